"""Special values: NaN and inf stay in their channel, constant channels, float16 overflow.

* A NaN or an inf in a channel gives that channel what NumPy gives (float64
  semantics: ``mean([1, inf]) == inf``, ``var([1, inf]) is NaN``) and leaves
  every other channel exactly as without it, in small (serial) and large
  (parallel) inputs, channels-first and channels-last, wherever in the
  channel the value sits (the first chunk, the middle, the last value).
* A constant channel has variance 0 and, with eps > 0, ``y == offset``.
* float16 data whose sum, or sum of squares, overflows float16 still gives
  the right statistics (accumulation is at least float32 / float64).
"""

import numpy as np
import pytest

import reference as ref

import fastbn as fbn

dtypes = pytest.mark.parametrize("dtype", ref.DTYPES, ids=lambda d: np.dtype(d).name)

#: id -> (shape, channel_axis): serial and parallel sizes, both loop nests; C = 6.
CASES = {
    "NCHW": ((4, 6, 5, 6), 1),
    "NCHW-parallel": ((8, 6, 96, 97), 1),    # > 2^18 values, several chunks per channel
    "NHWC": ((4, 5, 6, 6), -1),
    "NHWC-parallel": ((8, 96, 97, 6), -1),
    "NC": ((40, 6), 1),
    "NC-parallel": ((150000, 6), 1),
}
cases = pytest.mark.parametrize("shape,axis", list(CASES.values()), ids=list(CASES))
#: channel -> the special values put into it (+inf and -inf together make NaN);
#: channels 0 and 5 stay clean.
SPECIALS = {1: [np.nan], 2: [np.inf], 3: [-np.inf], 4: [np.inf, -np.inf]}
CLEAN = [0, 5]
#: Where in its channel (C order = memory order here) a special value sits: in the
#: first chunk / tile (merged into the others later), the middle, the last values.
POSITIONS = ("first", "middle", "last")


def _channel_positions(shape, axis, channel, where, k):
    """k indices of elements of ``channel``, at its start / middle / end (C order)."""
    nd = len(shape)
    ax = axis % nd
    other = [s for a, s in enumerate(shape) if a != ax]
    n = int(np.prod(other))
    start = {"first": 0, "middle": n // 2, "last": n - k}[where]
    out = []
    for flat in range(start, start + k):
        idx = list(np.unravel_index(flat, other))
        idx.insert(ax, channel)
        out.append(tuple(int(i) for i in idx))
    return out


def _data(rng, shape, axis, dtype, special=False, where="middle"):
    """Channel c ~ 0.5 + 3c + 2 randn; with ``special``, SPECIALS put in channels 1-4."""
    x = rng.standard_normal(shape) * 2.0 + 0.5
    x += ref.along(np.arange(shape[axis]) * 3.0, len(shape), axis)
    if special:
        for c, values in SPECIALS.items():
            for idx, v in zip(_channel_positions(shape, axis, c, where, len(values)), values):
                x[idx] = v
    return x.astype(dtype)


def _vecs(rng, C, dtype):
    pdt = ref.param_dtype(dtype)
    return (rng.uniform(0.5, 2.0, C).astype(pdt), rng.uniform(-1, 1, C).astype(pdt))


def _clean(v, axis, nd, channels, what):
    """No non-finite value of ``v`` (shape like x, or (C,)) lies in ``channels``."""
    v = np.asarray(v)
    bad = ~np.isfinite(v)
    bad = bad[channels] if v.ndim == 1 else np.take(bad, channels, axis=axis % nd)
    assert not bad.any(), f"{what}: a special value leaked into channels {channels}"


@cases
@pytest.mark.parametrize("where", POSITIONS)
@dtypes
def test_moments_and_train(backend, rng, shape, axis, where, dtype):
    """moments / batch_norm_train / running stats: channels 1-4 get NumPy's NaN or inf
    (mean inf, -inf or NaN; var NaN); channels 0 and 5 what they get without them."""
    x = _data(rng, shape, axis, dtype, special=True, where=where)
    nd = len(shape)
    axes = ref.reduced_axes(nd, axis)
    with np.errstate(invalid="ignore"):
        emean, evar = ref.moments(x, axes)
    assert np.isnan(evar[1:5]).all()
    assert list(emean[1:5].astype(str)) == ["nan", "inf", "-inf", "nan"]

    mean, var = fbn.moments(x, axes, backend=backend)
    ref.assert_close(mean, emean, "moments mean")  # non-finite values must match exactly
    ref.assert_close(var, evar, "moments var")

    scale, offset = _vecs(rng, 6, dtype)
    pdt = ref.param_dtype(dtype)
    rm, rv = np.zeros(6, pdt), np.ones(6, pdt)
    with np.errstate(invalid="ignore"):
        ey, em, einv, erm, erv = ref.batch_norm_train(x, scale, offset, axis, 1e-3, rm, rv, 0.1)
    y, m, inv = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, eps=1e-3,
                                     running_mean=rm, running_var=rv, backend=backend)
    ref.assert_close(m, em, "train mean")
    ref.assert_close(inv, einv, "train invstd")
    ref.assert_close(rm, erm, "running_mean")
    ref.assert_close(rv, erv, "running_var")
    assert np.isnan(np.take(y, [1, 2, 3, 4], axis=axis % nd)).all(), "y of channels 1-4: NaN"
    ref.assert_close(y, ey, "train y")
    _clean(y, axis, nd, CLEAN, "train y")


@pytest.mark.parametrize("shape,axis", [CASES["NCHW-parallel"], CASES["NHWC-parallel"],
                                        CASES["NC"]], ids=["NCHW-parallel", "NHWC-parallel", "NC"])
@dtypes
def test_infer_and_batch_normalization(backend, rng, shape, axis, dtype):
    """Elementwise: a special x value affects its own output value only; a special
    per-channel parameter affects its own channel only."""
    nd = len(shape)
    x = _data(rng, shape, axis, dtype, special=True)
    scale, offset = _vecs(rng, 6, dtype)
    pdt = ref.param_dtype(dtype)
    mean = (np.arange(6) * 3.0 + 0.5).astype(pdt)
    var = np.array([4.0, 2.0, 1.0, 3.0, 0.5, 2.5], pdt)
    with np.errstate(invalid="ignore"):
        ey = ref.batch_norm_infer(x, scale, offset, mean, var, axis, 1e-3)
    y = fbn.batch_norm_infer(x, scale, offset, mean, var, channel_axis=axis, eps=1e-3,
                             backend=backend)
    ref.assert_close(y, ey, "infer y")
    assert (~np.isfinite(y)).sum() == 5, "only the outputs of the 5 special values"
    kd = lambda v: ref.along(v, nd, axis).astype(pdt)  # noqa: E731
    y = fbn.batch_normalization(x, kd(mean), kd(var), kd(offset), kd(scale), 1e-3, backend=backend)
    ref.assert_close(y, ey, "batch_normalization y")

    # special values in one per-channel parameter (channels 1-3): those channels only
    x = _data(rng, shape, axis, dtype)
    for name in ("scale", "offset", "mean", "var"):
        p = dict(scale=scale.copy(), offset=offset.copy(), mean=mean.copy(), var=var.copy())
        p[name][1:4] = [np.nan, np.inf, -np.inf]
        with np.errstate(invalid="ignore"):
            ey = ref.batch_norm_infer(x, p["scale"], p["offset"], p["mean"], p["var"], axis, 1e-3)
        y = fbn.batch_norm_infer(x, p["scale"], p["offset"], p["mean"], p["var"], channel_axis=axis,
                                 eps=1e-3, backend=backend)
        ref.assert_close(y, ey, f"infer y, special {name}")
        _clean(y, axis, nd, [0, 4, 5], f"infer y, special {name}")


@cases
@pytest.mark.parametrize("into", ["dy", "x"])
@dtypes
def test_backward(backend, rng, shape, axis, into, dtype):
    """Special values in dy (or x) of channels 1-4: dscale, doffset and dx of those
    channels as the float64 formula gives them; channels 0 and 5 untouched."""
    nd = len(shape)
    x = _data(rng, shape, axis, dtype)
    dy = _data(rng, shape, axis, dtype)
    pdt = ref.param_dtype(dtype)
    _, m, inv, _, _ = ref.batch_norm_train(x, None, None, axis)
    m, inv = m.astype(pdt), inv.astype(pdt)
    if into == "dy":
        dy = _data(rng, shape, axis, dtype, special=True)
    else:
        x = _data(rng, shape, axis, dtype, special=True)
    scale = _vecs(rng, 6, dtype)[0]
    with np.errstate(invalid="ignore"):
        edx, eds, edo = ref.batch_norm_backward(dy, x, scale, m, inv, axis)
    dx, ds, do = fbn.batch_norm_backward(dy, x, scale, m, inv, channel_axis=axis, backend=backend)
    ref.assert_close(do, edo, "doffset")
    ref.assert_close(ds, eds, "dscale")
    ref.assert_close(dx, edx, "dx")
    for v, what in ((dx, "dx"), (ds, "dscale"), (do, "doffset")):
        _clean(v, axis, nd, CLEAN, what)


# -- constant channels ----------------------------------------------------------------

#: Constant values: a decimal that float16/32/64 cannot hold exactly, a large one,
#: a negative one, zero and a float16 subnormal.
CONSTANTS = [0.1, 1e6 + 0.1, -3.7, 0.0, 3e-6]


@cases
@pytest.mark.parametrize("value", CONSTANTS, ids=str)
@dtypes
def test_constant_channel(backend, rng, shape, axis, value, dtype):
    """Channel 1 constant: var 0, invstd 1/sqrt(eps), y == offset (not NaN) with eps > 0,
    dscale 0; channels 0 and 2 as the oracle gives them.

    Exact for float16/float32 data, whose float64 sums are exact.  float64 data
    (NumPy too) sums with rounding, so the mean may be off by a few ulps and
    y - offset = scale * invstd * (x - mean) is then ~1e-13 * |value| / sqrt(eps):
    bounded here, not zero.
    """
    if not np.isfinite(np.float64(value).astype(dtype)):
        pytest.skip(f"{value} overflows {np.dtype(dtype).name}")
    nd = len(shape)
    ax = axis % nd
    x = _data(rng, shape, axis, dtype)
    sl = [slice(None)] * nd
    sl[ax] = 1
    sl = tuple(sl)
    x[sl] = value
    v = float(x[sl].flat[0])  # the stored value
    scale, offset = _vecs(rng, 6, dtype)
    eps = 1e-3
    pdt = ref.param_dtype(dtype)
    axes = ref.reduced_axes(nd, axis)
    # how far float64 rounding may move channel 1's mean (0 for float16/float32 data)
    dm = 0.0 if dtype != np.float64 else 1e-12 * abs(v)
    others = [0, 2, 3, 4, 5]

    def same(got, want, tol, what):
        got = np.asarray(got, np.float64)
        assert np.all(np.abs(got - np.asarray(want, np.float64)) <= tol), f"{what}: {got} vs {want}"

    mean, var = fbn.moments(x, axes, backend=backend)
    same(mean[1], np.asarray(v, pdt), dm, "mean")
    same(var[1], 0.0, dm * dm, "var")
    y, m, inv = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, eps=eps, backend=backend)
    same(m[1], np.asarray(v, pdt), dm, "train mean")
    same(inv[1], np.asarray(1 / np.sqrt(eps), pdt), inv[1] * (1e-12 + dm * dm / eps), "invstd")
    yq = abs(float(scale[1]) / np.sqrt(eps)) * dm  # |q| * (mean error)
    same(y[sl], np.asarray(offset[1], dtype), yq + 1e-12 * abs(offset[1]), "y of channel 1")
    ey, *_ = ref.batch_norm_train(x, scale, offset, axis, eps)
    ref.assert_close(np.take(y, others, ax), np.take(ey, others, ax), "y of the other channels")
    # tf.nn style, from moments(keepdims=True): the same
    mk, vk = fbn.moments(x, axes, keepdims=True, backend=backend)
    kd = lambda a: ref.along(a, nd, axis).astype(pdt)  # noqa: E731
    y2 = fbn.batch_normalization(x, mk, vk, kd(offset), kd(scale), eps, backend=backend)
    same(y2[sl], np.asarray(offset[1], dtype), yq + 1e-12 * abs(offset[1]), "batch_normalization y")
    # backward: xhat == 0 in channel 1, so dscale[1] == 0
    dy = _data(rng, shape, axis, dtype)
    dx, ds, do = fbn.batch_norm_backward(dy, x, scale, m, inv, channel_axis=axis, backend=backend)
    same(ds[1], 0.0, np.sum(np.abs(dy[sl]), dtype=np.float64) * float(inv[1]) * dm, "dscale")
    edx, eds, edo = ref.batch_norm_backward(dy, x, scale, m, inv, axis)
    ref.assert_close(dx, edx, "dx")
    ref.assert_close(do, edo, "doffset")
    ref.assert_close(ds[others], eds[others], "dscale of the other channels")


# -- float16 overflow -------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((64, 3, 1024), 1), ((65536, 3), 1), ((4, 3, 2, 5), 1)],
                         ids=["NCL", "NC", "small"])
@pytest.mark.parametrize("level", [300.0, 6e4])
def test_float16_sums_that_overflow_float16(backend, rng, shape, axis, level):
    """float16 values ~300 (sum of squares ~6e9 per channel, float16 max 65504) and ~6e4
    (x**2 alone overflows; channel 2 alternates +-6e4 so x - mean is ~6e4 too):
    statistics, y and the backward sums as the float64 oracle gives them."""
    nd = len(shape)
    x = level + level * 0.1 * rng.standard_normal(shape)
    x = np.clip(x, -65000, 65000)
    sl = [slice(None)] * nd
    sl[axis] = 2
    x[tuple(sl)] = np.where(rng.random(x[tuple(sl)].shape) < 0.5, -6e4, 6e4)
    x = x.astype(np.float16)
    assert np.isfinite(x).all()
    axes = ref.reduced_axes(nd, axis)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.sum(x * x, axis=axes, dtype=np.float16)).all()  # would overflow
    emean, evar = ref.moments(x, axes)

    mean, var = fbn.moments(x, axes, backend=backend)
    assert mean.dtype == var.dtype == np.float32
    ref.assert_close(mean, emean, "mean")
    ref.assert_close(var, evar, "var")

    scale, offset = np.ones(3, np.float32), np.zeros(3, np.float32)
    rv = np.ones(3, np.float32)
    ey, em, einv, _, erv = ref.batch_norm_train(x, scale, offset, axis, 1e-5, None, rv, 0.5)
    y, m, inv = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, running_var=rv,
                                     momentum=0.5, backend=backend)
    assert np.isfinite(y).all()
    ref.assert_close(y, ey, "y")
    ref.assert_close(inv, einv, "invstd")
    ref.assert_close(rv, erv, "running_var")

    # sum(dy) ~ n * level overflows float16 too (dy = x would make dx cancel to ~0)
    dy = np.clip(level + level * 0.1 * rng.standard_normal(shape), -65000, 65000).astype(np.float16)
    edx, eds, edo = ref.batch_norm_backward(dy, x, scale, m, inv, axis)
    dx, ds, do = fbn.batch_norm_backward(dy, x, scale, m, inv, channel_axis=axis, backend=backend)
    assert np.isfinite(dx).all()
    ref.assert_close(do, edo, "doffset")
    ref.assert_close(ds, eds, "dscale")
    ref.assert_close(dx, edx, "dx")


# -- the other backends: Dask (chunks merged on the host) and CUDA (simulator) ----------

def test_dask_and_merge_moments_keep_inf_and_nan():
    """Dask's tree of Chan merges, and merge_moments of shards, give NumPy's inf / NaN
    for channels 1-4 (the special values in the first chunk) and leave 0 and 5 alone."""
    da = pytest.importorskip("dask.array")
    x = _data(np.random.default_rng(3), (40, 6, 10), 1, np.float32, special=True, where="first")
    emean, evar = ref.moments(x, (0, 2))
    with np.errstate(invalid="ignore"):
        mean, var = fbn.moments(da.from_array(x, chunks=(10, 6, 5)), (0, 2))
        ref.assert_close(mean.compute(), emean, "dask mean")
        ref.assert_close(var.compute(), evar, "dask var")
        parts = [fbn.partial_moments(x[i:i + 10], channel_axis=1) for i in range(0, 40, 10)]
        merged = fbn.merge_moments(*parts)
    ref.assert_close(merged.mean, emean, "merge_moments mean")
    ref.assert_close(merged.m2 / merged.count, evar, "merge_moments var")


_CUDA_SIM_SCRIPT = """
import sys
import numpy as np
from numba import cuda
sys.path.insert(0, {tests!r})
import test_special_values as tsv
import reference as ref
import fastbn as fbn
from fastbn.kernels import cuda_numba as K
K.TPB, K.TARGET_BLOCKS, K.MIN_PER_THREAD, K.ROWS_MIN_INNER = 8, 16, 1, 8  # multi-block, tiny
rng = np.random.default_rng(0)
for shape, axis in [((5, 6, 40), 1), ((60, 6), 1)]:
    for where in ("first", "last"):
        x = tsv._data(rng, shape, axis, np.float32, special=True, where=where)
        axes = ref.reduced_axes(x.ndim, axis)
        mean, var = fbn.moments(cuda.to_device(x), axes)
        emean, evar = ref.moments(x, axes)
        ref.assert_close(mean.copy_to_host(), emean, f"cuda mean {{shape}} {{where}}")
        ref.assert_close(var.copy_to_host(), evar, f"cuda var {{shape}} {{where}}")
print("ok")
"""


@pytest.mark.integration
def test_cuda_simulator_keeps_inf_and_nan():
    """The numba.cuda kernels (under the CUDA simulator, in a subprocess): NumPy's inf /
    NaN per channel, wherever the special value sits (a block's first value is its pivot)."""
    import os
    import subprocess
    import sys
    try:
        import numba.cuda  # noqa: F401
    except ImportError:
        pytest.skip("numba.cuda is not importable")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", _CUDA_SIM_SCRIPT.format(tests=tests)], env=env,
                          capture_output=True, text=True, timeout=600, cwd="/")
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]


# -- results independent of path and backend (issue 14 item 5) -----------------------
# The kernels' primitives directly, on each compiled backend: moments3 (the general
# path's statistics, every loop nest: long and short channels-first runs, folded
# runs, channels-last, strided views) and train_small3 (the fused small path).

def _kernel_modules():
    mods = []
    from fastbn.kernels import cpu_cython
    try:
        from fastbn.kernels import cpu_numba
        mods.append(pytest.param(cpu_numba, id="numba"))
    except ImportError:
        mods.append(pytest.param(None, id="numba", marks=pytest.mark.skip("no Numba")))
    mods.append(pytest.param(cpu_cython, id="cython", marks=pytest.mark.skipif(
        cpu_cython.unavailable_reason() is not None, reason="Cython extension not built")))
    return mods


kernel_mods = pytest.mark.parametrize("bk", _kernel_modules())
#: (O, C, I) canonical shapes: short runs (I <= 64: folded on Cython), long runs,
#: several chunks per run, channels-last (small and parallel-size).
SHAPES3 = [(5, 3, 7), (6, 5, 64), (9, 7, 65), (3, 4, 33), (2, 3, 9000), (40, 6, 1),
           (70000, 4, 1)]
FLOAT64_CONSTANTS = [0.1, 1 / 3, 1e6 + 0.1, -3.7, 1.7e308, -1.7e308, 2.5e-310]


def _views(x):
    """x itself, its Fortran-order copy and a strided view holding the same values."""
    big = np.full((x.shape[0], x.shape[1], 2 * x.shape[2]), np.nan)
    big[:, :, ::2] = x
    return [x, np.asfortranarray(x), big[:, :, ::2]]


@kernel_mods
@pytest.mark.parametrize("shape3", SHAPES3, ids=str)
@pytest.mark.parametrize("value", FLOAT64_CONSTANTS, ids=str)
def test_constant_float64_channel_is_exact_on_every_path(bk, shape3, value):
    """A constant float64 channel: mean exactly the constant and m2 exactly 0, on every
    loop nest and memory layout (1.7e308 neither overflows to inf nor gives NaN)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape3) * 3.0 + 1.0
    x[:, 1, :] = value
    n = shape3[0] * shape3[2]
    xm = np.delete(x, 1, axis=1).transpose(1, 0, 2).reshape(shape3[1] - 1, -1)
    for v in _views(x):
        m, m2 = bk.moments3(v)
        assert m[1] == value and m2[1] == 0.0, (m[1], m2[1])
        np.testing.assert_allclose(np.delete(m, 1), xm.mean(axis=1), rtol=1e-12)
        np.testing.assert_allclose(np.delete(m2, 1) / n, xm.var(axis=1), rtol=1e-10)


@kernel_mods
@pytest.mark.parametrize("shape3", [(5, 3, 7), (6, 5, 64), (4, 6, 300), (40, 6, 1),
                                    (300, 30, 1)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("value", [0.1, 1 / 3, 1e6 + 0.1, -3.7, 1.7e38], ids=str)
@pytest.mark.parametrize("eps", [0.0, 1e-5], ids=lambda e: f"eps{e}")
def test_train_small_constant_channel(bk, shape3, dtype, value, eps):
    """The fused small path on a constant channel: mean == the constant, y == offset
    exactly; with eps = 0, invstd == 0 (var + eps == 0: PyTorch's rule), never NaN.
    The other channels as the float64 reference gives them."""
    rng = np.random.default_rng(11)
    C = shape3[1]
    x = (rng.standard_normal(shape3) * 2 + 0.5).astype(dtype)
    x[:, 1, :] = value
    v = x[0, 1, 0]
    scale = rng.uniform(0.5, 2, C).astype(dtype)
    offset = rng.uniform(-1, 1, C).astype(dtype)
    out = np.empty_like(x)
    mean, inv = np.empty(C, dtype), np.empty(C, dtype)
    bk.train_small3(x, scale, offset, eps, 0.1, None, None, out, mean, inv)
    assert mean[1] == v
    assert np.all(out[:, 1, :] == offset[1]), out[:, 1, :].ravel()[:4]
    if eps == 0.0:
        assert inv[1] == 0.0
    else:
        assert inv[1] == np.asarray(1 / np.sqrt(eps), dtype)
    x64 = x.astype(np.float64)
    m = x64.mean(axis=(0, 2))
    var = x64.var(axis=(0, 2))
    with np.errstate(divide="ignore", invalid="ignore"):  # channel 1 with eps = 0
        want = ((x64 - m[None, :, None]) / np.sqrt(var + eps)[None, :, None] * scale[None, :, None]
                + offset[None, :, None])
    tol = 1e-5 if dtype == np.float32 else 1e-12
    others = [c for c in range(C) if c != 1]
    np.testing.assert_allclose(out[:, others], want[:, others], rtol=tol, atol=tol)


@kernel_mods
@pytest.mark.parametrize("shape3", SHAPES3, ids=str)
def test_float64_near_1e300_gives_inf_variance_not_nan(bk, shape3):
    """Finite float64 data whose squares overflow: m2 = inf where NumPy's var is inf,
    never NaN; the mean as NumPy's."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape3) * 1e300
    x[:, 0, :] = rng.standard_normal((shape3[0], shape3[2])) * 1e100   # a finite channel
    with np.errstate(over="ignore", invalid="ignore"):
        want_var = x.var(axis=(0, 2))
        want_mean = x.mean(axis=(0, 2))
    for v in _views(x):
        m, m2 = bk.moments3(v)
        assert not np.isnan(m2).any(), m2
        np.testing.assert_array_equal(np.isinf(m2), np.isinf(want_var))
        np.testing.assert_allclose(m, want_mean, rtol=1e-9, atol=1e-9 * 1e300)
        np.testing.assert_allclose(m2[0] / (shape3[0] * shape3[2]), want_var[0], rtol=1e-9)

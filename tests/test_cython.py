"""Tests specific to the Cython backend ("cython").

The public API is tested over every CPU backend by the ``backend`` fixture
(conftest.py); this file covers what only the compiled backend has:

* the fallback really works without Numba: separate processes in which
  ``import numba`` fails (a meta-path blocker) or ``FASTBN_DISABLE_NUMBA=1``;
  and with the compiled module missing too, a NumPy fallback, no ImportError;
* its loop nests (channels-first runs, channels-last tiles and channel blocks,
  the folded small-inner path) on inputs made small by shrinking the tile
  sizes, against the float64 NumPy kernels, for float16/32/64;
* float16 conversion in C: every half bit pattern round-trips, and float64 ->
  half rounds once to nearest-even exactly as NumPy does;
* memory the typed memoryviews cannot take directly (unaligned, read-only,
  zero strides), in-place output, results independent of the thread count;
* the fused small-input kernels: training, and inference and backward as the
  fast lane runs them (each loop nest), against the oracle and the general path.
"""

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastbn
import fastbn.layout
import reference as oracle
from fastbn.kernels import reference as np_kernels

cy = pytest.importorskip("fastbn.kernels.cpu_cython")
if cy.unavailable_reason() is not None:
    pytest.skip(cy.unavailable_reason(), allow_module_level=True)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
#: Kernel results against the float64 NumPy kernels; elementwise outputs are
#: rounded once from float64 on both sides, so they must agree to an ulp.
KERNEL_RTOL = {np.float16: 1e-3, np.float32: 1e-6, np.float64: 1e-12}


# -- separate processes: no Numba ----------------------------------------------------

BLOCKER = """
import importlib.abc, sys
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {blocked!r}):
            raise ImportError(f"{{name}} is blocked by the test")
        return None
sys.meta_path.insert(0, _Blocker())
"""

CHECK = """
import warnings
import numpy as np
sys.path.insert(0, {tests!r})
import fastbn
import reference as oracle

rng = np.random.default_rng(7)
x = (3.0 + rng.standard_normal((6, 5, 7, 9))).astype(np.float32)
dy = rng.standard_normal(x.shape).astype(np.float32)
scale, offset = rng.standard_normal(5), rng.standard_normal(5)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    chosen = fastbn.backend_for(x)
    y, mean, invstd = fastbn.batch_norm_train(x, scale.astype(np.float32),
                                              offset.astype(np.float32), channel_axis=1)
    dx, dscale, doffset = fastbn.batch_norm_backward(dy, x, scale.astype(np.float32), mean,
                                                     invstd, channel_axis=1)
    m, v = fastbn.moments(x, (0, 2, 3))
ey, emean, einvstd = oracle.batch_norm_train(x, scale.astype(np.float32),
                                             offset.astype(np.float32), channel_axis=1)[:3]
edx, edscale, edoffset = oracle.batch_norm_backward(dy, x, scale.astype(np.float32), mean,
                                                    invstd, channel_axis=1)
for got, want, what in [(y, ey, "y"), (mean, emean, "mean"), (invstd, einvstd, "invstd"),
                        (dx, edx, "dx"), (dscale, edscale, "dscale"),
                        (doffset, edoffset, "doffset"), (m, emean, "moments mean")]:
    oracle.assert_close(got, want, what)
print("CHOSEN", chosen)
print("NUMBA_LOADED", "numba" in sys.modules)
print("WARNINGS", len([w for w in caught if issubclass(w.category, RuntimeWarning)]))
print("BACKENDS", fastbn.backends())
"""


def run_python(code, timeout=300, **env):
    """Run ``code`` in a fresh interpreter; return its stdout (fails on a non-zero exit)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FASTBN_")}
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


@pytest.mark.integration
def test_without_numba_cython_is_chosen_and_matches():
    out = run_python(BLOCKER.format(blocked=("numba",)) + CHECK.format(tests=TESTS_DIR))
    assert out["CHOSEN"] == "cython"
    assert out["NUMBA_LOADED"] == "False"
    assert out["WARNINGS"] == "0"
    backends = eval(out["BACKENDS"])  # noqa: S307 - our own repr of a dict of str
    assert backends["cython"] == "available"
    assert "numba" in backends["numba"] and backends["numba"] != "available"


@pytest.mark.integration
def test_fastbn_disable_numba_chooses_cython():
    out = run_python("import sys\n" + CHECK.format(tests=TESTS_DIR), FASTBN_DISABLE_NUMBA="1")
    assert out["CHOSEN"] == "cython"
    assert eval(out["BACKENDS"])["numba"] == "disabled by FASTBN_DISABLE_NUMBA"  # noqa: S307


@pytest.mark.integration
def test_without_numba_and_extension_numpy_fallback_warns_once():
    blocked = ("numba", "fastbn.kernels._cython_kernels")
    out = run_python(BLOCKER.format(blocked=blocked) + CHECK.format(tests=TESTS_DIR))
    assert out["CHOSEN"] == "numpy"
    assert out["WARNINGS"] == "1"
    reason = eval(out["BACKENDS"])["cython"]  # noqa: S307
    assert reason.startswith("compiled extension fastbn.kernels._cython_kernels not built")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_forked_child_after_parallel_region_does_not_hang():
    """libgomp cannot start threads in a child forked after a parallel region;
    the backend must notice the fork and run serially instead of hanging."""
    code = textwrap.dedent("""
        import os, numpy as np
        from fastbn.kernels import cpu_cython as cy
        x = np.random.default_rng(0).standard_normal((64, 8, 4096)).astype(np.float32)
        assert cy._threads(x.size) > 1 or cy._ck.max_threads() == 1
        want = cy.moments3(x)                      # parent: a parallel region
        pid = os.fork()
        if pid == 0:
            got = cy.moments3(x)
            os._exit(0 if all((a == b).all() for a, b in zip(got, want)) else 3)
        _, status = os.waitpid(pid, 0)
        print("CHILD", os.waitstatus_to_exitcode(status))
    """)
    assert run_python(code, timeout=120)["CHILD"] == "0"


# -- loop nests against the NumPy kernels ------------------------------------------------

@pytest.fixture
def small_tiles(monkeypatch):
    """Tile sizes shrunk so small inputs take every path: many runs per row,
    many tiles, several channel blocks and row groups, two threads."""
    monkeypatch.setattr(cy, "CHUNK", 7)
    monkeypatch.setattr(cy, "TILE", 24)
    monkeypatch.setattr(cy, "CBLOCK", 5)
    monkeypatch.setattr(cy, "TASK", 64)
    monkeypatch.setattr(cy, "SERIAL_BELOW", 0)


def strided(base, how):
    """A view of ``base`` with the memory layout ``how``."""
    if how == "C":
        return base
    if how == "F":
        return np.asfortranarray(base)
    if how == "gaps":  # every axis strided, NaN in the gaps
        big = np.full([2 * s + 1 for s in base.shape], np.nan, dtype=base.dtype)
        view = big[1::2, 1::2, 1::2]
        view[...] = base
        return view
    if how == "negative":
        return np.ascontiguousarray(base[::-1, ::-1, ::-1])[::-1, ::-1, ::-1]
    raise ValueError(how)


SHAPES = {
    "channels-first": (5, 3, 40),       # I > FOLD_MAX: runs of CHUNK
    "channels-last": (37, 12, 1),       # tiles x channel blocks x row groups
    "folded": (9, 4, 6),                # 1 < I <= FOLD_MAX: viewed as (O, C*I, 1)
    "one-channel": (3, 1, 100),         # C = 1 still splits into runs
    "one-row": (1, 11, 1),
}


def assert_kernel_close(got, want, dtype, what):
    want = np.asarray(want, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    scale = np.max(np.abs(want[np.isfinite(want)]), initial=1.0)
    tol = KERNEL_RTOL[dtype] * (np.abs(want) + scale)
    ok = (np.abs(got - want) <= tol) | (np.isnan(got) & np.isnan(want))
    assert ok.all(), f"{what}: max error {np.nanmax(np.abs(got - want))} (dtype {np.dtype(dtype)})"


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("how", ["C", "F", "gaps", "negative"])
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_primitives_match_numpy_kernels(small_tiles, rng, case, how, dtype):
    shape = SHAPES[case]
    C = shape[1]
    spread = 1 + np.arange(C)[:, None]      # channels differ: a mixed-up channel fails
    x3 = strided((1e3 + rng.standard_normal(shape) * spread).astype(dtype), how)
    u3 = strided(rng.standard_normal(shape).astype(dtype), how)
    m, q, r, p = (rng.standard_normal(C) for _ in range(4))
    m += 1e3

    mean, m2 = cy.moments3(x3)
    emean, em2 = np_kernels.moments3(x3)
    assert_kernel_close(mean, emean, np.float64, "mean")
    assert_kernel_close(m2, em2, np.float64, "m2")

    for args in [(), (u3, p)]:
        out = strided(np.zeros(shape, dtype), how)
        expected = np.empty(shape, dtype)
        cy.affine3(x3, m, q, r, out, *args)
        np_kernels.affine3(x3, m, q, r, expected, *args)
        # Both evaluate in float64 and round once: equal, up to an FMA's last bit.
        assert_kernel_close(out, expected, dtype, f"affine3 with {len(args)} extra args")

    s1, s2 = cy.dy_sums3(u3, x3, m)
    e1, e2 = np_kernels.dy_sums3(u3, x3, m)
    assert_kernel_close(s1, e1, np.float64, "sum dy")
    assert_kernel_close(s2, e2, np.float64, "sum dy*(x-m)")


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_same_result_on_any_thread_count(small_tiles, monkeypatch, rng, case):
    """The work split depends on the shape only and no accumulator is shared,
    so one thread and two threads give bit-identical results."""
    x3 = rng.standard_normal(SHAPES[case]).astype(np.float32) + 100
    g3 = rng.standard_normal(SHAPES[case]).astype(np.float32)
    m = np.full(x3.shape[1], 100.0)
    results = []
    for threads in (1, 2):
        monkeypatch.setattr(cy, "_threads", lambda size, t=threads: t)
        results.append(cy.moments3(x3) + cy.dy_sums3(g3, x3, m))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# -- float16 conversion in C ---------------------------------------------------------

def test_float16_every_bit_pattern_round_trips():
    """out = 1*(x - 0) + (-0) converts each half to float64 and back: identity
    (adding -0, not +0, keeps the sign of -0)."""
    bits = np.arange(1 << 16, dtype=np.uint16).reshape(256, 1, 256)
    x = bits.view(np.float16)
    out = np.empty_like(x)
    cy.affine3(x, np.zeros(1), np.ones(1), np.full(1, -0.0), out)
    nan = np.isnan(x)
    assert np.array_equal(out.view(np.uint16)[~nan], bits[~nan])
    assert np.isnan(out[nan]).all()
    # The statistics read the same values: each finite half is a channel.
    finite = x[np.isfinite(x)].reshape(4, -1, 1)
    for got, want in zip(cy.moments3(finite), np_kernels.moments3(finite)):
        assert_kernel_close(got, want, np.float64, "moments of every finite half")


def test_float64_to_float16_rounds_once_like_numpy(rng):
    """x = 1, m = 0, r = -0: out = half(q) straight from float64, as NumPy rounds."""
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float64)
    finite.sort()
    mids = (finite[:-1] + finite[1:]) / 2          # exact ties: round to even
    values = np.concatenate([
        mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf),
        rng.standard_normal(20000) * 10.0 ** rng.integers(-9, 6, 20000),
        [0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e300, -1e300, 2.0 ** -25, 2.0 ** -26,
         5.9e-8, np.inf, -np.inf, np.nan]])
    x = np.ones((1, values.size, 1), dtype=np.float16)
    out = np.empty_like(x)
    cy.affine3(x, np.zeros(values.size), values, np.full(values.size, -0.0), out)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    got = out.ravel()
    nan = np.isnan(expected)
    assert np.array_equal(got.view(np.uint16)[~nan], expected.view(np.uint16)[~nan])
    assert np.isnan(got[nan]).all()


# -- memory the memoryviews cannot take as is ----------------------------------------

def unaligned(a):
    """A copy of ``a`` whose data pointer is not aligned to its item size."""
    buf = np.empty(a.nbytes + 1, dtype=np.uint8)
    view = buf[1:].view(a.dtype).reshape(a.shape)
    view[...] = a
    assert not view.flags.aligned
    return view


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unaligned_input_and_output(rng, dtype):
    x3 = rng.standard_normal((4, 3, 50)).astype(dtype)
    xu = unaligned(x3)
    out = unaligned(np.zeros_like(x3))
    m, q, r = rng.standard_normal(3), rng.standard_normal(3), rng.standard_normal(3)
    for got, want in zip(cy.moments3(xu), np_kernels.moments3(x3)):
        assert_kernel_close(got, want, np.float64, "moments of unaligned x")
    assert cy.affine3(xu, m, q, r, out) is out
    expected = np.empty_like(x3)
    np_kernels.affine3(x3, m, q, r, expected)
    assert_kernel_close(out, expected, dtype, "affine3 into unaligned out")


def test_read_only_and_broadcast_input(rng):
    x3 = rng.standard_normal((6, 4, 30)).astype(np.float32)
    x3.flags.writeable = False
    bcast = np.broadcast_to(rng.standard_normal((1, 4, 1)).astype(np.float32), (6, 4, 30))
    for a in (x3, bcast):
        for got, want in zip(cy.moments3(a), np_kernels.moments3(a)):
            assert_kernel_close(got, want, np.float64, "moments")
        m, q, r = np.ones(4), np.full(4, 2.0), np.zeros(4)
        out = np.empty(a.shape, np.float32)
        expected = np.empty_like(out)
        cy.affine3(a, m, q, r, out)
        np_kernels.affine3(a, m, q, r, expected)
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("shape", [(3, 4, 500), (300, 4, 1), (20, 4, 9)])
def test_affine_in_place(rng, shape):
    x3 = rng.standard_normal(shape).astype(np.float32)
    u3 = rng.standard_normal(shape).astype(np.float32)
    m, q, r, p = (rng.standard_normal(shape[1]) for _ in range(4))
    expected = np.empty_like(x3)
    np_kernels.affine3(x3, m, q, r, expected, u3, p)
    cy.affine3(x3, m, q, r, x3, u3, p)
    assert_kernel_close(x3, expected, np.float32, "in place")


def test_nan_stays_in_its_channel(rng):
    x3 = rng.standard_normal((8, 3, 300)).astype(np.float32)
    x3[5, 1, 17] = np.nan
    for y in (x3, np.ascontiguousarray(x3.transpose(0, 2, 1)).reshape(-1, 3, 1)):
        mean, m2 = cy.moments3(y)
        assert np.isnan(mean[1]) and np.isnan(m2[1])
        assert np.isfinite(mean[[0, 2]]).all() and np.isfinite(m2[[0, 2]]).all()


def test_empty_and_zero_channel_inputs():
    mean, m2 = cy.moments3(np.empty((0, 3, 4), np.float32))
    assert mean.shape == (3,) and np.isnan(mean).all()
    assert cy.moments3(np.empty((2, 0, 4), np.float32))[0].shape == (0,)
    out = np.empty((0, 3, 1), np.float32)
    assert cy.affine3(out, np.zeros(3), np.ones(3), np.zeros(3), out) is out
    s1, s2 = cy.dy_sums3(out, out, np.zeros(3))
    assert (s1 == 0).all() and (s2 == 0).all()


def test_threads_calling_at_once_get_their_own_results(rng):
    """The kernels release the GIL and share no state between calls."""
    arrays = [rng.standard_normal((16, 8, 1000)).astype(np.float32) + k for k in range(6)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(cy.moments3, arrays * 3))
    for a, (mean, m2) in zip(arrays * 3, results):
        emean, em2 = np_kernels.moments3(a)
        assert_kernel_close(mean, emean, np.float64, "mean")
        assert_kernel_close(m2, em2, np.float64, "m2")


# -- the fused small-input path ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape, axis", [((16, 4), 1), ((300, 30), 1), ((6, 3, 5, 7), 1),
                                         ((4, 6, 5), 2), ((3, 2, 5000), 1)])
@pytest.mark.parametrize("affine", [True, False])
def test_train_small3_matches_oracle(rng, shape, axis, dtype, affine):
    """train_small3 (one serial call; runs of CHUNK when inner is long) against the oracle."""
    x = (5 + rng.standard_normal(shape)).astype(dtype)
    C = shape[axis]
    pdt = np.float32 if dtype == np.float16 else dtype   # float16: float32 vectors, x as is
    x3 = x.reshape(int(np.prod(shape[:axis])), C, -1)
    scale = rng.standard_normal(C).astype(pdt) if affine else None
    offset = rng.standard_normal(C).astype(pdt) if affine else None
    rm, rv = rng.standard_normal(C).astype(pdt), rng.random(C).astype(pdt)
    erm, erv = rm.copy(), rv.copy()
    out, mean, invstd = np.empty_like(x3), np.empty(C, pdt), np.empty(C, pdt)
    cy.train_small3(x3, scale, offset, 1e-5, 0.1, rm, rv, out, mean, invstd)
    ey, emean, einvstd, erm, erv = oracle.batch_norm_train(
        x, scale, offset, channel_axis=axis, running_mean=erm, running_var=erv)
    for got, want, what in [(out.reshape(shape), ey, "y"), (mean, emean, "mean"),
                            (invstd, einvstd, "invstd"), (rm, erm, "running_mean"),
                            (rv, erv, "running_var")]:
        oracle.assert_close(got, want, what)


def test_small_inputs_take_the_fused_path(monkeypatch):
    calls = []
    monkeypatch.setattr(cy, "train_small3", lambda *a: calls.append(a) or None)
    fastbn.batch_norm_train(np.ones((8, 3), np.float32), channel_axis=-1, backend="cython")
    assert len(calls) == 1


#: (shape of a C-contiguous array, the transpose that gives its (N, C, ...) view or
#: None): a case for each loop nest of the fused inference and backward kernels.
FUSED_CASES = {
    "runs": ((3, 5, 7, 9), None),             # I = 63 > FUSED_FOLD: a run per (o, c)
    "runs-few-rows": ((2, 6, 3, 3), None),    # short runs, too few rows to fold
    "folded": ((43, 3, 2, 2), None),           # I = 4: rows of C*I = 12, 8 to a wide row
    "matrix": ((37, 12), None),                # (N, C): 8 rows to a wide row, 5 left over
    "wide-channels": ((3, 300), None),         # rows of C > 256: not widened
    "channels-last": ((5, 3, 3, 6), (0, 3, 1, 2)),   # NHWC memory seen as NCHW
    "few-rows": ((3, 11), None),               # fewer rows than a wide row takes
}


def _fused_inputs(make_array, case, dtype):
    """(x, dy) of ``case`` in FUSED_CASES, channel axis 1; channels differ in mean."""
    shape, order = FUSED_CASES[case]
    x = make_array(shape, dtype, channel_axis=1 if order is None else -1)
    dy = make_array(shape, dtype)
    if order is not None:
        x, dy = x.transpose(order), dy.transpose(order)
    return x, dy


def _spy_fused(monkeypatch):
    """Count the calls of cy.infer_small3 / cy.backward_small3 (which still run)."""
    calls = {"infer_small3": 0, "backward_small3": 0}
    for name in calls:
        def spy(*args, _real=getattr(cy, name), _name=name):
            calls[_name] += 1
            return _real(*args)
        monkeypatch.setattr(cy, name, spy)
    return calls


def _general(monkeypatch, func, *args, **kw):
    """``func`` on the Cython backend without its fused inference and backward
    kernels: the primitives (affine3, dy_sums3) with fastbn.core's coefficients."""
    with monkeypatch.context() as mp:
        mp.delattr(cy, "infer_small3")
        mp.delattr(cy, "backward_small3")
        mp.delattr(cy, "infer_backward_small3")
        return func(*args, backend="cython", **kw)


#: dtypes of (mean, var and invstd, scale, offset); None: the per-channel dtype.
#: "mixed" takes the kernels' conversion of vectors that differ within a pair.
FUSED_VECTORS = {"float32": (np.float32, np.float32, None, None),
                 "float64": (np.float64, np.float64, None, None),
                 "mixed": (np.float64, np.float16, np.float64, np.float16)}


@pytest.mark.parametrize("vectors", sorted(FUSED_VECTORS))
@pytest.mark.parametrize("case", sorted(FUSED_CASES))
@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: np.dtype(d).name)
def test_fused_infer_and_backward_through_the_lane(monkeypatch, make_array, rng, dtype, case,
                                                   vectors):
    """With Cython the default backend, batch_norm_infer / batch_norm_backward on
    small NumPy arrays run cy.infer_small3 / cy.backward_small3 (the fast lane):
    the oracle's numbers and the general path's (its own kernels) to an ulp, with
    and without scale/offset, into a new array, x or dy; statistics in float32 or
    float64 whatever x's dtype, and vectors of mixed dtypes."""
    calls = _spy_fused(monkeypatch)
    x, dy = _fused_inputs(make_array, case, dtype)
    C, pdt = x.shape[1], oracle.param_dtype(dtype)
    mdt, vdt, sdt, odt = (d or pdt for d in FUSED_VECTORS[vectors])
    bmean, bvar = oracle.moments(x, oracle.reduced_axes(x.ndim, 1))
    mean = (bmean + 0.3 * rng.standard_normal(C)).astype(mdt)
    var = (bvar * rng.uniform(0.5, 2, C)).astype(vdt)
    invstd = (1 / np.sqrt(bvar + 1e-3)).astype(vdt)
    bmean = bmean.astype(mdt)
    for affine in (True, False):
        scale = rng.uniform(0.5, 2, C).astype(sdt) if affine else None
        offset = rng.uniform(-1, 1, C).astype(odt) if affine else None
        want_y = oracle.batch_norm_infer(x, scale, offset, mean, var, eps=1e-3)
        want_b = oracle.batch_norm_backward(dy, x, scale, bmean, invstd)
        general_y = _general(monkeypatch, fastbn.batch_norm_infer, x, scale, offset, mean, var,
                             eps=1e-3)
        general_b = _general(monkeypatch, fastbn.batch_norm_backward, dy, x, scale, bmean, invstd)
        for out in (None, "x", "dy"):
            xy, xb, dyb = x.copy(order="K"), x.copy(order="K"), dy.copy(order="K")
            target = {"x": xb, "dy": dyb}.get(out)
            before = dict(calls)
            with fastbn.use_backend("cython"):
                y = fastbn.batch_norm_infer(xy, scale, offset, mean, var, eps=1e-3,
                                            out=xy if out == "x" else None)
                got_b = fastbn.batch_norm_backward(dyb, xb, scale, bmean, invstd, out=target)
            assert calls == {"infer_small3": before["infer_small3"] + 1,
                             "backward_small3": before["backward_small3"] + 1}, calls
            assert y.dtype == dtype and y.shape == x.shape
            assert (y is xy) == (out == "x") and (got_b[0] is target) == (out is not None)
            oracle.assert_close(y, want_y, "y")
            assert_kernel_close(y, general_y, dtype, "y against the general path")
            for got, want, general, what in zip(got_b, want_b, general_b,
                                                ("dx", "dscale", "doffset")):
                assert got.dtype == (dtype if what == "dx" else pdt), what
                oracle.assert_close(got, want, what)
                assert_kernel_close(got, general, got.dtype.type, what + " against the general path")


@pytest.mark.parametrize("case", sorted(FUSED_CASES))
@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: np.dtype(d).name)
def test_fused_infer_backward_through_the_lane(monkeypatch, make_array, rng, dtype, case):
    """With Cython the default backend, batch_norm_infer_backward on small NumPy
    arrays runs cy.infer_backward_small3 (backward_small's frozen mode): the
    oracle's numbers (dx = scale/sqrt(var + eps)*dy, dscale = sum(dy*(x - mean))
    /sqrt(var + eps), doffset = sum(dy)) and the general path's to an ulp."""
    calls = []
    real = cy.infer_backward_small3
    monkeypatch.setattr(cy, "infer_backward_small3", lambda *a: calls.append(1) or real(*a))
    x, dy = _fused_inputs(make_array, case, dtype)
    C, pdt = x.shape[1], oracle.param_dtype(dtype)
    axes = oracle.reduced_axes(x.ndim, 1)
    mean = (oracle.moments(x, axes)[0] + 0.3 * rng.standard_normal(C)).astype(pdt)
    var = rng.uniform(0.5, 2, C).astype(pdt)
    for scale in (rng.uniform(0.5, 2, C).astype(pdt), None):
        inv = 1 / np.sqrt(var.astype(np.float64) + 1e-3)
        a = inv if scale is None else scale * inv
        xc = oracle.f64(x) - oracle.along(mean, x.ndim, 1)
        want = (oracle.f64(dy) * oracle.along(a, x.ndim, 1), (oracle.f64(dy) * xc).sum(axis=axes) * inv,
                oracle.f64(dy).sum(axis=axes))
        magnitude = (0.0, oracle.abs_reduction(oracle.f64(dy) * xc, axes) * inv,
                     oracle.abs_reduction(dy, axes))
        general = _general(monkeypatch, fastbn.batch_norm_infer_backward, dy, x, scale, mean, var,
                           eps=1e-3)
        n = len(calls)
        with fastbn.use_backend("cython"):
            got = fastbn.batch_norm_infer_backward(dy, x, scale, mean, var, eps=1e-3)
        assert len(calls) == n + 1
        for g, w, gen, mag, what in zip(got, want, general, magnitude, ("dx", "dscale", "doffset")):
            assert g.dtype == (dtype if what == "dx" else pdt), what
            oracle.assert_close(g, w, what, magnitude=mag)
            assert_kernel_close(g, gen, g.dtype.type, what + " against the general path")


@pytest.mark.parametrize("case", sorted(FUSED_CASES))
@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: np.dtype(d).name)
def test_fused_nan_stays_in_its_channel(monkeypatch, make_array, rng, dtype, case):
    """Through the lane: a NaN mean makes its channel of y NaN, a NaN value of x
    only its own y; in the backward a NaN in dy makes its channel's dx, dscale and
    doffset NaN, one in x its channel's dx and dscale.  Every other value as the
    general path gives it (finite)."""
    calls = _spy_fused(monkeypatch)
    x, dy = _fused_inputs(make_array, case, dtype)
    C = x.shape[1]
    mean, var = oracle.moments(x, oracle.reduced_axes(x.ndim, 1))
    invstd = 1 / np.sqrt(var + 1e-3)
    at = (x.shape[0] - 1, 2) + tuple(s // 2 for s in x.shape[2:])   # in channel 2
    x[at] = np.nan
    dy[(0, 1) + (0,) * (x.ndim - 2)] = np.nan                        # in channel 1
    mean_nan = mean.copy()
    mean_nan[0] = np.nan
    with fastbn.use_backend("cython"):
        y = fastbn.batch_norm_infer(x, None, None, mean_nan, var, eps=1e-3)
        dx, dscale, doffset = fastbn.batch_norm_backward(dy, x, None, mean, invstd)
    assert calls == {"infer_small3": 1, "backward_small3": 1}
    nan_y = np.zeros(x.shape, bool)
    nan_y[:, 0] = True
    nan_y[at] = True
    np.testing.assert_array_equal(np.isnan(y), nan_y)
    nan_dx = np.zeros(x.shape, bool)
    nan_dx[:, 1:3] = True
    np.testing.assert_array_equal(np.isnan(dx), nan_dx)
    np.testing.assert_array_equal(np.isnan(dscale), np.isin(np.arange(C), (1, 2)))
    np.testing.assert_array_equal(np.isnan(doffset), np.arange(C) == 1)
    general_y = _general(monkeypatch, fastbn.batch_norm_infer, x, None, None, mean_nan, var,
                         eps=1e-3)
    assert_kernel_close(y, general_y, dtype, "y")
    general_b = _general(monkeypatch, fastbn.batch_norm_backward, dy, x, None, mean, invstd)
    for got, general, what in zip((dx, dscale, doffset), general_b, ("dx", "dscale", "doffset")):
        assert_kernel_close(got, general, got.dtype.type, what)


# -- the accuracy bar, through the public API -----------------------------------------

#: (O, C, I) shapes for the parallel fused inference kernel: each loop nest, from
#: SERIAL_BELOW (2^16) values to beyond SMALL (2^17).
PARALLEL_INFER = {
    "runs": (16, 64, 70),          # I > FUSED_FOLD: runs per (o, c), split over threads
    "folded": (1100, 8, 9),        # I = 9: rows of 72 values, one per row
    "wide-rows": (2501, 30, 1),    # channels-last, 8 rows to a wide row, 5 left over
    "rows": (4099, 64, 1),         # channels-last C = 64: rows not widened
    "beyond-small": (300, 40, 12),  # 144000 values > SMALL, folded rows
}


@pytest.mark.parametrize("case", sorted(PARALLEL_INFER))
@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: np.dtype(d).name)
def test_parallel_fused_inference_matches_serial_and_oracle(monkeypatch, rng, dtype, case):
    """infer_small3 from SERIAL_BELOW values runs on several OpenMP threads (blocks of
    rows or of runs; forced to 3 here, whatever the machine has): the serial
    kernel's bits, and the oracle's values."""
    shape = PARALLEL_INFER[case]
    assert np.prod(shape) >= cy.SERIAL_BELOW
    C = shape[1]
    pdt = np.float32 if dtype == np.float16 else dtype
    x = (rng.standard_normal(shape) * 2 + rng.uniform(-50, 50, C)[:, None]).astype(dtype)
    scale, offset = rng.uniform(0.5, 2, C).astype(pdt), rng.standard_normal(C).astype(pdt)
    mean, var = (rng.uniform(-50, 50, C)).astype(pdt), rng.uniform(0.5, 4, C).astype(pdt)
    outs = []
    for threads in (1, 3):
        monkeypatch.setattr(cy, "_threads", lambda size, n=threads: n)
        out = np.full_like(x, np.nan)
        cy.infer_small3(x, scale, offset, mean, var, 1e-3, out)
        outs.append(out)
    np.testing.assert_array_equal(outs[1], outs[0])
    want = oracle.batch_norm_infer(x, scale, offset, mean, var, channel_axis=1, eps=1e-3)
    oracle.assert_close(outs[1], want)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_float32_variance_at_offset_1e6(rng, layout):
    """Variance rel. error <= 1e-6 for float32 data with mean 1e6 (the issue's bar)."""
    x = (1e6 + rng.standard_normal((16, 32, 28, 28))).astype(np.float32)
    axis = 1
    if layout == "NHWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        axis = -1
    _, mean, invstd = fastbn.batch_norm_train(x, channel_axis=axis, eps=0.0, backend="cython")
    _, evar = oracle.moments(x, oracle.reduced_axes(x.ndim, axis))
    var = 1.0 / invstd.astype(np.float64) ** 2
    assert np.max(np.abs(var - evar) / evar) <= 1e-6
    # Inside, before the rounding to float32, far better than the bar.
    plan = fastbn.layout.make_plan(x.shape, x.strides, (axis % x.ndim,))
    _, m2 = cy.moments3(fastbn.layout.as3(x, plan))
    assert np.max(np.abs(m2 / plan.count - evar) / evar) <= 1e-10


def test_backends_reports_cython_available():
    assert fastbn.backends()["cython"] == "available"
    x = np.ones((2, 3))
    assert fastbn.backend_for(x, backend="cython") == "cython"
    with fastbn.use_backend("cython"):
        assert fastbn.backend_for(x) == "cython"

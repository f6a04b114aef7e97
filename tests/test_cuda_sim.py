"""The numba.cuda backend under Numba's CUDA simulator (no GPU needed).

Run in its own process; the simulator is chosen once, when numba.cuda is imported:

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda_sim.py -q

Without ``NUMBA_ENABLE_CUDASIM=1`` the simulator tests are skipped (the main
test run), except the pure-Python layout tests at the end.  Launches are
shrunk (``TPB`` = 8 threads per block, a few blocks per channel, the row
mapping from ``inner >= 8``) so tiny arrays cover the multi-block paths, and
the simulator runs every thread as a Python thread: keep arrays small.
"""

import os

import numpy as np
import pytest

import reference as ref
import fastbn as fbn
from fastbn import layout
from fastbn.families import cuda as device

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
if SIM:
    try:
        from numba import cuda as _cuda  # noqa: F401 - numba's built-in target or numba-cuda
    except ImportError:
        SIM = False
sim = pytest.mark.skipif(not SIM, reason="CUDA simulator tests: run with NUMBA_ENABLE_CUDASIM=1 "
                                         "in their own pytest process (numba.cuda importable)")

@pytest.fixture
def K(monkeypatch):
    """The cuda backend module with launches shrunk for the simulator."""
    from fastbn.kernels import cuda_numba
    monkeypatch.setattr(cuda_numba, "TPB", 8)
    monkeypatch.setattr(cuda_numba, "TARGET_BLOCKS", 16)
    monkeypatch.setattr(cuda_numba, "MIN_PER_THREAD", 1)
    monkeypatch.setattr(cuda_numba, "ROWS_MIN_INNER", 8)
    return cuda_numba


@pytest.fixture
def cuda():
    from numba import cuda
    return cuda


def on_device(cuda, h, memory):
    """``h``'s values as a (simulated) device array laid out as ``memory``."""
    if memory == "C":
        return cuda.to_device(np.ascontiguousarray(h))
    if memory == "F":
        return cuda.to_device(np.asfortranarray(h))
    if memory == "sliced":  # gaps hold NaN: reading outside the view fails the test
        big = list(h.shape)
        big[-1] *= 2
        index = (Ellipsis, slice(None, None, 2))
        if h.ndim >= 2:
            big[-2] += 2
            index = (Ellipsis, slice(1, -1), slice(None, None, 2))
        base = np.full(big, np.nan, dtype=h.dtype)
        base[index] = h
        return cuda.to_device(base)[index]
    if memory == "negstride":
        rev = (slice(None, None, -1),) * h.ndim
        return cuda.to_device(np.ascontiguousarray(h[rev]))[rev]
    if memory == "chlast":  # channels (axis 1) stored last, then transposed back
        order = (0,) + tuple(range(2, h.ndim)) + (1,)
        back = tuple(np.argsort(order))
        return cuda.to_device(np.ascontiguousarray(h.transpose(order))).transpose(back)
    raise ValueError(memory)


def host(d):
    assert device.is_numba(d), f"expected a Numba device array, got {type(d)}"
    return d.copy_to_host()


# -- the primitives -------------------------------------------------------------------

# (outer, C, inner): rows mapping (inner >= 8), columns mapping with inner 1 and 3,
# and a single row / single column.
SHAPES3 = [(3, 4, 20), (2, 3, 9), (13, 5, 1), (7, 3, 3), (1, 2, 11), (9, 1, 1)]


@sim
@pytest.mark.parametrize("shape", SHAPES3)
@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_moments3(K, cuda, make_array, shape, dtype):
    x = make_array(shape, dtype, loc=3.0)
    mean, m2 = K.moments3(cuda.to_device(x))
    assert isinstance(mean, np.ndarray) and mean.dtype == np.float64 and mean.shape == (shape[1],)
    rmean, rm2 = ref.moments(x.astype(np.float64), (0, 2))
    n = shape[0] * shape[2]
    ref.assert_close(mean, rmean, "mean", rtol=1e-12)
    ref.assert_close(m2, rm2 * n, "m2", rtol=1e-12 if dtype != np.float16 else 1e-6)


@sim
@pytest.mark.parametrize("shape", SHAPES3)
@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_dy_sums3(K, cuda, rng, make_array, shape, dtype):
    x = make_array(shape, dtype)
    dy = make_array(shape, dtype, loc=-0.3)
    m = rng.standard_normal(shape[1])
    a, b = K.dy_sums3(cuda.to_device(dy), cuda.to_device(x), m)
    dy64, xc = dy.astype(np.float64), x.astype(np.float64) - m[None, :, None]
    tol = 1e-12 if dtype != np.float16 else 1e-5  # float32 accumulators for float16
    ref.assert_close(a, dy64.sum(axis=(0, 2)), "sum dy", rtol=tol)
    ref.assert_close(b, (dy64 * xc).sum(axis=(0, 2)), "sum dy*xc", rtol=tol)


@sim
@pytest.mark.parametrize("shape", SHAPES3)
@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("with_u", [False, True])
def test_affine3(K, cuda, rng, make_array, shape, dtype, with_u):
    x = make_array(shape, dtype)
    C = shape[1]
    m, q, r, p = (rng.standard_normal(C) for _ in range(4))
    u = make_array(shape, dtype) if with_u else None
    out = cuda.device_array(shape, dtype)
    K.affine3(cuda.to_device(x), m, q, r, out, None if u is None else cuda.to_device(u),
              p if with_u else None)
    expect = q[None, :, None] * (x.astype(np.float64) - m[None, :, None]) + r[None, :, None]
    if with_u:
        expect += p[None, :, None] * u
    got = host(out)
    assert got.dtype == dtype
    ref.assert_close(got, expect, "affine3")


@sim
def test_launches_cover_several_blocks(K):
    """The shrunk launches really split channels over several blocks and columns."""
    grid, chunk, nsplit = K._rows_config(3 * 20, 4, K._tpb())
    assert nsplit > 1 and grid == (nsplit, 4)
    grid, block, rows_per, nsplit = K._cols_config(5, 13, K._tpb())
    assert nsplit > 1 and block == (5, 1)
    grid, block, rows_per, nsplit = K._cols_config(3 * 3, 7, K._tpb())
    assert grid[0] == 2 and block == (8, 1)


@sim
@pytest.mark.parametrize("shape", [(2, 5, 9), (11, 5, 1)])
def test_more_channels_than_grid(K, cuda, make_array, monkeypatch, shape):
    """Channels beyond the grid's y/x limit are walked by a channel loop."""
    monkeypatch.setattr(K, "_MAX_GRID_Y", 2)
    x = make_array(shape, np.float64)
    mean, m2 = K.moments3(cuda.to_device(x))
    rmean, rvar = ref.moments(x, (0, 2))
    ref.assert_close(mean, rmean, "mean")
    ref.assert_close(m2 / (shape[0] * shape[2]), rvar, "var")
    dy = make_array(shape, np.float64)
    a, b = K.dy_sums3(cuda.to_device(dy), cuda.to_device(x), rmean)
    ref.assert_close(a, dy.sum(axis=(0, 2)), "sum dy")


@sim
@pytest.mark.parametrize("shape", [(4, 3, 25), (40, 3, 1)])
def test_float32_large_mean_accuracy(K, cuda, rng, shape):
    """The issue's bar: float32 variance rel. error <= 1e-6 at offset 1e6."""
    x = (1e6 + rng.standard_normal(shape)).astype(np.float32)
    mean, m2 = K.moments3(cuda.to_device(x))
    rmean, rvar = ref.moments(x.astype(np.float64), (0, 2))
    var = m2 / (shape[0] * shape[2])
    assert np.max(np.abs(var - rvar) / rvar) <= 1e-6
    assert np.max(np.abs(mean - rmean) / rmean) <= 1e-12


@sim
def test_nan_propagates_to_its_channel_only(K, cuda, make_array):
    for shape in [(3, 4, 20), (13, 4, 1)]:
        x = make_array(shape, np.float32)
        x[1, 2, 0] = np.nan
        mean, m2 = K.moments3(cuda.to_device(x))
        assert np.isnan(mean[2]) and np.isnan(m2[2])
        assert np.isfinite(np.delete(mean, 2)).all() and np.isfinite(np.delete(m2, 2)).all()


@sim
def test_reductions_are_deterministic(K, cuda, make_array):
    x = cuda.to_device(make_array((3, 4, 20), np.float32, loc=100.0))
    first = K.moments3(x)
    for _ in range(2):
        again = K.moments3(x)
        assert all(np.array_equal(a, b) for a, b in zip(first, again))


@sim
@pytest.mark.parametrize("inner,nt", [(5, 3), (7, 7), (3, 8), (40, 8), (1, 4), (9, 20)])
@pytest.mark.parametrize("bits", [64, 32])
def test_rows_walk_index_math(K, inner, nt, bits):
    """The row kernels' walk (_adv, _adv2): the in-row index and byte offsets with
    negative strides stay exact against divmod.  64: offsets far beyond 2**32
    (Python ints stand for the device's int64; no big allocation); 32: int32
    offsets up to ~2**30, as _index_zero chooses them below 2**31 (NumPy's
    int32 raises where a value would leave its range)."""
    adv = getattr(K._adv, "py_func", K._adv)
    adv2 = getattr(K._adv2, "py_func", K._adv2)
    if bits == 64:
        iz, st0, st2, gt0, gt2, base, gbase = 0, 3 * 2**33 + 8, -16, -(2**34), 4, 2**41, 2**42
    else:
        iz, st0, st2, gt0, gt2, base, gbase = np.int32(0), 2**20 + 8, -16, -(2**20), 4, 2**29, 2**30
    dq, dr = divmod(nt, inner)
    back, d, dw = inner - dr, dq * st0 + dr * st2, (dq + 1) * st0 + (dr - inner) * st2
    gd, gdw = dq * gt0 + dr * gt2, (dq + 1) * gt0 + (dr - inner) * gt2
    dr, back, d, dw, gd, gdw = (iz + v for v in (dr, back, d, dw, gd, gdw))
    kk = 2
    o, i = divmod(kk, inner)
    a, b, i2 = iz + (base + o * st0 + i * st2), iz + (gbase + o * gt0 + i * gt2), iz + i
    for _ in range(60):
        kk += nt
        a, i = adv(a, i, dr, back, d, dw, iz)
        _, b, i2 = adv2(a, b, i2, dr, back, d, dw, gd, gdw, iz)
        o, want = divmod(kk, inner)
        assert i == i2 == want
        assert a == base + o * st0 + want * st2
        assert b == gbase + o * gt0 + want * gt2
        assert type(a) is type(b) is type(i) is type(iz + 0)


@sim
def test_index_zero_is_int32_below_2_gib_of_offsets(K, cuda):
    """_index_zero: the row kernels walk in int32 when every array's byte span
    (itemsize + sum |stride| * (n - 1), negative strides by magnitude) is below
    2**31, else int64."""
    small = cuda.device_array((4, 3, 5), np.float32)
    assert K._index_zero([small, small]).dtype == np.int32

    class Fake:   # only the attributes _index_zero reads; no 2 GiB allocation
        dtype, shape = np.dtype(np.float16), (3, 3, 5)

        def __init__(self, s0):
            self.strides = (s0, 2, 6)
    # spans: 2 + 2*|s0| + 2*2 + 4*6
    assert K._index_zero([small, Fake(-(2**30))]).dtype == np.int64        # 2**31 + 30
    assert K._index_zero([Fake(-(2**30) + 16), small]).dtype == np.int32   # 2**31 - 2


@sim
@pytest.mark.parametrize("memory", ["C", "negstride"])
def test_rows_kernels_walk_alike_in_int32_and_int64(K, cuda, make_array, monkeypatch, memory):
    """The row kernels give the same bits with the int64 walk (arrays of 2 GiB or
    more, _index_zero) as with the int32 one that smaller arrays take."""
    x = on_device(cuda, make_array((5, 3, 19), np.float32, loc=10.0), memory)
    dy = on_device(cuda, make_array((5, 3, 19), np.float32), memory)
    m = cuda.to_device(np.array([10.0, 9.5, 10.5]))
    assert K._use_rows(19, K._tpb())
    got = {}
    for iz in (np.int32(0), np.int64(0)):
        monkeypatch.setattr(K, "_index_zero", lambda arrays, iz=iz: iz)
        got[iz.dtype.name] = [v.copy_to_host() if hasattr(v, "copy_to_host") else np.asarray(v)
                              for v in K.moments3(x) + K.dy_sums3(dy, x, m)]
    for a, b in zip(got["int32"], got["int64"]):
        np.testing.assert_array_equal(a, b)
    h, g = host(x).astype(np.float64), host(dy).astype(np.float64)
    np.testing.assert_allclose(got["int32"][0], h.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(got["int32"][3], (g * (h - np.array([10.0, 9.5, 10.5])[:, None])).sum(axis=(0, 2)),
                               rtol=1e-9, atol=1e-9)


@sim
@pytest.mark.parametrize("ty", [1, 3])
def test_cols_walk_index_math(K, ty):
    """The column kernels' walk (_col, _fwd): a thread's column x[o::TY, c, i] as a
    1-D view, advanced in place of indexing by row, on NumPy views with negative
    and non-contiguous strides; writes through it land in x (out may be x)."""
    col = getattr(K._col, "py_func", K._col)
    fwd = getattr(K._fwd, "py_func", K._fwd)
    base = np.arange(2 * 11 * 4 * 6, dtype=np.float64).reshape(11 * 2, 4, 6)
    perm = base.reshape(6, 22, 4).transpose(1, 2, 0)  # strides not in decreasing order
    for x in (base[::2], base[::-2, ::-1, 1::2], perm[1::2, 1:, ::-1]):
        for o, c, i in [(0, 0, 0), (1, 2, x.shape[2] - 1), (x.shape[0] - 1, x.shape[1] - 1, 1)]:
            want = x[o::ty, c, i]
            n = len(want)
            v = col(x, o, c, i, ty, n)
            assert v.shape == (n,) and np.array_equal(v, want)
            for k in range(n + 1):
                assert np.array_equal(fwd(v, k), want[k:])
            w = fwd(col(x, o, c, i, ty, n), n - 1)
            w[0] = -1.0
            assert x[o + (n - 1) * ty, c, i] == -1.0


@sim
def test_copy_nd_and_flat_views(K, cuda, make_array):
    """The N-d strided copy behind non-viewable layouts, on flat views of strided arrays."""
    h = make_array((3, 4, 5), np.float64)
    src = on_device(cuda, h, "negstride")
    dst_host = np.full((5, 3, 4), np.nan)
    dst = cuda.to_device(dst_host)
    device._copy_perm(src, (2, 0, 1), dst, (0, 1, 2), (5, 3, 4))
    np.testing.assert_array_equal(host(dst), h.transpose(2, 0, 1))


# -- the public API on device arrays -------------------------------------------------------------

MEMORIES = ("C", "F", "sliced", "negstride", "chlast")


@sim
@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_batch_norm_train(K, cuda, make_array, memory, dtype):
    shape = (3, 4, 2, 5)
    h = make_array(shape, dtype, channel_axis=1)
    x = on_device(cuda, h, memory)
    pdt = ref.param_dtype(dtype)
    scale = make_array(4, pdt, loc=1.0, sd=0.5)
    offset = make_array(4, pdt)
    rm0, rv0 = make_array(4, pdt), np.abs(make_array(4, pdt)) + 0.5
    rm, rv = cuda.to_device(rm0), cuda.to_device(rv0)
    y, mean, invstd = fbn.batch_norm_train(x, cuda.to_device(scale), cuda.to_device(offset),
                                           eps=1e-3, running_mean=rm, running_var=rv, momentum=0.2)
    ey, emean, einv, erm, erv = ref.batch_norm_train(h, scale, offset, 1, 1e-3, rm0, rv0, 0.2)
    y, mean, invstd = host(y), host(mean), host(invstd)
    assert y.dtype == dtype and mean.dtype == pdt and invstd.dtype == pdt
    ref.assert_close(y, ey, "y")
    ref.assert_close(mean, emean, "mean")
    ref.assert_close(invstd, einv, "invstd")
    ref.assert_close(host(rm), erm, "running_mean")
    ref.assert_close(host(rv), erv, "running_var")


@sim
@pytest.mark.parametrize("shape,axis", [((6, 3), -1), ((5, 3, 4), -1), ((2, 3, 4), 2), ((4, 12), 1)])
def test_batch_norm_train_channel_axes(K, cuda, make_array, shape, axis):
    h = make_array(shape, np.float32, channel_axis=axis)
    y, mean, invstd = fbn.batch_norm_train(cuda.to_device(h), channel_axis=axis)
    ey, emean, einv, _, _ = ref.batch_norm_train(h, channel_axis=axis)
    ref.assert_close(host(y), ey, "y")
    ref.assert_close(host(mean), emean, "mean")
    ref.assert_close(host(invstd), einv, "invstd")


@sim
@pytest.mark.parametrize("memory", ("C", "chlast", "sliced"))
@pytest.mark.parametrize("dtype", (np.float16, np.float64))
def test_batch_norm_infer(K, cuda, make_array, memory, dtype):
    shape = (2, 3, 3, 4)
    h = make_array(shape, dtype)
    pdt = ref.param_dtype(dtype)
    scale, offset, mean = (make_array(3, pdt) for _ in range(3))
    var = np.abs(make_array(3, pdt)) + 0.1
    y = fbn.batch_norm_infer(on_device(cuda, h, memory), cuda.to_device(scale), None,
                             cuda.to_device(mean), cuda.to_device(var), eps=1e-4)
    ref.assert_close(host(y), ref.batch_norm_infer(h, scale, None, mean, var, 1, 1e-4), "y")


@sim
@pytest.mark.parametrize("memory", ("C", "chlast", "negstride"))
@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_batch_norm_backward(K, cuda, make_array, memory, dtype):
    shape = (3, 4, 2, 5)
    h = make_array(shape, dtype, channel_axis=1)
    g = make_array(shape, dtype)
    pdt = ref.param_dtype(dtype)
    scale = make_array(4, pdt, loc=1.0)
    _, mean, invstd, _, _ = ref.batch_norm_train(h)
    mean, invstd = mean.astype(pdt), invstd.astype(pdt)
    dx, dscale, doffset = fbn.batch_norm_backward(
        on_device(cuda, g, memory), on_device(cuda, h, memory), cuda.to_device(scale),
        cuda.to_device(mean), cuda.to_device(invstd))
    edx, edscale, edoffset = ref.batch_norm_backward(g, h, scale, mean, invstd)
    ref.assert_close(host(dx), edx, "dx")
    ref.assert_close(host(dscale), edscale, "dscale")
    ref.assert_close(host(doffset), edoffset, "doffset")


@sim
@pytest.mark.parametrize("axis,keepdims,ddof", [(None, False, 0), ((0, 2), True, 1), (1, False, 0),
                                                ((-1,), False, 0), ((0, 1, 2), True, 0)])
def test_moments(K, cuda, make_array, axis, keepdims, ddof):
    h = make_array((4, 3, 5), np.float32, loc=50.0)
    mean, var = fbn.moments(on_device(cuda, h, "F"), axis, keepdims=keepdims, ddof=ddof)
    emean, evar = ref.moments(h, axis, keepdims, ddof)
    mean, var = host(mean), host(var)
    assert mean.shape == np.shape(emean) and var.shape == np.shape(evar)
    ref.assert_close(mean, emean, "mean")
    ref.assert_close(var, evar, "var")


@sim
def test_batch_normalization(K, cuda, make_array):
    h = make_array((4, 3, 5), np.float32)
    mean, var = fbn.moments(cuda.to_device(h), (0, 2), keepdims=True)
    scale = make_array((1, 3, 1), np.float32)
    y = fbn.batch_normalization(cuda.to_device(h), mean, var, 0.25, cuda.to_device(scale), 1e-3)
    emean, evar = ref.moments(h, (0, 2), True)
    ref.assert_close(host(y), ref.batch_normalization(h, emean, evar, 0.25, scale, 1e-3), "y")


@sim
def test_out_in_place_overlap_and_exotic_strides(K, cuda, make_array):
    shape = (3, 4, 2, 5)
    h = make_array(shape, np.float64, channel_axis=1)
    ey = ref.batch_norm_train(h)[0]
    # out=x: in place
    x = cuda.to_device(h)
    y = fbn.batch_norm_train(x, out=x)[0]
    assert y is x
    ref.assert_close(host(x), ey, "in place")
    # out overlapping x shifted by one element: computed into a temporary first
    base = cuda.to_device(np.concatenate([h.ravel(), [0.0]]))
    xin = base[:-1].reshape(shape)
    yout = base[1:].reshape(shape)
    fbn.batch_norm_train(xin, out=yout)
    ref.assert_close(host(yout), ey, "shifted alias")
    # out= with strides no canonical view has (kept axis between two reduced axes of a cropped array)
    big = cuda.to_device(np.full((3, 4, 4, 7), np.nan))
    out = big[:, :, 1:3, 1:6]
    y = fbn.batch_norm_train(cuda.to_device(h), out=out)[0]
    assert y is out
    ref.assert_close(host(out), ey, "exotic out")
    assert np.isnan(host(big)[:, :, 0]).all()


@sim
def test_non_viewable_input_is_copied(K, cuda, make_array):
    # channels on axis 2 of a cropped array: the reduced axes 0, 1, 3 cannot be merged in place
    h = make_array((3, 4, 2, 5), np.float32, channel_axis=2)
    big = np.full((3, 6, 2, 7), np.nan, dtype=np.float32)
    big[:, 1:5, :, 1:6] = h
    x = cuda.to_device(big)[:, 1:5, :, 1:6]
    y, mean, invstd = fbn.batch_norm_train(x, channel_axis=2)
    ey, emean, einv, _, _ = ref.batch_norm_train(h, channel_axis=2)
    ref.assert_close(host(y), ey, "y")
    ref.assert_close(host(mean), emean, "mean")


@sim
def test_dispatch_and_mixed_families(K, cuda, make_array):
    assert fbn.backends()["cuda"] == "available"
    x = cuda.to_device(make_array((4, 3), np.float32))
    assert fbn.backend_for(x) == "cuda"
    with pytest.raises(TypeError, match="scale"):
        fbn.batch_norm_train(x, np.ones(3, np.float32), channel_axis=-1)
    with pytest.raises(TypeError):
        fbn.batch_norm_train(make_array((4, 3), np.float32), cuda.to_device(np.ones(3, np.float32)),
                             channel_axis=-1)
    with pytest.raises(TypeError, match="running_mean"):
        fbn.batch_norm_train(x, channel_axis=-1, running_mean=np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="out"):
        fbn.batch_norm_infer(x, None, None, cuda.to_device(np.zeros(3)), cuda.to_device(np.ones(3)),
                             channel_axis=-1, out=np.empty((4, 3), np.float32))
    with pytest.raises(TypeError, match="backend"):
        fbn.moments(x, backend="numba")


@sim
def test_bad_call_changes_nothing(K, cuda, make_array):
    x = cuda.to_device(make_array((4, 3), np.float32))
    rm = cuda.to_device(np.full(3, 7.0, np.float32))
    with pytest.raises(TypeError, match="running_var"):
        fbn.batch_norm_train(x, channel_axis=-1, running_mean=rm,
                             running_var=cuda.to_device(np.ones(3, np.float64)))
    np.testing.assert_array_equal(host(rm), 7.0)
    with pytest.raises(ValueError, match="more than 1 value"):
        fbn.batch_norm_train(cuda.to_device(np.ones((1, 3), np.float32)), channel_axis=-1, running_mean=rm)
    np.testing.assert_array_equal(host(rm), 7.0)
    with pytest.raises(TypeError, match="dtype"):
        fbn.moments(cuda.to_device(np.ones((2, 3), np.int32)))


@sim
def test_inputs_unchanged_and_empty(K, cuda, make_array):
    h = make_array((3, 4, 6), np.float32)
    x = cuda.to_device(h)
    fbn.batch_norm_train(x)
    np.testing.assert_array_equal(host(x), h)
    y = fbn.batch_norm_infer(cuda.to_device(np.ones((0, 4), np.float32)), None, None,
                             cuda.to_device(np.zeros(4)), cuda.to_device(np.ones(4)), channel_axis=-1)
    assert host(y).shape == (0, 4)
    mean, var = fbn.moments(cuda.to_device(np.ones((0, 4), np.float32)), 0)
    assert host(mean).shape == (4,) and np.isnan(host(mean)).all()


# -- the fused paths: launches, streams, devices, torch tensors ----------------------------------

@pytest.fixture
def launches(K, monkeypatch):
    """Every kernel launch of a call, as (kernel, stream) pairs."""
    seen = []
    real = K._launch

    def counting(kern, grid, block, shmem, stream, *args):
        seen.append((kern, stream))
        return real(kern, grid, block, shmem, stream, *args)
    monkeypatch.setattr(K, "_launch", counting)
    return seen


def _kinds(K, seen):
    names = {K._moments_rows: "moments", K._moments_cols: "moments", K._dysums_rows: "sums",
             K._dysums_cols: "sums", K._affine_cols: "affine", K._affine_u_cols: "affine",
             K._infer_cols: "affine"}
    return [names.get(k, k) for k, _ in seen]


def _infer_backward(dy, x, scale, mean, var, axis, eps):
    """API.md's batch_norm_infer_backward in float64."""
    axes = ref.reduced_axes(x.ndim, axis)
    q = 1.0 / np.sqrt(ref.f64(var) + eps)
    g = ref.f64(dy)
    xc = ref.f64(x) - ref.along(mean, x.ndim, axis)
    return (g * ref.along(ref.f64(scale) * q, x.ndim, axis), (g * xc).sum(axis=axes) * q,
            g.sum(axis=axes))


# (shape, channel_axis): NCHW (row mapping), NCHW with a small spatial extent (column
# mapping, two channels per block), NHWC and (N, C) (column mapping)
FUSED_LAYOUTS = [((2, 3, 2, 4), 1), ((3, 3, 2, 2), 1), ((2, 2, 3, 3), -1), ((5, 3), -1)]


@sim
@pytest.mark.parametrize("shape,axis", FUSED_LAYOUTS)
@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_fused_launch_counts(K, cuda, make_array, launches, monkeypatch, shape, axis, dtype):
    """Training forward 2 launches (<= 3), inference 1, backward 2, inference backward 2;
    no host<->device copies once the call's scratch exists; every result against the
    float64 reference."""
    h = make_array(shape, dtype, channel_axis=axis)
    g = make_array(shape, dtype)
    C = shape[axis]
    pdt = ref.param_dtype(dtype)
    scale, offset = make_array(C, pdt, loc=1.0, sd=0.5), make_array(C, pdt)
    rm0, rv0 = make_array(C, pdt), np.abs(make_array(C, pdt)) + 0.5
    x, dy = cuda.to_device(h), cuda.to_device(g)
    ds, do_ = cuda.to_device(scale), cuda.to_device(offset)
    rm, rv = cuda.to_device(rm0), cuda.to_device(rv0)
    fbn.batch_norm_train(x, ds, do_, channel_axis=axis)   # scratch for this shape, then count
    launches.clear()
    copies = []
    real_to_device = cuda.to_device
    monkeypatch.setattr(cuda, "to_device", lambda *a, **k: copies.append(1) or real_to_device(*a, **k))

    y, mean, invstd = fbn.batch_norm_train(x, ds, do_, channel_axis=axis, eps=1e-3,
                                           running_mean=rm, running_var=rv, momentum=0.2)
    assert _kinds(K, launches) == ["moments", "affine"]
    ey, emean, einv, erm, erv = ref.batch_norm_train(h, scale, offset, axis, 1e-3, rm0, rv0, 0.2)
    assert host(y).dtype == dtype and host(mean).dtype == pdt
    ref.assert_close(host(y), ey, "y")
    ref.assert_close(host(mean), emean, "mean")
    ref.assert_close(host(invstd), einv, "invstd")
    ref.assert_close(host(rm), erm, "running_mean")
    ref.assert_close(host(rv), erv, "running_var")

    launches.clear()
    var = cuda.to_device(rv0)
    y = fbn.batch_norm_infer(x, ds, do_, rm, var, channel_axis=axis, eps=1e-3)
    assert _kinds(K, launches) == ["affine"]
    ref.assert_close(host(y), ref.batch_norm_infer(h, scale, offset, erm, rv0, axis, 1e-3), "infer y")

    mean_d = cuda.to_device(emean.astype(pdt))
    inv_d = cuda.to_device(einv.astype(pdt))
    launches.clear()
    dx, dscale, doffset = fbn.batch_norm_backward(dy, x, ds, mean_d, inv_d, channel_axis=axis)
    assert _kinds(K, launches) == ["sums", "affine"]
    edx, eds, edo = ref.batch_norm_backward(g, h, scale, emean.astype(pdt), einv.astype(pdt), axis)
    ref.assert_close(host(dx), edx, "dx")
    ref.assert_close(host(dscale), eds, "dscale")
    ref.assert_close(host(doffset), edo, "doffset")

    launches.clear()
    dx, dscale, doffset = fbn.batch_norm_infer_backward(dy, x, ds, mean_d, var, channel_axis=axis,
                                                        eps=1e-3)
    assert _kinds(K, launches) == ["sums", "affine"]
    edx, eds, edo = _infer_backward(g, h, scale, emean.astype(pdt), rv0, axis, 1e-3)
    ref.assert_close(host(dx), edx, "infer dx")
    ref.assert_close(host(dscale), eds, "infer dscale")
    ref.assert_close(host(doffset), edo, "infer doffset")
    assert copies == [1, 1, 1], "only the test's own to_device calls"


@sim
@pytest.mark.parametrize("shape,axis", [((3, 2, 10), 1), ((6, 2), -1)])
def test_fused_constant_channel_nan_and_in_place(K, cuda, make_array, launches, shape, axis):
    """PyTorch's var + eps == 0 rule (invstd 0, y = offset), NaN kept to its channel,
    out=x in place, no scale/offset, running stats untouched when not given."""
    h = make_array(shape, np.float64, channel_axis=axis)
    idx = [slice(None)] * len(shape)
    idx[axis] = 0
    h[tuple(idx)] = 2.5          # channel 0 constant
    idx[axis] = 1
    h[tuple(idx)][0] = np.nan    # channel 1 holds a NaN
    offset = np.array([0.75, -1.0])
    x = cuda.to_device(h)
    y, mean, invstd = fbn.batch_norm_train(x, None, cuda.to_device(offset), channel_axis=axis,
                                           eps=0.0, out=x)
    assert y is x and len(launches) == 2
    inv = host(invstd)
    assert inv[0] == 0.0 and np.isnan(inv[1]) and np.isnan(host(mean)[1])
    yh = host(y)
    idx[axis] = 0
    assert (yh[tuple(idx)] == 0.75).all()
    idx[axis] = 1
    assert np.isnan(yh[tuple(idx)]).all()


@sim
def test_fused_stats_dtype_and_empty_batch(K, cuda, make_array, launches):
    """The layers' float64 statistics come from the fused path too; an empty batch
    goes the general way (NaN statistics, running statistics unchanged)."""
    from fastbn import api
    h = make_array((5, 3, 4), np.float32)
    y, mean, invstd = api.train(cuda.to_device(h), stats_dtype=np.float64)
    assert host(mean).dtype == np.float64 and len(launches) == 2
    ey, emean, einv, _, _ = ref.batch_norm_train(h)
    ref.assert_close(host(mean), emean, "mean", rtol=1e-12)
    rm = cuda.to_device(np.full(3, 4.0, np.float32))
    y, mean, invstd = fbn.batch_norm_train(cuda.to_device(np.ones((0, 3, 4), np.float32)), running_mean=rm)
    assert host(y).shape == (0, 3, 4) and np.isnan(host(mean)).all()
    np.testing.assert_array_equal(host(rm), 4.0)


@sim
@pytest.mark.parametrize("shape,axis", FUSED_LAYOUTS)
@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_fused_moments_in_one_launch(K, cuda, make_array, launches, monkeypatch, shape, axis,
                                     dtype):
    """moments over every axis but one: one launch and no host<->device copies, results
    of the per-channel dtype (keepdims-shaped, any ddof) against the float64 reference."""
    h = make_array(shape, dtype, channel_axis=axis)
    x = cuda.to_device(h)
    axes = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    fbn.moments(x, axes)   # scratch for this shape, then count
    launches.clear()
    monkeypatch.setattr(cuda, "to_device", lambda *a, **k: pytest.fail("a host->device copy"))
    for keepdims, ddof in ((False, 0), (True, 1)):
        mean, var = fbn.moments(x, axes, keepdims=keepdims, ddof=ddof)
        emean, evar = ref.moments(h, axes, keepdims, ddof)
        for got, want, name in ((mean, emean, "mean"), (var, evar, "var")):
            got = host(got)
            assert got.dtype == ref.param_dtype(dtype) and got.shape == np.shape(want), name
            ref.assert_close(got, want, name)
    assert _kinds(K, launches) == ["moments", "moments"]


@sim
@pytest.mark.filterwarnings("ignore:Degrees of freedom")   # NumPy's, for the reference
@pytest.mark.parametrize("ddof", [2, 3, 2.5])
def test_fused_moments_ddof_at_or_beyond_the_count(K, cuda, ddof):
    """n - ddof <= 0: NumPy's var gives inf (and NaN for a constant channel)."""
    h = np.array([[1.0, 4.0, 2.0], [3.0, 4.0, np.nan]])
    mean, var = fbn.moments(cuda.to_device(h), 0, ddof=ddof)
    with np.errstate(divide="ignore", invalid="ignore"):
        ref.assert_close(host(mean), np.mean(h, axis=0), "mean")
        np.testing.assert_array_equal(host(var), np.var(h, axis=0, ddof=ddof))   # [inf, nan, nan]


@sim
@pytest.mark.parametrize("shape,axis", FUSED_LAYOUTS)
@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_fused_batch_normalization_in_one_launch(K, cuda, make_array, launches, monkeypatch, shape,
                                                 axis, dtype):
    """batch_normalization with per-channel device parameters (keepdims-shaped, as
    moments gives them; 1-D along the last axis; offset/scale None or arrays of any
    float dtype): one launch and no host<->device copies, against the float64
    reference; out= and in place."""
    nd, C = len(shape), shape[axis]
    ax = axis % nd
    h = make_array(shape, dtype, channel_axis=axis)
    x = cuda.to_device(h)
    kd = tuple(C if a == ax else 1 for a in range(nd))
    mean = make_array(kd, np.float64, loc=0.5)
    var = np.abs(make_array(kd, np.float32)) + 0.5
    scale = make_array(kd, np.float16, loc=1.0)
    offset = make_array(kd, ref.param_dtype(dtype))
    dev = [cuda.to_device(a) for a in (mean, var, offset, scale)]
    flat = [cuda.to_device(a.reshape(-1)) for a in (mean, var)]
    out = cuda.device_array(shape, dtype)
    fbn.batch_normalization(x, *dev, 1e-3)   # scratch and compilation, then count
    launches.clear()
    monkeypatch.setattr(cuda, "to_device", lambda *a, **k: pytest.fail("a host->device copy"))
    y = fbn.batch_normalization(x, *dev, 1e-3)
    ref.assert_close(host(y), ref.batch_normalization(h, mean, var, offset, scale, 1e-3), "y")
    y = fbn.batch_normalization(x, dev[0], dev[1], None, None, 0.0)
    ref.assert_close(host(y), ref.batch_normalization(h, mean, var, None, None, 0.0), "y")
    if ax == nd - 1:   # 1-D parameters broadcast along the last axis
        y = fbn.batch_normalization(x, *flat, None, None, 1e-3)
        ref.assert_close(host(y), ref.batch_normalization(h, mean, var, None, None, 1e-3), "y")
    assert fbn.batch_normalization(x, *dev, 1e-3, out=out) is out
    assert fbn.batch_normalization(x, *dev, 1e-3, out=x) is x
    ref.assert_close(host(x), ref.batch_normalization(h, mean, var, offset, scale, 1e-3), "in place")
    assert _kinds(K, launches) == ["affine"] * (5 if ax == nd - 1 else 4)


@sim
def test_batch_normalization_other_parameters_take_the_general_path(K, cuda, make_array, launches):
    """Numbers, full-size or two-axis parameters and integer arrays: the general path
    (same results), and its errors for bad ones."""
    h = make_array((3, 4, 5), np.float32)
    x = cuda.to_device(h)
    m = make_array((1, 4, 5), np.float32)
    v = np.abs(make_array((1, 4, 1), np.float32)) + 0.5
    y = fbn.batch_normalization(x, cuda.to_device(m), cuda.to_device(v), 0.25, 2.0, 1e-3)
    ref.assert_close(host(y), ref.batch_normalization(h, m, v, 0.25, 2.0, 1e-3), "y")
    iv = np.full((1, 4, 1), 2, np.int32)
    y = fbn.batch_normalization(x, cuda.to_device(v), cuda.to_device(iv), None, None, 1e-3)
    ref.assert_close(host(y), ref.batch_normalization(h, v, iv, None, None, 1e-3), "y")
    with pytest.raises(ValueError, match="variance_epsilon"):
        fbn.batch_normalization(x, cuda.to_device(v), cuda.to_device(v), None, None, -1.0)
    with pytest.raises(TypeError, match="out"):
        fbn.batch_normalization(x, cuda.to_device(v), cuda.to_device(v), None, None, 1e-3,
                                out=cuda.device_array((3, 4, 5), np.float64))
    with pytest.raises(TypeError):
        fbn.batch_normalization(x, v, cuda.to_device(v), None, None, 1e-3)   # a host array


@sim
def test_fused_launches_on_the_arrays_stream(K, cuda, make_array, launches, monkeypatch):
    """Every launch of a call goes on the stream fastbn.kernels.cuda_runtime.stream_for
    picks for x, and nothing synchronises the device or the host."""
    from fastbn.kernels import cuda_runtime as rt
    marker = object()
    picked = []
    monkeypatch.setattr(rt, "stream_for", lambda a, tensor=None: picked.append(a) or marker)
    monkeypatch.setattr(cuda, "synchronize", lambda: pytest.fail("device-wide synchronize"))
    h = make_array((4, 3, 9), np.float32)
    x = cuda.to_device(h)
    fbn.batch_norm_train(x)
    fbn.batch_norm_backward(x, x, None, cuda.to_device(np.zeros(3, np.float32)),
                            cuda.to_device(np.ones(3, np.float32)))
    m, v = fbn.moments(x, (0, 2), keepdims=True)
    fbn.batch_normalization(x, m, v, None, m, 1e-3)
    assert len(launches) == 6 and all(s is marker for _, s in launches)
    assert all(a is x for a in picked)


def test_stream_for_each_family(monkeypatch):
    """stream_for: torch's current stream (wrapped once per pointer) for a tensor, only
    when torch is imported; a Numba array's own stream; else CuPy's current stream."""
    pytest.importorskip("numba.cuda")
    import sys
    import types
    from fastbn.kernels import cuda_runtime as rt
    made = []
    fake_cuda = types.SimpleNamespace(external_stream=lambda ptr: made.append(ptr) or ("ext", ptr))
    monkeypatch.setattr(rt, "cuda_module", lambda: fake_cuda)
    monkeypatch.setattr(rt, "_streams", {})
    monkeypatch.setattr(rt, "stream", lambda: "cupy-current")
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(
        current_stream=lambda index: types.SimpleNamespace(cuda_stream=0xABC + index)))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    tensor = types.SimpleNamespace(device=types.SimpleNamespace(index=1))
    assert rt.stream_for(object(), tensor) == ("ext", 0xABD)
    assert rt.stream_for(object(), tensor) == ("ext", 0xABD) and made == [0xABD]
    fake_torch.cuda.current_stream = lambda index: types.SimpleNamespace(cuda_stream=0)
    assert rt.stream_for(object(), tensor) == 0           # torch's default stream
    monkeypatch.delitem(sys.modules, "torch")
    assert rt.stream_for(object(), tensor) == "cupy-current"   # torch not imported: never imported here

    class NumbaArray:   # what is_numba recognises
        __cuda_ndarray__ = True

        def copy_to_host(self):
            pass
    a = NumbaArray()
    a.stream = "its-stream"
    assert rt.stream_for(a) == "its-stream"
    a.stream = 0
    assert rt.stream_for(a) == "cupy-current"


@sim
def test_fused_arguments_on_other_devices_raise(K, cuda, make_array, launches, monkeypatch):
    from fastbn.kernels import cuda_runtime as rt
    x = cuda.to_device(make_array((4, 3, 5), np.float32))
    scale = cuda.to_device(np.ones(3, np.float32))
    rm = cuda.to_device(np.zeros(3, np.float32))
    where = {id(x): 0, id(scale): 1, id(rm): 2}
    monkeypatch.setattr(rt, "device_of", lambda a: where.get(id(a), 0))
    with pytest.raises(ValueError, match="scale is on CUDA device 1 but x is on device 0"):
        fbn.batch_norm_train(x, scale)
    with pytest.raises(ValueError, match="running_mean is on CUDA device 2"):
        fbn.batch_norm_train(x, running_mean=rm)
    np.testing.assert_array_equal(host(rm), 0.0)
    with pytest.raises(ValueError, match="scale"):
        fbn.batch_norm_backward(x, x, scale, rm, rm)
    assert launches == []
    where[id(scale)] = where[id(rm)] = 0
    fbn.batch_norm_train(x, scale, running_mean=rm)
    assert len(launches) == 2


def test_on_device_switches_only_when_needed(monkeypatch):
    """The call runs on x's device: that device is made current (Numba and CuPy) for the
    call and restored after; nothing is entered when it is already current."""
    pytest.importorskip("numba.cuda")
    import types
    from fastbn.kernels import cuda_runtime as rt
    log = []

    class Ctx:
        def __init__(self, what):
            self.what = what

        def __enter__(self):
            log.append(("enter", self.what))

        def __exit__(self, *exc):
            log.append(("exit", self.what))
    fake = types.SimpleNamespace(get_current_device=lambda: types.SimpleNamespace(id=0),
                                 gpus={1: Ctx("numba 1")})
    monkeypatch.setattr(rt, "simulator", lambda: False)
    monkeypatch.setattr(rt, "cuda_module", lambda: fake)
    monkeypatch.setattr(device, "cupy", lambda: None)
    with device._on_device(0):
        pass
    assert log == []
    with device._on_device(1):
        log.append("work")
    assert log == [("enter", "numba 1"), "work", ("exit", "numba 1")]


class FakeTensor:
    """A stand-in for a torch CUDA tensor in the simulator (family_of reads the module)."""
    __module__ = "torch"

    def __init__(self, arr):
        self.arr = arr
        self.device = type("device", (), {"type": "cuda", "index": 0})()

    shape = property(lambda self: self.arr.shape)
    dtype = property(lambda self: self.arr.dtype)

    def reshape(self, shape):
        return FakeTensor(self.arr.reshape(shape))


@pytest.fixture
def fake_torch(cuda, monkeypatch):
    """torch's entry points in fastbn.families.cuda replaced by simulator arrays."""
    made = []

    def view(t):
        return type(t.arr)(t.arr._ary)   # a new view object of the same memory

    def empty(n, dtype, t):
        made.append("empty")
        return FakeTensor(cuda.device_array(n, dtype=dtype))

    def empty_like(t):
        made.append("empty_like")
        return FakeTensor(cuda.device_array_like(t.arr))
    monkeypatch.setattr(device, "_torch_view", view)
    monkeypatch.setattr(device, "_torch_empty", empty)
    monkeypatch.setattr(device, "_torch_empty_like", empty_like)
    monkeypatch.setattr(device, "_torch_from", lambda v, dtype, t, shape=None: FakeTensor(
        cuda.to_device(np.asarray(v, dtype=dtype).reshape(np.shape(v) if shape is None else shape))))
    from fastbn.kernels import cuda_runtime as rt
    monkeypatch.setattr(rt, "torch_stream", lambda index: 0)
    return made


@sim
def test_torch_tensors_in_torch_tensors_out(K, cuda, make_array, launches, fake_torch):
    h = make_array((4, 3, 6), np.float32)
    x = FakeTensor(cuda.to_device(h))
    scale = FakeTensor(cuda.to_device(np.full(3, 2.0, np.float32)))
    rm = FakeTensor(cuda.to_device(np.zeros(3, np.float32)))
    y, mean, invstd = fbn.batch_norm_train(x, scale, running_mean=rm)
    assert all(isinstance(a, FakeTensor) for a in (y, mean, invstd))
    assert fake_torch == ["empty_like", "empty", "empty"] and len(launches) == 2
    ey, emean, einv, erm, _ = ref.batch_norm_train(h, np.full(3, 2.0), None, 1, 1e-5, np.zeros(3), None)
    ref.assert_close(host(y.arr), ey, "y")
    ref.assert_close(host(invstd.arr), einv, "invstd")
    ref.assert_close(host(rm.arr), erm, "running_mean")
    out = FakeTensor(cuda.device_array(h.shape, np.float32))
    assert fbn.batch_norm_infer(x, scale, None, mean, invstd, out=out) is out
    dx, ds, do_ = fbn.batch_norm_backward(x, x, scale, mean, invstd, out=out)
    assert dx is out and isinstance(ds, FakeTensor)
    m, v = fbn.moments(x, (0, 2))       # one launch, into tensors from torch's allocator
    assert isinstance(m, FakeTensor) and isinstance(v, FakeTensor)
    ref.assert_close(host(m.arr), ref.moments(h, (0, 2))[0], "moments")
    m, v = fbn.moments(x, (0, 2), keepdims=True)
    assert isinstance(v, FakeTensor) and v.shape == (1, 3, 1)
    ref.assert_close(host(v.arr), ref.moments(h, (0, 2), True)[1], "moments")


# -- layout helpers (plain Python, run in every test process) ------------------------------------

@pytest.mark.parametrize("seed", range(40))
def test_strides3_matches_numpy_view(seed):
    """device.strides3 finds a view exactly when NumPy's reshape(copy=False) does, with its strides."""
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(1, 5))
    shape = tuple(int(s) for s in rng.integers(1, 4, ndim))
    a = np.empty([s * int(rng.integers(1, 3)) for s in shape])
    a = a[tuple(slice(None, None, int(rng.choice([1, 2, -1]))) for _ in shape)]
    a = a[tuple(slice(0, s) for s in shape)].transpose(rng.permutation(ndim))
    kept = tuple(sorted(int(k) for k in rng.choice(ndim, int(rng.integers(0, ndim + 1)), replace=False)))
    plan = layout.make_plan(a.shape, a.strides, kept)
    st3 = device.strides3(a.shape, a.strides, plan)
    view = layout.view3(a, plan)
    assert (st3 is None) == (view is None)
    if view is not None:
        for n, s, t in zip(view.shape, view.strides, st3):
            assert n == 1 or s == t


def test_cuda_backend_reports_why_it_is_unavailable():
    """Without a GPU (and without the simulator) the backend says why, instead of failing later."""
    if SIM:
        pytest.skip("the simulator makes the backend available")
    status = fbn.backends()["cuda"]
    if status == "available":
        pytest.skip("a CUDA GPU is present")
    assert status and isinstance(status, str)


def test_available_only_when_a_kernel_compiles(monkeypatch):
    """backends()["cuda"] needs more than a driver: a kernel must compile (numba-cuda
    without NVVM/NVRTC finds the GPU, then fails at the first call).  Asked once."""
    if SIM:
        pytest.skip("the simulator compiles nothing")
    pytest.importorskip("numba.cuda")
    import types
    from fastbn.kernels import cuda_numba as K
    if K.cuda is None:
        pytest.skip("numba-cuda not installed")
    monkeypatch.setattr(K.cuda, "is_available", lambda: True)
    monkeypatch.setattr(K.cuda, "get_current_device",
                        lambda: types.SimpleNamespace(compute_capability=(9, 0)))
    asked = []

    def no_nvrtc(*a, **k):
        asked.append(1)
        raise OSError("libnvrtc.so.13 or .12 not found")
    monkeypatch.setattr(K.cuda, "compile_ptx", no_nvrtc)
    monkeypatch.setattr(K, "_why_not", None)
    why = K.unavailable_reason()
    assert "cannot compile" in why and "libnvrtc" in why and "fastbn[cuda]" in why
    assert K.unavailable_reason() == why and asked == [1]
    monkeypatch.setattr(K.cuda, "compile_ptx", lambda *a, **k: ("ptx", None))
    monkeypatch.setattr(K, "_why_not", None)
    assert K.unavailable_reason() is None


def test_vector_views_are_cached_and_streams_not_wrapped(monkeypatch):
    """Per-channel vectors (the same scale/offset/running statistics every iteration) get
    one Numba view each, made without wrapping the stream their interface exports."""
    import types
    from fastbn.kernels import cuda_runtime as rt
    made = []
    fake = types.SimpleNamespace(from_cuda_array_interface=lambda desc, owner, sync: made.append(
        (desc, owner, sync)) or object())
    monkeypatch.setattr(rt, "cuda_module", lambda: fake)
    monkeypatch.setattr(rt, "_vector_views", {})

    class Vec:
        def __init__(self, ptr):
            self.__cuda_array_interface__ = {"shape": (3,), "strides": None, "typestr": "<f4",
                                             "data": (ptr, False), "version": 3, "stream": 1}
    a = Vec(4096)
    first = rt.vector_view(a)
    assert rt.vector_view(a) is first and rt.vector_view(Vec(4096)) is first
    assert rt.vector_view(Vec(8192)) is not first
    assert len(made) == 2 and all("stream" not in d and o is not None and s is False
                                  for d, o, s in made)

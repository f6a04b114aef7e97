"""The streaming-store elementwise pass (kernels/_stream.py via cpu_numba.affine3).

It only runs for big outputs (STREAM_FROM, STREAM_FROM_CL); here the thresholds are
lowered to 0 so small odd-sized arrays take it, and every call checks that it
did (a spy on ``_affine_stream``).  Results are compared with the float64
oracle and with the ordinary kernels.
"""

import numpy as np
import pytest

import fastbn as fbn
import reference as ref

cpu_numba = pytest.importorskip("fastbn.kernels.cpu_numba")
_stream = pytest.importorskip("fastbn.kernels._stream")
pytestmark = pytest.mark.skipif(not _stream.AVAILABLE, reason="streaming stores are x86-only")


@pytest.fixture
def streamed(monkeypatch):
    """Lower the threshold to 0; yields a list that counts streaming calls."""
    calls = []
    real = cpu_numba._affine_stream

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(cpu_numba, "STREAM_FROM", 0)
    monkeypatch.setattr(cpu_numba, "STREAM_FROM_CL", 0)
    monkeypatch.setattr(cpu_numba, "SMALL", 0)  # training forward through affine3 too
    monkeypatch.setattr(cpu_numba, "_affine_stream", spy)
    return calls


# (shape, channel_axis): channels-first runs with odd lengths, channels-last rows
# of C = 1, 3, 30, 64, 100 (periods smaller and larger than a 16-value line).
CASES = [((3, 5, 37, 29), 1), ((2, 7, 1000), 1), ((1, 1, 5), 1), ((300, 1), -1),
         ((3, 13, 11, 3), -1), ((257, 30), -1), ((9, 7, 5, 64), -1), ((130, 100), -1),
         ((5, 6, 7, 8), 2)]


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_train_infer_backward(streamed, rng, shape, axis, dtype):
    """float32 outputs stream; float16 ones are written directly (no float32 buffer)."""
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    pdt = ref.param_dtype(dtype)
    scale = rng.uniform(0.5, 2, C).astype(pdt)
    offset = rng.standard_normal(C).astype(pdt)
    y, mean, invstd = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, backend="numba")
    ey = ref.batch_norm_train(x, scale, offset, channel_axis=axis)[0]
    ref.assert_close(y, ey, "train y")
    var = rng.uniform(0.5, 2, C).astype(pdt)
    yi = fbn.batch_norm_infer(x, scale, offset, mean, var, channel_axis=axis, backend="numba")
    ref.assert_close(yi, ref.batch_norm_infer(x, scale, offset, mean, var, axis), "infer y")
    dx, _, _ = fbn.batch_norm_backward(dy, x, scale, mean, invstd, channel_axis=axis, backend="numba")
    edx, _, _ = ref.batch_norm_backward(dy, x, scale, mean, invstd, axis)
    ref.assert_close(dx, edx, "backward dx")
    assert len(streamed) == (3 if dtype == "float32" else 0), "every float32 pass streamed"


@pytest.mark.parametrize("shape,axis", CASES)
def test_same_as_ordinary_stores(streamed, monkeypatch, rng, shape, axis):
    """Streaming and ordinary kernels evaluate the same float64 FMA: equal to 1 ulp."""
    x = rng.standard_normal(shape).astype(np.float32)
    C = shape[axis]
    mean, var = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    a = fbn.batch_norm_infer(x, None, None, mean, var, channel_axis=axis, backend="numba")
    assert streamed
    monkeypatch.setattr(cpu_numba, "STREAM_FROM", 1 << 62)
    monkeypatch.setattr(cpu_numba, "STREAM_FROM_CL", 1 << 62)
    b = fbn.batch_norm_infer(x, None, None, mean, var, channel_axis=axis, backend="numba")
    assert len(streamed) == 1
    np.testing.assert_array_max_ulp(a, b, maxulp=1)


@pytest.mark.parametrize("backend,fixture", [("numba", "streamed"), ("cython", "cython_streamed")])
@pytest.mark.parametrize("offset_bytes", [0, 4, 8, 12, 60])
def test_alignments_and_in_place(request, rng, offset_bytes, backend, fixture):
    """Output starting anywhere in a line (and in place, out=x) is written exactly once."""
    streamed = request.getfixturevalue(fixture)
    if backend == "cython":
        streamed = streamed[1]  # the verdicts
    shape = (4, 3, 53)
    n = int(np.prod(shape))
    buf = np.zeros(n * 4 + 256, np.uint8)
    start = (-buf.ctypes.data) % 64 + offset_bytes
    x = buf[start:start + n * 4].view(np.float32).reshape(shape)
    x[...] = rng.standard_normal(shape)
    x0 = x.copy()
    guard = buf.copy()
    mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
    scale = np.array([1.0, 2.0, 3.0], np.float32)
    out = fbn.batch_norm_infer(x, scale, None, mean, var, channel_axis=1, eps=0.0, out=x,
                               backend=backend)
    assert out is x and streamed and all(streamed)
    np.testing.assert_allclose(x, x0 * scale[None, :, None], rtol=1e-6)
    outside = np.ones(buf.size, bool)
    outside[start:start + n * 4] = False
    assert np.array_equal(buf[outside], guard[outside]), "no byte outside the output was written"


def test_unaligned_data_falls_back_to_ordinary_stores(streamed, rng):
    """float32 data at an odd address (NumPy allows it): still correct."""
    buf = np.zeros(4 * 600 + 1, np.uint8)
    x = buf[1:].view(np.float32).reshape(20, 30)
    assert not x.flags.aligned
    x[...] = rng.standard_normal((20, 30))
    y = np.empty_like(x)
    mean, var = np.zeros(30, np.float32), np.full(30, 4.0, np.float32)
    fbn.batch_norm_infer(x, None, None, mean, var, channel_axis=-1, eps=0.0, out=y, backend="numba")
    np.testing.assert_allclose(y, x / 2, rtol=1e-6)


def test_not_streamed_below_threshold_or_float64(monkeypatch, rng):
    calls = []
    monkeypatch.setattr(cpu_numba, "_affine_stream", lambda *a: calls.append(a))
    x = rng.standard_normal((4, 3, 50)).astype(np.float32)
    fbn.batch_norm_train(x, backend="numba")  # 2.4 KB < STREAM_FROM
    monkeypatch.setattr(cpu_numba, "STREAM_FROM", 0)
    monkeypatch.setattr(cpu_numba, "STREAM_FROM_CL", 0)
    fbn.batch_norm_train(x.astype(np.float64), backend="numba")  # float64 keeps q*(x - m) + r
    assert calls == []


@pytest.mark.parametrize("shape,axis", [((3, 6, 41), 1), ((37, 6), -1)])
def test_special_values_like_ordinary_stores(streamed, monkeypatch, rng, shape, axis):
    """inf/NaN in x or in a channel's parameters: the same outputs as the ordinary kernels."""
    x = rng.standard_normal(shape).astype(np.float32)
    x.flat[[0, 7, 20, 33]] = [np.inf, -np.inf, np.nan, 1e38]
    mean = np.array([0, np.inf, 0, 1, -np.inf, 0], np.float32)
    var = np.array([1, 1, np.inf, np.nan, 1, 0], np.float32)
    scale = np.array([1, 2, 3, np.inf, 1, 0], np.float32)
    with np.errstate(all="ignore"):
        a = fbn.batch_norm_infer(x, scale, None, mean, var, channel_axis=axis, eps=0.0, backend="numba")
        assert streamed
        monkeypatch.setattr(cpu_numba, "STREAM_FROM", 1 << 62)
        monkeypatch.setattr(cpu_numba, "STREAM_FROM_CL", 1 << 62)
        b = fbn.batch_norm_infer(x, scale, None, mean, var, channel_axis=axis, eps=0.0, backend="numba")
    np.testing.assert_array_equal(a, b)


# -- the Cython fallback's streaming stores (fbn_stream_affine_f32) ------------

@pytest.fixture
def cython_streamed(monkeypatch):
    """Cython thresholds lowered to 0; yields the list of _streamable verdicts."""
    cy = pytest.importorskip("fastbn.kernels.cpu_cython")
    if cy.unavailable_reason() is not None or not cy._ck.has_stream():
        pytest.skip("Cython extension without streaming stores")
    verdicts = []
    real = cy._streamable

    def spy(*args):
        verdicts.append(real(*args))
        return verdicts[-1]
    monkeypatch.setattr(cy, "STREAM_FROM", 0)
    monkeypatch.setattr(cy, "STREAM_FROM_CL", 0)
    monkeypatch.setattr(cy, "SMALL", 0)   # not the fused small kernels: affine3
    monkeypatch.setattr(cy, "_streamable", spy)
    return cy, verdicts


@pytest.mark.parametrize("shape,axis", CASES)
def test_cython_streaming_equals_ordinary_stores(cython_streamed, monkeypatch, rng, shape, axis):
    """Bit-identical to the ordinary stores (same float64 expression, rounded once),
    and equal to the oracle, for inference and backward."""
    cy, verdicts = cython_streamed
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    C = shape[axis]
    scale, mean = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    var, invstd = rng.uniform(0.5, 2, C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)

    def both():
        return (fbn.batch_norm_infer(x, scale, mean, mean, var, channel_axis=axis, backend="cython"),
                fbn.batch_norm_backward(dy, x, scale, mean, invstd, channel_axis=axis,
                                        backend="cython")[0])
    y, dx = both()
    assert verdicts and all(verdicts), "every elementwise pass streamed"
    ref.assert_close(y, ref.batch_norm_infer(x, scale, mean, mean, var, axis), "infer y")
    ref.assert_close(dx, ref.batch_norm_backward(dy, x, scale, mean, invstd, axis)[0], "dx")
    monkeypatch.setattr(cy, "STREAM_FROM", 1 << 62)
    monkeypatch.setattr(cy, "STREAM_FROM_CL", 1 << 62)
    y2, dx2 = both()
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(dx, dx2)


@pytest.mark.parametrize("backend", ["numba", "cython"])
def test_streaming_from_threads(streamed, monkeypatch, rng, backend):
    """Concurrent streamed calls (parallel kernels entered from 4 threads) give the
    serial results."""
    import concurrent.futures
    if backend == "cython":
        cy = pytest.importorskip("fastbn.kernels.cpu_cython")
        if cy.unavailable_reason() is not None:
            pytest.skip(cy.unavailable_reason())
        monkeypatch.setattr(cy, "STREAM_FROM", 0)
        monkeypatch.setattr(cy, "STREAM_FROM_CL", 0)
        monkeypatch.setattr(cy, "SMALL", 0)   # affine3, not the fused small kernels
    xs = [rng.standard_normal((6, 5, 301)).astype(np.float32) for _ in range(8)]
    xs += [rng.standard_normal((700, 24)).astype(np.float32) for _ in range(8)]

    def call(x):
        ax = 1 if x.ndim == 3 else -1
        C = x.shape[ax]
        return fbn.batch_norm_infer(x, None, None, np.zeros(C, np.float32), np.full(C, 4.0, np.float32),
                                    channel_axis=ax, eps=0.0, backend=backend)
    expected = [call(x) for x in xs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            for got, want in zip(pool.map(call, xs), expected):
                np.testing.assert_array_equal(got, want)
    for x, want in zip(xs, expected):
        np.testing.assert_allclose(want, x / 2, rtol=1e-6)

"""The numba.cuda backend on a real GPU: CuPy in/out, streams, float16, both layouts, large sizes.

Skipped without a CUDA GPU (and under the simulator, which tests/test_cuda_sim.py covers).
Run on a GPU machine with ``python -m pytest tests/test_cuda_gpu.py -q``.
"""

import os
import time

import numpy as np
import pytest

import reference as ref
import fastbn as fbn


def _gpu_reason():
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return "the CUDA simulator is on (tests/test_cuda_sim.py covers it)"
    try:
        from numba import cuda
    except ImportError:
        return "numba-cuda is not installed"
    try:
        if not cuda.is_available():
            return "no CUDA GPU here"
    except Exception as exc:  # noqa: BLE001
        return f"no usable CUDA driver: {exc}"
    return None


_REASON = _gpu_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


@pytest.fixture
def cp():
    return pytest.importorskip("cupy")


@pytest.fixture
def cuda():
    from numba import cuda
    return cuda


@pytest.fixture
def small_blocks(monkeypatch):
    """Few threads per block and many splits: the multi-block paths on moderate sizes."""
    from fastbn.kernels import cuda_numba
    monkeypatch.setattr(cuda_numba, "TPB", 32)
    monkeypatch.setattr(cuda_numba, "MIN_PER_THREAD", 2)
    return cuda_numba


# (shape, channel_axis): NCHW, NHWC, (N, C), NCL with a large spatial extent
LAYOUTS = [((8, 16, 14, 14), 1), ((8, 14, 14, 16), -1), ((300, 40), -1), ((4, 6, 1000), 1)]


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_train_backward_cupy(cp, make_array, shape, axis, dtype):
    h = make_array(shape, dtype, channel_axis=axis)
    g = make_array(shape, dtype)
    C = shape[axis]
    pdt = ref.param_dtype(dtype)
    scale, offset = make_array(C, pdt, loc=1.0, sd=0.3), make_array(C, pdt)
    rm0, rv0 = np.zeros(C, pdt), np.ones(C, pdt)
    rm, rv = cp.asarray(rm0), cp.asarray(rv0)
    y, mean, invstd = fbn.batch_norm_train(cp.asarray(h), cp.asarray(scale), cp.asarray(offset),
                                           channel_axis=axis, running_mean=rm, running_var=rv)
    assert all(isinstance(a, cp.ndarray) for a in (y, mean, invstd))
    assert y.dtype == dtype and mean.dtype == pdt and invstd.dtype == pdt
    ey, emean, einv, erm, erv = ref.batch_norm_train(h, scale, offset, axis, 1e-5, rm0, rv0, 0.1)
    ref.assert_close(y.get(), ey, "y")
    ref.assert_close(mean.get(), emean, "mean")
    ref.assert_close(invstd.get(), einv, "invstd")
    ref.assert_close(rm.get(), erm, "running_mean")
    ref.assert_close(rv.get(), erv, "running_var")
    dx, dscale, doffset = fbn.batch_norm_backward(cp.asarray(g), cp.asarray(h), cp.asarray(scale),
                                                  mean, invstd, channel_axis=axis)
    edx, eds, edo = ref.batch_norm_backward(g, h, scale, mean.get(), invstd.get(), axis)
    ref.assert_close(dx.get(), edx, "dx")
    ref.assert_close(dscale.get(), eds, "dscale")
    ref.assert_close(doffset.get(), edo, "doffset")


@pytest.mark.parametrize("shape,axis", LAYOUTS[:2])
def test_small_blocks_multi_block_paths(cp, make_array, small_blocks, shape, axis):
    h = make_array(shape, np.float32, loc=10.0, channel_axis=axis)
    y, mean, invstd = fbn.batch_norm_train(cp.asarray(h), channel_axis=axis)
    ey, emean, einv, _, _ = ref.batch_norm_train(h, channel_axis=axis)
    ref.assert_close(y.get(), ey, "y")
    ref.assert_close(invstd.get(), einv, "invstd")


@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_infer_and_moments_cupy(cp, make_array, dtype):
    h = make_array((6, 5, 7, 9), dtype)
    pdt = ref.param_dtype(dtype)
    mean, var = make_array(5, pdt), np.abs(make_array(5, pdt)) + 0.1
    y = fbn.batch_norm_infer(cp.asarray(h), None, None, cp.asarray(mean), cp.asarray(var))
    ref.assert_close(y.get(), ref.batch_norm_infer(h, None, None, mean, var), "y")
    for axis in (None, (0, 2), 3, (1, 2, 3)):
        m, v = fbn.moments(cp.asarray(h), axis, ddof=1)
        em, ev = ref.moments(h, axis, ddof=1)
        ref.assert_close(m.get(), em, f"mean {axis}")
        ref.assert_close(v.get(), ev, f"var {axis}")


def test_float32_variance_at_offset_1e6(cp, rng):
    """The issue's accuracy bar, NCHW and NHWC: variance rel. error <= 1e-6."""
    h = (1e6 + rng.standard_normal((64, 32, 28, 28))).astype(np.float32)
    expect = h.astype(np.float64).var(axis=(0, 2, 3))
    for x, axes in ((cp.asarray(h), (0, 2, 3)), (cp.asarray(np.moveaxis(h, 1, -1).copy()), (0, 1, 2))):
        _, var = fbn.moments(x, axes)
        assert np.max(np.abs(var.get().astype(np.float64) - expect) / expect) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("axis", [1, -1])
def test_large_256mb(cp, axis):
    """>= 256 MB float32 (the benchmark's size), against CuPy float64 statistics."""
    shape = (256, 64, 64, 64)
    x = (3.0 + cp.random.standard_normal(shape, dtype=cp.float32))
    ax = axis % 4
    axes = tuple(a for a in range(4) if a != ax)
    y, mean, invstd = fbn.batch_norm_train(x, channel_axis=axis)
    xf = x.astype(cp.float64)
    emean = xf.mean(axis=axes)
    evar = xf.var(axis=axes)
    assert float(cp.max(cp.abs(mean - emean) / cp.abs(emean))) < 1e-6
    assert float(cp.max(cp.abs(invstd.astype(cp.float64) ** -2 - 1e-5 - evar) / evar)) < 1e-5
    shp = [-1 if a == ax else 1 for a in range(4)]
    ey = (xf - emean.reshape(shp)) / cp.sqrt(evar.reshape(shp) + 1e-5)
    assert float(cp.max(cp.abs(y - ey))) < 1e-4


def test_numba_device_arrays_in_and_out(cuda, make_array):
    h = make_array((5, 3, 4, 6), np.float32, channel_axis=1)
    rm = cuda.to_device(np.zeros(3, np.float32))
    y, mean, invstd = fbn.batch_norm_train(cuda.to_device(h), running_mean=rm)
    assert all(cuda.is_cuda_array(a) and hasattr(a, "copy_to_host") for a in (y, mean, invstd))
    ey, emean, einv, erm, _ = ref.batch_norm_train(h, running_mean=np.zeros(3))
    ref.assert_close(y.copy_to_host(), ey, "y")
    ref.assert_close(mean.copy_to_host(), emean, "mean")
    ref.assert_close(rm.copy_to_host(), erm, "running_mean")


def test_numba_arrays_without_cupy(cuda, make_array, monkeypatch):
    """The host-vector path (no CuPy) on a real device, layouts included."""
    from fastbn.kernels import cuda_runtime as device
    monkeypatch.setattr(device, "USE_CUPY", False)
    h = make_array((5, 3, 4, 6), np.float64, channel_axis=1)
    x = cuda.to_device(np.ascontiguousarray(np.moveaxis(h, 1, -1)))  # NHWC storage
    rm = cuda.to_device(np.zeros(3))
    y, mean, invstd = fbn.batch_norm_train(x, channel_axis=-1, running_mean=rm)
    ey, emean, einv, erm, _ = ref.batch_norm_train(np.moveaxis(h, 1, -1), channel_axis=-1,
                                                   running_mean=np.zeros(3))
    ref.assert_close(y.copy_to_host(), ey, "y")
    ref.assert_close(mean.copy_to_host(), emean, "mean")
    ref.assert_close(rm.copy_to_host(), erm, "running_mean")
    # a cropped view: no canonical view exists, the N-d copy kernel gathers it
    big = np.full((5, 5, 4, 8), np.nan)
    big[:, 1:4, :, 1:7] = h
    y = fbn.batch_norm_train(cuda.to_device(big)[:, 1:4, :, 1:7])[0]
    ref.assert_close(y.copy_to_host(), ref.batch_norm_train(h)[0], "cropped")


def test_torch_cuda_tensor_in(cp, make_array):
    torch = _torch_cuda()
    h = make_array((4, 3, 5, 5), np.float32)
    t = torch.as_tensor(h, device="cuda")
    y, mean, invstd = fbn.batch_norm_train(t)
    assert all(isinstance(a, torch.Tensor) and a.is_cuda for a in (y, mean, invstd))
    ref.assert_close(y.cpu().numpy(), ref.batch_norm_train(h)[0], "y")
    out = torch.empty_like(t)
    assert fbn.batch_norm_train(t, out=out)[0] is out
    ref.assert_close(out.cpu().numpy(), ref.batch_norm_train(h)[0], "out= torch")
    cl = t.to(memory_format=torch.channels_last)
    y = fbn.batch_norm_train(cl)[0]
    assert y.is_contiguous(memory_format=torch.channels_last)   # torch.empty_like keeps it
    ref.assert_close(y.cpu().numpy(), ref.batch_norm_train(h)[0], "channels_last")


def test_out_in_place_and_exotic(cp, make_array):
    h = make_array((4, 3, 6, 5), np.float32, channel_axis=1)
    ey = ref.batch_norm_train(h)[0]
    x = cp.asarray(h)
    assert fbn.batch_norm_train(x, out=x)[0] is x
    ref.assert_close(x.get(), ey, "in place")
    big = cp.full((4, 3, 8, 9), cp.nan, dtype=cp.float32)
    out = big[:, :, 1:7, 2:7]
    assert fbn.batch_norm_train(cp.asarray(h), out=out)[0] is out
    ref.assert_close(out.get(), ey, "exotic out")
    assert bool(cp.isnan(big[:, :, 0]).all())


def test_mixed_families_raise(cp, make_array):
    x = cp.asarray(make_array((4, 3), np.float32))
    with pytest.raises(TypeError, match="scale"):
        fbn.batch_norm_train(x, np.ones(3, np.float32), channel_axis=-1)
    with pytest.raises(TypeError):
        fbn.batch_norm_train(make_array((4, 3), np.float32), cp.ones(3, cp.float32), channel_axis=-1)
    rm = cp.zeros(3, cp.float32)
    with pytest.raises(TypeError, match="running_var"):
        fbn.batch_norm_train(x, channel_axis=-1, running_mean=rm, running_var=np.ones(3, np.float32))
    assert not bool(rm.any())


def test_runs_on_cupy_current_stream_without_host_sync(cp, make_array):
    """Kernels queue behind work on CuPy's current stream and the call does not wait for it."""
    spin = cp.RawKernel(r'''
    extern "C" __global__ void spin(long long cycles) {
        long long t0 = clock64();
        while (clock64() - t0 < cycles) { }
    }''', "spin")
    h = make_array((16, 8, 32, 32), np.float32)
    x = cp.asarray(h)
    fbn.batch_norm_train(x)  # compile and warm up
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        x2 = cp.asarray(h)
        spin((1,), (1,), (np.int64(2_000_000_000),))  # ~1 s at ~2 GHz
        t0 = time.perf_counter()
        y, mean, invstd = fbn.batch_norm_train(x2)
        elapsed = time.perf_counter() - t0
        assert not s.done  # the spin (and our kernels behind it) are still queued
    s.synchronize()
    assert elapsed < 0.5, f"the call waited {elapsed:.2f} s for the device"
    ref.assert_close(y.get(), ref.batch_norm_train(h)[0], "y on a side stream")


def test_deterministic(cp, make_array):
    x = cp.asarray(make_array((32, 16, 20, 20), np.float32, loc=100.0))
    first = fbn.moments(x, (0, 2, 3))
    for _ in range(3):
        again = fbn.moments(x, (0, 2, 3))
        assert all(bool((a == b).all()) for a, b in zip(first, again))


# -- the fused paths on hardware: launches, the caller's stream and device ------------------------

@pytest.fixture
def launches(monkeypatch):
    from fastbn.kernels import cuda_numba
    seen = []
    real = cuda_numba._launch

    def counting(kern, grid, block, shmem, stream, *args):
        seen.append((kern, stream))
        return real(kern, grid, block, shmem, stream, *args)
    monkeypatch.setattr(cuda_numba, "_launch", counting)
    return seen


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_fused_launch_counts_on_the_gpu(cp, make_array, launches, shape, axis):
    h = make_array(shape, np.float32, channel_axis=axis)
    x = cp.asarray(h)
    C = shape[axis]
    rm, rv = cp.zeros(C, cp.float32), cp.ones(C, cp.float32)
    y, mean, invstd = fbn.batch_norm_train(x, channel_axis=axis, running_mean=rm, running_var=rv)
    assert len(launches) == 2
    launches.clear()
    fbn.batch_norm_infer(x, None, None, rm, rv, channel_axis=axis)
    assert len(launches) == 1
    launches.clear()
    dx, ds, do_ = fbn.batch_norm_backward(x, x, None, mean, invstd, channel_axis=axis)
    assert len(launches) == 2
    launches.clear()
    fbn.batch_norm_infer_backward(x, x, None, rm, rv, channel_axis=axis)
    assert len(launches) == 2
    edx, eds, edo = ref.batch_norm_backward(h, h, None, mean.get(), invstd.get(), axis)
    ref.assert_close(dx.get(), edx, "dx")
    ref.assert_close(ds.get(), eds, "dscale")


def test_every_allowed_block_size_launches(cp, make_array, monkeypatch):
    """Launch bounds: 1024 threads per block must launch (no LAUNCH_OUT_OF_RESOURCES)."""
    from fastbn.kernels import cuda_numba
    h = make_array((16, 8, 20, 20), np.float64)
    for tpb in (32, 256, 1024):
        monkeypatch.setattr(cuda_numba, "TPB", tpb)
        for axis, x in ((1, cp.asarray(h)), (-1, cp.asarray(h.transpose(0, 2, 3, 1).copy()))):
            y, mean, invstd = fbn.batch_norm_train(x, channel_axis=axis)
            fbn.batch_norm_backward(x, x, None, mean, invstd, channel_axis=axis)
        ref.assert_close(y.get(), ref.batch_norm_train(h.transpose(0, 2, 3, 1), channel_axis=-1)[0],
                         f"TPB={tpb}")


def _torch_cuda():
    """torch, or a skip where it has no CUDA."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    return torch


def _all_on(launches, s):
    """True if every launch went on torch stream ``s``."""
    return all(int(st.handle.value if hasattr(st.handle, "value") else st.handle) == s.cuda_stream
               for _, st in launches)


def test_torch_current_stream_is_used(cp, make_array, launches):
    """Under ``with torch.cuda.stream(s)`` the kernels queue on s, behind torch's work there,
    and the call does not wait for the device."""
    torch = _torch_cuda()
    h = make_array((16, 8, 32, 32), np.float32)
    t = torch.as_tensor(h, device="cuda")
    fbn.batch_norm_train(t)   # compile
    launches.clear()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = t * 1.0
        torch.cuda._sleep(1_000_000_000)
        t0 = time.perf_counter()
        y = fbn.batch_norm_train(x)[0]
        elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"the call waited {elapsed:.2f} s"
    assert _all_on(launches, s)
    s.synchronize()
    ref.assert_close(y.cpu().numpy(), ref.batch_norm_train(h)[0], "y on torch's stream")


def test_moments_and_normalization_on_torchs_stream(cp, make_array, launches):
    """moments over (N, H, W) and batch_normalization with its keepdims results: one
    launch each, on torch's current stream, tensors back, no wait for the device."""
    torch = _torch_cuda()
    h = make_array((16, 8, 32, 32), np.float32, loc=3.0)
    t = torch.as_tensor(h, device="cuda")
    m, v = fbn.moments(t, (0, 2, 3), keepdims=True)   # compile
    fbn.batch_normalization(t, m, v, None, None, 1e-3)
    launches.clear()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = t * 1.0
        torch.cuda._sleep(1_000_000_000)
        t0 = time.perf_counter()
        m, v = fbn.moments(x, (0, 2, 3), keepdims=True)
        y = fbn.batch_normalization(x, m, v, None, None, 1e-3)
        elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"the calls waited {elapsed:.2f} s"
    assert len(launches) == 2 and _all_on(launches, s)
    assert all(isinstance(a, torch.Tensor) for a in (m, v, y)) and tuple(m.shape) == (1, 8, 1, 1)
    s.synchronize()
    em, ev = ref.moments(h, (0, 2, 3), True)
    ref.assert_close(v.cpu().numpy(), ev, "var on torch's stream")
    ref.assert_close(y.cpu().numpy(), ref.batch_normalization(h, em, ev, None, None, 1e-3), "y")


def test_numba_array_stream_is_used(cuda, make_array, launches):
    h = make_array((4, 3, 40), np.float32)
    s = cuda.stream()
    x = cuda.to_device(h, stream=s)
    y = fbn.batch_norm_train(x)[0]
    assert launches and all(st is s for _, st in launches)
    s.synchronize()
    ref.assert_close(y.copy_to_host(), ref.batch_norm_train(h)[0], "y")


def test_second_device(cp, make_array):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one GPU")
    h = make_array((4, 3, 5, 5), np.float32)
    with cp.cuda.Device(1):
        x = cp.asarray(h)
        rm = cp.zeros(3, cp.float32)
    with cp.cuda.Device(0):
        y, mean, invstd = fbn.batch_norm_train(x, running_mean=rm)   # runs on device 1
        assert y.device.id == 1
        ref.assert_close(y.get(), ref.batch_norm_train(h)[0], "y on device 1")
        with pytest.raises(ValueError, match="scale is on CUDA device 0"):
            fbn.batch_norm_train(x, cp.ones(3, cp.float32))


def test_backend_compiles():
    assert fbn.backends()["cuda"] == "available"

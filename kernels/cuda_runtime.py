"""Low-level CUDA helpers shared by the CUDA kernels and the CUDA array family.

Which numba.cuda / CuPy is in use, the stream kernels launch on, device
allocation, and zero-copy Numba views of device memory.  Nothing here knows
fastbn's public API; ``fastbn.families.cuda`` builds the family on top.

Module attribute ``USE_CUPY`` (default True; never in the simulator) lets
tests exercise the no-CuPy path on a machine that has CuPy, with Numba arrays.
"""

import importlib
import os
import sys

import numpy as np

USE_CUPY = True

_cupy_mod = None      # None: not looked up yet; False: not importable
_streams = {}
_sm_count = {}

def simulator():
    """True when Numba's CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1`` at import)."""
    try:
        from numba.cuda import config
        return bool(config.ENABLE_CUDASIM)
    except (ImportError, AttributeError):
        return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def cuda_module():
    """numba.cuda (imported on first use)."""
    from numba import cuda
    return cuda


def cupy():
    """The cupy module if it is installed and used (not in the simulator), else None."""
    global _cupy_mod
    if not USE_CUPY:
        return None
    if _cupy_mod is None:
        if simulator():
            _cupy_mod = False
        else:
            try:
                _cupy_mod = importlib.import_module("cupy")
            except Exception:  # noqa: BLE001 - ImportError, or a CuPy without its CUDA libraries
                _cupy_mod = False
    return _cupy_mod or None


def xp():
    """The namespace of per-channel working vectors: cupy, or numpy (host) without CuPy."""
    return cupy() or np


def sm_count():
    """Streaming multiprocessors of the current device (16 when it cannot tell: simulator)."""
    cuda = cuda_module()
    try:
        dev = cuda.get_current_device()
        key = getattr(dev, "id", 0)
        if key not in _sm_count:
            _sm_count[key] = int(dev.MULTIPROCESSOR_COUNT)
        return _sm_count[key]
    except Exception:  # noqa: BLE001 - the simulator's device has no attributes
        return 16


def stream():
    """The Numba stream kernels launch on: CuPy's current stream, or 0 (default stream).

    CuPy's null stream (pointer 0) is the legacy default stream, which is
    Numba's stream 0 too.  External-stream wrappers are cached per (device, pointer).
    """
    cp = cupy()
    if cp is None:
        return 0
    ptr = cp.cuda.get_current_stream().ptr
    if ptr == 0:
        return 0
    key = (cp.cuda.runtime.getDevice(), ptr)
    s = _streams.get(key)
    if s is None:
        s = _streams[key] = cuda_module().external_stream(ptr)
    return s


def is_cupy(a):
    return type(a).__module__.split(".", 1)[0] == "cupy"


def is_numba(a):
    """A Numba device array (or the simulator's stand-in for one)."""
    return bool(getattr(a, "__cuda_ndarray__", False)) and hasattr(a, "copy_to_host")


def is_fake(a):
    return type(a).__name__ == "FakeCUDAArray"


def to_numba(a):
    """``a`` as a Numba device array for a kernel argument: zero-copy, no sync.

    Host NumPy arrays (per-channel vectors without CuPy) are copied to the device.
    """
    if is_numba(a):
        return a
    cuda = cuda_module()
    if isinstance(a, np.ndarray):
        return cuda.to_device(np.ascontiguousarray(a), stream=stream())
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError(f"expected a device array, got {type(a).__name__}")
    if cai.get("stream") is not None:
        # Numba would wrap the exported stream (one more object per call) only to
        # not synchronise on it: fastbn picks the stream itself (stream_for).
        cai = {k: v for k, v in cai.items() if k != "stream"}
    return cuda.from_cuda_array_interface(cai, owner=a, sync=False)


_vector_views = {}
_VECTOR_VIEWS_MAX = 64


def vector_view(a):
    """:func:`to_numba` for a per-channel vector, cached by what it points at.

    The same scale, offset and running statistics come with every call of a
    training loop; their views are kept (each holds its array, so its memory
    cannot be reused under the key while cached; a few small vectors at most).
    """
    if is_numba(a):
        return a
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:
        return to_numba(a)
    key = (type(a), cai["data"][0], tuple(cai["shape"]), cai.get("strides"), cai["typestr"])
    v = _vector_views.get(key)
    if v is None:
        if len(_vector_views) >= _VECTOR_VIEWS_MAX:
            _vector_views.clear()
        v = _vector_views[key] = to_numba(a)
    return v


def to_host(a):
    """A device (or host) array's values as a NumPy array (waits for the device)."""
    if isinstance(a, np.ndarray):
        return a
    if is_cupy(a):
        return a.get()
    if is_numba(a):
        return a.copy_to_host()
    if getattr(a, "__cuda_array_interface__", None) is not None:
        return cuda_module().as_cuda_array(a, sync=False).copy_to_host()
    return np.asarray(a)


def empty(shape, dtype):
    """An uninitialised C-contiguous device array: ``(owner, numba_view)``.

    ``owner`` is the CuPy array (keep it until the kernels using the view are
    enqueued) or the Numba array itself.
    """
    cp = cupy()
    if cp is not None:
        a = cp.empty(shape, dtype=dtype)
        return a, to_numba(a)
    d = cuda_module().device_array(shape, dtype=dtype, stream=stream())
    return d, d


def full(shape, value, dtype):
    """Like :func:`empty`, filled with ``value``."""
    cp = cupy()
    if cp is not None:
        a = cp.full(shape, value, dtype=dtype)
        return a, to_numba(a)
    d = cuda_module().to_device(np.full(shape, value, dtype=dtype), stream=stream())
    return d, d


def param_stack(vectors, dtype):
    """Per-channel kernel parameters stacked as rows: ``(owner, numba view of shape (k, C))``.

    One array (one conversion, one kernel argument) instead of k.
    """
    cp = cupy()
    if cp is not None:
        a = cp.stack([cp.asarray(v) for v in vectors]).astype(dtype, copy=False)
        return a, to_numba(a)
    h = np.ascontiguousarray(np.stack([to_host(v) for v in vectors]), dtype=dtype)
    d = cuda_module().to_device(h, stream=stream())
    return d, d


def vector_pair(owner, view):
    """Rows 0 and 1 of a (2, C) float64 kernel result as working vectors.

    CuPy views (no wait) with CuPy; else one copy to the host, which waits for the kernels.
    """
    if cupy() is not None and is_cupy(owner):
        return owner[0], owner[1]
    h = view.copy_to_host()
    return h[0], h[1]


def ptr(a):
    if is_fake(a):
        return a._ary.__array_interface__["data"][0]
    return a.__cuda_array_interface__["data"][0]


def flat(a):
    """``(flat, offset, strides)``: a 1-D element view spanning ``a``'s memory, the
    position of ``a[0, ..., 0]`` in it, and ``a``'s strides in elements."""
    item = np.dtype(a.dtype).itemsize
    if any(s % item for s in a.strides):
        raise ValueError(f"strides {tuple(a.strides)} are not multiples of the item size {item}")
    shape = tuple(int(n) for n in a.shape)
    st = tuple(int(s) // item for s in a.strides)
    lo = sum(min(0, (n - 1) * s) for n, s in zip(shape, st))
    hi = sum(max(0, (n - 1) * s) for n, s in zip(shape, st))
    span = hi - lo + 1
    if is_fake(a):
        low = a._ary[tuple(slice(n - 1, n) if s < 0 else slice(0, 1) for n, s in zip(shape, st))]
        return type(a)(np.lib.stride_tricks.as_strided(low, (span,), (item,))), -lo, st
    cai = a.__cuda_array_interface__
    desc = {"shape": (span,), "strides": None, "data": (cai["data"][0] + lo * item, False),
            "typestr": cai["typestr"], "version": 3}
    return cuda_module().from_cuda_array_interface(desc, owner=a, sync=False), -lo, st


# -- per-stream scratch ------------------------------------------------------------------
#
# The fused kernels need block partials, arrival counters and the per-channel
# coefficients between their two launches.  Kept per (device, stream) and
# reused: work queued on one stream runs in order, so a later call on that
# stream cannot overwrite what an earlier one still reads, and no allocation,
# zero-fill or Numba array wrapper is built per call once a shape has been seen.

_scratch = {}
_SCRATCH_MAX = 64   # entries kept before the cache starts over (shapes seen by a training loop: few)


def stream_key(s):
    """A hashable name of a Numba stream (0, the legacy default stream: 0)."""
    if s is None or (isinstance(s, int) and s == 0):
        return 0
    try:
        return int(s)   # a numba Stream converts to its handle
    except (TypeError, ValueError):
        return id(s)


def _current_device_id():
    try:
        return cuda_module().get_current_device().id
    except Exception:  # noqa: BLE001 - the simulator
        return 0


def scratch(s, name, shape, dtype):
    """A cached uninitialised Numba device array for stream ``s`` (None: :func:`stream`)."""
    s = stream() if s is None else s
    key = (_current_device_id(), stream_key(s), name, tuple(shape), np.dtype(dtype).str)
    a = _scratch.get(key)
    if a is None:
        if len(_scratch) >= _SCRATCH_MAX:
            _scratch.clear()
        a = _scratch[key] = cuda_module().device_array(tuple(shape), dtype=dtype)
    return a


def counters(s, n):
    """Zeroed int32 arrival counters for stream ``s``, at least ``n`` of them.

    The fused reductions' last blocks reset what they counted, so the
    counters are zero again at the end of every launch: filled once per stream.
    """
    s = stream() if s is None else s
    key = (_current_device_id(), stream_key(s), "counters")
    a = _scratch.get(key)
    if a is None or a.shape[0] < n:
        if len(_scratch) >= _SCRATCH_MAX:
            _scratch.clear()
        size = max(64, 1 << (max(n, 1) - 1).bit_length())
        a = _scratch[key] = cuda_module().to_device(np.zeros(size, np.int32))
    return a


# -- where an array lives: its stream, its device ------------------------------------------

def torch_stream(device_index):
    """PyTorch's current stream on ``device_index`` as a Numba stream, when torch is
    imported (by the caller: fastbn never imports it); None otherwise."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    ptr = int(torch.cuda.current_stream(device_index).cuda_stream)
    return external(ptr, device_index)


def external(ptr, device_id):
    """A cached Numba wrapper of the CUDA stream pointer ``ptr`` (0: the default stream)."""
    if ptr == 0:
        return 0
    key = (device_id, ptr)
    s = _streams.get(key)
    if s is None:
        s = _streams[key] = cuda_module().external_stream(ptr)
    return s


def stream_for(a, tensor=None):
    """The stream work on array ``a`` belongs on: PyTorch's current stream for a
    torch tensor (``tensor``: the tensor ``a`` views), CuPy's current stream for
    CuPy arrays, the stream a Numba array was made on (else CuPy's current one)."""
    if tensor is not None:
        s = torch_stream(tensor.device.index)
        if s is not None:
            return s
    if is_numba(a):
        s = getattr(a, "stream", 0)
        if s is not None and not (isinstance(s, int) and s == 0):
            return s
    return stream()


def device_of(a):
    """The device ordinal holding array ``a``, or None where it cannot tell (the simulator)."""
    dev = getattr(a, "device", None)
    if dev is not None:
        ident = getattr(dev, "id", None)          # CuPy
        if ident is None:
            ident = getattr(dev, "index", None)   # torch
        if isinstance(ident, int):
            return ident
    data = getattr(a, "gpu_data", None)           # Numba
    ctx = getattr(data, "context", None)
    ident = getattr(getattr(ctx, "device", None), "id", None)
    return ident if isinstance(ident, int) else None

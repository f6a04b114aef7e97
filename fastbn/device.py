"""Helpers for the ``"cuda"`` array family (device memory).

Three kinds of arrays belong to the family:

* **CuPy** arrays: results come back as CuPy arrays;
* **Numba device arrays** (``numba.cuda.to_device``; in the CUDA simulator
  ``FakeCUDAArray``): results come back as Numba device arrays;
* anything else with ``__cuda_array_interface__`` (a PyTorch CUDA tensor):
  :func:`asarray` turns it into a zero-copy CuPy view when CuPy is installed,
  else into a Numba device array, and results follow that kind.

Kernels take Numba device arrays: :func:`to_numba` makes zero-copy views
through the CUDA array interface with ``sync=False`` (Numba would otherwise
synchronise on the stream an array exports).  Per-channel vectors live in a
*working namespace*, :func:`xp`: CuPy when it is installed (they stay on the
device, computed on CuPy's current stream, no hidden synchronisation), else
host NumPy.  Without CuPy every call therefore copies a few length-C vectors
between host and device (``copy_to_host`` waits for the device): correct,
a few tens of microseconds per call, and the reason to install CuPy.

Kernels run on CuPy's current stream (:func:`stream`), or on Numba's default
stream without CuPy.  Temporaries come from CuPy's stream-ordered memory pool
when CuPy is present.

Module attribute ``USE_CUPY`` (default True; never in the simulator) lets
tests exercise the no-CuPy path on a machine that has CuPy, with Numba arrays.
Kernels queue on CuPy's current stream: work on other streams (a Numba stream
of the caller's) must be synchronised by the caller first.

Testing: the simulator (tests/test_cuda_sim.py) runs every no-CuPy branch; the
CuPy branches (``cp = cupy()`` not None, ``is_cupy``) and :func:`stream` run
only on a GPU machine (tests/test_cuda_gpu.py).
"""

import importlib
import math
import os
import sys

import numpy as np

USE_CUPY = True

_cupy_mod = None      # None: not looked up yet; False: not importable
_streams = {}
_sm_count = {}


# -- environment -----------------------------------------------------------------

def simulator():
    """True when Numba's CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1`` at import)."""
    try:
        from numba.cuda import config
        return bool(config.ENABLE_CUDASIM)
    except (ImportError, AttributeError):
        return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def _cuda():
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
    cuda = _cuda()
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
        s = _streams[key] = _cuda().external_stream(ptr)
    return s


# -- kinds of arrays ---------------------------------------------------------------

def is_cupy(a):
    return type(a).__module__.split(".", 1)[0] == "cupy"


def is_numba(a):
    """A Numba device array (or the simulator's stand-in for one)."""
    return bool(getattr(a, "__cuda_ndarray__", False)) and hasattr(a, "copy_to_host")


def _is_fake(a):
    return type(a).__name__ == "FakeCUDAArray"


def asarray(obj):
    """A cuda-family object as an array fastbn can work with, without copying.

    CuPy and Numba arrays come back as they are; another
    ``__cuda_array_interface__`` object (a PyTorch CUDA tensor) becomes a CuPy
    view, or a Numba view without CuPy.  Anything else comes back unchanged
    (the caller's dtype check rejects it).
    """
    if is_cupy(obj) or is_numba(obj):
        return obj
    if getattr(obj, "__cuda_array_interface__", None) is not None:
        cp = cupy()
        if cp is not None:
            return cp.asarray(obj)
        return _cuda().as_cuda_array(obj, sync=False)
    return obj


def to_numba(a):
    """``a`` as a Numba device array for a kernel argument: zero-copy, no sync.

    Host NumPy arrays (per-channel vectors without CuPy) are copied to the device.
    """
    if is_numba(a):
        return a
    cuda = _cuda()
    if isinstance(a, np.ndarray):
        return cuda.to_device(np.ascontiguousarray(a), stream=stream())
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError(f"expected a device array, got {type(a).__name__}")
    return cuda.from_cuda_array_interface(cai, owner=a, sync=False)


def _to_host(a):
    """A device (or host) array's values as a NumPy array (waits for the device)."""
    if isinstance(a, np.ndarray):
        return a
    if is_cupy(a):
        return a.get()
    if is_numba(a):
        return a.copy_to_host()
    if getattr(a, "__cuda_array_interface__", None) is not None:
        return _cuda().as_cuda_array(a, sync=False).copy_to_host()
    return np.asarray(a)


# -- allocation --------------------------------------------------------------------

def empty(shape, dtype):
    """An uninitialised C-contiguous device array: ``(owner, numba_view)``.

    ``owner`` is the CuPy array (keep it until the kernels using the view are
    enqueued) or the Numba array itself.
    """
    cp = cupy()
    if cp is not None:
        a = cp.empty(shape, dtype=dtype)
        return a, to_numba(a)
    d = _cuda().device_array(shape, dtype=dtype, stream=stream())
    return d, d


def full(shape, value, dtype):
    """Like :func:`empty`, filled with ``value``."""
    cp = cupy()
    if cp is not None:
        a = cp.full(shape, value, dtype=dtype)
        return a, to_numba(a)
    d = _cuda().to_device(np.full(shape, value, dtype=dtype), stream=stream())
    return d, d


def _k_order(shape, strides):
    """Axes from largest to smallest |stride| (NumPy's order='K' for a new array)."""
    return sorted(range(len(shape)), key=lambda a: -abs(strides[a]) if shape[a] > 1 else 0)


def empty_like_layout(x, dtype):
    """An uninitialised array of ``x``'s kind, shape and memory order (order='K')."""
    shape = tuple(int(s) for s in x.shape)
    if is_cupy(x):
        return sys.modules["cupy"].empty_like(x, dtype=dtype, order="K")
    if _is_fake(x):
        return type(x)(np.empty_like(x._ary, dtype=dtype, order="K"))
    order = _k_order(shape, x.strides)
    inverse = np.argsort(order)
    cp = cupy()
    if cp is not None:
        buf = cp.empty([shape[a] for a in order], dtype=dtype).transpose(inverse)
        return to_numba(buf)
    strides = [0] * len(shape)
    step = np.dtype(dtype).itemsize
    for a in reversed(order):
        strides[a] = step
        step *= max(shape[a], 1)
    return _cuda().device_array(shape, dtype=dtype, strides=tuple(strides), stream=stream())


# -- per-channel vectors ----------------------------------------------------------------

def vec_in(v, dtype=np.float64):
    """A per-channel input (device array, or a host number) as a working vector.

    CuPy arrays (zero-copy for device input) with CuPy, else host NumPy
    arrays; converted to ``dtype`` unless it is None.
    """
    cp = cupy()
    if cp is not None:
        a = cp.asarray(v)
    else:
        a = _to_host(v)
    return a if dtype is None else a.astype(dtype, copy=False)


def vec_out(v, like, dtype, shape=None):
    """A working vector as a result of ``like``'s kind (CuPy or Numba), in ``dtype``."""
    if is_cupy(like):
        a = sys.modules["cupy"].asarray(v).astype(dtype, copy=False)
        return a if shape is None else a.reshape(shape)
    cp = cupy()
    if cp is not None and is_cupy(v):
        a = cp.ascontiguousarray(v, dtype=dtype)
        return to_numba(a if shape is None else a.reshape(shape))
    h = np.ascontiguousarray(_to_host(v), dtype=dtype)
    return _cuda().to_device(h if shape is None else h.reshape(shape), stream=stream())


def param_stack(vectors, dtype):
    """Per-channel kernel parameters stacked as rows: ``(owner, numba view of shape (k, C))``.

    One array (one conversion, one kernel argument) instead of k.
    """
    cp = cupy()
    if cp is not None:
        a = cp.stack([cp.asarray(v) for v in vectors]).astype(dtype, copy=False)
        return a, to_numba(a)
    h = np.ascontiguousarray(np.stack([_to_host(v) for v in vectors]), dtype=dtype)
    d = _cuda().to_device(h, stream=stream())
    return d, d


def vector_pair(owner, view):
    """Rows 0 and 1 of a (2, C) float64 kernel result as working vectors.

    CuPy views (no wait) with CuPy; else one copy to the host, which waits for the kernels.
    """
    if cupy() is not None and is_cupy(owner):
        return owner[0], owner[1]
    h = view.copy_to_host()
    return h[0], h[1]


def running_array(v, name):
    """A running statistic of the cuda family, checked for an in-place update: contiguous."""
    v = asarray(v)
    if hasattr(v, "strides") and hasattr(v, "shape") and len(v.shape) == 1 and v.shape[0] > 1:
        if v.strides[0] != np.dtype(v.dtype).itemsize:
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
    return v


def update_running(pairs, momentum):
    """``r = (1 - momentum) * r + momentum * batch`` in place for each (r, batch) pair.

    Both new values are computed before either is written.
    """
    cp = cupy()
    new = []
    for r, batch in pairs:
        if r is None:
            continue
        if cp is not None:
            rv = cp.asarray(r)  # a view: writing it writes r
            new.append((rv, (1.0 - momentum) * rv + momentum * cp.asarray(batch)))
        else:
            h = _to_host(r)
            new.append((r, ((1.0 - momentum) * h + momentum * _to_host(batch)).astype(h.dtype)))
    for r, val in new:
        if cp is not None:
            r[...] = val
        elif is_cupy(r):
            r.set(val)
        else:
            r.copy_to_device(np.ascontiguousarray(val))


# -- the canonical (outer, C, inner) view ----------------------------------------------------

def strides3(shape, strides, plan):
    """Byte strides of ``plan``'s canonical 3-D view of an array, or None if none exists.

    The perm puts outer, kept and inner axes in that order; each group must
    collapse into one axis (what NumPy's ``reshape(copy=False)`` of the
    transposed array requires).  Axes of length 1 do not matter.
    """
    perm, k = plan.perm, len(plan.kept)
    p = perm.index(plan.kept[0]) if k else 0
    out = []
    for group in (perm[:p], perm[p:p + k], perm[p + k:]):
        axes = [a for a in group if shape[a] != 1]
        for a, b in zip(axes, axes[1:]):
            if strides[a] != strides[b] * shape[b]:
                return None
        out.append(int(strides[axes[-1]]) if axes else 0)
    return tuple(out)


def _view(arr, shape, strides):
    """A zero-copy Numba view of ``arr``'s memory with ``shape``/byte ``strides`` from element 0."""
    if _is_fake(arr):
        return type(arr)(np.lib.stride_tricks.as_strided(arr._ary, shape, strides))
    cai = arr.__cuda_array_interface__
    desc = {"shape": tuple(shape), "strides": tuple(strides), "data": cai["data"],
            "typestr": cai["typestr"], "version": 3}
    return _cuda().from_cuda_array_interface(desc, owner=arr, sync=False)


def _ptr(a):
    if _is_fake(a):
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
    if _is_fake(a):
        low = a._ary[tuple(slice(n - 1, n) if s < 0 else slice(0, 1) for n, s in zip(shape, st))]
        return type(a)(np.lib.stride_tricks.as_strided(low, (span,), (item,))), -lo, st
    cai = a.__cuda_array_interface__
    desc = {"shape": (span,), "strides": None, "data": (cai["data"][0] + lo * item, False),
            "typestr": cai["typestr"], "version": 3}
    return _cuda().from_cuda_array_interface(desc, owner=a, sync=False), -lo, st


def _kernels():
    from .kernels import cuda_numba
    return cuda_numba


def _copy_perm(src, src_perm, dst, dst_perm, shape):
    """dst.transpose(dst_perm)[...] = src.transpose(src_perm), both of transposed shape ``shape``."""
    sf, so, ss = flat(src)
    df, do, ds = flat(dst)
    _kernels().copy_nd(sf, so, [ss[a] for a in src_perm], df, do, [ds[a] for a in dst_perm], shape)


def as3(arr, plan):
    """The canonical 3-D Numba view of device array ``arr``, or a C-order copy if none exists."""
    shape3 = tuple(int(s) for s in plan.shape3)
    if math.prod(shape3) == 0:
        return empty(shape3, arr.dtype)[1]
    st3 = strides3(arr.shape, arr.strides, plan)
    if st3 is not None:
        return _view(arr, shape3, st3)
    cp = cupy()
    if cp is not None:
        return to_numba(cp.ascontiguousarray(cp.asarray(arr).transpose(plan.perm)).reshape(shape3))
    _, dst = empty(shape3, arr.dtype)
    pshape = tuple(int(arr.shape[a]) for a in plan.perm)
    ident = tuple(range(len(pshape)))
    _copy_perm(arr, plan.perm, _view(dst, pshape, _c_strides(pshape, np.dtype(arr.dtype).itemsize)),
               ident, pshape)
    return dst


def _c_strides(shape, item):
    out, step = [], item
    for n in reversed(shape):
        out.append(step)
        step *= max(n, 1)
    return tuple(reversed(out))


def _span(a):
    item = np.dtype(a.dtype).itemsize
    p = _ptr(a)
    lo = p + sum(min(0, (n - 1) * s) for n, s in zip(a.shape, a.strides))
    hi = p + sum(max(0, (n - 1) * s) for n, s in zip(a.shape, a.strides)) + item
    return lo, hi


def _separate(y3, *inputs3):
    """True unless ``y3`` overlaps an input without being exactly the same view."""
    ylo, yhi = _span(y3)
    for a in inputs3:
        if a is None:
            continue
        lo, hi = _span(a)
        if lo < yhi and ylo < hi and not (_ptr(a) == _ptr(y3) and tuple(a.strides) == tuple(y3.strides)
                                          and tuple(a.shape) == tuple(y3.shape)):
            return False
    return True


def affine(bk, x3, plan, x, out, m, q, r, u3=None, p=None):
    """``fastbn.api._affine`` for device arrays: allocate or view the output, run
    ``bk.affine3`` and return the array handed to the caller (``out`` if given)."""
    y = empty_like_layout(x, x.dtype) if out is None else out
    shape3 = tuple(int(s) for s in plan.shape3)
    if math.prod(shape3) == 0:
        return y
    st3 = strides3(y.shape, y.strides, plan)
    if st3 is None:  # a user's out= with strides no 3-D view has: compute, then scatter
        _, tmp = empty(shape3, x.dtype)
        bk.affine3(x3, m, q, r, tmp, u3, p)
        pshape = tuple(int(y.shape[a]) for a in plan.perm)
        cp = cupy()
        if cp is not None:
            cp.asarray(y).transpose(plan.perm)[...] = cp.asarray(tmp).reshape(pshape)
        else:
            item = np.dtype(x.dtype).itemsize
            _copy_perm(_view(tmp, pshape, _c_strides(pshape, item)), tuple(range(len(pshape))),
                       y, plan.perm, pshape)
        return y
    y3 = _view(y, shape3, st3)
    if out is not None and not _separate(y3, x3, u3):
        _, tmp = empty(shape3, x.dtype)
        bk.affine3(x3, m, q, r, tmp, u3, p)
        _kernels().copy3(tmp, y3)
    else:
        bk.affine3(x3, m, q, r, y3, u3, p)
    return y

"""The ``"cuda"`` array family (device memory).

Three kinds of arrays belong to the family:

* **CuPy** arrays: results come back as CuPy arrays;
* **Numba device arrays** (``numba.cuda.to_device``; in the CUDA simulator
  ``FakeCUDAArray``): results come back as Numba device arrays;
* PyTorch CUDA tensors: :func:`asarray` makes a zero-copy Numba view that
  remembers its tensor (:func:`tensor_of`); results are tensors allocated by
  torch, ``out=`` comes back as the caller's tensor (:func:`handback`);
* anything else with ``__cuda_array_interface__``: :func:`asarray` turns it
  into a zero-copy CuPy view when CuPy is installed, else into a Numba device
  array, and results follow that kind.

``moments``, ``batch_norm_train``, ``batch_norm_infer`` and the two backward
functions come here whole first (``FUSED``, :func:`fused_moments`,
:func:`fused_train` ...): their kernels do the per-channel math themselves
(1, 2, 1, 2 and 2 launches, no CuPy operations), on the device holding ``x``
and on the caller's stream (``fastbn.kernels.cuda_runtime.stream_for``).

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
Outside the fused calls (``batch_normalization``, empty batches, layouts
that need a copy) kernels queue on CuPy's current stream:
work on other streams must be synchronised by the caller first.

Testing: the simulator (tests/test_cuda_sim.py) runs every no-CuPy branch; the
CuPy branches (``cp = cupy()`` not None, ``is_cupy``) and :func:`stream` run
only on a GPU machine (tests/test_cuda_gpu.py).
"""

import math
import sys

import numpy as np

from ..kernels import cuda_runtime as rt
from ..kernels.cuda_runtime import cupy, empty, flat, is_cupy, is_numba, stream, to_numba, xp  # noqa: F401

NAME = "cuda"

def asarray(obj, name=None, expected=None):
    """A cuda-family object as an array fastbn can work with, without copying.

    CuPy and Numba arrays come back as they are; another
    ``__cuda_array_interface__`` object (a PyTorch CUDA tensor) becomes a CuPy
    view, or a Numba view without CuPy.  Anything else comes back unchanged
    (the caller's dtype check rejects it).
    """
    if is_cupy(obj) or is_numba(obj):
        return obj
    if type(obj).__module__.split(".", 1)[0] == "torch":
        # A Numba view remembering its tensor: results come back as tensors
        # allocated by torch, and work goes on torch's current stream.
        usable(name)
        v = _torch_view(obj)
        v._fastbn_tensor = obj
        return v
    if getattr(obj, "__cuda_array_interface__", None) is not None:
        usable(name)
        cp = cupy()
        if cp is not None:
            return cp.asarray(obj)
        return rt.cuda_module().as_cuda_array(obj, sync=False)
    return obj


def usable(name=None):
    """Raise the ``TypeError`` of :func:`fastbn.backend_for` (naming the argument)
    when no backend serves device arrays here (no driver or GPU, no numba-cuda).

    Asked before the first touch of the CUDA driver (a view of a
    ``__cuda_array_interface__`` object initialises it), so a host without a
    usable GPU gets fastbn's error, not Numba's ``CudaSupportError``, and
    nothing has been written.  Cheap once the backend is loaded.
    """
    global _why_not
    if _why_not is None:
        try:
            from ..kernels import cuda_numba
            _why_not = cuda_numba.unavailable_reason() or ""
        except Exception as exc:  # noqa: BLE001 - an import failure is a reason too
            _why_not = f"{type(exc).__name__}: {exc}".strip()
    if _why_not:
        # The words of dispatch.choose's error (backend_for gives the same reason).
        raise TypeError(f"{name or 'the array'} is a CUDA array (__cuda_array_interface__), "
                        f"but no fastbn backend is available for cuda arrays: cuda: {_why_not}")


_why_not = None   # why the CUDA kernels cannot run here ("" when they can), asked once


def _k_order(shape, strides):
    """Axes from largest to smallest |stride| (NumPy's order='K' for a new array)."""
    return sorted(range(len(shape)), key=lambda a: -abs(strides[a]) if shape[a] > 1 else 0)


def empty_like_layout(x, dtype):
    """An uninitialised array of ``x``'s kind, shape and memory order (order='K')."""
    shape = tuple(int(s) for s in x.shape)
    t = tensor_of(x)
    if t is not None and np.dtype(dtype) == np.dtype(x.dtype):
        return asarray(_torch_empty_like(t))
    if is_cupy(x):
        return sys.modules["cupy"].empty_like(x, dtype=dtype, order="K")
    if rt.is_fake(x):
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
    return rt.cuda_module().device_array(shape, dtype=dtype, strides=tuple(strides), stream=stream())


def vec_in(v, dtype=np.float64):
    """A per-channel input (device array, or a host number) as a working vector.

    CuPy arrays (zero-copy for device input) with CuPy, else host NumPy
    arrays; converted to ``dtype`` unless it is None.
    """
    cp = cupy()
    if cp is not None:
        a = cp.asarray(v)
    else:
        a = rt.to_host(v)
    return a if dtype is None else a.astype(dtype, copy=False)


def vec_out(v, like, dtype, shape=None):
    """A working vector as a result of ``like``'s kind (CuPy, Numba or torch), in ``dtype``."""
    t = tensor_of(like)
    if t is not None:
        return _torch_from(v, dtype, t, shape)
    if is_cupy(like):
        a = sys.modules["cupy"].asarray(v).astype(dtype, copy=False)
        return a if shape is None else a.reshape(shape)
    cp = cupy()
    if cp is not None and is_cupy(v):
        a = cp.ascontiguousarray(v, dtype=dtype)
        return to_numba(a if shape is None else a.reshape(shape))
    h = np.ascontiguousarray(rt.to_host(v), dtype=dtype)
    return rt.cuda_module().to_device(h if shape is None else h.reshape(shape), stream=stream())


def is_array(v):
    """True for a device array object (what in-place arguments must be)."""
    return hasattr(v, "dtype") and hasattr(v, "shape")


def check_running(v, name):
    """A running statistic of the cuda family must be contiguous (updated in place)."""
    if len(v.shape) == 1 and v.shape[0] > 1 and v.strides[0] != np.dtype(v.dtype).itemsize:
        raise ValueError(f"{name} must be contiguous (it is updated in place)")


def check_out(out, name):
    """Device arrays have no read-only flag to check."""


def vector(v):
    """A per-channel input as a float64 working vector (see :func:`vec_in`)."""
    return vec_in(v)


def full(n, value):
    return xp().full(n, value, dtype=np.float64)


def result(v, like, dtype, shape=None):
    return vec_out(v, like, dtype, shape)


def assign(pairs):
    """Write each ``(running statistic, new working vector)`` pair in place."""
    cp = cupy()
    for r, val in pairs:
        if cp is not None:
            cp.asarray(r)[...] = val  # a view: writing it writes r
        elif is_cupy(r):
            r.set(np.asarray(val, dtype=r.dtype))
        else:
            r.copy_to_device(np.ascontiguousarray(val, dtype=r.dtype))


def overlaps(a, b):
    """True if the memory spans of device arrays ``a`` and ``b`` intersect."""
    alo, ahi = _span(a)
    blo, bhi = _span(b)
    return alo < bhi and blo < ahi


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
    if rt.is_fake(arr):
        return type(arr)(np.lib.stride_tricks.as_strided(arr._ary, shape, strides))
    cai = arr.__cuda_array_interface__
    desc = {"shape": tuple(shape), "strides": tuple(strides), "data": cai["data"],
            "typestr": cai["typestr"], "version": 3}
    return rt.cuda_module().from_cuda_array_interface(desc, owner=arr, sync=False)


def _kernels():
    from ..kernels import cuda_numba
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
    p = rt.ptr(a)
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
        if lo < yhi and ylo < hi and not (rt.ptr(a) == rt.ptr(y3) and tuple(a.strides) == tuple(y3.strides)
                                          and tuple(a.shape) == tuple(y3.shape)):
            return False
    return True


def affine(bk, x3, plan, x, out, m, q, r, u3=None, p=None):
    """``fastbn.api._affine`` for device arrays: allocate or view the output, run
    ``bk.affine3`` and return the array handed to the caller (``out`` if given)."""
    y = empty_like_layout(x, x.dtype) if out is None else out
    shape3 = tuple(int(s) for s in plan.shape3)
    if math.prod(shape3) == 0:
        return handback(y)
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
        return handback(y)
    y3 = _view(y, shape3, st3)
    if out is not None and not _separate(y3, x3, u3):
        _, tmp = empty(shape3, x.dtype)
        bk.affine3(x3, m, q, r, tmp, u3, p)
        _kernels().copy3(tmp, y3)
    else:
        bk.affine3(x3, m, q, r, y3, u3, p)
    return handback(y)


# -- torch CUDA tensors ------------------------------------------------------------------------
# The only places that touch torch (imported by the caller, never by fastbn);
# the simulator tests replace them with fakes.

def tensor_of(a):
    """The torch tensor that Numba view ``a`` was made from (:func:`asarray`), or None."""
    return getattr(a, "_fastbn_tensor", None)


def handback(a):
    """What the caller gets for device array ``a``: its tensor if it views one."""
    t = getattr(a, "_fastbn_tensor", None)
    return a if t is None else t


def _torch_view(t):
    # Version 2 of the interface (torch's) carries no stream: nothing to sync.
    return rt.cuda_module().from_cuda_array_interface(t.__cuda_array_interface__, owner=t,
                                                      sync=False)


def _torch_dtype(dtype):
    return getattr(sys.modules["torch"], np.dtype(dtype).name)


def _torch_empty_like(t):
    return sys.modules["torch"].empty_like(t)   # torch's allocator, t's memory format


def _torch_empty(n, dtype, t):
    return sys.modules["torch"].empty(n, dtype=_torch_dtype(dtype), device=t.device)


def _torch_from(v, dtype, t, shape=None):
    """A working vector (CuPy or host NumPy) as a new tensor on ``t``'s device."""
    torch = sys.modules["torch"]
    src = torch.as_tensor(v if is_cupy(v) else np.ascontiguousarray(v))
    out = src.to(device=t.device, dtype=_torch_dtype(dtype), copy=True)
    return out if shape is None else out.reshape(shape)


# -- the fused calls ---------------------------------------------------------------------------
#
# ``fastbn.api``'s public functions hand a checked call here first
# (``F.FUSED``); the CUDA backend then runs it in the fewest launches
# (``train3`` ... in fastbn.kernels.cuda_numba: per-channel math inside the
# kernels) on the caller's stream and device.  None: not this call (an empty
# batch, a layout without a canonical view, an ``out`` that needs a
# temporary): the general path takes it.

FUSED = True


class _Call:
    """Where one call runs: the device and stream of ``x``, and result allocation."""

    def __init__(self, x, named):
        self.tensor = tensor_of(x)
        self.cupy = is_cupy(x)
        self.device = self.tensor.device.index if self.tensor is not None else rt.device_of(x)
        for name, v in named:
            if v is None:
                continue
            t = tensor_of(v)
            dev = t.device.index if t is not None else rt.device_of(v)
            if dev is not None and self.device is not None and dev != self.device:
                raise ValueError(f"{name} is on CUDA device {dev} but x is on device {self.device}; "
                                 f"move {name} to x's device first")
        self._ctx = _on_device(self.device)
        self._ctx.__enter__()
        self.stream = rt.stream_for(x, self.tensor)

    def close(self):
        self._ctx.__exit__(None, None, None)

    def vector(self, n, dtype):
        """A new length-n result vector: ``(what the caller gets, Numba view)``."""
        if self.tensor is not None:
            t = _torch_empty(n, dtype, self.tensor)
            return t, asarray(t)
        if self.cupy:
            a = sys.modules["cupy"].empty(n, dtype=dtype)
            return a, to_numba(a)
        a = rt.cuda_module().device_array(n, dtype=dtype, stream=self.stream)
        return a, a


class _on_device:
    """Make device ``dev`` current for a call (nothing to do when it already is)."""

    def __init__(self, dev):
        self.dev = dev
        self.stack = []

    def __enter__(self):
        if self.dev is None or rt.simulator():
            return
        cuda = rt.cuda_module()
        if cuda.get_current_device().id != self.dev:
            g = cuda.gpus[self.dev]
            g.__enter__()
            self.stack.append(g)
            cp = cupy()
            if cp is not None:
                d = cp.cuda.Device(self.dev)
                d.__enter__()
                self.stack.append(d)

    def __exit__(self, *exc):
        while self.stack:
            self.stack.pop().__exit__(*exc)


def _nb(v):
    """A per-channel argument (as the caller passed it) as a Numba view (cached)."""
    if v is None:
        return None
    if not (is_numba(v) or hasattr(type(v), "__cuda_array_interface__")):
        v = asarray(v)   # (the simulator's stand-ins)
    return rt.vector_view(v)


def _view3(a, plan):
    st3 = strides3(a.shape, a.strides, plan)
    return None if st3 is None else _view(a, tuple(int(s) for s in plan.shape3), st3)


def _data3(plan, *arrays):
    """Canonical views of the full-size inputs, or None if one has none (then the
    general path copies it)."""
    views = tuple(_view3(a, plan) for a in arrays)
    return None if any(v is None for v in views) else views


def _output3(x, plan, out, inputs3):
    """``(y, y3)``: the array handed back and the view the kernel writes, or None
    when ``out`` needs a temporary (no view, or a partial overlap)."""
    if out is not None:
        y3 = _view3(out, plan)
        if y3 is None or not _separate(y3, *inputs3):
            return None
        return out, y3
    y = empty_like_layout(x, x.dtype)
    y3 = _view3(y, plan)
    return None if y3 is None else (y, y3)


def _fused(bk, name, plan):
    C, n = plan.shape3[1], plan.count
    if n == 0 or C == 0:
        return None
    return getattr(bk, name, None)


def fused_train(bk, x, plan, scale, offset, eps, momentum, running_mean, running_var, out,
                stats_dtype):
    """``fastbn.api.train`` for device arrays in two launches: ``(y, mean, invstd)`` or None."""
    kern = _fused(bk, "train3", plan)
    if kern is None or (views := _data3(plan, x)) is None:
        return None
    call = _Call(x, (("scale", scale), ("offset", offset), ("running_mean", running_mean),
                     ("running_var", running_var), ("out", out)))
    try:
        target = _output3(x, plan, out, views)
        if target is None:
            return None
        C = plan.shape3[1]
        (mean, mean_d), (inv, inv_d) = call.vector(C, stats_dtype), call.vector(C, stats_dtype)
        kern(views[0], target[1], mean_d, inv_d, _nb(scale), _nb(offset), _nb(running_mean),
             _nb(running_var), eps, momentum, call.stream)
        return handback(target[0]), mean, inv
    finally:
        call.close()


def fused_moments(bk, x, plan, ddof, pdt, shape):
    """``fastbn.api.moments`` for device arrays in one launch: ``(mean, var)`` of
    ``shape`` in ``pdt``, or None.  The reduction's last blocks write the mean
    and ``m2 / (n - ddof)`` (NumPy's inf/NaN where ``n - ddof <= 0``) per
    channel on the caller's stream, into vectors of ``x``'s kind (torch
    tensors from torch's allocator for a tensor)."""
    kern = _fused(bk, "moments_var3", plan)
    if kern is None or (views := _data3(plan, x)) is None:
        return None
    call = _Call(x, ())
    try:
        C = plan.shape3[1]
        (mean, mean_d), (var, var_d) = call.vector(C, pdt), call.vector(C, pdt)
        kern(views[0], mean_d, var_d, float(ddof), call.stream)
        return mean.reshape(shape), var.reshape(shape)
    finally:
        call.close()


def fused_infer(bk, x, plan, scale, offset, mean, var, eps, out, named=None):
    """``fastbn.api.batch_norm_infer`` for device arrays in one launch: ``y`` or None.
    ``named``: the arguments as the caller passed them, for the device check (when
    the vectors here are views made of them)."""
    kern = _fused(bk, "infer3", plan)
    if kern is None or (views := _data3(plan, x)) is None:
        return None
    call = _Call(x, named or (("scale", scale), ("offset", offset), ("mean", mean), ("var", var),
                              ("out", out)))
    try:
        target = _output3(x, plan, out, views)
        if target is None:
            return None
        kern(views[0], target[1], _nb(scale), _nb(offset), _nb(mean), _nb(var), eps, call.stream)
        return handback(target[0])
    finally:
        call.close()


def _channel_axis(p, shape):
    """The one axis of an array of ``shape`` along which device array ``p`` holds a
    value per channel (``p`` keepdims-shaped, or 1-D along the last axis), or None."""
    nd = len(shape)
    if len(p.shape) == 1 and nd >= 1:
        return nd - 1 if p.shape[0] == shape[-1] else None
    if len(p.shape) != nd:
        return None
    axes = [a for a in range(nd) if p.shape[a] != 1]
    return axes[0] if len(axes) == 1 and p.shape[axes[0]] == shape[axes[0]] else None


def channel_params(x, mean, variance, offset, scale):
    """``batch_normalization``'s parameters when each (offset/scale may be None) is a
    device array of a float dtype holding one value per channel along one axis of
    ``x``, as ``moments(..., keepdims=True)`` gives them: ``(axis, given, vectors)``
    (the arrays by name, for the device check, and 1-D views of mean, variance,
    offset, scale); None otherwise (numbers, other broadcasts, integer dtypes).
    The caller has checked that each is None or of this family; raises nothing:
    the general path checks what this declines."""
    if mean is None or variance is None:
        return None
    ax, given, vecs = None, [], []
    for name, p in (("mean", mean), ("variance", variance), ("offset", offset), ("scale", scale)):
        if p is None:
            vecs.append(None)
            continue
        if not is_array(p) or np.dtype(p.dtype).kind != "f":
            return None
        p = asarray(p, name)
        a = _channel_axis(p, tuple(x.shape))
        if a is None or (ax is not None and a != ax):
            return None
        ax = a
        given.append((name, p))
        vecs.append(_view(p, (int(x.shape[ax]),), (p.strides[a if len(p.shape) > 1 else 0],)))
    return ax, tuple(given), tuple(vecs)


def fused_normalization(bk, x, plan, params, eps, out):
    """``fastbn.api.batch_normalization`` for the parameters ``channel_params`` found
    (``plan``: x's plan with their axis kept): ``y = (x - mean) * scale /
    sqrt(variance + eps) + offset`` by the inference kernel in one launch on the
    caller's stream, or None."""
    _, given, (m, v, o, s) = params
    return fused_infer(bk, x, plan, s, o, m, v, eps, out, named=given + (("out", out),))


def _fused_backward(name, bk, dy, x, plan, scale, mean, stat, eps, out, stat_name):
    kern = _fused(bk, name, plan)
    if kern is None or (views := _data3(plan, dy, x)) is None:
        return None
    call = _Call(x, (("dy", dy), ("scale", scale), ("mean", mean), (stat_name, stat), ("out", out)))
    try:
        target = _output3(x, plan, out, views)
        if target is None:
            return None
        C = plan.shape3[1]
        pdt = np.dtype(np.float32) if np.dtype(x.dtype) == np.float16 else np.dtype(x.dtype)
        (ds, ds_d), (do, do_d) = call.vector(C, pdt), call.vector(C, pdt)
        args = (views[0], views[1], target[1], ds_d, do_d, _nb(scale), _nb(mean), _nb(stat))
        kern(*args, eps, call.stream) if eps is not None else kern(*args, call.stream)
        return handback(target[0]), ds, do
    finally:
        call.close()


def fused_backward(bk, dy, x, plan, scale, mean, invstd, out):
    """``fastbn.api.batch_norm_backward`` for device arrays in two launches, or None."""
    return _fused_backward("backward3", bk, dy, x, plan, scale, mean, invstd, None, out, "invstd")


def fused_infer_backward(bk, dy, x, plan, scale, mean, var, eps, out):
    """``fastbn.api.batch_norm_infer_backward`` for device arrays in two launches, or None."""
    return _fused_backward("infer_backward3", bk, dy, x, plan, scale, mean, var, eps, out, "var")

"""The common call on NumPy arrays, answered with a few identity tests.

The general path's steps (argument checks, layout plan, dispatch, float64
working vectors, per-channel math in NumPy) cost more than a few-KB kernel
(NCHW (4,16,4,4) float32: ~8 of ~12 us), and 40-80 us at 1 MiB, where they
run on caches the kernel has just flushed.  A call takes this lane when every
argument is already what the backend's fused entry points take unchanged:

* ``x`` (and ``dy``) a ``numpy.ndarray`` (not a subclass), C-contiguous or
  C-contiguous with the channel axis moved last (channels_last memory), of a
  dtype the backend's fused kernels take, with 0 < size <= the backend's
  ``FUSED_MAX`` (Numba: any size; its entry points run the parallel
  primitives beyond ``SMALL``, with the per-channel math compiled) or else
  ``SMALL``; ``dy`` of ``x``'s shape and dtype;
* ``channel_axis`` a Python int in range, ``eps``/``momentum`` Python floats
  in range, ``backend=None`` (the default backend, as ``dispatch.choose``
  picks it: ``use_backend``, ``FASTBN_BACKEND``);
* per-channel vectors None or C-contiguous ``(C,)`` ndarrays (of the
  per-channel dtype where the kernel writes them or requires it);
* ``out`` None, ``x`` (or ``dy``) itself, or a writeable ndarray like ``x``
  in ``x``'s memory layout; nothing written (``out``, running statistics)
  shares memory with another argument.

Anything else returns None, and the caller runs the general path, which gives
the same numbers for these calls and every error message for the rest: this
module never raises for bad input.
"""

import math

import numpy as np

from . import dispatch

_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)
_FLOATS = (_F16, _F32, np.dtype(np.float64))


_module = dispatch.numpy_default   # the default NumPy backend's kernel module


def _kernel(name, x, limit="SMALL", bk=None):
    """The default NumPy backend's (or ``bk``'s) fused kernel ``name`` when the
    backend has it and it takes ``x``'s dtype and size (0 < size <= the
    backend's ``limit``); else None."""
    bk = bk or _module()
    kern = getattr(bk, name, None)
    if (kern is None or type(x) is not np.ndarray or x.dtype not in bk.SMALL_DTYPES
            or not 0 < x.size <= getattr(bk, limit, bk.SMALL)):
        return None
    return kern


def _layout(x, channel_axis):
    """``(shape3, order)`` when ``x``'s memory is one of the two layouts the fused
    kernels take as it is: C-contiguous (``order`` None; ``shape3`` = (outer,
    C, inner)), or C-contiguous with the channel axis moved last (``order``:
    that transpose; ``shape3`` = (rows, C, 1)) -- a channels_last tensor's
    NumPy view, an NHWC array seen as NCHW.  None otherwise, or for a bad
    ``channel_axis``."""
    shape = x.shape
    nd = len(shape)
    if type(channel_axis) is not int or not -nd <= channel_axis < nd:
        return None
    ax = channel_axis % nd
    if x.flags.c_contiguous:
        return (math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1:])), None
    order = tuple(i for i in range(nd) if i != ax) + (ax,)
    if x.transpose(order).flags.c_contiguous:
        return (x.size // shape[ax], shape[ax], 1), order
    return None


def _as3(a, s3, order):
    """``a``'s (outer, C, inner) view in ``x``'s layout (see _layout), or None if
    ``a``'s memory is laid out otherwise."""
    t = a if order is None else a.transpose(order)
    return t.reshape(s3) if t.flags.c_contiguous else None


def _vec(v, C, dtype=None):
    """None, or a C-contiguous (C,) float16/32/64 ndarray (of ``dtype`` if given)."""
    if v is None:
        return True
    return (type(v) is np.ndarray and v.shape == (C,) and v.flags.c_contiguous
            and (v.dtype == dtype if dtype is not None else v.dtype in _FLOATS))


def _apart(written, others):
    """True if no array in ``written`` can share memory with another array of
    ``written`` or ``others`` (None entries skipped; the same object twice is
    sharing).

    Distinct ndarrays that own their buffers cannot overlap; anything else is
    asked of ``np.may_share_memory`` (bounds only: a "maybe" sends the call to
    the general path, which asks exactly; ~0.7 us a pair, less than reading an
    array's address through ``__array_interface__``)."""
    arrays = written + [o for o in others if o is not None]
    if len({id(a) for a in arrays}) == len(arrays) and all(a.flags.owndata for a in arrays):
        return True
    for i, w in enumerate(written):
        for o in arrays[i + 1:]:
            if o is w or (not (w.flags.owndata and o.flags.owndata)
                          and np.may_share_memory(w, o)):
                return False
    return True


def _out(out, x, data):
    """The array the fused kernel writes: new (``out`` None: like ``x``, in its
    memory order), ``out`` if it is one of ``data`` (x, dy) or a writeable
    ndarray like ``x`` (whose layout and overlaps the caller checks), else None."""
    if out is None:
        return np.empty_like(x)
    if not (out is x or any(out is d for d in data) or (
            type(out) is np.ndarray and out.dtype == x.dtype and out.shape == x.shape)):
        return None
    return out if out.flags.writeable else None


def _written(out, y, data):
    """[y] if the kernel writes into the caller's ``out`` (it must then not overlap
    anything), [] for a new array; and the data it must be apart from."""
    if out is None:
        return [], list(data)
    return [y], [d for d in data if d is not y]


def train(x, scale, offset, channel_axis, eps, running_mean, running_var, momentum, out,
          f64_stats=False):
    """``batch_norm_train`` for the common small call: ``(y, mean, invstd)``, or None.

    ``f64_stats``: ``mean``/``invstd`` as the kernel computed them, in float64
    (``layer.train_forward_f64``); None where the backend's kernel writes only
    the per-channel dtype (its ``F64_STATS`` false)."""
    bk = _module()
    kern = _kernel("train_small3", x, "FUSED_MAX", bk)
    if f64_stats and not getattr(bk, "F64_STATS", False):
        return None
    lay = None if kern is None else _layout(x, channel_axis)
    if lay is None:
        return None
    s3, order = lay
    if (s3[0] * s3[2] < 2 or type(eps) is not float or not eps >= 0.0
            or type(momentum) is not float or not 0.0 <= momentum <= 1.0):
        return None
    C = s3[1]
    pdt = _F32 if x.dtype == _F16 else x.dtype
    if not (_vec(scale, C, pdt) and _vec(offset, C, pdt) and _vec(running_mean, C, pdt)
            and _vec(running_var, C, pdt)):
        return None
    running = [r for r in (running_mean, running_var) if r is not None]
    y = _out(out, x, ())
    if y is None or not all(r.flags.writeable for r in running):
        return None
    y3 = _as3(y, s3, order)
    written, data = _written(out, y, (x,))
    if y3 is None or ((written or running)
                      and not _apart(running + written, data + [scale, offset])):
        return None
    sdt = np.float64 if f64_stats else pdt
    mean, invstd = np.empty(C, sdt), np.empty(C, sdt)
    kern(_as3(x, s3, order), scale, offset, eps, momentum, running_mean, running_var, y3, mean,
         invstd)
    return y, mean, invstd


def infer(x, scale, offset, mean, var, channel_axis, eps, out):
    """``batch_norm_infer`` for the common small call: ``y``, or None."""
    kern = _kernel("infer_small3", x, "FUSED_MAX")
    lay = None if kern is None else _layout(x, channel_axis)
    if lay is None or type(eps) is not float or not eps >= 0.0:
        return None
    s3, order = lay
    C = s3[1]
    if not (_vec(scale, C) and _vec(offset, C) and mean is not None and _vec(mean, C)
            and var is not None and _vec(var, C)):
        return None
    y = _out(out, x, ())
    y3 = None if y is None else _as3(y, s3, order)
    if y3 is None:
        return None
    written, data = _written(out, y, (x,))
    if written and not _apart(written, data + [scale, offset, mean, var]):
        return None
    kern(_as3(x, s3, order), scale, offset, mean, var, eps, y3)
    return y


def backward(dy, x, scale, mean, invstd, channel_axis, out):
    """``batch_norm_backward`` for the common small call: ``(dx, dscale, doffset)``, or None."""
    kern = _kernel("backward_small3", x, "FUSED_MAX")
    lay = None if kern is None else _layout(x, channel_axis)
    if lay is None or type(dy) is not np.ndarray or dy.dtype != x.dtype or dy.shape != x.shape:
        return None
    s3, order = lay
    dy3 = _as3(dy, s3, order)
    if dy3 is None:
        return None
    C = s3[1]
    if not (_vec(scale, C) and mean is not None and _vec(mean, C) and invstd is not None
            and _vec(invstd, C)):
        return None
    dx = _out(out, x, (dy,))
    dx3 = None if dx is None else _as3(dx, s3, order)
    if dx3 is None:
        return None
    written, data = _written(out, dx, (x, dy))
    if written and not _apart(written, data + [scale, mean, invstd]):
        return None
    pdt = _F32 if x.dtype == _F16 else x.dtype
    dscale, doffset = np.empty(C, pdt), np.empty(C, pdt)
    kern(dy3, _as3(x, s3, order), scale, mean, invstd, dx3, dscale, doffset)
    return dx, dscale, doffset

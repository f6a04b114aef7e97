"""The common small call on NumPy arrays, answered with a few identity tests.

For a few KB of data the general path's steps (argument checks, layout plan,
dispatch, per-argument conversions) cost more than the fused kernel itself:
at NCHW (4,16,4,4) float32 ~8 of ~12 us.  A call takes this lane when every
argument is already what the general path would pass to the backend's fused
small kernel unchanged:

* ``x`` (and ``dy``) a C-contiguous ``numpy.ndarray`` (not a subclass) of a
  dtype the backend's fused kernels take, with 0 < size <= the backend's
  ``FUSED_MAX`` (Numba: any size; its entry points run the parallel
  primitives beyond ``SMALL``, with the per-channel math compiled) or else
  ``SMALL``; ``dy`` of ``x``'s shape and dtype;
* ``channel_axis`` a Python int in range, ``eps``/``momentum`` Python floats
  in range, ``backend=None`` (the default backend, as ``dispatch.choose``
  picks it: ``use_backend``, ``FASTBN_BACKEND``);
* per-channel vectors None or C-contiguous ``(C,)`` ndarrays (of the
  per-channel dtype where the kernel writes them or requires it);
* ``out`` None, ``x`` (or ``dy``) itself, or a C-contiguous writeable ndarray
  like ``x``; nothing written (``out``, running statistics) shares memory
  with another argument.

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


def _kernel(name, x, limit="SMALL"):
    """The default NumPy backend's fused kernel ``name`` when the backend has it
    and it takes ``x`` as it is (dtype, 0 < size <= the backend's ``limit``,
    C-contiguous); else None."""
    bk = dispatch.module(dispatch.choose("numpy"))
    kern = getattr(bk, name, None)
    if (kern is None or type(x) is not np.ndarray or x.dtype not in bk.SMALL_DTYPES
            or not 0 < x.size <= getattr(bk, limit, bk.SMALL) or not x.flags.c_contiguous):
        return None
    return kern


def _shape3(shape, channel_axis):
    """(outer, C, inner) of a C-contiguous array, or None for a bad ``channel_axis``."""
    nd = len(shape)
    if type(channel_axis) is not int or not -nd <= channel_axis < nd:
        return None
    ax = channel_axis % nd
    return math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1:])


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
    the general path, which asks exactly)."""
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
    """The array the fused kernel writes: new (``out`` None), ``out`` if it is one
    of ``data`` (x, dy) or a C-contiguous writeable array like ``x`` (whose
    overlaps the caller checks), else None."""
    if out is None:
        return np.empty_like(x)
    if out is x or any(out is d for d in data) or (
            type(out) is np.ndarray and out.dtype == x.dtype and out.shape == x.shape
            and out.flags.c_contiguous and out.flags.writeable):
        return out
    return None


def _written(out, y, data):
    """[y] if the kernel writes into the caller's ``out`` (it must then not overlap
    anything), [] for a new array; and the data it must be apart from."""
    if out is None:
        return [], list(data)
    return [y], [d for d in data if d is not y]


def train(x, scale, offset, channel_axis, eps, running_mean, running_var, momentum, out):
    """``batch_norm_train`` for the common small call: ``(y, mean, invstd)``, or None."""
    kern = _kernel("train_small3", x, "FUSED_MAX")
    if kern is None:
        return None
    s3 = _shape3(x.shape, channel_axis)
    if (s3 is None or s3[0] * s3[2] < 2 or type(eps) is not float or not eps >= 0.0
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
    written, data = _written(out, y, (x,))
    if (written or running) and not _apart(running + written, data + [scale, offset]):
        return None
    mean, invstd = np.empty(C, pdt), np.empty(C, pdt)
    kern(x.reshape(s3), scale, offset, eps, momentum, running_mean, running_var,
                    y.reshape(s3), mean, invstd)
    return y, mean, invstd


def infer(x, scale, offset, mean, var, channel_axis, eps, out):
    """``batch_norm_infer`` for the common small call: ``y``, or None."""
    kern = _kernel("infer_small3", x, "FUSED_MAX")
    if kern is None:
        return None
    s3 = _shape3(x.shape, channel_axis)
    if s3 is None or type(eps) is not float or not eps >= 0.0:
        return None
    C = s3[1]
    if not (_vec(scale, C) and _vec(offset, C) and mean is not None and _vec(mean, C)
            and var is not None and _vec(var, C)):
        return None
    y = _out(out, x, ())
    if y is None:
        return None
    written, data = _written(out, y, (x,))
    if written and not _apart(written, data + [scale, offset, mean, var]):
        return None
    kern(x.reshape(s3), scale, offset, mean, var, eps, y.reshape(s3))
    return y


def backward(dy, x, scale, mean, invstd, channel_axis, out):
    """``batch_norm_backward`` for the common small call: ``(dx, dscale, doffset)``, or None."""
    kern = _kernel("backward_small3", x, "FUSED_MAX")
    if kern is None:
        return None
    if (type(dy) is not np.ndarray or dy.dtype != x.dtype or dy.shape != x.shape
            or not dy.flags.c_contiguous):
        return None
    s3 = _shape3(x.shape, channel_axis)
    if s3 is None:
        return None
    C = s3[1]
    if not (_vec(scale, C) and mean is not None and _vec(mean, C) and invstd is not None
            and _vec(invstd, C)):
        return None
    dx = _out(out, x, (dy,))
    if dx is None:
        return None
    written, data = _written(out, dx, (x, dy))
    if written and not _apart(written, data + [scale, mean, invstd]):
        return None
    pdt = _F32 if x.dtype == _F16 else x.dtype
    dscale, doffset = np.empty(C, pdt), np.empty(C, pdt)
    kern(dy.reshape(s3), x.reshape(s3), scale, mean, invstd, dx.reshape(s3),
                       dscale, doffset)
    return dx, dscale, doffset

"""The common call on NumPy arrays, answered with a few identity tests.

The general path's steps (argument checks, layout plan, dispatch, float64
working vectors, per-channel math in NumPy) cost more than a few-KB kernel
(NCHW (4,16,4,4) float32: ~8 of ~12 us), and 40-80 us at 1 MiB, where they
run on caches the kernel has just flushed.  A call takes this lane when every
argument is already what the backend's fused entry points take unchanged:

* ``x`` (and ``dy``) a ``numpy.ndarray`` (not a subclass), C-contiguous or
  C-contiguous with the channel axis moved last (channels_last memory), of a
  dtype the backend's fused kernels take, with 0 < size <= the backend's
  ``FUSED_MAX`` (Numba and Cython: any size; their entry points run the
  parallel primitives beyond ``SMALL``, with the per-channel math compiled
  or in a few NumPy operations) or else ``SMALL``; ``dy`` of ``x``'s shape
  and dtype;
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

The checks themselves cost more than a few-KB kernel when written in Python
(~40 NumPy attribute reads and comparisons at 0.1-0.2 us each), so they are
compiled (``fastbn.kernels.lane_checks``, built by ``setup.py`` with the
Cython backend, but without OpenMP and for every CPU alike) and this module
holds their Python twins (``train_args``, ``infer_args``, ``backward_args``),
used where the extension is not built.  ``checks`` is the one in use.  The two
decide alike except on overlaps: the compiled checks compare byte ranges
(every array here is one dense block), the Python ones accept only distinct
arrays that own their memory or that ``np.may_share_memory`` clears, and
decline a few more calls (disjoint views of one buffer) to the general path.
"""

import math
import sys

import numpy as np

from . import dispatch

_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
#: data dtype -> per-channel dtype (float32 for float16 data)
_PDT = {_F16: _F32, _F32: _F32, _F64: _F64}

_module = dispatch.numpy_default   # the default NumPy backend's kernel module


# -- the lane ------------------------------------------------------------------------
# The backend's attributes are read afresh on every call (tests and users swap
# them), but only these few.  Backends with fused kernels take float16/32/64.

def _kernel(name, f64_stats=False):
    """``(kern, limit)``: the default NumPy backend's fused kernel ``name`` and the
    largest input it takes (FUSED_MAX, else SMALL); None when it has none (or,
    with ``f64_stats``, writes no float64 statistics: F64_STATS)."""
    bk = _module()
    kern = getattr(bk, name, None)
    if kern is None or (f64_stats and not getattr(bk, "F64_STATS", False)):
        return None
    return kern, getattr(bk, "FUSED_MAX", bk.SMALL)


def train(x, scale, offset, channel_axis, eps, running_mean, running_var, momentum, out,
          f64_stats=False):
    """``batch_norm_train`` for the common small call: ``(y, mean, invstd)``, or None.

    ``f64_stats``: ``mean``/``invstd`` as the kernel computed them, in float64
    (``layer.train_forward_f64``); None where the backend's kernel writes only
    the per-channel dtype (its ``F64_STATS`` false)."""
    k = _kernel("train_small3", f64_stats)
    a = None if k is None else checks.train_args(x, scale, offset, channel_axis, eps, running_mean,
                                                 running_var, momentum, out, k[1], f64_stats)
    if a is None:
        return None
    x3, y, y3, mean, invstd = a
    k[0](x3, scale, offset, eps, momentum, running_mean, running_var, y3, mean, invstd)
    return y, mean, invstd


def infer(x, scale, offset, mean, var, channel_axis, eps, out):
    """``batch_norm_infer`` for the common small call: ``y``, or None."""
    k = _kernel("infer_small3")
    a = None if k is None else checks.infer_args(x, scale, offset, mean, var, channel_axis, eps,
                                                 out, k[1])
    if a is None:
        return None
    x3, y, y3 = a
    k[0](x3, scale, offset, mean, var, eps, y3)
    return y


def backward(dy, x, scale, mean, invstd, channel_axis, out):
    """``batch_norm_backward`` for the common small call: ``(dx, dscale, doffset)``, or None."""
    k = _kernel("backward_small3")
    a = None if k is None else checks.backward_args(dy, x, scale, mean, invstd, channel_axis, out,
                                                    k[1])
    if a is None:
        return None
    dy3, x3, dx, dx3, dscale, doffset = a
    k[0](dy3, x3, scale, mean, invstd, dx3, dscale, doffset)
    return dx, dscale, doffset


def infer_backward(dy, x, scale, mean, var, channel_axis, eps, out):
    """``batch_norm_infer_backward`` for the common small call: ``(dx, dscale,
    doffset)``, or None.  The backward's checks, ``var`` in place of ``invstd``, all
    three vectors of the per-channel dtype (what the layers pass; any other mix
    takes the general path, which converts them once, rather than compiling the
    backward's kernels for it)."""
    k = None if type(eps) is not float or not eps >= 0.0 else _kernel("infer_backward_small3")
    a = None if k is None else checks.backward_args(dy, x, scale, mean, var, channel_axis, out,
                                                    k[1], True)
    if a is None:
        return None
    dy3, x3, dx, dx3, dscale, doffset = a
    k[0](dy3, x3, scale, mean, var, eps, dx3, dscale, doffset)
    return dx, dscale, doffset


def moments(x, axis, keepdims, ddof):
    """``moments`` over every axis but one (``axis`` an int or a tuple of ints,
    ``keepdims`` a bool, ``ddof`` an int or float below the count): ``(mean,
    var)`` from the default backend's kernels (see moments_into), as the general
    path computes them, without its checks and plan; None otherwise."""
    if type(keepdims) is not bool or (type(ddof) is not int and type(ddof) is not float):
        return None
    axes = (axis,) if type(axis) is int else axis
    if type(x) is not np.ndarray or type(axes) is not tuple or len(axes) != x.ndim - 1:
        return None
    nd = x.ndim
    seen = 0
    for a in axes:
        if type(a) is not int or not -nd <= a < nd or seen >> (a % nd) & 1:
            return None
        seen |= 1 << (a % nd)
    ax = (~seen & ((1 << nd) - 1)).bit_length() - 1   # the one axis kept
    x3 = checks.view3_args(x, ax, 1 << 62)
    if x3 is None:
        return None
    C = x3.shape[1]
    if not x.size // C - ddof > 0:
        return None
    pdt = _PDT[x.dtype]
    if keepdims:
        shape = tuple(C if a == ax else 1 for a in range(nd))
        mean, var = np.empty(shape, pdt), np.empty(shape, pdt)
        moments_into(_module(), x3, ddof, mean.reshape(C), var.reshape(C))
    else:
        mean, var = np.empty(C, pdt), np.empty(C, pdt)
        moments_into(_module(), x3, ddof, mean, var)
    return mean, var


def moments_into(bk, x3, ddof, mean_out, var_out):
    """Per-channel mean and variance ``m2 / (n - ddof)`` (n > ddof) of the NumPy
    (outer, C, inner) ``x3`` into the (C,) ``mean_out``/``var_out``: the backend's
    fused ``moments_small3`` if it has one, else its ``moments3`` and the division
    here (the same numbers as the general path's, which calls this too)."""
    kern = getattr(bk, "moments_small3", None)
    if kern is not None:
        kern(x3, ddof, mean_out, var_out)
        return
    mean, m2 = bk.moments3(x3)
    mean_out[...] = mean
    var_out[...] = m2 / (x3.shape[0] * x3.shape[2] - ddof)


def normalization(x, mean, variance, offset, scale, eps, out):
    """``batch_normalization`` for per-channel parameters of the per-channel dtype
    (arrays shaped like ``moments(..., keepdims=True)`` gives them, or 1-D along the
    last axis): the inference lane on their 1-D views; None otherwise."""
    p = checks.channel_params(x, mean, variance, offset, scale)
    if p is None:
        return None
    ax, m, v, o, s = p
    return infer(x, s, o, m, v, ax, eps, out)


# -- the checks in Python (kernels/lane_checks.pyx has the compiled ones) -----------
# Each ``*_args`` takes the public function's arguments and the size ``limit``,
# and returns None or the kernel's arguments: (outer, C, inner) views, new outputs.

def _plan(x, channel_axis, limit):
    """``(pdt, shape3, order)`` for a call on ``x``, or None.

    ``x`` must be exactly an ndarray of float16/32/64 with 0 < size <= ``limit``,
    and its memory one of the two layouts the kernels take as they are:
    C-contiguous (``order`` None; ``shape3`` = (outer, C, inner)), or
    C-contiguous with the channel axis moved last (``order``: that transpose;
    ``shape3`` = (rows, C, 1)) -- a channels_last tensor's NumPy view, an NHWC
    array seen as NCHW.  One channel: ``shape3`` = (1, 1, size), as
    ``fastbn.layout`` plans it (so the general path runs the same loop nest).
    ``pdt`` is the per-channel dtype."""
    if type(x) is not np.ndarray or type(channel_axis) is not int:
        return None
    pdt = _PDT.get(x.dtype)
    if pdt is None or not 0 < x.size <= limit:
        return None
    shape = x.shape
    nd = len(shape)
    if not -nd <= channel_axis < nd:
        return None
    ax = channel_axis % nd
    if shape[ax] == 1 and x.flags.c_contiguous:   # one channel: as fastbn.layout plans it
        return pdt, (1, 1, x.size), None
    if x.flags.c_contiguous:
        return pdt, (math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1:])), None
    order = tuple(i for i in range(nd) if i != ax) + (ax,)
    if x.transpose(order).flags.c_contiguous:
        return pdt, (x.size // shape[ax], shape[ax], 1), order
    return None


def _as3(a, s3, order):
    """``a``'s (outer, C, inner) view in ``x``'s layout (see _plan), or None if
    ``a``'s memory is laid out otherwise."""
    t = a if order is None else a.transpose(order)
    return t.reshape(s3) if t.flags.c_contiguous else None


def _vectors(C, dtype, *vs):
    """True if every one of ``vs`` is None or a C-contiguous (C,) ndarray of
    ``dtype`` (of any of float16/32/64 when ``dtype`` is None)."""
    c1 = (C,)
    for v in vs:
        if v is None:
            continue
        if type(v) is not np.ndarray or v.shape != c1 or not v.flags.c_contiguous:
            return False
        dt = v.dtype
        if dt is not dtype and (dt != dtype if dtype is not None else dt not in _PDT):
            return False
    return True


def _apart(written, others):
    """True if no array in ``written`` can share memory with another array of
    ``written`` or ``others`` (None entries skipped; the same object twice is
    sharing).

    Distinct ndarrays that own their buffers cannot overlap; anything else is
    asked of ``np.may_share_memory`` (bounds only: a "maybe" sends the call to
    the general path, which asks exactly; ~0.7 us a pair, less than reading an
    array's address through ``__array_interface__``)."""
    written = [w for w in written if w is not None]
    arrays = written + [o for o in others if o is not None]
    if len({id(a) for a in arrays}) == len(arrays):
        for a in arrays:
            if not a.flags.owndata:
                break
        else:
            return True
    for i, w in enumerate(written):
        for o in arrays[i + 1:]:
            if o is w or (not (w.flags.owndata and o.flags.owndata)
                          and np.may_share_memory(w, o)):
                return False
    return True


def _out(out, x, dy, s3, order):
    """``(y, y3)``: the array the fused kernel writes and its (outer, C, inner)
    view: new (``out`` None: like ``x``, in its memory order), else ``out`` if it
    is ``x``, ``dy`` or an ndarray like ``x`` in ``x``'s layout, and writeable;
    else None."""
    if out is None:
        y = np.empty_like(x)
    elif out is not x and out is not dy and (
            type(out) is not np.ndarray or out.shape != x.shape
            or (out.dtype is not x.dtype and out.dtype != x.dtype)):
        return None
    elif not out.flags.writeable:
        return None
    else:
        y = out
    y3 = _as3(y, s3, order)
    return None if y3 is None else (y, y3)


def train_args(x, scale, offset, channel_axis, eps, running_mean, running_var, momentum, out,
               limit, f64_stats):
    """``(x3, y, y3, mean, invstd)`` for ``train_small3``, or None; ``mean``/``invstd``
    new, float64 with ``f64_stats``, else of the per-channel dtype."""
    p = _plan(x, channel_axis, limit)
    if (p is None or p[1][0] * p[1][2] < 2 or type(eps) is not float or not eps >= 0.0
            or type(momentum) is not float or not 0.0 <= momentum <= 1.0):
        return None
    pdt, s3, order = p
    C = s3[1]
    if not _vectors(C, pdt, scale, offset, running_mean, running_var):
        return None
    for r in (running_mean, running_var):
        if r is not None and not r.flags.writeable:
            return None
    yy = _out(out, x, None, s3, order)
    if yy is None:
        return None
    y, y3 = yy
    if out is not None:
        ok = _apart([running_mean, running_var, y], [scale, offset] + ([] if y is x else [x]))
    else:
        ok = _apart([running_mean, running_var], [x, scale, offset])
    if not ok:
        return None
    sdt = _F64 if f64_stats else pdt
    return _as3(x, s3, order), y, y3, np.empty(C, sdt), np.empty(C, sdt)


def infer_args(x, scale, offset, mean, var, channel_axis, eps, out, limit):
    """``(x3, y, y3)`` for ``infer_small3``, or None."""
    if mean is None or var is None or type(eps) is not float or not eps >= 0.0:
        return None
    p = _plan(x, channel_axis, limit)
    if p is None or not _vectors(p[1][1], None, scale, offset, mean, var):
        return None
    _, s3, order = p
    yy = _out(out, x, None, s3, order)
    if yy is None:
        return None
    y, y3 = yy
    if out is not None and not _apart(
            [y], [scale, offset, mean, var] + ([] if y is x else [x])):
        return None
    return _as3(x, s3, order), y, y3


def backward_args(dy, x, scale, mean, invstd, channel_axis, out, limit, same_dtype=False):
    """``(dy3, x3, dx, dx3, dscale, doffset)`` for ``backward_small3``, or None;
    ``dscale``/``doffset`` new, of the per-channel dtype.  With ``same_dtype`` the
    vectors must be of the per-channel dtype too."""
    if (mean is None or invstd is None or type(dy) is not np.ndarray
            or type(x) is not np.ndarray or dy.shape != x.shape
            or (dy.dtype is not x.dtype and dy.dtype != x.dtype)):
        return None
    p = _plan(x, channel_axis, limit)
    if p is None:
        return None
    pdt, s3, order = p
    C = s3[1]
    dy3 = _as3(dy, s3, order)
    if dy3 is None or not _vectors(C, pdt if same_dtype else None, scale, mean, invstd):
        return None
    dd = _out(out, x, dy, s3, order)
    if dd is None:
        return None
    dx, dx3 = dd
    if out is not None and not _apart(
            [dx], [a for a in (x, dy) if a is not dx] + [scale, mean, invstd]):
        return None
    return dy3, _as3(x, s3, order), dx, dx3, np.empty(C, pdt), np.empty(C, pdt)


def view3_args(x, channel_axis, limit):
    """``x``'s (outer, C, inner) view, or None (see _plan)."""
    p = _plan(x, channel_axis, limit)
    return None if p is None else _as3(x, p[1], p[2])


def _param_axis(p, x, pdt):
    """The one axis of ``x`` along which ``p`` (of dtype ``pdt``) holds a value per
    channel (see lane_checks.pyx), or -1."""
    if type(p) is not np.ndarray or p.dtype != pdt or not p.flags.c_contiguous:
        return -1
    nd = x.ndim
    if p.ndim == 1 and nd >= 1:
        return nd - 1 if p.shape[0] == x.shape[-1] else -1
    if p.ndim != nd:
        return -1
    axes = [i for i in range(nd) if p.shape[i] != 1]
    return axes[0] if len(axes) == 1 and p.shape[axes[0]] == x.shape[axes[0]] else -1


def channel_params(x, mean, variance, offset, scale):
    """``(channel_axis, mean, variance, offset, scale)`` with 1-D views, or None
    (see lane_checks.channel_params: the parameters of x's per-channel dtype)."""
    pdt = _PDT.get(x.dtype) if type(x) is np.ndarray else None
    if pdt is None or mean is None or variance is None:
        return None
    ax = -1
    for p in (mean, variance, offset, scale):
        if p is not None:
            a = _param_axis(p, x, pdt)
            if a < 0 or (ax >= 0 and a != ax):
                return None
            ax = a
    return (ax,) + tuple(None if p is None else p.reshape(-1)
                         for p in (mean, variance, offset, scale))


try:
    from .kernels import lane_checks as compiled
except ImportError:   # not built (no compiler at install): the Python twins above
    compiled = None

#: The checks in use: the compiled ones, else this module's.
checks = compiled if compiled is not None else sys.modules[__name__]

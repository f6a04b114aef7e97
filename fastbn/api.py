"""The public functions (API.md), each one straight path:

    check (``checks``) -> plan (``layout``) -> primitives (the backend's
    ``moments3`` / ``dy_sums3`` / ``affine3``, or its fused small-input kernel)
    -> per-channel math (``core``) -> results in the caller's family (``families``).

The family module of ``x`` (host NumPy or CUDA device arrays) answers every
question that depends on where the arrays live; the backend module only runs
kernels on canonical ``(outer, C, inner)`` views.  Dask arrays are handed, as
a whole call, to the Dask backend, which builds the same steps into a graph.
"""

import math

import numpy as np

from . import broadcast, checks, core, dispatch, families, layout

_NAN = float("nan")
_SMALL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _whole(x, backend, fn):
    """What runs the whole call of public function ``fn`` when ``x`` is not host
    data: the Dask backend's ``fn`` for a Dask array (it builds a graph), the
    torch family's tensor version of ``fn`` for a CPU tensor; else None."""
    if type(x) is np.ndarray:
        return None
    fam = families.family_of(x)
    if fam == "dask":
        return getattr(dispatch.module(dispatch.choose("dask", backend)), fn.__name__)
    if fam == "torch":
        return families.module("torch").wrapped(fn)
    return None


def _channel_input(x, channel_axis, backend):
    """Checked ``x`` and its plan: ``(x, family name, family module, backend, plan)``."""
    x, fam = checks.data_array(x, "x")
    ax = checks.channel_axis(channel_axis, x.ndim)
    plan = layout.make_plan(x.shape, x.strides, (ax,))
    return x, fam, families.module(fam), dispatch.module(dispatch.choose(fam, backend)), plan


def _results(F, like, dtype, *vectors):
    return tuple(F.result(v, like, dtype) for v in vectors)


# -- moments -----------------------------------------------------------------

def moments(x, axis=None, *, keepdims=False, ddof=0, backend=None):
    """Mean and variance of ``x`` over ``axis``, in one read of ``x``.

    Equal to ``(np.mean(x, axis), np.var(x, axis, ddof=ddof))`` computed in
    float64, returned in ``x``'s dtype (float32 for float16 input).  ``axis``:
    None (all), an int, or a tuple of ints.  TensorFlow's
    ``tf.nn.moments(x, axes)`` is ``moments(x, axes)``.
    """
    if (whole := _whole(x, backend, moments)) is not None:
        return whole(x, axis, keepdims=keepdims, ddof=ddof, backend=backend)
    x, fam = checks.data_array(x, "x")
    axes = layout.normalize_axes(axis, x.ndim)
    ddof = checks.scalar(ddof, "ddof")
    F = families.module(fam)
    bk = dispatch.module(dispatch.choose(fam, backend))
    plan = layout.make_plan(x.shape, x.strides, tuple(a for a in range(x.ndim) if a not in axes))
    C, n = plan.shape3[1], plan.count
    if n == 0 or C == 0:
        mean = m2 = F.full(C, _NAN)
    else:
        mean, m2 = bk.moments3(F.as3(x, plan))
    var = core.variance(m2, n, ddof)
    shape = tuple(1 if a in axes else x.shape[a] for a in range(x.ndim)) if keepdims else plan.kept_shape
    pdt = checks.param_dtype(x.dtype)
    return F.result(mean, x, pdt, shape), F.result(var, x, pdt, shape)


# -- tf.nn.batch_normalization -----------------------------------------------

def batch_normalization(x, mean, variance, offset, scale, variance_epsilon, *, out=None, backend=None):
    """TensorFlow's ``tf.nn.batch_normalization`` with NumPy broadcasting.

    ``y = (x - mean) / sqrt(variance + variance_epsilon) * scale + offset``;
    ``offset``/``scale`` may be None.  The parameters must broadcast to
    ``x.shape``; the axes on which any of them varies act as the channel
    axes of one fused pass (e.g. what ``moments(..., keepdims=True)`` gives).
    """
    if (whole := _whole(x, backend, batch_normalization)) is not None:
        return whole(x, mean, variance, offset, scale, variance_epsilon, out=out,
                     backend=backend)
    x, fam = checks.data_array(x, "x")
    params, eps = broadcast.arguments(x, fam, mean, variance, offset, scale, variance_epsilon)
    out = checks.out_array(out, x, fam)
    F = families.module(fam)
    bk = dispatch.module(dispatch.choose(fam, backend))
    plan = broadcast.plan(x, params)
    m, q, r = broadcast.coefficients(params, eps, plan, x, fam)
    return F.affine(bk, F.as3(x, plan), plan, x, out, m, q, r)


# -- fused batch norm ----------------------------------------------------------

def _small_train(bk, x, plan, scale, offset, eps, momentum, running_mean, running_var, out):
    """The backend's fused one-call kernel for small C-contiguous host inputs, or None.

    Per-call overhead dominates small batches (an MLP layer is (batch, 30));
    the arguments are already checked, so this only asks whether the kernel
    takes them as they are.
    """
    small = getattr(bk, "train_small3", None)
    if (small is None or type(x) is not np.ndarray or not 0 < x.size <= bk.SMALL
            or x.dtype not in _SMALL_DTYPES or not x.flags.c_contiguous):
        return None
    dt = x.dtype
    for v in (scale, offset, running_mean, running_var):
        if v is not None and (v.dtype != dt or not v.flags.c_contiguous):
            return None
    if out is None:
        out = np.empty_like(x)
    elif not (out.flags.c_contiguous and (out is x or not np.may_share_memory(out, x))):
        return None
    ax = plan.kept[0]
    outer = math.prod(x.shape[:ax])
    C = x.shape[ax]
    shape3 = (outer, C, plan.count // outer)
    mean = np.empty(C, dt)
    invstd = np.empty(C, dt)
    small(x.reshape(shape3), scale, offset, eps, momentum, running_mean, running_var,
          out.reshape(shape3), mean, invstd)
    return out, mean, invstd


def train(x, scale=None, offset=None, *, channel_axis=1, eps=1e-5, running_mean=None,
          running_var=None, momentum=0.1, out=None, backend=None, stats_dtype=None):
    """:func:`batch_norm_train`, with the batch ``mean``/``invstd`` returned in
    ``stats_dtype`` (None: the per-channel dtype; ``numpy.float64`` keeps the
    exact statistics for a backward at large means - what the layers use)."""
    x, fam, F, bk, plan = _channel_input(x, channel_axis, backend)
    C, n = plan.shape3[1], plan.count
    pdt = checks.param_dtype(x.dtype)
    (scale, w_scale, offset, w_offset, eps, momentum, running_mean,
     running_var) = checks.train_state(scale, offset, eps, momentum, running_mean, running_var, C,
                                       fam, pdt)
    out = checks.out_array(out, x, fam)
    checks.no_overlaps(fam, (("running_mean", running_mean), ("running_var", running_var)), out,
                       (("scale", scale), ("offset", offset)), (("x", x),))
    if n == 1:
        raise ValueError(f"batch_norm_train needs more than 1 value per channel to compute a "
                         f"variance; x of shape {tuple(x.shape)} with channel_axis={channel_axis} "
                         f"has 1")
    rdt = pdt if stats_dtype is None else np.dtype(stats_dtype)
    if n == 0:  # an empty batch (PyTorch): empty y, NaN statistics, running stats untouched
        nan = F.full(C, _NAN)
        y = F.affine(bk, F.as3(x, plan), plan, x, out, nan, nan, nan)
        return (y,) + _results(F, x, rdt, nan, nan)
    if rdt == pdt:
        fused = _small_train(bk, x, plan, scale, offset, eps, momentum, running_mean, running_var,
                             out)
        if fused is not None:
            return fused
    x3 = F.as3(x, plan)
    mean, m2 = bk.moments3(x3)
    invstd, q, r = core.train_coefficients(m2, n, eps, w_scale, w_offset)
    y = F.affine(bk, x3, plan, x, out, mean, q, r)
    # Statistics last: a failure above leaves running stats untouched.
    if running_mean is not None or running_var is not None:
        new = core.running_update(None if running_mean is None else F.vector(running_mean),
                                  None if running_var is None else F.vector(running_var),
                                  mean, m2, n, momentum)
        F.assign([(r, v) for r, v in zip((running_mean, running_var), new) if r is not None])
    return (y,) + _results(F, x, rdt, mean, invstd)


def batch_norm_train(x, scale=None, offset=None, *, channel_axis=1, eps=1e-5, running_mean=None,
                     running_var=None, momentum=0.1, out=None, backend=None):
    """Training-mode forward: normalise with the batch's per-channel statistics.

    x: any shape with channels on ``channel_axis`` (1 for NCHW, -1 for NHWC).
    Returns ``(y, mean, invstd)``: ``y`` shaped like x, ``mean`` and
    ``invstd = 1/sqrt(var + eps)`` (biased var) of length C.  Running
    statistics, if given, are updated in place with momentum (PyTorch
    convention, unbiased running variance).
    """
    if (whole := _whole(x, backend, batch_norm_train)) is not None:
        return whole(x, scale, offset, channel_axis=channel_axis, eps=eps,
                     running_mean=running_mean, running_var=running_var,
                     momentum=momentum, out=out, backend=backend)
    return train(x, scale, offset, channel_axis=channel_axis, eps=eps, running_mean=running_mean,
                 running_var=running_var, momentum=momentum, out=out, backend=backend)


def batch_norm_infer(x, scale, offset, mean, var, *, channel_axis=1, eps=1e-5, out=None, backend=None):
    """Inference-mode forward with given (running) statistics.

    ``y = (x - mean) * scale / sqrt(var + eps) + offset`` per channel;
    ``scale``/``offset`` may be None (ones / zeros).
    """
    if (whole := _whole(x, backend, batch_norm_infer)) is not None:
        return whole(x, scale, offset, mean, var, channel_axis=channel_axis, eps=eps,
                     out=out, backend=backend)
    x, fam, F, bk, plan = _channel_input(x, channel_axis, backend)
    C = plan.shape3[1]
    scale, w_scale = checks.vector(scale, "scale", C, fam)
    offset, w_offset = checks.vector(offset, "offset", C, fam)
    _, w_mean = checks.vector(mean, "mean", C, fam, optional=False)
    _, w_var = checks.vector(var, "var", C, fam, optional=False)
    eps = checks.scalar(eps, "eps", low=0.0)
    out = checks.out_array(out, x, fam)
    checks.no_overlaps(fam, out=out, vectors=(("scale", scale), ("offset", offset)))
    q, r = core.infer_coefficients(w_var, eps, w_scale, w_offset)
    return F.affine(bk, F.as3(x, plan), plan, x, out, w_mean, q, r)


def _backward_input(dy, x, scale, mean, channel_axis, out, backend):
    """Checked arguments common to both backward passes."""
    x, fam, F, bk, plan = _channel_input(x, channel_axis, backend)
    dy = checks.same_as_x(dy, x, fam)
    C = plan.shape3[1]
    scale, w_scale = checks.vector(scale, "scale", C, fam)
    _, w_mean = checks.vector(mean, "mean", C, fam, optional=False)
    out = checks.out_array(out, x, fam)
    checks.no_overlaps(fam, out=out, vectors=(("scale", scale),))
    return x, dy, fam, F, bk, plan, w_scale, w_mean, out


def _dy_sums(F, bk, dy3, x3, mean, C):
    """Per-channel ``(sum(dy), sum(dy*(x - mean)))``; zeros for no values."""
    if x3.size == 0:  # kernels may assume non-empty input
        return F.full(C, 0.0), F.full(C, 0.0)
    return bk.dy_sums3(dy3, x3, mean)


def batch_norm_backward(dy, x, scale, mean, invstd, *, channel_axis=1, out=None, backend=None):
    """Gradients of ``batch_norm_train``'s ``y`` (batch statistics).

    Returns ``(dx, dscale, doffset)``: ``doffset = sum(dy)``,
    ``dscale = sum(dy * xhat)``, ``dx = scale*invstd/n * (n*dy - doffset -
    xhat*dscale)`` with ``xhat = (x - mean)*invstd``; sums per channel over n
    values.  ``scale=None`` means ones.  ``mean``/``invstd`` may be float64
    for any data dtype (the exact statistics keep the gradients accurate at
    large means).
    """
    if (whole := _whole(x, backend, batch_norm_backward)) is not None:
        return whole(dy, x, scale, mean, invstd, channel_axis=channel_axis, out=out,
                     backend=backend)
    x, dy, fam, F, bk, plan, w_scale, w_mean, out = _backward_input(dy, x, scale, mean,
                                                                    channel_axis, out, backend)
    C = plan.shape3[1]
    _, w_invstd = checks.vector(invstd, "invstd", C, fam, optional=False)
    x3, dy3 = F.as3(x, plan), F.as3(dy, plan)
    dscale, doffset = core.gradient_sums(w_invstd, *_dy_sums(F, bk, dy3, x3, w_mean, C))
    if plan.count == 0:  # an empty batch: no gradient, even with its NaN statistics
        dscale = F.full(C, 0.0)
    a, b, c = core.backward_coefficients(plan.count, w_invstd, w_scale, dscale, doffset)
    dx = F.affine(bk, x3, plan, x, out, w_mean, b, c, dy3, a)
    return (dx,) + _results(F, x, checks.param_dtype(x.dtype), dscale, doffset)


def batch_norm_infer_backward(dy, x, scale, mean, var, *, channel_axis=1, eps=1e-5, out=None,
                              backend=None):
    """Gradients of ``batch_norm_infer``'s ``y`` (fixed statistics, e.g. frozen BN).

    Returns ``(dx, dscale, doffset)``: ``dx = dy * scale / sqrt(var + eps)``,
    ``dscale = sum(dy * (x - mean)) / sqrt(var + eps)``, ``doffset = sum(dy)``,
    sums per channel.  ``scale=None`` means ones.
    """
    if (whole := _whole(x, backend, batch_norm_infer_backward)) is not None:
        return whole(dy, x, scale, mean, var, channel_axis=channel_axis,
                     eps=eps, out=out, backend=backend)
    x, dy, fam, F, bk, plan, w_scale, w_mean, out = _backward_input(dy, x, scale, mean,
                                                                    channel_axis, out, backend)
    C = plan.shape3[1]
    _, w_var = checks.vector(var, "var", C, fam, optional=False)
    eps = checks.scalar(eps, "eps", low=0.0)
    x3, dy3 = F.as3(x, plan), F.as3(dy, plan)
    dscale, doffset, a = core.infer_backward_coefficients(w_var, eps, w_scale,
                                                          *_dy_sums(F, bk, dy3, x3, w_mean, C))
    zero = F.full(C, 0.0)
    dx = F.affine(bk, x3, plan, x, out, w_mean, zero, zero, dy3, a)
    return (dx,) + _results(F, x, checks.param_dtype(x.dtype), dscale, doffset)

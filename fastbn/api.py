"""The public functions (API.md).

Each function checks its arguments (``checks``), builds the canonical
``(outer, C, inner)`` view (``layout``), and calls the three primitives of the
chosen backend (``moments3``, ``affine3``, ``dy_sums3``).  Per-channel
arithmetic (invstd, the affine coefficients, running statistics) happens here,
in float64, on length-C vectors.
"""

import numpy as np

from . import checks, device, dispatch, layout


def _backend(family, backend):
    return dispatch.module(dispatch.choose(family, backend))


def _dask(x, backend):
    """The dask backend if ``x`` is a Dask array (it implements the public functions), else None."""
    return dispatch.module(dispatch.choose("dask", backend)) if dispatch.family_of(x) == "dask" else None


def _output(out, x, plan):
    """Destination for an elementwise result shaped like ``x``.

    Returns ``(y, y3, finish)``: the array handed back to the caller, the
    canonical view the kernel writes, and a callable that copies ``y3`` into
    ``y`` when no view was possible (exotic strides of a user's ``out``).
    """
    y = layout.empty_like_layout(x, x.dtype) if out is None else out
    y3 = layout.view3(y, plan)
    if y3 is None:
        tmp = np.empty(plan.shape3, dtype=x.dtype)

        def finish():
            y.transpose(plan.perm)[...] = tmp.reshape([y.shape[a] for a in plan.perm])
        return y, tmp, finish
    return y, y3, None


def _separate(y3, *inputs3):
    """True if ``y3`` overlaps an input without being exactly the same view.

    Elementwise kernels may write in place (``out=x``), but not into a
    shifted or transposed alias of their input.
    """
    for a in inputs3:
        if a is None or not np.may_share_memory(y3, a):
            continue
        same = (a.__array_interface__["data"][0] == y3.__array_interface__["data"][0]
                and a.strides == y3.strides)
        if not same:
            return False
    return True


def _affine(bk, x3, plan, x, out, m, q, r, u3=None, p=None):
    if not isinstance(x, np.ndarray):  # device arrays (cuda family)
        return device.affine(bk, x3, plan, x, out, m, q, r, u3, p)
    y, y3, finish = _output(out, x, plan)
    if y3.size == 0:  # nothing to write; kernels may assume non-empty input
        return y
    if out is not None and not _separate(y3, x3, u3):
        tmp = np.empty(plan.shape3, dtype=x.dtype)
        bk.affine3(x3, m, q, r, tmp, u3, p)
        y3[...] = tmp
    else:
        bk.affine3(x3, m, q, r, y3, u3, p)
    if finish is not None:
        finish()
    return y


def _channel_plan(x, channel_axis):
    ax = checks.channel_axis(channel_axis, x.ndim)
    return ax, layout.make_plan(x.shape, x.strides, (ax,))


# -- moments -----------------------------------------------------------------

def moments(x, axis=None, *, keepdims=False, ddof=0, backend=None):
    """Mean and variance of ``x`` over ``axis``, in one read of ``x``.

    Equal to ``(np.mean(x, axis), np.var(x, axis, ddof=ddof))`` computed in
    float64, returned in ``x``'s dtype (float32 for float16 input).  ``axis``:
    None (all), an int, or a tuple of ints.  TensorFlow's
    ``tf.nn.moments(x, axes)`` is ``moments(x, axes)``.
    """
    if (dk := _dask(x, backend)) is not None:
        return dk.moments(x, axis, keepdims=keepdims, ddof=ddof, backend=backend)
    x, fam = checks.data_array(x, "x")
    axes = layout.normalize_axes(axis, x.ndim)
    ddof = checks.scalar(ddof, "ddof")
    bk = _backend(fam, backend)
    kept = tuple(a for a in range(x.ndim) if a not in axes)
    plan = layout.make_plan(x.shape, x.strides, kept)
    n = plan.count
    pdt = checks.param_dtype(x.dtype)
    if n == 0 or plan.shape3[1] == 0:
        mean = np.full(plan.shape3[1], np.nan)
        m2 = np.full(plan.shape3[1], np.nan)
    else:
        mean, m2 = bk.moments3(layout.as3(x, plan))
    with np.errstate(divide="ignore", invalid="ignore"):
        var = m2 / max(n - ddof, 0)
    shape = tuple(1 if a in axes else x.shape[a] for a in range(x.ndim)) if keepdims else plan.kept_shape
    if fam == "cuda":
        return device.vec_out(mean, x, pdt, shape), device.vec_out(var, x, pdt, shape)
    return (np.asarray(mean, dtype=pdt).reshape(shape), np.asarray(var, dtype=pdt).reshape(shape))


# -- tf.nn.batch_normalization -----------------------------------------------

def _param(v, name, x, family):
    """A broadcastable parameter of batch_normalization, aligned to x.ndim."""
    if v is None:
        return None
    fam = dispatch.family_of(v)
    if fam != family and not (family == "cuda" and fam == "numpy" and np.ndim(v) == 0):
        raise TypeError(f"{name} is a {fam} array but x is a {family} array")
    # cuda: a working vector (CuPy, or host NumPy without CuPy); a host number is allowed
    v = device.vec_in(v, None) if family == "cuda" else np.asarray(v)
    if v.dtype.kind not in "fiu" or v.dtype == np.bool_:
        raise TypeError(f"{name} must be a real float array or number, got dtype {v.dtype}")
    if v.ndim > x.ndim:
        raise ValueError(f"{name} has shape {v.shape}, more dimensions than x {x.shape}")
    v = v.reshape((1,) * (x.ndim - v.ndim) + v.shape)
    for a, (s, t) in enumerate(zip(v.shape, x.shape)):
        if s not in (1, t):
            raise ValueError(f"{name} of shape {v.shape} does not broadcast to x's shape {x.shape} "
                             f"(axis {a}: {s} vs {t})")
    return v.astype(np.float64)


def batch_normalization(x, mean, variance, offset, scale, variance_epsilon, *, out=None, backend=None):
    """TensorFlow's ``tf.nn.batch_normalization`` with NumPy broadcasting.

    ``y = (x - mean) / sqrt(variance + variance_epsilon) * scale + offset``;
    ``offset``/``scale`` may be None.  The parameters must broadcast to
    ``x.shape``; the axes on which any of them varies act as the channel
    axes of one fused pass (e.g. what ``moments(..., keepdims=True)`` gives).
    """
    if (dk := _dask(x, backend)) is not None:
        return dk.batch_normalization(x, mean, variance, offset, scale, variance_epsilon, out=out,
                                      backend=backend)
    x, fam = checks.data_array(x, "x")
    params = {name: _param(v, name, x, fam) for name, v in
              (("mean", mean), ("variance", variance), ("offset", offset), ("scale", scale))}
    for name in ("mean", "variance"):
        if params[name] is None:
            raise TypeError(f"{name} must be an array or number, got None")
    eps = checks.scalar(variance_epsilon, "variance_epsilon", low=0.0)
    out = checks.out_array(out, x, fam)
    bk = _backend(fam, backend)
    kept = tuple(a for a in range(x.ndim)
                 # != 1, not > 1: a parameter of length 0 (x empty there) varies too
                 if any(p is not None and p.shape[a] != 1 for p in params.values()))
    plan = layout.make_plan(x.shape, x.strides, kept)

    def per_channel(v, default):
        if v is None:
            return (device.xp() if fam == "cuda" else np).full(plan.shape3[1], default)
        return np.broadcast_to(v[tuple(slice(None) if a in kept else 0 for a in range(x.ndim))],
                               plan.kept_shape).reshape(-1)

    with np.errstate(divide="ignore", invalid="ignore"):
        q = per_channel(params["scale"], 1.0) / np.sqrt(per_channel(params["variance"], 0.0) + eps)
    return _affine(bk, layout.as3(x, plan), plan, x, out,
                   np.ascontiguousarray(per_channel(params["mean"], 0.0)), np.ascontiguousarray(q),
                   np.ascontiguousarray(per_channel(params["offset"], 0.0)))


# -- fused batch norm ----------------------------------------------------------

def _train_args(x, scale, offset, channel_axis, eps, running_mean, running_var, momentum, out):
    x, fam = checks.data_array(x, "x")
    ax, plan = _channel_plan(x, channel_axis)
    C = x.shape[ax]
    pdt = checks.param_dtype(x.dtype)
    scale = checks.vector(scale, "scale", C, fam)
    offset = checks.vector(offset, "offset", C, fam)
    eps = checks.scalar(eps, "eps", low=0.0)
    momentum = checks.scalar(momentum, "momentum", low=0.0, high=1.0)
    running_mean = checks.running(running_mean, "running_mean", C, fam, pdt)
    running_var = checks.running(running_var, "running_var", C, fam, pdt)
    out = checks.out_array(out, x, fam)
    if plan.count < 2:
        raise ValueError(f"batch_norm_train needs more than 1 value per channel to compute a "
                         f"variance; x of shape {x.shape} with channel_axis={channel_axis} "
                         f"has {plan.count}")
    return x, fam, plan, pdt, scale, offset, eps, momentum, running_mean, running_var, out


_SMALL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _small_vec(v, C, dt):
    return v is None or (type(v) is np.ndarray and v.dtype == dt and v.shape == (C,)
                         and v.flags.c_contiguous and v.flags.writeable)


def _train_small(x, scale, offset, channel_axis, eps, running_mean, running_var, momentum, out,
                 backend):
    """The fused one-call path for small C-contiguous NumPy inputs, or None.

    Per-call overhead dominates small batches (an MLP layer is (batch, 30)).
    Every precondition is checked with cheap identity/attribute tests; if any
    fails this returns None and the general path runs (and raises on bad input).
    """
    if (type(x) is not np.ndarray or x.dtype not in _SMALL_DTYPES
            or type(channel_axis) is not int or not x.flags.c_contiguous
            or type(eps) is not float or type(momentum) is not float
            or not (eps >= 0.0 and 0.0 <= momentum <= 1.0)):
        return None
    bk = dispatch.small_path_backend(backend)
    ndim = x.ndim
    if bk is None or x.size > bk.SMALL or not -ndim <= channel_axis < ndim:
        return None
    shape = x.shape
    ax = channel_axis % ndim
    C = shape[ax]
    n = x.size // C if C else 0
    dt = x.dtype
    if (n < 2 or not (_small_vec(scale, C, dt) and _small_vec(offset, C, dt)
                      and _small_vec(running_mean, C, dt) and _small_vec(running_var, C, dt))):
        return None
    if out is None:
        out = np.empty_like(x)
    elif not (type(out) is np.ndarray and out.dtype == dt and out.shape == shape
              and out.flags.c_contiguous and out.flags.writeable
              and (out is x or not np.may_share_memory(out, x))):
        return None
    outer = 1
    for s in shape[:ax]:
        outer *= s
    shape3 = (outer, C, n // outer)
    mean = np.empty(C, dt)
    invstd = np.empty(C, dt)
    bk.train_small3(x.reshape(shape3), scale, offset, eps, momentum, running_mean, running_var,
                    out.reshape(shape3), mean, invstd)
    return out, mean, invstd


def batch_norm_train(x, scale=None, offset=None, *, channel_axis=1, eps=1e-5, running_mean=None,
                     running_var=None, momentum=0.1, out=None, backend=None):
    """Training-mode forward: normalise with the batch's per-channel statistics.

    x: any shape with channels on ``channel_axis`` (1 for NCHW, -1 for NHWC).
    Returns ``(y, mean, invstd)``: ``y`` shaped like x, ``mean`` and
    ``invstd = 1/sqrt(var + eps)`` (biased var) of length C.  Running
    statistics, if given, are updated in place with momentum (PyTorch
    convention, unbiased running variance).
    """
    small = _train_small(x, scale, offset, channel_axis, eps, running_mean, running_var, momentum,
                         out, backend)
    if small is not None:
        return small
    if (dk := _dask(x, backend)) is not None:
        return dk.batch_norm_train(x, scale, offset, channel_axis=channel_axis, eps=eps,
                                   running_mean=running_mean, running_var=running_var,
                                   momentum=momentum, out=out, backend=backend)
    (x, fam, plan, pdt, scale, offset, eps, momentum, running_mean, running_var,
     out) = _train_args(x, scale, offset, channel_axis, eps, running_mean, running_var, momentum, out)
    bk = _backend(fam, backend)
    x3 = layout.as3(x, plan)
    mean, m2 = bk.moments3(x3)
    n = plan.count
    invstd = 1.0 / np.sqrt(m2 / n + eps)
    q = invstd if scale is None else scale * invstd
    r = np.zeros_like(mean) if offset is None else offset
    y = _affine(bk, x3, plan, x, out, mean, q, r)
    # Statistics last: a failure above leaves running stats untouched.
    if fam == "cuda":
        device.update_running(((running_mean, mean), (running_var, m2 / (n - 1))), momentum)
        return y, device.vec_out(mean, x, pdt), device.vec_out(invstd, x, pdt)
    if running_mean is not None:
        running_mean[...] = (1.0 - momentum) * running_mean + momentum * mean
    if running_var is not None:
        running_var[...] = (1.0 - momentum) * running_var + momentum * (m2 / (n - 1))
    return y, mean.astype(pdt), invstd.astype(pdt)


def batch_norm_infer(x, scale, offset, mean, var, *, channel_axis=1, eps=1e-5, out=None, backend=None):
    """Inference-mode forward with given (running) statistics.

    ``y = (x - mean) * scale / sqrt(var + eps) + offset`` per channel;
    ``scale``/``offset`` may be None (ones / zeros).
    """
    if (dk := _dask(x, backend)) is not None:
        return dk.batch_norm_infer(x, scale, offset, mean, var, channel_axis=channel_axis, eps=eps,
                                   out=out, backend=backend)
    x, fam = checks.data_array(x, "x")
    ax, plan = _channel_plan(x, channel_axis)
    C = x.shape[ax]
    scale = checks.vector(scale, "scale", C, fam)
    offset = checks.vector(offset, "offset", C, fam)
    mean = checks.vector(mean, "mean", C, fam, optional=False)
    var = checks.vector(var, "var", C, fam, optional=False)
    eps = checks.scalar(eps, "eps", low=0.0)
    out = checks.out_array(out, x, fam)
    bk = _backend(fam, backend)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = 1.0 / np.sqrt(var + eps)
    if scale is not None:
        q = scale * q
    r = np.zeros_like(mean) if offset is None else offset
    return _affine(bk, layout.as3(x, plan), plan, x, out, mean, q, r)


def batch_norm_backward(dy, x, scale, mean, invstd, *, channel_axis=1, out=None, backend=None):
    """Gradients of ``batch_norm_train``'s ``y`` (batch statistics).

    Returns ``(dx, dscale, doffset)``: ``doffset = sum(dy)``,
    ``dscale = sum(dy * xhat)``, ``dx = scale*invstd/n * (n*dy - doffset -
    xhat*dscale)`` with ``xhat = (x - mean)*invstd``; sums per channel over n
    values.  ``scale=None`` means ones.
    """
    if (dk := _dask(x, backend)) is not None:
        return dk.batch_norm_backward(dy, x, scale, mean, invstd, channel_axis=channel_axis, out=out,
                                      backend=backend)
    x, fam = checks.data_array(x, "x")
    dy, _ = checks.data_array(dy, "dy", fam)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have x's dtype {x.dtype}, got {dy.dtype}")
    ax, plan = _channel_plan(x, channel_axis)
    C = x.shape[ax]
    pdt = checks.param_dtype(x.dtype)
    scale = checks.vector(scale, "scale", C, fam)
    mean = checks.vector(mean, "mean", C, fam, optional=False)
    invstd = checks.vector(invstd, "invstd", C, fam, optional=False)
    out = checks.out_array(out, x, fam)
    bk = _backend(fam, backend)
    x3 = layout.as3(x, plan)
    dy3 = layout.as3(dy, plan)
    n = max(plan.count, 1)  # count 0: dx is empty; avoid 0/0 below
    if x3.size == 0:  # sums over no values; kernels may assume non-empty input
        doffset, s_dyxc = np.zeros_like(mean), np.zeros_like(mean)
    else:
        doffset, s_dyxc = bk.dy_sums3(dy3, x3, mean)
    dscale = s_dyxc * invstd
    a = invstd if scale is None else scale * invstd
    b = -a * invstd * dscale / n
    c = -a * doffset / n
    dx = _affine(bk, x3, plan, x, out, mean, b, c, dy3, a)
    if fam == "cuda":
        return dx, device.vec_out(dscale, x, pdt), device.vec_out(doffset, x, pdt)
    return dx, dscale.astype(pdt), doffset.astype(pdt)


def batch_norm_infer_backward(dy, x, scale, mean, var, *, channel_axis=1, eps=1e-5, out=None,
                              backend=None):
    """Gradients of ``batch_norm_infer``'s ``y`` (fixed statistics, e.g. frozen BN).

    Returns ``(dx, dscale, doffset)``: ``dx = dy * scale / sqrt(var + eps)``,
    ``dscale = sum(dy * (x - mean)) / sqrt(var + eps)``, ``doffset = sum(dy)``,
    sums per channel.  ``scale=None`` means ones.
    """
    if (dk := _dask(x, backend)) is not None:
        raise TypeError("batch_norm_infer_backward does not take Dask arrays yet")
    x, fam = checks.data_array(x, "x")
    dy, _ = checks.data_array(dy, "dy", fam)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have x's dtype {x.dtype}, got {dy.dtype}")
    ax, plan = _channel_plan(x, channel_axis)
    C = x.shape[ax]
    pdt = checks.param_dtype(x.dtype)
    scale = checks.vector(scale, "scale", C, fam)
    mean = checks.vector(mean, "mean", C, fam, optional=False)
    var = checks.vector(var, "var", C, fam, optional=False)
    eps = checks.scalar(eps, "eps", low=0.0)
    out = checks.out_array(out, x, fam)
    bk = _backend(fam, backend)
    x3 = layout.as3(x, plan)
    dy3 = layout.as3(dy, plan)
    with np.errstate(divide="ignore", invalid="ignore"):
        invstd = 1.0 / np.sqrt(var + eps)
    if x3.size == 0:
        doffset, s_dyxc = np.zeros_like(mean), np.zeros_like(mean)
    else:
        doffset, s_dyxc = bk.dy_sums3(dy3, x3, mean)
    dscale = s_dyxc * invstd
    a = invstd if scale is None else scale * invstd
    z = np.zeros_like(mean)
    dx = _affine(bk, x3, plan, x, out, mean, z, z, dy3, a)
    if fam == "cuda":
        return dx, device.vec_out(dscale, x, pdt), device.vec_out(doffset, x, pdt)
    return dx, dscale.astype(pdt), doffset.astype(pdt)

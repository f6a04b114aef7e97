"""The public functions (API.md), each one straight path:

    check (``checks``) -> plan (``layout``) -> primitives (the backend's
    ``moments3`` / ``dy_sums3`` / ``affine3``, or its fused small-input kernel)
    -> per-channel math (``core``) -> results in the caller's family (``families``).

The family module of ``x`` (host NumPy or CUDA device arrays) answers every
question that depends on where the arrays live; the backend module only runs
kernels on canonical ``(outer, C, inner)`` views.  Dask arrays are handed, as
a whole call, to the Dask backend, which builds the same steps into a graph.

Array families.  Every array argument may be a NumPy array (or anything
``numpy.asarray`` takes: lists, scalars, memoryviews; ``np.matrix`` and other
subclasses as their base ndarray; masked arrays are refused), a CuPy array, a
Numba device array or another ``__cuda_array_interface__`` object (the CUDA
backend), a ``dask.array.Array`` (lazy results; ``out=`` not supported), or a
CPU ``torch.Tensor`` (run on zero-copy NumPy views; results come back as
tensors, ``out=`` as the given tensor; tensors that require grad are refused).
All the arrays of one call are of one family.  Results are arrays of ``x``'s
family.  The type hints say ``ArrayLike`` for what goes in and ``Array``
(``typing.Any``) for what comes out, so a result keeps the caller's array type.
"""

# mypy: allow-redefinition
# (the public functions rebind their ArrayLike arguments to the checked arrays)
from __future__ import annotations

import functools
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import broadcast, checks, core, dispatch, docstrings, families, fastlane, layout

#: An array of ``x``'s family: ``numpy.ndarray`` for host input, ``cupy.ndarray``
#: (or a Numba device array) for CUDA input, a lazy ``dask.array.Array`` for Dask
#: input, ``torch.Tensor`` for CPU tensors.  ``Any`` to a type checker.
Array: TypeAlias = Any
#: ``axis=`` of :func:`moments`: None (every axis), an axis or a tuple of axes.
Axes: TypeAlias = int | tuple[int, ...] | None

_NAN = float("nan")


def _whole(x, backend, fn):
    """What runs the whole call of public function ``fn`` when ``x`` is not host
    data: the Dask backend's ``fn`` for a Dask array (it builds a graph), the
    torch family's tensor version of ``fn`` for a CPU tensor; else None."""
    if type(x) is np.ndarray:
        return None
    fam = families.family_of(x)
    if fam == "dask":   # its chunks run on the CPU backend chosen here (FASTBN_BACKEND, ...)
        dk = dispatch.module(dispatch.choose("dask", backend))
        return functools.partial(getattr(dk, fn.__name__),
                                 cpu=dispatch.module_path(dispatch.choose("numpy")))
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

def moments(x: ArrayLike, axis: Axes = None, *, keepdims: bool = False, ddof: float = 0,
            backend: str | None = None) -> tuple[Array, Array]:
    """Mean and variance of ``x`` over ``axis``, in one read of ``x``.

    Equal to ``(np.mean(x, axis), np.var(x, axis, ddof=ddof))`` computed in
    float64 (shifted sums merged exactly with Chan's formula, accurate at large
    means).  TensorFlow's ``tf.nn.moments(x, axes)`` is ``moments(x, axes)``.

    Parameters
    ----------
    x : array_like, any shape
        float16, float32 or float64 data: a NumPy array (or anything
        ``numpy.asarray`` takes), CuPy/CUDA array, Dask array or CPU
        ``torch.Tensor``.
    axis : None, int or tuple of ints, optional
        Axes to reduce (negative counts from the end); None: every axis.
    keepdims : bool, optional
        Keep the reduced axes with length 1 (the results then broadcast
        against ``x``, e.g. into :func:`batch_normalization`).
    ddof : float, optional
        Delta degrees of freedom: the variance divides by ``n - ddof``.
    {{backend}}

    Returns
    -------
    mean, var : arrays of x's family
        Shaped like ``x`` without the reduced axes (with them as 1 if
        ``keepdims``); dtype float32 for float16 ``x``, else ``x``'s dtype.
        NaN where nothing was reduced (an empty axis).  Lazy for Dask input,
        tensors for tensor input.

    Raises
    ------
    TypeError
        ``x`` is not a float16/32/64 array (integer, bool, complex, a masked
        array, a tensor that requires grad), ``backend`` does not take ``x``'s
        family, or a bad argument type.
    ValueError
        An axis out of range or repeated, ``ddof`` NaN, an unknown or
        unavailable ``backend``.

    Examples
    --------
    {{example_x}}
    >>> mean, var = fbn.moments(x, axis=0)
    >>> mean, var
    (array([ 2., 20.], dtype=float32), array([  1., 100.], dtype=float32))
    >>> fbn.moments(x, axis=0, ddof=1)[1]
    array([  1.3333334, 133.33333  ], dtype=float32)
    >>> fbn.moments(x, axis=0, keepdims=True)[0].shape
    (1, 2)
    """
    if (type(x) is np.ndarray and backend is None
            and (r := fastlane.moments(x, axis, keepdims, ddof)) is not None):
        return r
    if (whole := _whole(x, backend, moments)) is not None:
        return whole(x, axis, keepdims=keepdims, ddof=ddof, backend=backend)
    x, fam = checks.data_array(x, "x")
    axes = layout.normalize_axes(axis, x.ndim)
    ddof = checks.scalar(ddof, "ddof")
    F = families.module(fam)
    bk = dispatch.module(dispatch.choose(fam, backend))
    plan = layout.make_plan(x.shape, x.strides, tuple(a for a in range(x.ndim) if a not in axes))
    C, n = plan.shape3[1], plan.count
    shape = tuple(1 if a in axes else x.shape[a] for a in range(x.ndim)) if keepdims else plan.kept_shape
    pdt = checks.param_dtype(x.dtype)
    if F.FUSED and (r := F.fused_moments(bk, x, plan, ddof, pdt, shape)) is not None:
        return r
    if n == 0 or C == 0:
        mean = m2 = F.full(C, _NAN)
    else:
        x3 = F.as3(x, plan)
        if type(x3) is np.ndarray and n - ddof > 0:   # the lane's kernels: the same numbers
            mean, var = np.empty(C, pdt), np.empty(C, pdt)
            fastlane.moments_into(bk, x3, ddof, mean, var)
            return mean.reshape(shape), var.reshape(shape)
        mean, m2 = bk.moments3(x3)
    var = core.variance(m2, n, ddof)
    return F.result(mean, x, pdt, shape), F.result(var, x, pdt, shape)


# -- tf.nn.batch_normalization -----------------------------------------------

def batch_normalization(x: ArrayLike, mean: ArrayLike, variance: ArrayLike,
                        offset: ArrayLike | None, scale: ArrayLike | None,
                        variance_epsilon: float, *, out: Array | None = None,
                        backend: str | None = None) -> Array:
    """TensorFlow's ``tf.nn.batch_normalization`` with NumPy broadcasting.

    ``y = (x - mean) / sqrt(variance + variance_epsilon) * scale + offset``.
    The axes on which any parameter varies act as the channel axes of one
    fused pass over ``x`` (e.g. what ``moments(..., keepdims=True)`` gives).

    Parameters
    ----------
    x : array_like, any shape
        float16, float32 or float64 data (NumPy, CuPy/CUDA, Dask or a CPU
        ``torch.Tensor``).
    mean, variance : array_like
        Broadcastable to ``x.shape`` (scalars, ``(C,)`` for channels last, or
        keepdims-shaped such as ``(1, C, 1, 1)``); any float dtype.
    offset, scale : array_like or None
        Broadcastable to ``x.shape``, like ``mean``; None means 0 / 1.
    variance_epsilon : float
        Added to ``variance`` (>= 0).
    out : array, optional
        Where to write ``y``: an array of ``x``'s family, shape and dtype.  It
        may be ``x`` itself (in place) or overlap ``x`` in any way; ``offset``
        and ``scale`` must not share memory with it.  Not supported for Dask
        input.
    backend : str, optional
        Force a backend (``"numba"``, ``"cython"``, ``"numpy"``, ``"cuda"``,
        ``"dask"``); None: the dispatcher's choice.

    Returns
    -------
    {{y_result}}

    Raises
    ------
    TypeError
        Non-float ``x`` or parameters, arrays of different families in one
        call (e.g. ``x`` a CuPy array, ``scale`` a NumPy array), a tensor that
        requires grad, ``out`` of another dtype, ``out=`` with Dask input.
    ValueError
        Parameters that do not broadcast to ``x.shape``, ``out`` of another
        shape, ``scale``/``offset`` overlapping ``out`` (naming both, nothing
        written), ``variance_epsilon`` < 0, an unknown or unavailable ``backend``.

    Examples
    --------
    {{example_x}}
    >>> mean, var = fbn.moments(x, axis=0, keepdims=True)  # (1, 2) each
    >>> fbn.batch_normalization(x, mean, var, None, None, 1e-3)
    array([[-0.9995004, -0.999995 ],
           [ 0.9995004,  0.999995 ],
           [-0.9995004, -0.999995 ],
           [ 0.9995004,  0.999995 ]], dtype=float32)
    >>> y = fbn.batch_normalization(x, mean, var, 0.5, 2.0, 1e-3, out=x)  # in place
    >>> y is x
    True
    """
    if (type(x) is np.ndarray and backend is None and type(variance_epsilon) is float
            and (r := fastlane.normalization(x, mean, variance, offset, scale, variance_epsilon,
                                             out)) is not None):
        return r
    if (whole := _whole(x, backend, batch_normalization)) is not None:
        return whole(x, mean, variance, offset, scale, variance_epsilon, out=out,
                     backend=backend)
    x, fam = checks.data_array(x, "x")
    if (getattr(families.module(fam), "FUSED", False)
            and (y := _normalization_fused(x, fam, mean, variance, offset, scale,
                                           variance_epsilon, out, backend)) is not None):
        return y
    params, eps = broadcast.arguments(x, fam, mean, variance, offset, scale, variance_epsilon)
    out = checks.out_array(out, x, fam)
    F = families.module(fam)
    if out is not None:   # (numbers and lists cannot overlap out)
        checks.no_overlaps(fam, out=out, vectors=tuple(
            (k, v) for k, v in (("scale", scale), ("offset", offset))
            if families.family_of(v) == fam and F.is_array(v)))
    bk = dispatch.module(dispatch.choose(fam, backend))
    plan = broadcast.plan(x, params)
    m, q, r = broadcast.coefficients(params, eps, plan, x, fam)
    return F.affine(bk, F.as3(x, plan), plan, x, out, m, q, r)


def _normalization_fused(x, fam, mean, variance, offset, scale, variance_epsilon, out, backend):
    """``batch_normalization`` in one fused call (families with ``FUSED`` kernels: the
    GPU) when its parameters are per-channel arrays (``F.channel_params``), with the
    general path's checks of ``variance_epsilon`` and ``out`` first; else None.  No
    float64 copies of the parameters: nothing runs off the caller's stream."""
    F = families.module(fam)
    if any(v is not None and families.family_of(v) != fam for v in (mean, variance, offset, scale)):
        return None
    params = F.channel_params(x, mean, variance, offset, scale)
    if params is None:
        return None
    eps = checks.scalar(variance_epsilon, "variance_epsilon", low=0.0)
    out = checks.out_array(out, x, fam)
    if out is not None:
        checks.no_overlaps(fam, out=out, vectors=tuple(
            (k, v) for k, v in (("scale", scale), ("offset", offset)) if v is not None))
    bk = dispatch.module(dispatch.choose(fam, backend))
    plan = layout.make_plan(x.shape, x.strides, (params[0],))
    return F.fused_normalization(bk, x, plan, params, eps, out)


# -- fused batch norm ----------------------------------------------------------

def _small(bk, name, x, out, data=()):
    """``(kernel, out)``: the backend's fused one-call kernel ``name`` for small
    C-contiguous host inputs and the array it writes, or None when it does not
    take these arrays as they are.

    Per-call overhead dominates small batches (an MLP layer is (batch, 30)); the
    arguments are already checked.  ``data``: the other full-size inputs (``dy``);
    ``out`` may be exactly ``x`` or one of them, or separate.
    """
    small = getattr(bk, name, None)
    if (small is None or type(x) is not np.ndarray or not 0 < x.size <= bk.SMALL
            or x.dtype not in bk.SMALL_DTYPES or not x.flags.c_contiguous):
        return None
    for d in data:
        if type(d) is not np.ndarray or not d.flags.c_contiguous:
            return None
    if out is None:
        return small, np.empty_like(x)
    if not out.flags.c_contiguous:
        return None
    for a in (x,) + data:
        if out is not a and np.may_share_memory(out, a):
            return None
    return small, out


def _small_backward(bk, name, dy, x, plan, out, *vectors):
    """``(dx, dscale, doffset)`` from the backend's fused backward kernel ``name``
    (``backward_small3`` or ``infer_backward_small3``, whose per-channel arguments
    are ``vectors``) for small inputs, or None (see _small)."""
    fused = _small(bk, name, x, out, (dy,))
    if fused is None:
        return None
    small, dx = fused
    s3 = plan.shape3
    pdt = checks.param_dtype(x.dtype)
    dscale, doffset = np.empty(s3[1], pdt), np.empty(s3[1], pdt)
    small(dy.reshape(s3), x.reshape(s3), *vectors, dx.reshape(s3), dscale, doffset)
    return dx, dscale, doffset


def _small_train(bk, x, plan, scale, offset, eps, momentum, running_mean, running_var, out):
    """The fused training forward (``train_small3``) for small inputs, or None."""
    dt = checks.param_dtype(x.dtype)
    for v in (scale, offset, running_mean, running_var):   # the kernel takes this dtype
        if v is not None and (v.dtype != dt or not v.flags.c_contiguous):
            return None
    fused = _small(bk, "train_small3", x, out)   # (allocates y: asked last)
    if fused is None:
        return None
    small, out = fused
    shape3 = plan.shape3   # for C-contiguous x: (prod(shape[:ax]), C, prod(shape[ax+1:]))
    C = shape3[1]
    mean = np.empty(C, dt)
    invstd = np.empty(C, dt)
    small(x.reshape(shape3), scale, offset, eps, momentum, running_mean, running_var,
          out.reshape(shape3), mean, invstd)
    return out, mean, invstd


def train(x: ArrayLike, scale: ArrayLike | None = None, offset: ArrayLike | None = None, *,
          channel_axis: int = 1, eps: float = 1e-5, running_mean: Array | None = None,
          running_var: Array | None = None, momentum: float = 0.1, out: Array | None = None,
          backend: str | None = None,
          stats_dtype: DTypeLike | None = None) -> tuple[Array, Array, Array]:
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
    if F.FUSED and (r := F.fused_train(bk, x, plan, scale, offset, eps, momentum, running_mean,
                                       running_var, out, rdt)) is not None:
        return r
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


def batch_norm_train(x: ArrayLike, scale: ArrayLike | None = None,
                     offset: ArrayLike | None = None, *, channel_axis: int = 1, eps: float = 1e-5,
                     running_mean: Array | None = None, running_var: Array | None = None,
                     momentum: float = 0.1, out: Array | None = None,
                     backend: str | None = None) -> tuple[Array, Array, Array]:
    """Training-mode forward: normalise with the batch's per-channel statistics.

    ``y = (x - mean) * invstd * scale + offset`` per channel, with the batch's
    ``mean`` and ``invstd = 1/sqrt(var + eps)`` (biased variance) over every
    axis but ``channel_axis`` (cuDNN's ForwardTraining, TensorFlow's
    ``FusedBatchNormV3(is_training=True)``, PyTorch's training-mode
    ``batch_norm``).  Running statistics, if given, are updated in place:
    ``r = (1 - momentum) * r + momentum * batch``, with the unbiased variance
    ``var * n / (n - 1)`` for ``running_var`` (PyTorch's convention;
    TensorFlow's ``decay`` is ``1 - momentum``).

    Parameters
    ----------
    {{x}}
    {{scale_offset}}
    channel_axis : int, optional
        The axis of ``x`` holding the channels (negative counts from the end);
        statistics are over every other axis.
    eps : float, optional
        Added to the variance (>= 0).  Where ``var + eps == 0`` (a constant
        channel with ``eps=0``) ``invstd`` is 0 and ``y`` equals ``offset``.
    running_mean, running_var : array, shape (C,), optional
        Running statistics updated in place: arrays of ``x``'s family (NumPy
        arrays for Dask input) of exactly the per-channel dtype (float32 for
        float16 ``x``, else ``x``'s dtype), contiguous and writeable.  They
        may not overlap each other, ``x``, ``out``, ``scale`` or ``offset``.
        Written last: a call that raises leaves them untouched.
    {{momentum_train}}
    {{out_y}}
    {{backend}}

    Returns
    -------
    {{y_result}}
    mean, invstd : arrays of x's family, shape (C,)
        The batch mean and ``1/sqrt(var + eps)``, float32 for float16 ``x``,
        else ``x``'s dtype: what :func:`batch_norm_backward` takes.  NaN for
        an empty batch (``n == 0``, not an error: ``y`` is empty and the
        running statistics are left unchanged).

    Raises
    ------
    TypeError
        Non-float ``x``; a running statistic that is not an array of the
        per-channel dtype; ``out`` of another dtype; arrays of different
        families in one call; a CPU tensor that requires grad (use
        ``fastbn.torch`` for autograd); ``out=`` with Dask input; a
        ``backend`` that does not take ``x``'s family.
    ValueError
        ``channel_axis`` out of range; vectors not of shape ``(C,)``; ``out``
        of another shape; ``eps`` < 0; ``momentum`` outside [0, 1]; one value
        per channel (``n == 1``: no variance); running statistics that overlap
        another argument, or ``scale``/``offset`` that overlap ``out``; an
        unknown or unavailable ``backend``.  Nothing is written before these
        checks.

    See Also
    --------
    batch_norm_backward : the gradients of this ``y``.
    BatchNorm : the same as a stateful layer.

    Examples
    --------
    {{example_x}}
    >>> rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    >>> y, mean, invstd = fbn.batch_norm_train(x, running_mean=rm, running_var=rv)
    >>> y
    array([[-0.999995  , -0.99999994],
           [ 0.999995  ,  0.99999994],
           [-0.999995  , -0.99999994],
           [ 0.999995  ,  0.99999994]], dtype=float32)
    >>> mean, invstd
    (array([ 2., 20.], dtype=float32), array([0.999995  , 0.09999999], dtype=float32))
    >>> rm, rv                                            # updated in place
    (array([0.2, 2. ], dtype=float32), array([ 1.0333333, 14.233334 ], dtype=float32))

    Running statistics may not share memory with another argument:

    >>> fbn.batch_norm_train(x, running_mean=rm, running_var=rm)
    Traceback (most recent call last):
        ...
    ValueError: running_mean and running_var overlap in memory; ...

    Channels last (NHWC) and float16 data, normalised in place:

    >>> x = np.ones((8, 4, 4, 3), dtype=np.float16)
    >>> x[::2] = 3.0
    >>> y, mean, invstd = fbn.batch_norm_train(x, channel_axis=-1, out=x)
    >>> y is x, mean.shape, mean.dtype
    (True, (3,), dtype('float32'))
    """
    if (type(x) is np.ndarray and backend is None
            and (r := fastlane.train(x, scale, offset, channel_axis, eps, running_mean, running_var,
                                     momentum, out)) is not None):
        return r
    if (whole := _whole(x, backend, batch_norm_train)) is not None:
        return whole(x, scale, offset, channel_axis=channel_axis, eps=eps,
                     running_mean=running_mean, running_var=running_var,
                     momentum=momentum, out=out, backend=backend)
    return train(x, scale, offset, channel_axis=channel_axis, eps=eps, running_mean=running_mean,
                 running_var=running_var, momentum=momentum, out=out, backend=backend)


def batch_norm_infer(x: ArrayLike, scale: ArrayLike | None, offset: ArrayLike | None,
                     mean: ArrayLike, var: ArrayLike, *, channel_axis: int = 1,
                     eps: float = 1e-5, out: Array | None = None,
                     backend: str | None = None) -> Array:
    """Inference-mode forward with given (running) statistics.

    ``y = (x - mean) * scale / sqrt(var + eps) + offset`` per channel (PyTorch's
    eval-mode ``batch_norm``, TensorFlow's ``FusedBatchNormV3(is_training=False)``).

    Parameters
    ----------
    {{x}}
    scale, offset : array_like, shape (C,) or None
        Per-channel affine parameters, any float dtype; None means ones /
        zeros.  Must not overlap ``out``.
    mean, var : array_like, shape (C,)
        The statistics to normalise with (e.g. running statistics), any float
        dtype.
    {{channel_axis}}
    eps : float, optional
        Added to ``var`` (>= 0).
    {{out_y}}
    {{backend}}

    Returns
    -------
    {{y_result}}

    Raises
    ------
    {{type_error_backward}}
    ValueError
        ``channel_axis`` out of range; vectors not of shape ``(C,)``; ``out``
        of another shape; ``eps`` < 0; ``scale``/``offset`` overlapping
        ``out``; an unknown or unavailable ``backend``.

    Examples
    --------
    {{example_x}}
    >>> mean = np.array([2.0, 20.0], np.float32)
    >>> var = np.array([1.0, 100.0], np.float32)
    >>> fbn.batch_norm_infer(x, None, np.array([0.0, 1.0], np.float32), mean, var, eps=0.0)
    array([[-1.,  0.],
           [ 1.,  2.],
           [-1.,  0.],
           [ 1.,  2.]], dtype=float32)
    """
    if (type(x) is np.ndarray and backend is None
            and (r := fastlane.infer(x, scale, offset, mean, var, channel_axis, eps, out)) is not None):
        return r
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
    if F.FUSED and (r := F.fused_infer(bk, x, plan, scale, offset, mean, var, eps, out)) is not None:
        return r
    if (fused := _small(bk, "infer_small3", x, out)) is not None:
        small, y = fused
        small(x.reshape(plan.shape3), w_scale, w_offset, w_mean, w_var, eps,
              y.reshape(plan.shape3))
        return y
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


def batch_norm_backward(dy: ArrayLike, x: ArrayLike, scale: ArrayLike | None, mean: ArrayLike,
                        invstd: ArrayLike, *, channel_axis: int = 1, out: Array | None = None,
                        backend: str | None = None) -> tuple[Array, Array, Array]:
    """Gradients of ``batch_norm_train``'s ``y`` (batch statistics).

    ``doffset = sum(dy)``, ``dscale = sum(dy * xhat)`` and
    ``dx = scale * invstd / n * (n * dy - doffset - xhat * dscale)`` with
    ``xhat = (x - mean) * invstd``, sums per channel over its ``n`` values.

    Parameters
    ----------
    {{dy}}
    {{x}}
    {{scale_backward}}
    mean, invstd : array_like, shape (C,)
        What :func:`batch_norm_train` returned for this ``x``.  Any float
        dtype: float64 statistics (e.g. exact ones kept from the forward) keep
        the gradients accurate for data with a large mean.
    {{channel_axis}}
    {{out_dx}}
    {{backend}}

    Returns
    -------
    {{dx_result}}
    dscale, doffset : arrays of x's family, shape (C,)
        The gradients of ``scale`` and ``offset``, float32 for float16 ``x``,
        else ``x``'s dtype.  For an empty batch ``dx`` is empty and both are 0.

    Raises
    ------
    {{type_error_backward}}
    ValueError
        ``dy`` not of ``x``'s shape; vectors not of shape ``(C,)``; ``out`` of
        another shape; ``channel_axis`` out of range; ``scale`` overlapping
        ``out``; an unknown or unavailable ``backend``.

    See Also
    --------
    batch_norm_train : the forward whose ``mean``/``invstd`` this takes.

    Examples
    --------
    {{example_x}}
    >>> y, mean, invstd = fbn.batch_norm_train(x)
    >>> dy = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, -1.0]], np.float32)
    >>> dx, dscale, doffset = fbn.batch_norm_backward(dy, x, None, mean, invstd)
    >>> dscale, doffset
    (array([-0.999995  , -0.99999994], dtype=float32), array([ 1., -1.], dtype=float32))
    >>> dx.shape, dx.dtype
    ((4, 2), dtype('float32'))
    >>> dx = fbn.batch_norm_backward(dy, x, None, mean, invstd, out=dy)[0]  # dx over dy
    >>> dx is dy
    True
    """
    if (type(x) is np.ndarray and backend is None
            and (r := fastlane.backward(dy, x, scale, mean, invstd, channel_axis, out)) is not None):
        return r
    if (whole := _whole(x, backend, batch_norm_backward)) is not None:
        return whole(dy, x, scale, mean, invstd, channel_axis=channel_axis, out=out,
                     backend=backend)
    x, dy, fam, F, bk, plan, w_scale, w_mean, out = _backward_input(dy, x, scale, mean,
                                                                    channel_axis, out, backend)
    C = plan.shape3[1]
    _, w_invstd = checks.vector(invstd, "invstd", C, fam, optional=False)
    if F.FUSED and (r := F.fused_backward(bk, dy, x, plan, scale, mean, invstd, out)) is not None:
        return r
    if (r := _small_backward(bk, "backward_small3", dy, x, plan, out,
                             w_scale, w_mean, w_invstd)) is not None:
        return r
    x3, dy3 = F.as3(x, plan), F.as3(dy, plan)
    dscale, doffset = core.gradient_sums(w_invstd, *_dy_sums(F, bk, dy3, x3, w_mean, C))
    if plan.count == 0:  # an empty batch: no gradient, even with its NaN statistics
        dscale = F.full(C, 0.0)
    a, b, c = core.backward_coefficients(plan.count, w_invstd, w_scale, dscale, doffset)
    dx = F.affine(bk, x3, plan, x, out, w_mean, b, c, dy3, a)
    return (dx,) + _results(F, x, checks.param_dtype(x.dtype), dscale, doffset)


def batch_norm_infer_backward(dy: ArrayLike, x: ArrayLike, scale: ArrayLike | None,
                              mean: ArrayLike, var: ArrayLike, *, channel_axis: int = 1,
                              eps: float = 1e-5, out: Array | None = None,
                              backend: str | None = None) -> tuple[Array, Array, Array]:
    """Gradients of ``batch_norm_infer``'s ``y`` (fixed statistics, e.g. frozen BN).

    ``dx = dy * scale / sqrt(var + eps)``,
    ``dscale = sum(dy * (x - mean)) / sqrt(var + eps)`` and
    ``doffset = sum(dy)``, sums per channel.

    Parameters
    ----------
    {{dy}}
    {{x}}
    {{scale_backward}}
    mean, var : array_like, shape (C,)
        The statistics the forward normalised with (any float dtype).
    {{channel_axis}}
    eps : float, optional
        The forward's ``eps`` (>= 0).
    {{out_dx}}
    {{backend}}

    Returns
    -------
    {{dx_result}}
    dscale, doffset : arrays of x's family, shape (C,)
        The gradients of ``scale`` and ``offset``, float32 for float16 ``x``,
        else ``x``'s dtype.

    Raises
    ------
    {{type_error_backward}}
    ValueError
        ``dy`` not of ``x``'s shape; vectors not of shape ``(C,)``; ``out`` of
        another shape; ``channel_axis`` out of range; ``eps`` < 0; ``scale``
        overlapping ``out``; an unknown or unavailable ``backend``.

    Examples
    --------
    {{example_x}}
    >>> mean = np.array([2.0, 20.0], np.float32)
    >>> var = np.array([1.0, 100.0], np.float32)
    >>> dy = np.ones_like(x)
    >>> dx, dscale, doffset = fbn.batch_norm_infer_backward(dy, x, None, mean, var, eps=0.0)
    >>> dx[0], dscale, doffset
    (array([1. , 0.1], dtype=float32), array([0., 0.], dtype=float32),
     array([4., 4.], dtype=float32))
    """
    if (type(x) is np.ndarray and backend is None
            and (r := fastlane.infer_backward(dy, x, scale, mean, var, channel_axis, eps,
                                              out)) is not None):
        return r
    if (whole := _whole(x, backend, batch_norm_infer_backward)) is not None:
        return whole(dy, x, scale, mean, var, channel_axis=channel_axis,
                     eps=eps, out=out, backend=backend)
    x, dy, fam, F, bk, plan, w_scale, w_mean, out = _backward_input(dy, x, scale, mean,
                                                                    channel_axis, out, backend)
    C = plan.shape3[1]
    _, w_var = checks.vector(var, "var", C, fam, optional=False)
    eps = checks.scalar(eps, "eps", low=0.0)
    if F.FUSED and (r := F.fused_infer_backward(bk, dy, x, plan, scale, mean, var, eps, out)):
        return r
    if (r := _small_backward(bk, "infer_backward_small3", dy, x, plan, out,
                             w_scale, w_mean, w_var, eps)) is not None:
        return r
    x3, dy3 = F.as3(x, plan), F.as3(dy, plan)
    dscale, doffset, a = core.infer_backward_coefficients(w_var, eps, w_scale,
                                                          *_dy_sums(F, bk, dy3, x3, w_mean, C))
    zero = F.full(C, 0.0)
    dx = F.affine(bk, x3, plan, x, out, w_mean, zero, zero, dy3, a)
    return (dx,) + _results(F, x, checks.param_dtype(x.dtype), dscale, doffset)


docstrings.fill(globals())   # the shared parameter descriptions ({{name}} lines)

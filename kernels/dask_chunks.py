"""Dask backend ("dask"): fastbn's public functions on chunked ``dask.array`` input.

Unlike the other backends this module implements the public functions
themselves (``fastbn.api`` hands ``dask.array.Array`` input straight here);
each returns lazy Dask arrays and does its work chunk by chunk, on whatever
scheduler computes the result (threads, processes, ``dask.distributed``).

Statistics (``moments``, ``batch_norm_train``)
    Every chunk runs the ``moments3`` primitive of fastbn's default CPU
    backend (chosen when the graph is built, honouring ``use_backend`` and
    ``FASTBN_BACKEND``) on its canonical ``(outer, C, inner)`` view, giving a
    partial ``(count, mean, m2)`` per channel.  The partials are merged in a
    ``da.reduction`` tree with Chan's formula (``fastbn.core.chan_merge``):
    exact where E[x^2] - E[x]^2 would cancel, and correct for chunks of any,
    unequal, or zero size.  Chunks may split the channel axis, the reduced
    axes, or both.
Elementwise passes (normalize, inference, the backward's ``dx``)
    One ``blockwise`` task per chunk of ``x`` running the backend's
    ``affine3`` with the per-channel coefficients of that chunk's channels.
Backward sums
    Per-chunk ``dy_sums3`` partials, summed in a tree (sums merge by addition).

Per-channel inputs (``scale``, ``offset``, ``mean``, ``var``, ``invstd``) may
be NumPy or Dask arrays; results are Dask arrays in the per-channel dtype
(float32 for float16 ``x``).  ``out=`` is refused: results are lazy.  ``x``
must have known chunk sizes (``x.compute_chunk_sizes()``).  Chunks must be
NumPy arrays (CuPy-backed chunks are not supported yet).
"""

import math

import numpy as np

import importlib

from fastbn import broadcast, checks, core, families, layout

try:
    import dask
    import dask.array as da
except ImportError:  # optional extra: fastbn[dask]
    dask = da = None

NAME = "dask"
FAMILIES = ("dask",)


def unavailable_reason():
    return None if da is not None else "dask not installed"


# -- argument handling (client side) ----------------------------------------------

def _data(x, name="x", family=None):
    x, fam = checks.data_array(x, name, family)
    if fam != "dask":
        raise TypeError(f"the dask backend takes dask arrays; {name} is a {fam} array")
    if any(isinstance(s, float) and math.isnan(s) for s in x.shape):
        raise ValueError(f"{name} has unknown chunk sizes (shape {x.shape}); "
                         f"call {name}.compute_chunk_sizes() first")
    meta_family = families.family_of(getattr(x, "_meta", np.empty(0)))
    if meta_family != "numpy":
        raise TypeError(f"{name} has {type(x._meta).__module__} chunks; the dask backend "
                        "takes dask arrays of NumPy chunks")
    return x


def _no_out(out):
    if out is not None:
        raise TypeError("out= is not supported for dask arrays: results are lazy; "
                        "store them with dask.array.store or .compute()")


#: The CPU backend module the chunk tasks run when the caller names none.
DEFAULT_CPU = "fastbn.kernels.reference"


def _cpu(cpu):
    """Module path of the CPU backend the chunks run on, fixed when the graph is built:
    the dispatcher's choice (``fastbn.api`` passes it as ``cpu=``), else the reference.
    Tasks import it by path, so a worker process needs nothing else of fastbn."""
    return DEFAULT_CPU if cpu is None else cpu


def _vec(v, name, C, chunks, *, optional=True):
    """A per-channel vector (NumPy or Dask, shape (C,)) -> float64 Dask array chunked like x's channels."""
    if v is None:
        if optional:
            return None
        raise TypeError(f"{name} must be a 1-D array of length {C}, got None")
    if families.family_of(v) == "dask":
        if v.dtype.kind != "f":
            raise TypeError(f"{name} must be a float array, got dtype {v.dtype}")
        if tuple(v.shape) != (C,):
            raise ValueError(f"{name} must have shape ({C},) (one value per channel), "
                             f"got shape {tuple(v.shape)}")
        return v.astype(np.float64).rechunk((chunks,))
    if families.family_of(v) != "numpy":
        raise TypeError(f"{name} is a {families.family_of(v)} array but x is a dask array of NumPy "
                        "chunks; pass a NumPy or Dask array")
    _, v = checks.vector(v, name, C, "numpy", optional=optional)
    return da.from_array(v, chunks=(chunks,))


def _param(v, name, x):
    """A parameter of batch_normalization: broadcastable to x -> float64 Dask array of x.ndim dims."""
    if v is None:
        return None
    if families.family_of(v) != "dask":
        if families.family_of(v) != "numpy":
            raise TypeError(f"{name} is a {families.family_of(v)} array but x is a dask array")
        v = np.asarray(v)
    v = broadcast.align(v, name, x)
    chunks = tuple(x.chunks[a] if s > 1 else (s,) for a, s in enumerate(v.shape))
    if isinstance(v, np.ndarray):
        return da.from_array(v.astype(np.float64), chunks=chunks)
    return v.astype(np.float64).rechunk(chunks)


def _running(v, name, C, pdt):
    """A running statistic: a NumPy array updated in place (never lazy, never another family)."""
    if v is not None and families.family_of(v) != "numpy":
        raise TypeError(f"{name} must be a NumPy array updated in place (a lazy Dask array "
                        f"cannot be written to), got {checks.describe(v)}")
    return checks.running(v, name, C, "numpy", pdt)


def _channel(x, channel_axis):
    ax = checks.channel_axis(channel_axis, x.ndim)
    return ax, x.shape[ax], math.prod(s for a, s in enumerate(x.shape) if a != ax)


# -- chunk tasks (run on the workers) ---------------------------------------------

def _block_moments(block, *, kept, bk):
    """One chunk -> packed partial moments, shape (3,) + block shape with reduced axes at 1."""
    kshape = tuple(s if a in kept else 1 for a, s in enumerate(block.shape))
    out = np.zeros((3,) + kshape)
    plan = layout.make_plan(block.shape, block.strides, kept)
    if plan.count == 0 or block.size == 0:
        return out
    mean, m2 = importlib.import_module(bk).moments3(layout.as3(block, plan))
    out[0] = plan.count
    out[1] = np.asarray(mean).reshape(kshape)
    out[2] = np.asarray(m2).reshape(kshape)
    return out


def _block_dy_sums(dyb, xb, m, *, ax, bk):
    """One chunk -> per-channel (sum(dy), sum(dy*(x - m))), shape (2,) + block shape, reduced at 1."""
    kshape = tuple(s if a == ax else 1 for a, s in enumerate(xb.shape))
    out = np.zeros((2,) + kshape)
    plan = layout.make_plan(xb.shape, xb.strides, (ax,))
    if xb.size == 0:
        return out
    s1, s2 = importlib.import_module(bk).dy_sums3(layout.as3(dyb, plan), layout.as3(xb, plan),
                                          np.ascontiguousarray(m, dtype=np.float64))
    out[0] = np.asarray(s1).reshape(kshape)
    out[1] = np.asarray(s2).reshape(kshape)
    return out


def _block_affine(xb, m, q, r, u=None, p=None, *, ax, bk):
    """One chunk: ``q*(x - m) + r (+ p*u)`` per channel, via the backend's affine3."""
    return _block_affine3(xb, layout.make_plan(xb.shape, xb.strides, (ax,)), bk, m, q, r, u, p)


def _block_affine3(xb, plan, bk, m, q, r, u=None, p=None):
    y = layout.empty_like_layout(xb, xb.dtype)
    if xb.size == 0:
        return y
    y3 = layout.view3(y, plan)
    if y3 is None:  # exotic block strides: write C-order, return that
        y = np.empty(xb.shape, dtype=xb.dtype)
        plan_y = layout.make_plan(y.shape, y.strides, plan.kept)
        y3 = layout.view3(y, plan_y)
        plan = plan_y
    vec = [np.ascontiguousarray(v, dtype=np.float64) for v in (m, q, r)]
    u3 = None if u is None else layout.as3(u, plan)
    pv = None if p is None else np.ascontiguousarray(p, dtype=np.float64)
    importlib.import_module(bk).affine3(layout.as3(xb, plan), *vec, y3, u3, pv)
    return y


def _block_batch_normalization(xb, mean, variance, offset, scale, *, eps, bk):
    """One chunk of ``tf.nn.batch_normalization`` with its slices of the parameters."""
    params = dict(zip(broadcast.NAMES, (mean, variance, offset, scale)))
    plan = broadcast.plan(xb, params)
    m, q, r = broadcast.coefficients(params, eps, plan, xb, "numpy")
    return _block_affine3(xb, plan, bk, m, q, r)


def _var(m2, count, *, denom):
    """m2 / (n - ddof) as NumPy gives it (inf/NaN where n - ddof <= 0), NaN for no values."""
    return np.where(count > 0, core.variance(m2, denom), np.nan)


def _identity(p, axis=None, keepdims=True, computing_meta=False):
    return p


def _merge(p, axis, keepdims=True, computing_meta=False):
    # axis numbers axes of p, whose axis 0 holds (count, mean, m2).
    return core.chan_merge(p, tuple(a - 1 for a in axis))


# -- graph builders ------------------------------------------------------------------

def _inds(ndim):
    return tuple(range(ndim))


def _stats(x, reduced, bk):
    """Lazy packed merged moments of x over ``reduced``: shape (3,) + x.shape with reduced at 1."""
    kept = tuple(a for a in range(x.ndim) if a not in reduced)
    inds = _inds(x.ndim)
    parts = da.blockwise(_block_moments, (x.ndim,) + inds, x, inds,
                         new_axes={x.ndim: 3}, adjust_chunks={a: 1 for a in reduced},
                         dtype=np.float64, meta=np.empty((0,) * (x.ndim + 1)),
                         kept=kept, bk=bk)
    return da.reduction(parts, _identity, _merge, combine=_merge,
                        axis=tuple(a + 1 for a in reduced), keepdims=True, dtype=np.float64,
                        meta=np.empty((0,) * (x.ndim + 1)), concatenate=True,
                        name="fastbn-moments")


def _affine(x, ax, bk, m, q, r, u=None, p=None):
    """Lazy ``q*(x - m) + r (+ p*u)``; vectors are (C,) Dask arrays chunked like x's axis ax."""
    inds = _inds(x.ndim)
    args = [x, inds, m, (ax,), q, (ax,), r, (ax,)]
    if u is not None:
        args += [u.rechunk(x.chunks), inds, p, (ax,)]
    return da.blockwise(_block_affine, inds, *args, dtype=x.dtype,
                        meta=np.empty((0,) * x.ndim, dtype=x.dtype), ax=ax, bk=bk)


# -- the public functions --------------------------------------------------------------
# Each takes the arguments of its fastbn namesake, plus ``cpu``: the module path of the
# CPU backend the chunk tasks run (see _cpu).

def moments(x, axis=None, *, keepdims=False, ddof=0, backend=None, cpu=None):
    """Lazy ``(mean, var)`` of a Dask array over ``axis`` (see ``fastbn.moments``).

    One read of x: a per-chunk moments kernel and a Chan-merge tree.
    """
    x = _data(x)
    axes = layout.normalize_axes(axis, x.ndim)
    ddof = checks.scalar(ddof, "ddof")
    pdt = checks.param_dtype(x.dtype)
    denom = float(max(math.prod(x.shape[a] for a in axes) - ddof, 0))
    if not axes:  # nothing reduced: each value is its own mean, m2 = 0
        zero = da.zeros_like(x, dtype=np.float64)
        return x.astype(pdt), da.map_blocks(_var, zero, zero + 1, denom=denom).astype(pdt)
    R = _stats(x, axes, _cpu(cpu))
    count, mean, m2 = R[0], R[1], R[2]
    mean = da.where(count > 0, mean, np.nan)
    var = da.map_blocks(_var, m2, count, denom=denom, dtype=np.float64)
    if not keepdims:
        mean, var = mean.squeeze(axis=axes), var.squeeze(axis=axes)
    return mean.astype(pdt), var.astype(pdt)


def batch_normalization(x, mean, variance, offset, scale, variance_epsilon, *, out=None, backend=None,
                        cpu=None):
    """Lazy ``tf.nn.batch_normalization`` (see ``fastbn.batch_normalization``).

    Parameters may be NumPy or Dask arrays broadcastable to x (e.g. what
    ``moments(x, axes, keepdims=True)`` returns); each chunk runs fastbn's
    fused CPU pass with its slice of the parameters.
    """
    x = _data(x)
    params = {name: _param(v, name, x) for name, v in
              (("mean", mean), ("variance", variance), ("offset", offset), ("scale", scale))}
    for name in ("mean", "variance"):
        if params[name] is None:
            raise TypeError(f"{name} must be an array or number, got None")
    eps = checks.scalar(variance_epsilon, "variance_epsilon", low=0.0)
    _no_out(out)
    inds = _inds(x.ndim)
    args = [x, inds]
    for name in ("mean", "variance", "offset", "scale"):
        args += [None, None] if params[name] is None else [params[name], inds]
    return da.blockwise(_block_batch_normalization, inds, *args, dtype=x.dtype,
                        meta=np.empty((0,) * x.ndim, dtype=x.dtype), eps=eps, bk=_cpu(cpu))


def batch_norm_train(x, scale=None, offset=None, *, channel_axis=1, eps=1e-5, running_mean=None,
                     running_var=None, momentum=0.1, out=None, backend=None, cpu=None):
    """Training-mode forward of a Dask array (see ``fastbn.batch_norm_train``).

    Returns lazy ``(y, mean, invstd)``: ``mean`` and ``invstd`` are (C,) Dask
    arrays from one Chan-merge tree reduction over x's chunks; ``y`` is a
    Dask array chunked like x, each chunk normalised with its channels'
    statistics.  Computing ``y`` reads x twice (statistics, then normalize);
    compute ``y``, ``mean`` and ``invstd`` together (``dask.compute``) so the
    statistics are computed once.

    Running statistics: ``running_mean`` / ``running_var`` must be NumPy
    arrays (they are updated in place, and only the calling process's memory
    can be).  When they are given, the per-channel statistics are computed
    during this call (``dask.compute`` of the (C,) reduction on the current
    scheduler: one streaming read of x) and the running statistics are
    updated in place before the call returns, exactly as for NumPy input;
    ``y``, ``mean`` and ``invstd`` are then built on those computed
    statistics, so computing ``y`` later reads x only once more.  Without
    running statistics nothing is computed here: everything stays lazy until
    you compute it.  (A lazy in-place update is not offered because under
    ``dask.distributed`` every task, the final one included, runs in a
    worker process, where writing to the caller's arrays is impossible.)
    If computing the statistics fails, the running statistics are untouched.
    """
    x = _data(x)
    ax, C, n = _channel(x, channel_axis)
    pdt = checks.param_dtype(x.dtype)
    cch = x.chunks[ax]
    scale = _vec(scale, "scale", C, cch)
    offset = _vec(offset, "offset", C, cch)
    eps = checks.scalar(eps, "eps", low=0.0)
    momentum = checks.scalar(momentum, "momentum", low=0.0, high=1.0)
    running_mean = _running(running_mean, "running_mean", C, pdt)
    running_var = _running(running_var, "running_var", C, pdt)
    _no_out(out)
    if n < 2:
        raise ValueError(f"batch_norm_train needs more than 1 value per channel to compute a "
                         f"variance; x of shape {x.shape} with channel_axis={channel_axis} "
                         f"has {n}")
    bk = _cpu(cpu)
    reduced = tuple(a for a in range(x.ndim) if a != ax)
    R = _stats(x, reduced, bk)
    mean, m2 = R[1].squeeze(axis=reduced), R[2].squeeze(axis=reduced)
    if running_mean is not None or running_var is not None:
        mean_np, m2_np = dask.compute(mean, m2)
        mean, m2 = da.from_array(mean_np, chunks=(cch,)), da.from_array(m2_np, chunks=(cch,))
        new = core.running_update(None if running_mean is None else running_mean.astype(np.float64),
                                  None if running_var is None else running_var.astype(np.float64),
                                  mean_np, m2_np, n, momentum)
        for r, v in zip((running_mean, running_var), new):
            if r is not None:
                r[...] = v
    invstd, q, r = core.train_coefficients(m2, n, eps, scale, offset)
    y = _affine(x, ax, bk, mean, q, r)
    return y, mean.astype(pdt), invstd.astype(pdt)


def batch_norm_infer(x, scale, offset, mean, var, *, channel_axis=1, eps=1e-5, out=None, backend=None,
                     cpu=None):
    """Lazy inference-mode forward of a Dask array (see ``fastbn.batch_norm_infer``)."""
    x = _data(x)
    ax, C, _ = _channel(x, channel_axis)
    cch = x.chunks[ax]
    scale = _vec(scale, "scale", C, cch)
    offset = _vec(offset, "offset", C, cch)
    mean = _vec(mean, "mean", C, cch, optional=False)
    var = _vec(var, "var", C, cch, optional=False)
    eps = checks.scalar(eps, "eps", low=0.0)
    _no_out(out)
    q, r = core.infer_coefficients(var, eps, scale, offset)
    return _affine(x, ax, _cpu(cpu), mean, q, r)


def _backward_input(dy, x, scale, mean, channel_axis, out):
    x = _data(x)
    dy = _data(dy, "dy", "dask")
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have x's dtype {x.dtype}, got {dy.dtype}")
    ax, C, n = _channel(x, channel_axis)
    cch = x.chunks[ax]
    scale = _vec(scale, "scale", C, cch)
    mean = _vec(mean, "mean", C, cch, optional=False)
    _no_out(out)
    return x, dy.rechunk(x.chunks), ax, C, n, cch, scale, mean


def _dy_sums(dy, x, mean, ax, bk):
    """Lazy per-channel (sum(dy), sum(dy*(x - mean))) from per-chunk partials summed in a tree."""
    reduced = tuple(a for a in range(x.ndim) if a != ax)
    inds = _inds(x.ndim)
    parts = da.blockwise(_block_dy_sums, (x.ndim,) + inds, dy, inds, x, inds, mean, (ax,),
                         new_axes={x.ndim: 2}, adjust_chunks={a: 1 for a in reduced},
                         dtype=np.float64, meta=np.empty((0,) * (x.ndim + 1)), ax=ax, bk=bk)
    sums = parts.sum(axis=tuple(a + 1 for a in reduced))
    return sums[0], sums[1]


def batch_norm_backward(dy, x, scale, mean, invstd, *, channel_axis=1, out=None, backend=None,
                        cpu=None):
    """Lazy gradients of ``batch_norm_train``'s ``y`` (see ``fastbn.batch_norm_backward``).

    ``mean``/``invstd`` may be the lazy results of :func:`batch_norm_train`.
    Returns lazy ``(dx, dscale, doffset)``; the per-channel sums come from a
    tree reduction of per-chunk ``dy_sums3`` partials.
    """
    x, dy, ax, C, n, cch, scale, mean = _backward_input(dy, x, scale, mean, channel_axis, out)
    invstd = _vec(invstd, "invstd", C, cch, optional=False)
    bk = _cpu(cpu)
    dscale, doffset = core.gradient_sums(invstd, *_dy_sums(dy, x, mean, ax, bk))
    a, b, c = core.backward_coefficients(n, invstd, scale, dscale, doffset)
    dx = _affine(x, ax, bk, mean, b, c, dy, a)
    pdt = checks.param_dtype(x.dtype)
    return dx, dscale.astype(pdt), doffset.astype(pdt)


def batch_norm_infer_backward(dy, x, scale, mean, var, *, channel_axis=1, eps=1e-5, out=None,
                              backend=None, cpu=None):
    """Lazy gradients of ``batch_norm_infer``'s ``y`` (see ``fastbn.batch_norm_infer_backward``)."""
    x, dy, ax, C, n, cch, scale, mean = _backward_input(dy, x, scale, mean, channel_axis, out)
    var = _vec(var, "var", C, cch, optional=False)
    eps = checks.scalar(eps, "eps", low=0.0)
    bk = _cpu(cpu)
    dscale, doffset, a = core.infer_backward_coefficients(var, eps, scale,
                                                          *_dy_sums(dy, x, mean, ax, bk))
    zero = da.zeros_like(mean)
    dx = _affine(x, ax, bk, mean, zero, zero, dy, a)
    pdt = checks.param_dtype(x.dtype)
    return dx, dscale.astype(pdt), doffset.astype(pdt)

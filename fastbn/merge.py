"""Mergeable batch-norm state: synchronised batch norm with your own all-reduce.

Data-parallel workers each hold a shard of the batch (shards may differ in
size, and may be empty).  Batch norm over the *whole* batch needs per-channel
statistics of the concatenation; these functions split that into a local part,
a tiny exchange the user does with whatever transport they have (MPI,
``torch.distributed``, pipes), and a local apply::

    # forward, on every worker (x: this worker's shard, channels on axis 1)
    part = fbn.partial_moments(x, channel_axis=1)        # Moments, 3 x (C,)
    parts = all_gather(part.pack())                      # (P, 3, C) float64
    total = fbn.merge_moments(parts)                     # Moments of the whole batch
    y, mean, invstd = fbn.batch_norm_train_from_moments(x, total, scale, offset)

    # backward
    g = fbn.partial_grad_sums(dy, x, mean, invstd)       # GradSums, 3 x (C,)
    g = fbn.GradSums.unpack(all_reduce_sum(g.pack()))    # sums merge by addition
    dx, dscale, doffset = fbn.batch_norm_backward_from_sums(dy, x, scale, mean, invstd, g)

``y``/``dx`` equal the slices of single-process ``batch_norm_train`` /
``batch_norm_backward`` on the concatenated batch, and ``mean``, ``invstd``,
``dscale``, ``doffset`` are the global values on every worker; the shard
sizes enter the merge as counts, so unequal shards are weighted correctly.

Moments merge with Chan's formula (exact; never E[x^2] - E[x]^2), so they
need an all-gather, not a sum.  With only an all-reduce(sum) available, use
two: sum ``count`` and ``count*mean`` for the global mean ``M``, then sum
``m2 + count*(mean - M)**2`` for the global ``m2``.

Per-channel vectors here are float64 (exact counts up to 2**53) and live in
host memory; the apply helpers take NumPy arrays.
"""

import functools
from typing import NamedTuple

import numpy as np

from . import checks, core, dispatch, families, layout
from .families import host


def _tensor_calls(fn):
    """``fn``, also taking CPU torch tensors: a call whose first argument holds
    one runs on NumPy views and returns tensors (``fastbn.families.torch_cpu``)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if args and families.holds_tensor(args[0]):
            return families.module("torch").wrapped(fn)(*args, **kwargs)
        return fn(*args, **kwargs)
    return call


class Moments(NamedTuple):
    """Per-channel partial moments of a shard: three float64 arrays of shape (C,).

    ``count``: values per channel; ``mean``: their mean; ``m2``: the sum of
    squared deviations from ``mean``.  An empty shard has count 0, mean 0, m2 0.
    """
    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    def var(self, ddof=0):
        """Per-channel variance ``m2 / (count - ddof)`` (NaN/inf where undefined)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.m2 / np.maximum(self.count - ddof, 0)

    def pack(self):
        """The three vectors stacked as one (3, C) float64 array, for transport."""
        return _pack(self)

    @classmethod
    def unpack(cls, a):
        """Inverse of :meth:`pack`: a (3, C) array -> Moments."""
        return _unpack(cls, a, "packed moments")


def _pack(parts):
    """A summary's three (C,) vectors stacked as one (3, C) float64 array."""
    return np.stack(list(parts)).astype(np.float64, copy=False)


def _unpack(cls, a, what):
    """Inverse of _pack: a (3, C) array -> ``cls`` with copies of its rows."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != 3:
        raise ValueError(f"{what} must have shape (3, C), got {a.shape}")
    return cls(a[0].copy(), a[1].copy(), a[2].copy())


class GradSums(NamedTuple):
    """Per-channel backward sums of a shard: three float64 arrays of shape (C,).

    ``count``: values per channel; ``sum_dy``: ``sum(dy)``; ``sum_dy_xhat``:
    ``sum(dy * xhat)`` with ``xhat = (x - mean) * invstd`` for the *global*
    mean and invstd.  They merge by plain addition; merged, ``sum_dy`` is
    ``doffset`` and ``sum_dy_xhat`` is ``dscale``.
    """
    count: np.ndarray
    sum_dy: np.ndarray
    sum_dy_xhat: np.ndarray

    def pack(self):
        """The three vectors stacked as one (3, C) float64 array (all-reduce with sum)."""
        return _pack(self)

    @classmethod
    def unpack(cls, a):
        """Inverse of :meth:`pack`: a (3, C) array -> GradSums."""
        return _unpack(cls, a, "packed grad sums")


# -- merging -------------------------------------------------------------------

def _stack(parts, cls, what):
    """Parts (NamedTuples, (3, C) or (P, 3, C) arrays) -> one (P, 3, C) float64 array."""
    if not parts:
        raise ValueError(f"{what} needs at least one part")
    blocks = []
    for i, part in enumerate(parts):
        a = part.pack() if isinstance(part, cls) else np.asarray(part, dtype=np.float64)
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3 or a.shape[1] != 3:
            raise ValueError(f"{what}: part {i} must be a {cls.__name__}, a packed (3, C) "
                             f"array or a stacked (P, 3, C) array, got shape {a.shape}")
        blocks.append(a)
    if len({b.shape[2] for b in blocks}) != 1:
        raise ValueError(f"{what}: parts have different channel counts "
                         f"{sorted({b.shape[2] for b in blocks})}")
    return np.concatenate(blocks, axis=0)


@_tensor_calls
def merge_moments(*parts):
    """Merge partial moments of shards into the moments of their concatenation.

    Each part is a :class:`Moments`, a packed (3, C) array (``Moments.pack()``)
    or a stacked (P, 3, C) array (what an all-gather of packed parts gives).
    Associative and commutative up to rounding; counts may differ and may be
    zero.  Returns a :class:`Moments` of (C,) float64 vectors.
    """
    p = _stack(parts, Moments, "merge_moments")
    merged = core.chan_merge(np.moveaxis(p, 1, 0), axis=0)[:, 0]
    return Moments(merged[0], merged[1], merged[2])


@_tensor_calls
def merge_grad_sums(*parts):
    """Add up :class:`GradSums` of shards (same part forms as :func:`merge_moments`)."""
    s = _stack(parts, GradSums, "merge_grad_sums").sum(axis=0)
    return GradSums(s[0], s[1], s[2])


# -- local parts ---------------------------------------------------------------

def _shard(x, channel_axis, name="x"):
    x, fam = checks.data_array(x, name)
    ax = checks.channel_axis(channel_axis, x.ndim)
    return x, fam, ax, layout.make_plan(x.shape, x.strides, (ax,))


@_tensor_calls
def partial_moments(x, channel_axis=1, *, backend=None):
    """Per-channel partial moments of one shard ``x``: a :class:`Moments`.

    x: any shape with channels on ``channel_axis``; statistics over every
    other axis, in one read of x by the chosen CPU backend.  An empty shard
    (e.g. batch size 0) gives count 0, mean 0, m2 0.
    """
    x, fam, ax, plan = _shard(x, channel_axis)
    C, n = x.shape[ax], plan.count
    if n == 0 or C == 0:
        z = np.zeros(C)
        return Moments(z, z.copy(), z.copy())
    bk = dispatch.module(dispatch.choose(fam, backend))
    mean, m2 = bk.moments3(layout.as3(x, plan))
    return Moments(np.full(C, float(n)), _host(mean), _host(m2))


def _host(v):
    """A per-channel result as a host float64 NumPy array."""
    if hasattr(v, "get"):          # CuPy
        v = v.get()
    elif hasattr(v, "copy_to_host"):  # Numba device array
        v = v.copy_to_host()
    return np.asarray(v, dtype=np.float64)


def _packed_arg(v, kind, C, name):
    """A ``kind`` (Moments or GradSums) of length-C vectors, or its packed (3, C)
    form, as the packed float64 array."""
    if isinstance(v, kind):
        v = v.pack()
    v = np.asarray(v, dtype=np.float64)
    if v.shape != (3, C):
        raise ValueError(f"{name} must be a {kind.__name__} of length-{C} vectors "
                         f"(or packed (3, {C})), got shape {v.shape}")
    return v


def _apply(x, fam, plan, out, backend, m, q, r, u=None, p=None):
    """``out = q*(x - m) + r (+ p*u)`` per channel, via the backend's affine3."""
    if fam != "numpy":
        raise TypeError(f"the synchronised batch-norm helpers take NumPy arrays; x is a {fam} array")
    out = checks.out_array(out, x, fam)
    bk = dispatch.module(dispatch.choose(fam, backend))
    u3 = None if u is None else layout.as3(u, plan)
    return host.affine(bk, layout.as3(x, plan), plan, x, out, m, q, r, u3, p)


@_tensor_calls
def batch_norm_train_from_moments(x, moments, scale=None, offset=None, *, channel_axis=1, eps=1e-5,
                                  running_mean=None, running_var=None, momentum=0.1, out=None,
                                  backend=None):
    """Training-mode forward of a shard, with the merged moments of the whole batch.

    ``moments``: :func:`merge_moments` of every worker's :func:`partial_moments`.
    Returns ``(y, mean, invstd)`` exactly as ``batch_norm_train`` on the
    concatenated batch would: ``y`` shaped like this shard, ``mean`` and
    ``invstd = 1/sqrt(var + eps)`` (biased var) of length C.  Running
    statistics, if given, are updated in place with the global statistics
    (unbiased running variance from the global count), identically on every
    worker.  A global count < 2 raises ValueError.
    """
    x, fam, ax, plan = _shard(x, channel_axis)
    C = x.shape[ax]
    pdt = checks.param_dtype(x.dtype)
    n, mean, m2 = _packed_arg(moments, Moments, C, "moments")
    (scale, w_scale, offset, w_offset, eps, momentum, running_mean,
     running_var) = checks.train_state(scale, offset, eps, momentum, running_mean, running_var, C,
                                       fam, pdt)
    checks.no_overlaps(fam, (("running_mean", running_mean), ("running_var", running_var)),
                       None if out is None else checks.out_array(out, x, fam),
                       (("scale", scale), ("offset", offset)), (("x", x),))
    if C and np.any(n == 1):
        raise ValueError(f"batch_norm_train_from_moments needs more than 1 value per channel in "
                         f"the whole batch to compute a variance; the merged count is {n.min():g}")
    empty = C and np.all(n == 0)  # an empty batch: NaN statistics, running stats untouched
    if empty:
        mean = m2 = np.full(C, np.nan)
    invstd, q, r = core.train_coefficients(m2, n, eps, w_scale, w_offset)
    y = _apply(x, fam, plan, out, backend, mean, q, r)
    if not empty:
        new = core.running_update(None if running_mean is None else host.vector(running_mean),
                                  None if running_var is None else host.vector(running_var),
                                  mean, m2, n, momentum)
        host.assign([(r, v) for r, v in zip((running_mean, running_var), new) if r is not None])
    return y, mean.astype(pdt), invstd.astype(pdt)


@_tensor_calls
def partial_grad_sums(dy, x, mean, invstd, *, channel_axis=1, backend=None):
    """Per-channel backward sums of one shard: a :class:`GradSums`.

    dy, x: this shard's upstream gradient and input (same shape and dtype);
    mean, invstd: the *global* (C,) statistics the forward returned.
    """
    x, fam, ax, plan = _shard(x, channel_axis)
    dy = checks.same_as_x(dy, x, fam)
    C = x.shape[ax]
    _, mean = checks.vector(mean, "mean", C, fam, optional=False)
    _, invstd = checks.vector(invstd, "invstd", C, fam, optional=False)
    if plan.count == 0 or C == 0:
        z = np.zeros(C)
        return GradSums(z, z.copy(), z.copy())
    bk = dispatch.module(dispatch.choose(fam, backend))
    s_dy, s_dyxc = bk.dy_sums3(layout.as3(dy, plan), layout.as3(x, plan), mean)
    dscale, doffset = core.gradient_sums(_host(invstd), _host(s_dy), _host(s_dyxc))
    return GradSums(np.full(C, float(plan.count)), doffset, dscale)


@_tensor_calls
def batch_norm_backward_from_sums(dy, x, scale, mean, invstd, sums, *, channel_axis=1, out=None,
                                  backend=None):
    """Backward of a shard, with the merged :class:`GradSums` of the whole batch.

    Returns ``(dx, dscale, doffset)`` as ``batch_norm_backward`` on the
    concatenated batch would: ``dx`` shaped like this shard, ``dscale`` and
    ``doffset`` the global (C,) gradients (the same on every worker, so no
    further all-reduce of the parameter gradients is needed).
    """
    x, fam, ax, plan = _shard(x, channel_axis)
    dy = checks.same_as_x(dy, x, fam)
    C = x.shape[ax]
    pdt = checks.param_dtype(x.dtype)
    scale, w_scale = checks.vector(scale, "scale", C, fam)
    _, mean = checks.vector(mean, "mean", C, fam, optional=False)
    _, invstd = checks.vector(invstd, "invstd", C, fam, optional=False)
    n, doffset, dscale = _packed_arg(sums, GradSums, C, "sums")
    a, b, c = core.backward_coefficients(n, invstd, w_scale, dscale, doffset)
    dx = _apply(x, fam, plan, out, backend, mean, b, c, dy, a)
    return dx, dscale.astype(pdt), doffset.astype(pdt)

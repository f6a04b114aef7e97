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
host memory.  The data arguments are NumPy arrays (or anything
``numpy.asarray`` takes) or CPU ``torch.Tensor`` objects: a call whose first
argument holds a tensor runs on zero-copy NumPy views and returns tensors
(``Moments``/``GradSums`` of float64 tensors); CuPy and Dask arrays are not
taken here.
"""

# mypy: allow-redefinition
# (the public functions rebind their ArrayLike arguments to the checked arrays)
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import checks, core, dispatch, docstrings, families, layout
from .api import Array
from .families import host

_F = TypeVar("_F", bound=Callable[..., Any])


def _tensor_calls(fn: _F) -> _F:
    """``fn``, also taking CPU torch tensors: a call whose first argument holds
    one runs on NumPy views and returns tensors (``fastbn.families.torch_cpu``)."""
    first = next(iter(inspect.signature(fn).parameters))   # x, dy or parts

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if families.holds_tensor(args[0] if args else kwargs.get(first)):
            return families.module("torch").wrapped(fn)(*args, **kwargs)
        return fn(*args, **kwargs)
    return call  # type: ignore[return-value]


class Moments(NamedTuple):
    """Per-channel partial moments of a shard: three float64 arrays of shape (C,).

    What :func:`partial_moments` returns and :func:`merge_moments` merges (and
    returns, for the whole batch).  An empty shard has count 0, mean 0, m2 0.

    Attributes
    ----------
    {{count_part}}
    mean : ndarray, shape (C,), float64
        Their mean.
    m2 : ndarray, shape (C,), float64
        The sum of squared deviations from ``mean``.

    Examples
    --------
    >>> import numpy as np
    >>> import fastbn as fbn
    >>> m = fbn.partial_moments(np.array([[1.0, 10.0], [3.0, 30.0]]))   # (N, C) = (2, 2)
    >>> m
    Moments(count=array([2., 2.]), mean=array([ 2., 20.]), m2=array([  2., 200.]))
    >>> m.var(), m.var(ddof=1)
    (array([  1., 100.]), array([  2., 200.]))
    >>> packed = m.pack()                                # what goes over the wire
    >>> packed.shape, packed.dtype
    ((3, 2), dtype('float64'))
    >>> fbn.Moments.unpack(packed).mean
    array([ 2., 20.])
    """
    count: NDArray[np.float64]  # type: ignore[assignment]  # tuple.count: the contract's name
    mean: NDArray[np.float64]
    m2: NDArray[np.float64]

    def var(self, ddof: float = 0) -> NDArray[np.float64]:
        """Per-channel variance ``m2 / (count - ddof)``, shape (C,), float64.

        NaN or inf where ``count - ddof <= 0`` (no warning).
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.m2 / np.maximum(self.count - ddof, 0)

    def pack(self) -> NDArray[np.float64]:
        """The three vectors stacked as one (3, C) float64 array, for transport."""
        return _pack(self)

    @classmethod
    def unpack(cls, a: ArrayLike) -> Moments:
        """Inverse of :meth:`pack`: a (3, C) array -> Moments (copies of its rows).

        Raises ``ValueError`` if ``a`` is not of shape (3, C).
        """
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

    What :func:`partial_grad_sums` returns.  They merge by plain addition
    (:func:`merge_grad_sums`, or an all-reduce(sum) of :meth:`pack`); merged,
    ``sum_dy`` is ``doffset`` and ``sum_dy_xhat`` is ``dscale``.

    Attributes
    ----------
    {{count_part}}
    sum_dy : ndarray, shape (C,), float64
        ``sum(dy)``.
    sum_dy_xhat : ndarray, shape (C,), float64
        ``sum(dy * xhat)`` with ``xhat = (x - mean) * invstd`` for the
        *global* ``mean`` and ``invstd``.

    Examples
    --------
    {{example_shards}}
    >>> y, mean, invstd = fbn.batch_norm_train(x)       # global statistics
    >>> dy = np.ones_like(x)
    >>> ga = fbn.partial_grad_sums(dy[:1], a, mean, invstd)
    >>> gb = fbn.partial_grad_sums(dy[1:], b, mean, invstd)
    >>> fbn.GradSums.unpack(ga.pack() + gb.pack()).sum_dy   # an all-reduce(sum)
    array([4., 4.])
    """
    count: NDArray[np.float64]  # type: ignore[assignment]  # tuple.count: the contract's name
    sum_dy: NDArray[np.float64]
    sum_dy_xhat: NDArray[np.float64]

    def pack(self) -> NDArray[np.float64]:
        """The three vectors stacked as one (3, C) float64 array (all-reduce with sum)."""
        return _pack(self)

    @classmethod
    def unpack(cls, a: ArrayLike) -> GradSums:
        """Inverse of :meth:`pack`: a (3, C) array -> GradSums (copies of its rows).

        Raises ``ValueError`` if ``a`` is not of shape (3, C).
        """
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
def merge_moments(*parts: Moments | ArrayLike) -> Moments:
    """Merge partial moments of shards into the moments of their concatenation.

    Chan's exact pairwise merge (never ``E[x^2] - E[x]^2``): associative and
    commutative up to rounding; counts may differ and may be zero.

    Parameters
    ----------
    *parts : Moments or array_like
        One or more of: a :class:`Moments`, a packed ``(3, C)`` array
        (``Moments.pack()``) or a stacked ``(P, 3, C)`` array (what an
        all-gather of packed parts gives); any mix, the same ``C`` for all.
        CPU tensors are taken too (the first part decides: tensors in,
        tensors out).

    Returns
    -------
    Moments
        The moments of the whole batch: (C,) float64 vectors.

    Raises
    ------
    {{parts_value_error}}

    Examples
    --------
    {{example_shards}}
    >>> total = fbn.merge_moments(fbn.partial_moments(a), fbn.partial_moments(b))
    >>> total.count, total.mean, total.var()
    (array([4., 4.]), array([ 2., 20.]), array([  1., 100.]))
    >>> gathered = np.stack([fbn.partial_moments(a).pack(), fbn.partial_moments(b).pack()])
    >>> fbn.merge_moments(gathered).mean                 # (P, 3, C) = (2, 3, 2)
    array([ 2., 20.])
    """
    p = _stack(parts, Moments, "merge_moments")
    merged = core.chan_merge(np.moveaxis(p, 1, 0), axis=0)[:, 0]
    return Moments(merged[0], merged[1], merged[2])


@_tensor_calls
def merge_grad_sums(*parts: GradSums | ArrayLike) -> GradSums:
    """Add up :class:`GradSums` of shards: the sums of the whole batch.

    Parameters
    ----------
    *parts : GradSums or array_like
        One or more of: a :class:`GradSums`, a packed ``(3, C)`` array or a
        stacked ``(P, 3, C)`` array (as for :func:`merge_moments`).

    Returns
    -------
    GradSums
        The sums over every part: (C,) float64 vectors.

    Raises
    ------
    {{parts_value_error}}

    Examples
    --------
    {{example_shards}}
    >>> y, mean, invstd = fbn.batch_norm_train(x)
    >>> dy = np.ones_like(x)
    >>> g = fbn.merge_grad_sums(fbn.partial_grad_sums(dy[:1], a, mean, invstd),
    ...                         fbn.partial_grad_sums(dy[1:], b, mean, invstd))
    >>> g.count, g.sum_dy
    (array([4., 4.]), array([4., 4.]))
    """
    s = _stack(parts, GradSums, "merge_grad_sums").sum(axis=0)
    return GradSums(s[0], s[1], s[2])


# -- local parts ---------------------------------------------------------------

def _shard(x, channel_axis, name="x"):
    x, fam = checks.data_array(x, name)
    if fam == "dask":
        raise TypeError(f"{name} is a dask array; the synchronised batch-norm helpers take NumPy "
                        "arrays, CPU torch tensors or (partial sums only) CUDA arrays: compute "
                        "the chunks first, or use fastbn's functions on the whole Dask array")
    ax = checks.channel_axis(channel_axis, x.ndim)
    return x, fam, ax, layout.make_plan(x.shape, x.strides, (ax,))


@_tensor_calls
def partial_moments(x: ArrayLike, channel_axis: int = 1, *,
                    backend: str | None = None) -> Moments:
    """Per-channel partial moments of one shard ``x``: a :class:`Moments`.

    Statistics over every axis but ``channel_axis``, in one read of ``x``.

    Parameters
    ----------
    {{x_shard}}
    {{channel_axis_shard}}
    {{backend_cpu}}

    Returns
    -------
    Moments
        ``count``, ``mean``, ``m2``: (C,) float64 vectors (float64 tensors for
        a tensor ``x``).  An empty shard gives count 0, mean 0, m2 0.

    Raises
    ------
    TypeError
        Non-float ``x``, a CPU tensor that requires grad or tensors mixed
        with other arrays, a ``backend`` that does not take ``x``.
    ValueError
        ``channel_axis`` out of range, an unknown or unavailable ``backend``.

    Examples
    --------
    {{example_shards}}
    >>> fbn.partial_moments(a)
    Moments(count=array([1., 1.]), mean=array([ 1., 10.]), m2=array([0., 0.]))
    >>> fbn.partial_moments(np.zeros((0, 2), np.float32)).count   # an empty shard
    array([0., 0.])
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
def batch_norm_train_from_moments(x: ArrayLike, moments: Moments | ArrayLike,
                                  scale: ArrayLike | None = None,
                                  offset: ArrayLike | None = None, *, channel_axis: int = 1,
                                  eps: float = 1e-5, running_mean: Array | None = None,
                                  running_var: Array | None = None, momentum: float = 0.1,
                                  out: Array | None = None,
                                  backend: str | None = None) -> tuple[Array, Array, Array]:
    """Training-mode forward of a shard, with the merged moments of the whole batch.

    Returns what ``batch_norm_train`` on the concatenated batch would, for
    this shard's rows; running statistics are updated identically on every
    worker (unbiased running variance from the global count).

    Parameters
    ----------
    {{x_shard}}
    moments : Moments or array_like, shape (3, C)
        :func:`merge_moments` of every worker's :func:`partial_moments` (or
        its packed form).
    {{scale_offset}}
    {{channel_axis_shard}}
    {{eps_layer}}
    running_mean, running_var : array, shape (C,), optional
        Updated in place: arrays of ``x``'s family of exactly the per-channel
        dtype (float32 for float16 ``x``, else ``x``'s dtype), contiguous and
        writeable, overlapping no other argument.  Left unchanged when the whole batch is empty.
    {{momentum_train}}
    out : array, optional
        Where to write ``y``: an array of ``x``'s family, shape and dtype; may
        be ``x`` itself or overlap it.
    {{backend_cpu}}

    Returns
    -------
    {{y_result}}
    mean, invstd : arrays of x's family, shape (C,)
        The global mean and ``1/sqrt(var + eps)`` (biased variance), float32
        for float16 ``x``, else ``x``'s dtype.

    Raises
    ------
    TypeError
        As ``batch_norm_train``; also for CuPy or Dask data.
    ValueError
        As ``batch_norm_train``; also ``moments`` not of ``C`` channels, and a
        global count of 1 in a channel.

    Examples
    --------
    {{example_shards}}
    >>> total = fbn.merge_moments(fbn.partial_moments(a), fbn.partial_moments(b))
    >>> ya, mean, invstd = fbn.batch_norm_train_from_moments(a, total)
    >>> ya                                                # = batch_norm_train(x)[0][:1]
    array([[-0.999995  , -0.99999994]], dtype=float32)
    >>> mean, invstd
    (array([ 2., 20.], dtype=float32), array([0.999995  , 0.09999999], dtype=float32))
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
def partial_grad_sums(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike, *,
                      channel_axis: int = 1, backend: str | None = None) -> GradSums:
    """Per-channel backward sums of one shard: a :class:`GradSums`.

    Parameters
    ----------
    {{dy_shard}}
    {{x_shard}}
    mean, invstd : array_like, shape (C,)
        The *global* statistics the forward returned (any float dtype).
    {{channel_axis_shard}}
    {{backend_cpu}}

    Returns
    -------
    GradSums
        ``count``, ``sum_dy``, ``sum_dy_xhat``: (C,) float64 vectors (float64
        tensors for tensor input); zeros for an empty shard.

    Raises
    ------
    TypeError
        Non-float arrays, ``dy`` of another dtype than ``x``, a missing
        ``mean``/``invstd``, a CPU tensor that requires grad.
    ValueError
        ``dy`` not of ``x``'s shape, vectors not of shape ``(C,)``,
        ``channel_axis`` out of range.

    Examples
    --------
    {{example_shards}}
    >>> y, mean, invstd = fbn.batch_norm_train(x)
    >>> dy = np.ones_like(x)
    >>> fbn.partial_grad_sums(dy[:1], a, mean, invstd)
    GradSums(count=array([1., 1.]), sum_dy=array([1., 1.]),
             sum_dy_xhat=array([-0.99999499, -0.99999994]))
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
def batch_norm_backward_from_sums(dy: ArrayLike, x: ArrayLike, scale: ArrayLike | None,
                                  mean: ArrayLike, invstd: ArrayLike, sums: GradSums | ArrayLike,
                                  *, channel_axis: int = 1, out: Array | None = None,
                                  backend: str | None = None) -> tuple[Array, Array, Array]:
    """Backward of a shard, with the merged :class:`GradSums` of the whole batch.

    Returns what ``batch_norm_backward`` on the concatenated batch would, for
    this shard's rows.

    Parameters
    ----------
    {{dy_shard}}
    {{x_shard}}
    scale : array_like, shape (C,) or None
        The forward's ``scale``; None means ones.  Must not overlap ``out``.
    mean, invstd : array_like, shape (C,)
        The global statistics the forward returned.
    sums : GradSums or array_like, shape (3, C)
        :func:`merge_grad_sums` of every worker's :func:`partial_grad_sums`
        (or the all-reduced packed form).
    {{channel_axis_shard}}
    out : array, optional
        Where to write ``dx``: an array of ``x``'s family, shape and dtype;
        may be ``dy`` or ``x`` itself or overlap them.
    {{backend_cpu}}

    Returns
    -------
    dx : array of x's family
        Shape and dtype of this shard's ``x`` (``out`` itself when given).
    dscale, doffset : arrays of x's family, shape (C,)
        The global gradients of ``scale`` and ``offset``, float32 for float16
        ``x``, else ``x``'s dtype: the same on every worker, so they need no
        further all-reduce.

    Raises
    ------
    TypeError
        Non-float arrays, ``dy``/``out`` of another dtype than ``x``, CuPy or
        Dask data, a CPU tensor that requires grad.
    ValueError
        Shapes that do not match ``x`` and ``C``, ``sums`` not of ``C``
        channels.

    Examples
    --------
    {{example_shards}}
    >>> y, mean, invstd = fbn.batch_norm_train(x)
    >>> dy = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, -1.0]], np.float32)
    >>> g = fbn.merge_grad_sums(fbn.partial_grad_sums(dy[:1], a, mean, invstd),
    ...                         fbn.partial_grad_sums(dy[1:], b, mean, invstd))
    >>> dxa, dscale, doffset = fbn.batch_norm_backward_from_sums(dy[:1], a, None, mean, invstd, g)
    >>> dxa.shape, dscale, doffset                       # = batch_norm_backward(dy, x, ...)
    ((1, 2), array([-0.999995  , -0.99999994], dtype=float32), array([ 1., -1.], dtype=float32))
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


docstrings.fill(globals())   # the shared parameter descriptions ({{name}} lines)

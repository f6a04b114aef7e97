"""The per-channel core: every batch-norm formula on length-C vectors, once.

Kernels reduce a batch to per-channel summaries (``count``, ``mean``, ``m2`` =
sum of squared deviations; ``sum(dy)``, ``sum(dy * (x - mean))``) and apply
per-channel affine maps.  Everything between those two steps is here, in
float64: the statistics, the coefficients of each affine pass, the running
statistics update and Chan's merge of partial moments.  The public functions,
the sync-BN helpers (``fastbn.merge``), the Dask backend and the CUDA family
all call these; kernels with a fused in-kernel copy of a formula (the small
training path, the GPU kernels) are tested against them.

The functions only use arithmetic and NumPy ufuncs, so they work unchanged on
NumPy, CuPy and Dask vectors (ufuncs dispatch on the array type).

Conventions: ``n`` is the number of values per channel (a number, or an array
for merged shards); an affine pass computes ``y = q*(x - m) + r (+ p*u)``.
"""

import numpy as np


def invstd(var, eps):
    """``1/sqrt(var + eps)``, and 0 where ``var + eps == 0`` (PyTorch's rule).

    A constant channel with ``eps=0`` then normalises to ``offset`` instead
    of NaN; NaN statistics stay NaN.
    """
    s = var + eps
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s == 0, 0.0, 1.0 / np.sqrt(s))


def variance(m2, n, ddof=0):
    """``m2 / (n - ddof)`` as NumPy's var gives it (inf/NaN where ``n - ddof <= 0``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return m2 / np.maximum(n - ddof, 0)


def train_coefficients(m2, n, eps, scale, offset):
    """Training forward: ``(invstd, q, r)`` with ``y = q*(x - mean) + r``.

    ``invstd = 1/sqrt(m2/n + eps)`` (biased variance), ``q = scale*invstd``,
    ``r = offset`` (None means ones / zeros).
    """
    inv = invstd(variance(m2, n), eps)
    return inv, (inv if scale is None else scale * inv), (np.zeros_like(inv) if offset is None else offset)


def infer_coefficients(var, eps, scale, offset):
    """Inference forward: ``(q, r)`` with ``y = q*(x - mean) + r``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = 1.0 / np.sqrt(var + eps)
    return (q if scale is None else scale * q), (np.zeros_like(q) if offset is None else offset)


def gradient_sums(inv, sum_dy, sum_dy_xc):
    """``(dscale, doffset)`` from the kernels' sums: ``dscale = sum(dy * xhat) =
    inv * sum(dy*(x - mean))``, ``doffset = sum(dy)``."""
    return sum_dy_xc * inv, sum_dy


def backward_coefficients(n, inv, scale, dscale, doffset):
    """Training backward: ``(a, b, c)`` with ``dx = b*(x - mean) + c + a*dy``.

    ``dx = scale*inv/n * (n*dy - doffset - xhat*dscale)`` rearranged as an
    affine map of ``x`` and ``dy``.  ``n == 0`` (an empty batch): there is no
    ``dx`` to write, and the coefficients are kept finite.
    """
    a = inv if scale is None else scale * inv
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.maximum(n, 1)
        b = -a * inv * dscale / n
        c = -a * doffset / n
    return a, b, c


def infer_backward_coefficients(var, eps, scale, sum_dy, sum_dy_xc):
    """Inference backward: ``(dscale, doffset, a)`` with ``dx = a*dy`` (statistics fixed).

    ``a = scale/sqrt(var + eps)``, ``dscale = sum(dy*(x - mean))/sqrt(var + eps)``.
    """
    q, _ = infer_coefficients(var, eps, None, None)
    dscale, doffset = gradient_sums(q, sum_dy, sum_dy_xc)
    return dscale, doffset, (q if scale is None else scale * q)


def running_update(running_mean, running_var, mean, m2, n, momentum):
    """New running statistics ``(1 - momentum)*r + momentum*batch``: ``(new_mean, new_var)``.

    ``running_mean``/``running_var``: the current values as working vectors
    (None: not tracked, gives None).  ``running_var`` gets the unbiased batch
    variance ``m2/(n - 1)`` (PyTorch, TF's fused op).  Both are computed
    before the caller writes either, so a failure leaves neither half-updated.
    """
    new_mean = None if running_mean is None else (1.0 - momentum) * running_mean + momentum * mean
    new_var = None if running_var is None else ((1.0 - momentum) * running_var
                                                + momentum * variance(m2, n, ddof=1))
    return new_mean, new_var


def chan_merge(p, axis):
    """Merge packed partial moments along ``axis``: fastbn's one Chan merge.

    ``p`` has shape ``(3, ...)`` with ``p[0], p[1], p[2] = count, mean, m2``;
    every partial along ``axis`` (an int or tuple of axes of ``p[0]``, i.e.
    numbered without the leading 3) is merged into one.  Returns the packed
    result with those axes kept at length 1.

    The many-way form of Chan's formula: ``n = sum(n_i)``,
    ``mean = s + sum(n_i * (mean_i - s)) / n`` (``s``: the mean of the largest
    partial, so the sum only sees small deviations), ``m2 = sum(m2_i) +
    sum(n_i * (mean_i - mean)**2)``.  Exact in exact arithmetic and
    associative; partials with ``n_i == 0`` contribute nothing, whatever
    their mean and m2 hold.
    """
    axis = tuple(a + 1 for a in ((axis,) if np.isscalar(axis) else axis))
    n_i = p[0:1]
    live = n_i > 0
    mean_i = np.where(live, p[1:2], 0.0)
    m2_i = np.where(live, p[2:3], 0.0)
    n = n_i.sum(axis=axis, keepdims=True)
    # s: per output element, the mean of the partial with the largest count.
    k = len(axis)
    flat_n = np.moveaxis(n_i, axis, range(-k, 0))
    flat_m = np.moveaxis(mean_i, axis, range(-k, 0))
    lead = flat_n.shape[:-k]
    many = int(np.prod(flat_n.shape[-k:], dtype=np.int64))
    if many == 0 or n.size == 0:
        s = np.zeros_like(n)
    else:
        flat_n = flat_n.reshape(lead + (many,))
        flat_m = flat_m.reshape(lead + (many,))
        idx = np.argmax(flat_n, axis=-1)[..., None]
        s = np.take_along_axis(flat_m, idx, axis=-1).reshape(n.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s + np.where(n > 0, (n_i * (mean_i - s)).sum(axis=axis, keepdims=True) / n, 0.0)
        # An inf partial mean makes inf - inf above; the plain weighted sum gives what
        # NumPy's mean gives (inf, or NaN for +inf with -inf).
        plain = (n_i * mean_i).sum(axis=axis, keepdims=True) / n
        mean = np.where(np.isfinite(mean) | (n == 0), mean, plain)
        m2 = (m2_i.sum(axis=axis, keepdims=True)
              + (n_i * (mean_i - mean) ** 2).sum(axis=axis, keepdims=True))
    return np.concatenate([n, mean, m2], axis=0)

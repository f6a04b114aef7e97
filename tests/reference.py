"""The test oracle: fastbn's public functions in plain float64 NumPy, readable as the spec.

Written from API.md, independently of ``fastbn.kernels.reference``: every
result is computed in float64 from the *stored* input values (so float16 and
float32 inputs are judged on what they hold, not on what they were meant to
hold), with the textbook two-pass formulas, and nothing is updated in place:
running statistics come back as new arrays.

Conventions (API.md):
* ``channel_axis`` is one axis of ``x``; statistics reduce over all the others,
  ``n`` values per channel.
* Per-channel vectors are 1-D of length C.
* ``var`` is the biased variance ``sum((x - mean)**2) / n``; the running
  variance uses the unbiased ``var * n / (n - 1)`` (PyTorch convention).

The last section says how close fastbn must come: tolerances by the dtype of
the value fastbn returns.
"""

import math

import numpy as np


#: Every dtype fastbn takes for x (per-channel vectors: :func:`param_dtype`).
DTYPES = (np.float16, np.float32, np.float64)


def f64(a):
    """``a`` as a float64 array (a copy when it is not float64 already)."""
    return np.asarray(a, dtype=np.float64)


def param_dtype(dtype):
    """dtype of per-channel vectors for data of ``dtype``: float32 for float16, else itself."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def reduced_axes(ndim, channel_axis):
    """Every axis of an ``ndim``-D array except ``channel_axis`` (which may be negative)."""
    c = channel_axis % ndim
    return tuple(a for a in range(ndim) if a != c)


def along(v, ndim, channel_axis):
    """A length-C vector reshaped to broadcast against x along ``channel_axis``."""
    shape = [1] * ndim
    shape[channel_axis % ndim] = -1
    return f64(v).reshape(shape)


def count(shape, axes):
    """Number of elements reduced together over ``axes`` (1 for no axes)."""
    return math.prod(shape[a] for a in axes)


# -- moments -------------------------------------------------------------------

def moments(x, axis=None, keepdims=False, ddof=0):
    """``(mean, var)`` over ``axis`` (None = all, int, or tuple; negatives allowed).

    var = sum((x - mean)**2) / (n - ddof), NaN/inf where n - ddof <= 0, as NumPy.
    """
    x = f64(x)
    if axis is None:
        axes = tuple(range(x.ndim))
    elif isinstance(axis, (tuple, list)):
        axes = tuple(a % x.ndim for a in axis)
    else:
        axes = (axis % x.ndim,)
    n = count(x.shape, axes)
    mean = x.sum(axis=axes, keepdims=True) / n if n else np.full(
        [1 if a in axes else s for a, s in enumerate(x.shape)], np.nan)
    m2 = ((x - mean) ** 2).sum(axis=axes, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = m2 / max(n - ddof, 0)
    if not keepdims:
        mean, var = mean.squeeze(axis=axes), var.squeeze(axis=axes)
    return mean, var


# -- tf.nn.batch_normalization -----------------------------------------------

def batch_normalization(x, mean, variance, offset, scale, variance_epsilon):
    """``(x - mean) / sqrt(variance + eps) * scale + offset`` with NumPy broadcasting."""
    y = (f64(x) - f64(mean)) / np.sqrt(f64(variance) + variance_epsilon)
    if scale is not None:
        y = y * f64(scale)
    if offset is not None:
        y = y + f64(offset)
    return y


# -- fused batch norm ------------------------------------------------------------

def batch_norm_train(x, scale=None, offset=None, channel_axis=1, eps=1e-5, running_mean=None,
                     running_var=None, momentum=0.1):
    """Training forward.  Returns ``(y, mean, invstd, new_running_mean, new_running_var)``.

    mean, var: biased batch statistics per channel (length C);
    invstd = 1 / sqrt(var + eps); y = (x - mean) * invstd * scale + offset;
    new_running_* = (1 - momentum) * running_* + momentum * batch statistic,
    with the unbiased variance var * n / (n - 1); None if not given.
    """
    x = f64(x)
    axes = reduced_axes(x.ndim, channel_axis)
    n = count(x.shape, axes)
    mean, var = moments(x, axes)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x - along(mean, x.ndim, channel_axis)) * along(invstd, x.ndim, channel_axis)
    if scale is not None:
        y = y * along(scale, x.ndim, channel_axis)
    if offset is not None:
        y = y + along(offset, x.ndim, channel_axis)
    new_mean = None if running_mean is None else (1 - momentum) * f64(running_mean) + momentum * mean
    new_var = (None if running_var is None
               else (1 - momentum) * f64(running_var) + momentum * var * n / (n - 1))
    return y, mean, invstd, new_mean, new_var


def batch_norm_infer(x, scale, offset, mean, var, channel_axis=1, eps=1e-5):
    """Inference forward: ``(x - mean) / sqrt(var + eps) * scale + offset`` per channel."""
    x = f64(x)
    y = (x - along(mean, x.ndim, channel_axis)) / np.sqrt(along(var, x.ndim, channel_axis) + eps)
    if scale is not None:
        y = y * along(scale, x.ndim, channel_axis)
    if offset is not None:
        y = y + along(offset, x.ndim, channel_axis)
    return y


def batch_norm_backward(dy, x, scale, mean, invstd, channel_axis=1):
    """Gradients of the training forward's ``y``.  Returns ``(dx, dscale, doffset)``.

    xhat = (x - mean) * invstd; doffset = sum(dy); dscale = sum(dy * xhat);
    dx = scale * invstd / n * (n * dy - doffset - xhat * dscale); scale None = ones.
    """
    x, dy = f64(x), f64(dy)
    nd = x.ndim
    axes = reduced_axes(nd, channel_axis)
    n = count(x.shape, axes)
    xhat = (x - along(mean, nd, channel_axis)) * along(invstd, nd, channel_axis)
    doffset = dy.sum(axis=axes)
    dscale = (dy * xhat).sum(axis=axes)
    g = f64(invstd) if scale is None else f64(scale) * f64(invstd)
    dx = along(g / n, nd, channel_axis) * (n * dy - along(doffset, nd, channel_axis)
                                           - xhat * along(dscale, nd, channel_axis))
    return dx, dscale, doffset


# -- how close fastbn must come ----------------------------------------------------

#: Relative tolerance by the dtype of the value fastbn returns.  The oracle is
#: exact in comparison, so these budget for rounding the result once to that
#: dtype plus accumulation error (float64 accumulators everywhere).
RTOL = {np.dtype(np.float16): 1e-3, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def abs_reduction(terms, axes, keepdims=False, mean=False):
    """Sum (or mean) of ``|terms|`` over ``axes``, in float64: the ``magnitude``
    that ``assert_close`` judges that reduction of ``terms`` by."""
    a = np.abs(f64(terms))
    return a.mean(axis=axes, keepdims=keepdims) if mean else a.sum(axis=axes, keepdims=keepdims)


def assert_close(actual, expected, what="", rtol=None, magnitude=0.0):
    """fastbn's ``actual`` against the float64 oracle's ``expected``.

    ``|actual - expected| <= rtol * (|expected| + max|expected| + magnitude)``:
    relative to each value and to the magnitude of the whole output (so values
    near zero are judged on the output's scale, as rounding to float16
    requires).  For a sum or mean, pass ``magnitude`` = the same reduction of
    the terms' absolute values (see ``abs_reduction``): a sum's rounding error
    scales with that, and a sum that cancels to nearly zero is otherwise judged
    on its own tiny size (CI once failed a C=1 float64 mean of 1.9e-4, right to
    7e-16).  NaN must match NaN.  ``rtol`` defaults to ``RTOL[actual.dtype]``.
    """
    actual = np.asarray(actual)
    expected = np.broadcast_to(f64(expected), actual.shape)
    if rtol is None:
        rtol = RTOL[actual.dtype]
    a = actual.astype(np.float64)
    finite = np.isfinite(expected)
    scale = np.max(np.abs(expected[finite]), initial=0.0)
    err = np.abs(a - expected)
    bound = rtol * (np.abs(expected) + scale + np.broadcast_to(f64(magnitude), a.shape))
    ok = np.where(finite, err <= bound,
                  (a == expected) | (np.isnan(a) & np.isnan(expected)))
    if not ok.all():
        bad = np.argwhere(~ok)
        i = tuple(bad[0])
        worst = np.nanmax(np.where(finite, err, 0)) / max(scale, 1e-300)
        raise AssertionError(
            f"{what}: {bad.shape[0]} of {ok.size} values off (dtype {actual.dtype}, rtol {rtol:g}); "
            f"first at {i}: got {a[i]!r}, expected {expected[i]!r}; "
            f"worst error / max|expected| = {worst:.3g}")


# -- numerical gradients -------------------------------------------------------

def numerical_gradient(f, v, h=1e-6):
    """Central finite-difference gradient of the scalar ``f()`` w.r.t. the float64 array ``v``.

    ``v`` is perturbed in place one element at a time (and restored), so ``f``
    must read it.  Error: O(h**2) truncation plus O(eps64 |f| / h) rounding.
    """
    g = np.zeros(v.shape)
    for i in np.ndindex(v.shape):
        old = v[i]
        v[i] = old + h
        up = f()
        v[i] = old - h
        down = f()
        v[i] = old
        g[i] = (up - down) / (2 * h)
    return g

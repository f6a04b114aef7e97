"""The plain NumPy float64 backend ("numpy"): the fallback of last resort and
the test oracle.  Readable rather than fast; every other backend must agree
with it to within the dtype's rounding."""

import numpy as np

NAME = "numpy"
FAMILIES = ("numpy",)


def moments3(x3):
    """(outer, C, inner) -> per-channel (mean, m2), float64, two passes."""
    x = np.asarray(x3, dtype=np.float64)
    if x.size == 0:
        return np.full(x.shape[1], np.nan), np.zeros(x.shape[1])  # as the other backends
    # Sums of deviations from one value of each channel: NumPy adds a strided axis
    # without pairwise summation, so summing x itself would lose ~n ulps of a large
    # mean; and a constant channel gets its mean exactly (var 0, y == offset).
    pivot = x[0, :, 0]
    pivot = np.where(np.isfinite(pivot), pivot, 0.0)  # inf - inf would make NaN of an inf mean
    d = x - pivot[None, :, None]
    mean_d = d.mean(axis=(0, 2))
    m2 = ((d - mean_d[None, :, None]) ** 2).sum(axis=(0, 2))
    return pivot + mean_d, m2


def affine3(x3, m, q, r, out3, u3=None, p=None):
    """out3 = q*(x3 - m) + r (+ p*u3), per channel, in float64."""
    x = np.asarray(x3, dtype=np.float64)
    res = q[None, :, None] * (x - m[None, :, None]) + r[None, :, None]
    if u3 is not None:
        res += p[None, :, None] * np.asarray(u3, dtype=np.float64)
    out3[...] = res
    return out3


def dy_sums3(dy3, x3, m):
    """Per-channel (sum(dy), sum(dy*(x - m))), float64."""
    dy = np.asarray(dy3, dtype=np.float64)
    xc = np.asarray(x3, dtype=np.float64) - m[None, :, None]
    return dy.sum(axis=(0, 2)), (dy * xc).sum(axis=(0, 2))

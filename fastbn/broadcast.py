"""``tf.nn.batch_normalization``'s broadcasting parameters -> per-channel affine coefficients.

``batch_normalization(x, mean, variance, offset, scale, eps)`` takes
parameters that broadcast to ``x``; the axes on which any of them varies act
as the channel axes of one fused ``affine3`` pass.  Used by the public
function and, per chunk, by the Dask backend.
"""

import numpy as np

from . import checks, core, families, layout

NAMES = ("mean", "variance", "offset", "scale")


def param(v, name, x, family):
    """A broadcastable parameter, as a float64 array of the family aligned to ``x.ndim``.

    ``v`` may be an array of ``x``'s family or a host number (also for device ``x``).
    """
    if v is None:
        return None
    vf = families.family_of(v)
    if vf != family and not (vf == "numpy" and np.ndim(v) == 0):
        raise TypeError(f"{name} is a {vf} array but x is a {family} array")
    v = families.module(vf).asarray(v, name, "a real float array or number")
    return families.module(family).vector(align(v, name, x))


def align(v, name, x):
    """Array ``v`` checked as a real parameter broadcastable to ``x``, reshaped to ``x.ndim`` dims."""
    if v.dtype.kind not in "fiu" or v.dtype == np.bool_:
        raise TypeError(f"{name} must be a real float array or number, got dtype {v.dtype}")
    if v.ndim > x.ndim:
        raise ValueError(f"{name} has shape {tuple(v.shape)}, more dimensions than x {tuple(x.shape)}")
    v = v.reshape((1,) * (x.ndim - v.ndim) + tuple(v.shape))
    for a, (s, t) in enumerate(zip(v.shape, x.shape)):
        if s not in (1, t):
            raise ValueError(f"{name} of shape {tuple(v.shape)} does not broadcast to x's shape "
                             f"{tuple(x.shape)} (axis {a}: {s} vs {t})")
    return v


def plan(x, params):
    """The canonical plan whose channel block is every axis a parameter varies on."""
    kept = tuple(a for a in range(x.ndim)
                 # != 1, not > 1: a parameter of length 0 (x empty there) varies too
                 if any(p is not None and p.shape[a] != 1 for p in params.values()))
    return layout.make_plan(x.shape, x.strides, kept)


def coefficients(params, eps, p, x, family):
    """``(m, q, r)`` per channel of plan ``p`` for ``y = q*(x - m) + r``."""
    fam = families.module(family)

    def per_channel(v, default):
        if v is None:
            return fam.full(p.shape3[1], default)
        sel = tuple(slice(None) if a in p.kept else 0 for a in range(x.ndim))
        return np.ascontiguousarray(np.broadcast_to(v[sel], p.kept_shape).reshape(-1))

    q, r = core.infer_coefficients(per_channel(params["variance"], 0.0), eps,
                                   per_channel(params["scale"], 1.0), per_channel(params["offset"], 0.0))
    return per_channel(params["mean"], 0.0), np.ascontiguousarray(q), np.ascontiguousarray(r)


def arguments(x, family, mean, variance, offset, scale, variance_epsilon):
    """Checked parameters ``{name: array or None}`` and eps."""
    params = {name: param(v, name, x, family) for name, v in zip(NAMES, (mean, variance, offset, scale))}
    for name in ("mean", "variance"):
        if params[name] is None:
            raise TypeError(f"{name} must be an array or number, got None")
    return params, checks.scalar(variance_epsilon, "variance_epsilon", low=0.0)

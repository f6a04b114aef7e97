"""Argument checking for the public functions: the one validator of every path.

Everything here runs before any output or running statistic is written, so a
bad call raises and changes nothing.  Messages name the argument, what was
expected and what came (API.md, Errors).  Family-specific questions (how to
view an object as an array, contiguity, overlap) go to the family module
(``fastbn.families``); the common NumPy case is answered by cheap identity
tests first, since small calls are dominated by this cost.
"""

import math
import numbers

import numpy as np

from . import families
from .families import host

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)

describe = host.describe


def param_dtype(dtype):
    """dtype of per-channel vectors for data of ``dtype`` (float32 for float16)."""
    return _F32 if dtype == _F16 else np.dtype(dtype)


def _family_of(v, family, name, hint=""):
    fam = families.family_of(v)
    if fam != family:
        raise TypeError(f"{name} is a {fam} array but x is a {family} array{hint}")
    return families.module(fam)


def data_array(x, name, family=None):
    """``x`` as an array of its family with a float16/32/64 dtype.

    Returns ``(array, family_name)``.  ``family``: the family the call's other
    arrays belong to (mixing families raises ``TypeError``).
    """
    if type(x) is np.ndarray and x.dtype in FLOAT_DTYPES and family in (None, "numpy"):
        return x, "numpy"
    if x is None:
        raise TypeError(f"{name} must be a float16, float32 or float64 array, got None")
    fam = families.family_of(x)
    if family is not None and fam != family:
        raise TypeError(f"{name} is a {fam} array but the other arrays of this call are {family} "
                        "arrays; move them to the same device first")
    if fam == "torch":   # the public functions hand tensors over whole (families.torch_cpu)
        raise TypeError(f"{name} is a torch tensor but the other arrays of this call are NumPy "
                        "arrays; pass tensors for every array argument, or none")
    if fam != "dask":
        x = families.module(fam).asarray(x, name, "an array of floats")
    dt = getattr(x, "dtype", None)
    if dt is None or np.dtype(dt) not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float16, float32 or float64, got {describe(x)}")
    return x, fam


def same_as_x(dy, x, fam, name="dy"):
    """``dy``: an array of ``x``'s family, shape and dtype."""
    dy, _ = data_array(dy, name, fam)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    if dy.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {dy.dtype}")
    return dy


def channel_axis(channel_axis, ndim, name="channel_axis"):
    """``channel_axis`` as an axis number in ``[0, ndim)``."""
    if type(channel_axis) is int and -ndim <= channel_axis < ndim:
        return channel_axis % ndim
    if isinstance(channel_axis, (bool, np.bool_)) or not isinstance(channel_axis, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {channel_axis!r}")
    if ndim < 1:
        raise ValueError("x must have at least 1 dimension (the channel axis), got a 0-d array")
    if not -ndim <= channel_axis < ndim:
        raise ValueError(f"{name} {channel_axis} is out of range for x with ndim {ndim}")
    return int(channel_axis) % ndim


def scalar(v, name, *, low=None, high=None):
    """A real number within [low, high] (Python, NumPy or 0-d array/tensor)."""
    if type(v) is not float:
        if isinstance(v, (bool, np.bool_)):
            raise TypeError(f"{name} must be a real number, got {describe(v)}")
        if not isinstance(v, numbers.Real):
            dt = getattr(v, "dtype", None)
            kind = getattr(dt, "kind", None)
            if kind is None and dt is not None:  # e.g. a torch dtype: ask the value itself
                kind = "f" if getattr(v, "is_floating_point", lambda: False)() else (
                    "i" if str(dt).split(".")[-1].startswith(("int", "uint")) else None)
            if getattr(v, "shape", None) != () or kind not in ("f", "i", "u"):
                raise TypeError(f"{name} must be a real number, got {describe(v)}")
        v = float(v)
    if math.isnan(v) or (low is not None and v < low) or (high is not None and v > high):
        if low is None:
            bounds = "a number" if high is None else f"<= {high}"
        else:
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {v}")
    return v


def vector(v, name, length, family, *, optional=True):
    """A per-channel input vector: 1-D, ``length`` long, float dtype, same family.

    Returns ``(raw, work)``: the caller's array (as its family's array) and a
    float64 working vector of the family (both None when optional and None).
    """
    if v is None:
        if optional:
            return None, None
        raise TypeError(f"{name} must be a 1-D array of length {length}, got None")
    if type(v) is np.ndarray and family == "numpy":
        if v.dtype in FLOAT_DTYPES and v.shape == (length,):   # the common case, at once
            return v, v.astype(np.float64)
        fam = host
    else:
        fam = _family_of(v, family, name, "; move it to the same device first")
        v = fam.asarray(v, name, "a 1-D float array")
    dt = getattr(v, "dtype", None)
    if dt is None or np.dtype(dt).kind != "f":
        raise TypeError(f"{name} must be a float array, got {describe(v)}")
    if tuple(v.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},) (one value per channel), "
                         f"got shape {tuple(v.shape)}")
    return v, fam.vector(v)


def running(v, name, length, family, dtype):
    """A running statistic updated in place: exact dtype, 1-D, contiguous, writeable."""
    if v is None:
        return None
    fam = _family_of(v, family, name)
    if not fam.is_array(v):
        raise TypeError(f"{name} must be an array updated in place, got {describe(v)}")
    v = fam.asarray(v, name, "an array updated in place")
    if np.dtype(v.dtype) != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the per-channel dtype for this x), "
                        f"got {v.dtype}")
    if tuple(v.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},), got shape {tuple(v.shape)}")
    fam.check_running(v, name)
    return v


def out_array(out, x, family, name="out"):
    """``out=``: same family, shape and dtype as ``x``, writeable."""
    if out is None:
        return None
    if (type(out) is np.ndarray and family == "numpy" and out.dtype == x.dtype
            and out.shape == x.shape and out.flags.writeable):   # the common case, at once
        return out
    fam = families.family_of(out)
    if fam != family or not families.module(fam).is_array(out):
        raise TypeError(f"{name} must be a {family} array like x, got {describe(out)}")
    mod = families.module(fam)
    out = mod.asarray(out, name, "an array like x")
    if np.dtype(out.dtype) != np.dtype(x.dtype):
        raise TypeError(f"{name} must have dtype {x.dtype} (x's dtype), got {out.dtype}")
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"{name} must have shape {tuple(x.shape)} (x's shape), got {tuple(out.shape)}")
    mod.check_out(out, name)
    return out


def no_overlaps(family, running=(), out=None, vectors=(), data=()):
    """Raise ``ValueError`` naming both arguments if a write would corrupt another argument.

    ``running``: ``(name, array)`` pairs written in place (running statistics);
    they may overlap nothing else.  ``out`` may overlap ``data`` (``x``,
    ``dy``: the elementwise pass handles that) but not the per-channel
    ``vectors`` (``scale``, ``offset``) or the running statistics.  None
    entries are skipped.
    """
    running = [(k, v) for k, v in running if v is not None]
    vectors = [(k, v) for k, v in vectors if v is not None]
    if not running and (out is None or not vectors):
        return
    outs = [] if out is None else [("out", out)]
    data = [(k, v) for k, v in data if v is not None]
    arrays = [v for _, v in running + outs + vectors + data]
    owners = set()
    if family == "numpy":
        # Different ndarrays that each own their buffer (separate allocations, the
        # usual call) cannot overlap: that answer costs no memory-span arithmetic.
        owners = {id(v) for v in arrays if type(v) is np.ndarray and v.flags.owndata}
        if len(owners) == len(arrays):
            return   # all distinct objects, each owning its buffer
    fam = families.module(family)
    checks = [(a, b) for i, a in enumerate(running) for b in running[i + 1:] + data + outs + vectors]
    checks += [(o, v) for o in outs for v in vectors]
    for (a, va), (b, vb) in checks:
        if va is not vb and id(va) in owners and id(vb) in owners:
            continue
        if fam.overlaps(va, vb):
            raise ValueError(f"{a} and {b} overlap in memory; {a} is written in place, so it "
                             "must not share memory with another argument")


def _plain(v, C, dtype, in_place=False):
    """None, or a plain (C,) ndarray of ``dtype`` (contiguous and writeable if ``in_place``)."""
    if v is None:
        return True
    if type(v) is not np.ndarray or v.dtype != dtype or v.shape != (C,):
        return False
    return not in_place or (v.flags.c_contiguous and v.flags.writeable)


def train_state(scale, offset, eps, momentum, running_mean, running_var, C, family, dtype):
    """The training forward's per-channel arguments, checked: ``(scale, w_scale,
    offset, w_offset, eps, momentum, running_mean, running_var)`` (``w_*``: the
    float64 working vectors; ``dtype``: the per-channel dtype)."""
    if (family == "numpy" and type(eps) is float and type(momentum) is float
            and eps >= 0.0 and 0.0 <= momentum <= 1.0
            and _plain(scale, C, dtype) and _plain(offset, C, dtype)
            and _plain(running_mean, C, dtype, True) and _plain(running_var, C, dtype, True)):
        # the common call, answered by identity tests (the general checks below give
        # the same answer for it, and the messages for everything else)
        return (scale, None if scale is None else scale.astype(np.float64),
                offset, None if offset is None else offset.astype(np.float64),
                eps, momentum, running_mean, running_var)
    scale, w_scale = vector(scale, "scale", C, family)
    offset, w_offset = vector(offset, "offset", C, family)
    eps = scalar(eps, "eps", low=0.0)
    momentum = scalar(momentum, "momentum", low=0.0, high=1.0)
    running_mean = running(running_mean, "running_mean", C, family, dtype)
    running_var = running(running_var, "running_var", C, family, dtype)
    return scale, w_scale, offset, w_offset, eps, momentum, running_mean, running_var

"""Argument checking for the public functions.

Everything here runs before any output or running statistic is written, so a
bad call raises and changes nothing.  Messages name the argument, what was
expected and what came (API.md, Errors).
"""

import math
import numbers

import numpy as np

from . import device, dispatch

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def param_dtype(dtype):
    """dtype of per-channel vectors for data of ``dtype`` (float32 for float16)."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def _describe(v):
    if hasattr(v, "dtype") and hasattr(v, "shape"):
        return f"{type(v).__module__.split('.')[0]}.{type(v).__name__} of dtype {v.dtype}, shape {tuple(v.shape)}"
    return f"{type(v).__name__} {v!r}"[:120]


def _family_array(v, fam, name, expected):
    """``v`` as an array object of its family ``fam``: ``np.asarray`` for host
    objects that are not ndarrays (lists, scalars, memoryviews), a CuPy/Numba
    view for other CUDA objects (e.g. a torch CUDA tensor)."""
    if fam == "numpy" and not isinstance(v, np.ndarray):
        try:
            return np.asarray(v)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be {expected}, got {_describe(v)}") from exc
    if fam == "cuda":
        return device.asarray(v)
    return v


def data_array(x, name, family=None):
    """``x`` as an array of its family with a float16/32/64 dtype, ndim >= 1 where needed.

    NumPy-family input that is not an ndarray (lists, scalars, memoryviews)
    goes through ``np.asarray``.  Returns ``(array, family)``.
    """
    if x is None:
        raise TypeError(f"{name} must be a float16, float32 or float64 array, got None")
    fam = dispatch.family_of(x)
    if family is not None and fam != family:
        raise TypeError(f"{name} is a {fam} array but the other arrays of this call are {family} "
                        "arrays; move them to the same device first")
    x = _family_array(x, fam, name, "an array of floats")
    dt = getattr(x, "dtype", None)
    if dt is None or np.dtype(dt) not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float16, float32 or float64, got {_describe(x)}")
    return x, fam


def channel_axis(channel_axis, ndim, name="channel_axis"):
    if isinstance(channel_axis, (bool, np.bool_)) or not isinstance(channel_axis, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {channel_axis!r}")
    if ndim < 1:
        raise ValueError("x must have at least 1 dimension (the channel axis), got a 0-d array")
    if not -ndim <= channel_axis < ndim:
        raise ValueError(f"{name} {channel_axis} is out of range for x with ndim {ndim}")
    return int(channel_axis) % ndim


def scalar(v, name, *, low=None, high=None):
    """A real number within [low, high]."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        if not (hasattr(v, "shape") and v.shape == () and hasattr(v, "dtype") and v.dtype.kind == "f"):
            raise TypeError(f"{name} must be a real number, got {_describe(v)}")
    v = float(v)
    if math.isnan(v) or (low is not None and v < low) or (high is not None and v > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {v}")
    return v


def vector(v, name, length, family, *, optional=True):
    """A per-channel input vector: 1-D, ``length`` long, float dtype, same family.

    Returns it as a float64 array of the family (None stays None when optional).
    """
    if v is None:
        if optional:
            return None
        raise TypeError(f"{name} must be a 1-D array of length {length}, got None")
    fam = dispatch.family_of(v)
    if fam != family:
        raise TypeError(f"{name} is a {fam} array but x is a {family} array; "
                        "move it to the same device first")
    v = _family_array(v, fam, name, "a 1-D float array")
    dt = getattr(v, "dtype", None)
    if dt is None or np.dtype(dt).kind != "f":
        raise TypeError(f"{name} must be a float array, got {_describe(v)}")
    if tuple(v.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},) (one value per channel), "
                         f"got shape {tuple(v.shape)}")
    return device.vec_in(v) if fam == "cuda" else v.astype(np.float64)


def running(v, name, length, family, dtype):
    """A running statistic updated in place: exact dtype, 1-D, contiguous, writeable."""
    if v is None:
        return None
    fam = dispatch.family_of(v)
    if fam != family:
        raise TypeError(f"{name} is a {fam} array but x is a {family} array")
    if fam == "cuda":
        v = device.running_array(v, name)
    if not hasattr(v, "dtype") or not hasattr(v, "shape") or (fam == "numpy" and not isinstance(v, np.ndarray)):
        raise TypeError(f"{name} must be an array updated in place, got {_describe(v)}")
    if np.dtype(v.dtype) != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the per-channel dtype for this x), "
                        f"got {v.dtype}")
    if tuple(v.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},), got shape {tuple(v.shape)}")
    if fam == "numpy":
        if not v.flags.c_contiguous:
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
        if not v.flags.writeable:
            raise ValueError(f"{name} is read-only; it must be writeable (it is updated in place)")
    return v


def out_array(out, x, family, name="out"):
    """``out=``: same family, shape and dtype as ``x``, writeable."""
    if out is None:
        return None
    fam = dispatch.family_of(out)
    if fam != family or (fam == "numpy" and not isinstance(out, np.ndarray)):
        raise TypeError(f"{name} must be a {family} array like x, got {_describe(out)}")
    if fam == "cuda":
        out = device.asarray(out)
    if np.dtype(out.dtype) != np.dtype(x.dtype):
        raise TypeError(f"{name} must have dtype {x.dtype} (x's dtype), got {out.dtype}")
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"{name} must have shape {tuple(x.shape)} (x's shape), got {tuple(out.shape)}")
    if fam == "numpy" and not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out

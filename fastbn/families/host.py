"""The ``"numpy"`` family: host memory (``numpy.ndarray`` and what ``np.asarray`` takes).

Results are plain ndarrays.  ndarray subclasses (``np.matrix``, ...) are
worked on as views of their base ndarray; masked arrays are refused, since a
mask cannot be honoured by the kernels.  Per-channel working vectors are
float64 ndarrays.
"""

import numpy as np

from .. import layout

NAME = "numpy"
FUSED = False   # no fused whole-call kernels (fastbn.families.cuda has them)


def describe(v):
    """A short description of ``v`` for error messages."""
    if hasattr(v, "dtype") and hasattr(v, "shape"):
        return (f"{type(v).__module__.split('.')[0]}.{type(v).__name__} of dtype {v.dtype}, "
                f"shape {tuple(v.shape)}")
    return f"{type(v).__name__} {v!r}"[:120]


def asarray(v, name, expected):
    """``v`` as a plain ndarray without copying where it already is one.

    Lists, scalars and memoryviews go through ``np.asarray``; subclasses
    become base-class views of the same memory.
    """
    if type(v) is np.ndarray:
        return v
    if isinstance(v, np.ndarray):
        if isinstance(v, np.ma.MaskedArray):
            raise TypeError(f"{name} is a numpy masked array; fastbn cannot honour a mask "
                            f"(pass {name}.filled(value) or {name}.data)")
        return v.view(np.ndarray)
    try:
        return np.asarray(v)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be {expected}, got {describe(v)}") from exc


def is_array(v):
    """True for an array object (not a list or number): what in-place arguments must be."""
    return isinstance(v, np.ndarray)


def check_running(v, name):
    """A running statistic must be contiguous and writeable (it is updated in place)."""
    if not v.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous (it is updated in place)")
    if not v.flags.writeable:
        raise ValueError(f"{name} is read-only; it must be writeable (it is updated in place)")


def check_out(out, name):
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")


def vector(v):
    """A per-channel input as a float64 working vector (a copy: inputs are never written)."""
    return v.astype(np.float64)


def full(n, value):
    return np.full(n, value, dtype=np.float64)


def as3(arr, plan):
    return layout.as3(arr, plan)


def _output(out, x, plan):
    """``(y, y3, finish)``: the array handed back, the canonical view the kernel
    writes, and a callable copying ``y3`` into ``y`` when ``y`` (a user's
    ``out`` with exotic strides) has no such view."""
    y = layout.empty_like_layout(x, x.dtype) if out is None else out
    y3 = layout.view3(y, plan)
    if y3 is None:
        tmp = np.empty(plan.shape3, dtype=x.dtype)

        def finish():
            y.transpose(plan.perm)[...] = tmp.reshape([y.shape[a] for a in plan.perm])
        return y, tmp, finish
    return y, y3, None


def _separate(y3, *inputs3):
    """True unless ``y3`` overlaps an input without being exactly the same view.

    Elementwise kernels may write in place (``out=x``), but not into a
    shifted or transposed alias of their input.
    """
    for a in inputs3:
        if a is None or not np.may_share_memory(y3, a):
            continue
        if not (a.__array_interface__["data"][0] == y3.__array_interface__["data"][0]
                and a.strides == y3.strides):
            return False
    return True


def affine(bk, x3, plan, x, out, m, q, r, u3=None, p=None):
    """``out = q*(x - m) + r (+ p*u)`` per channel with backend ``bk``; returns the result.

    Allocates ``y`` in ``x``'s memory order when ``out`` is None; an ``out``
    overlapping the inputs other than exactly in place goes through a temporary.
    """
    y, y3, finish = _output(out, x, plan)
    if y3.size == 0:  # nothing to write; kernels may assume non-empty input
        return y
    if out is not None and not _separate(y3, x3, u3):
        tmp = np.empty(plan.shape3, dtype=x.dtype)
        bk.affine3(x3, m, q, r, tmp, u3, p)
        y3[...] = tmp
    else:
        bk.affine3(x3, m, q, r, y3, u3, p)
    if finish is not None:
        finish()
    return y


def result(v, like, dtype, shape=None):
    """A working vector as a result: an ndarray of ``dtype`` (reshaped to ``shape``)."""
    a = np.asarray(v, dtype=dtype)
    return a if shape is None else a.reshape(shape)


def assign(pairs):
    """Write each ``(array, new value)`` pair in place."""
    for r, new in pairs:
        r[...] = new


def overlaps(a, b):
    """True if ndarrays ``a`` and ``b`` share memory (exactly, for the small
    per-channel vectors this is asked about)."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=10_000))
    except np.exceptions.TooHardError:
        return True

"""Any array and channel axis -> the canonical ``(outer, C, inner)`` view.

Kernels see only 3-D arrays whose axis 1 holds the kept ("channel") axes and
whose axes 0 and 2 are reduced over.  Because a reduction does not care about
the order of the reduced axes, they are sorted by stride: those with larger
strides than the channel block go in front ("outer"), the others behind
("inner"), so C-order, F-order, NCHW, NHWC and most sliced views all map onto
a view without copying.  Only exotic strides (e.g. kept axes that are not
adjacent in memory) need a copy.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np


def normalize_axes(axis, ndim, name="axis"):
    """``axis`` (None, int or tuple, negatives allowed) -> sorted tuple of ints."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (list, tuple)):
        items = tuple(axis)
    else:
        items = (axis,)
    out = []
    for a in items:
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"{name} must be None, an int or a tuple of ints, got {axis!r}")
        a = int(a)
        if not -ndim <= a < ndim:
            raise ValueError(f"{name} {a} is out of bounds for an array of ndim {ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} {axis!r} repeats an axis")
    return tuple(sorted(out))


@dataclass(frozen=True)
class Plan:
    """How to view an array of ``shape`` as ``shape3 = (outer, C, inner)``.

    ``perm`` orders the axes as outer axes, kept axes (in their original
    order), inner axes.  ``kept_shape`` is the shape of the kept axes, so a
    length-C result reshapes to it.
    """
    shape: tuple
    perm: tuple
    shape3: tuple
    kept: tuple
    kept_shape: tuple

    @property
    def count(self):
        """Number of values reduced into each channel (outer * inner)."""
        return self.shape3[0] * self.shape3[2]


def make_plan(shape, strides, kept):
    """Plan for reducing every axis except ``kept`` (a sorted tuple).

    ``strides`` (in bytes, as NumPy gives them) choose which reduced axes go in
    front of the channel block and which behind it.  Plans are cached: a
    network calls with the same few shapes over and over, and planning costs
    more than the kernel on a small batch.
    """
    return _plan(tuple(shape), tuple(strides), tuple(kept))


@functools.lru_cache(maxsize=1024)
def _plan(shape, strides, kept):
    ndim = len(shape)
    reduced = [a for a in range(ndim) if a not in kept]
    # Axes of length 1 have meaningless strides; keep them out of the way.
    live_kept = [abs(strides[a]) for a in kept if shape[a] > 1]
    pivot = min(live_kept) if live_kept else 0
    by_stride = sorted(reduced, key=lambda a: -abs(strides[a]) if shape[a] > 1 else 0)
    if live_kept:
        outer = [a for a in by_stride if shape[a] > 1 and abs(strides[a]) > pivot]
        inner = [a for a in by_stride if a not in outer]
    else:
        outer, inner = [], by_stride
    n_outer = math.prod(int(shape[a]) for a in outer)
    n_inner = math.prod(int(shape[a]) for a in inner)
    n_kept = math.prod(int(shape[a]) for a in kept)
    return Plan(shape=tuple(shape), perm=tuple(outer) + tuple(kept) + tuple(inner),
                shape3=(n_outer, n_kept, n_inner), kept=tuple(kept),
                kept_shape=tuple(shape[a] for a in kept))


def view3(arr, plan):
    """The canonical 3-D view of ``arr`` (no copy), or None if strides forbid it."""
    try:
        return arr.transpose(plan.perm).reshape(plan.shape3, copy=False)
    except ValueError:
        return None


def as3(arr, plan):
    """The canonical 3-D array of ndarray ``arr``: a view if possible, else a C-order copy
    (device arrays: ``fastbn.families.cuda.as3``)."""
    v = view3(arr, plan)
    if v is None:
        v = np.ascontiguousarray(arr.transpose(plan.perm)).reshape(plan.shape3)
    return v


def empty_like_layout(x, dtype):
    """An uninitialised array shaped like ``x`` with ``x``'s memory order (order='K'),
    so the canonical view of the result matches that of ``x``."""
    return np.empty_like(x, dtype=dtype, order="K")

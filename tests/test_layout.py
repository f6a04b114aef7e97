"""Every public function x dtype x channel axis x memory layout x odd sizes, against the oracle.

Plus the canonical-view machinery itself (``fastbn.layout``): which inputs map
onto a ``(outer, C, inner)`` view without a copy, and that the view (or copy)
holds each channel's values.
"""

import numpy as np
import pytest

import reference as ref

import fastbn as fbn
from fastbn import layout

MEMORY = ("C", "F", "sliced", "negstride")  # see conftest.random_array

#: id -> (shape, channel_axis).  Odd sizes: C=1, C=3, N=2, spatial 1x1, 7x5.
LAYOUTS = {
    "NCHW": ((2, 3, 7, 5), 1),
    "NHWC": ((2, 7, 5, 3), -1),
    "NC": ((9, 3), -1),
    "NC-axis1": ((5, 4), 1),
    "NCL": ((3, 4, 9), 1),
    "NCDHW": ((2, 3, 3, 4, 5), 1),
    "middle-axis": ((3, 4, 5, 6), -2),
    "C=1": ((4, 1, 5, 3), 1),
    "1x1": ((6, 3, 1, 1), 1),
}

layouts = pytest.mark.parametrize("shape,axis", list(LAYOUTS.values()), ids=list(LAYOUTS))
memories = pytest.mark.parametrize("memory", MEMORY)
dtypes = pytest.mark.parametrize("dtype", ref.DTYPES, ids=lambda d: np.dtype(d).name)


def every_case(test):
    """``test`` for every layout x memory layout x dtype."""
    return layouts(memories(dtypes(test)))


def _vec(rng, C, dtype, low=-1.5, high=1.5):
    return rng.uniform(low, high, C).astype(ref.param_dtype(dtype))


def _params(rng, C, dtype):
    """Random per-channel (scale, offset, mean, var) for data of ``dtype``; var in [0.5, 3]."""
    scale, offset, mean = (_vec(rng, C, dtype) for _ in range(3))
    return scale, offset, mean, _vec(rng, C, dtype, 0.5, 3.0)


def _check_output(y, x):
    assert isinstance(y, np.ndarray) and y.shape == x.shape and y.dtype == x.dtype


def _check_vector(v, C, x):
    assert isinstance(v, np.ndarray) and v.shape == (C,) and v.dtype == ref.param_dtype(x.dtype)


def _check_results(got, expected, names, x, C, magnitudes=None):
    """``got[0]`` is an array like ``x``, the others length-C vectors (see _check_vector);
    each is close to the oracle's value in ``expected``, named by a word of ``names``.
    ``magnitudes`` maps a name to the ``magnitude`` of a reduction (ref.assert_close)."""
    names = names.split()
    magnitudes = magnitudes or {}
    assert len(got) == len(expected) == len(names)
    _check_output(got[0], x)
    for v in got[1:]:
        _check_vector(v, C, x)
    for g, e, name in zip(got, expected, names):
        ref.assert_close(g, e, name, magnitude=magnitudes.get(name, 0.0))


@every_case
def test_moments(backend, make_array, shape, axis, memory, dtype):
    x = make_array(shape, dtype, memory, channel_axis=axis)
    axes = ref.reduced_axes(x.ndim, axis)
    mean, var = fbn.moments(x, axes, keepdims=True, backend=backend)
    emean, evar = ref.moments(x, axes, keepdims=True)
    assert mean.shape == emean.shape and mean.dtype == ref.param_dtype(dtype)
    ref.assert_close(mean, emean, "mean", magnitude=ref.abs_reduction(x, axes, True, mean=True))
    ref.assert_close(var, evar, "var")


@every_case
def test_batch_normalization(backend, make_array, rng, shape, axis, memory, dtype):
    x = make_array(shape, dtype, memory, channel_axis=axis)
    axes = ref.reduced_axes(x.ndim, axis)
    pshape = [1 if a in axes else s for a, s in enumerate(shape)]
    scale, offset, mean, var = (v.reshape(pshape) for v in _params(rng, shape[axis], dtype))
    y = fbn.batch_normalization(x, mean, var, offset, scale, 1e-3, backend=backend)
    _check_output(y, x)
    ref.assert_close(y, ref.batch_normalization(x, mean, var, offset, scale, 1e-3), "y")


@every_case
def test_batch_norm_train(backend, make_array, rng, shape, axis, memory, dtype):
    x = make_array(shape, dtype, memory, channel_axis=axis)
    C = shape[axis]
    scale, offset = _vec(rng, C, dtype), _vec(rng, C, dtype)
    rmean, rvar = _vec(rng, C, dtype), _vec(rng, C, dtype, 0.5, 2.0)
    rmean0, rvar0 = rmean.copy(), rvar.copy()
    y, mean, invstd = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, eps=1e-3,
                                           running_mean=rmean, running_var=rvar, momentum=0.3,
                                           backend=backend)
    ey, emean, einvstd, ermean, ervar = ref.batch_norm_train(
        x, scale, offset, axis, 1e-3, rmean0, rvar0, 0.3)
    abs_mean = ref.abs_reduction(x, ref.reduced_axes(x.ndim, axis), mean=True)
    _check_results((y, mean, invstd, rmean, rvar), (ey, emean, einvstd, ermean, ervar),
                   "y mean invstd running_mean running_var", x, C,
                   {"mean": abs_mean, "running_mean": abs_mean})


@every_case
def test_batch_norm_infer(backend, make_array, rng, shape, axis, memory, dtype):
    x = make_array(shape, dtype, memory, channel_axis=axis)
    scale, offset, mean, var = _params(rng, shape[axis], dtype)
    y = fbn.batch_norm_infer(x, scale, offset, mean, var, channel_axis=axis, eps=1e-3,
                             backend=backend)
    _check_output(y, x)
    ref.assert_close(y, ref.batch_norm_infer(x, scale, offset, mean, var, axis, 1e-3), "y")


@every_case
def test_batch_norm_backward(backend, make_array, rng, shape, axis, memory, dtype):
    x = make_array(shape, dtype, memory, channel_axis=axis)
    dy = make_array(shape, dtype, memory, loc=0.0, sd=1.0)
    C = shape[axis]
    scale = _vec(rng, C, dtype)
    _, emean, einvstd, _, _ = ref.batch_norm_train(x, None, None, axis, 1e-3)
    pdt = ref.param_dtype(dtype)
    mean, invstd = emean.astype(pdt), einvstd.astype(pdt)  # what batch_norm_train hands over
    dx, dscale, doffset = fbn.batch_norm_backward(dy, x, scale, mean, invstd, channel_axis=axis,
                                                  backend=backend)
    edx, edscale, edoffset = ref.batch_norm_backward(dy, x, scale, mean, invstd, axis)
    axes = ref.reduced_axes(x.ndim, axis)
    xhat = (ref.f64(x) - ref.along(mean, x.ndim, axis)) * ref.along(invstd, x.ndim, axis)
    _check_results((dx, dscale, doffset), (edx, edscale, edoffset), "dx dscale doffset", x, C,
                   {"dscale": ref.abs_reduction(ref.f64(dy) * xhat, axes),
                    "doffset": ref.abs_reduction(dy, axes)})


@pytest.mark.parametrize("memory", ["C", "F"])
@layouts
def test_output_keeps_memory_order(backend, make_array, shape, axis, memory):
    """Like NumPy's ufuncs (order='K'): C in, C out; Fortran in, Fortran out."""
    x = make_array(shape, np.float32, memory)
    y, _, _ = fbn.batch_norm_train(x, channel_axis=axis, backend=backend)
    flag = "C_CONTIGUOUS" if memory == "C" else "F_CONTIGUOUS"
    assert y.flags[flag]


# Big enough for a parallel backend to split the reduction into chunks
# (C=1 and C=3 must still use every core), small enough to stay fast.
MEDIUM = {
    "NCHW-C3": ((8, 3, 96, 97), 1),
    "NHWC-C3": ((8, 96, 97, 3), -1),
    "NCHW-C1": ((16, 1, 96, 97), 1),
    "NC": ((20000, 7), -1),
    "NCHW-C64": ((4, 64, 31, 33), 1),
}


@pytest.mark.parametrize("shape,axis", list(MEDIUM.values()), ids=list(MEDIUM))
@dtypes
def test_medium_sizes(backend, make_array, rng, shape, axis, dtype):
    """All functions on arrays large enough to take a backend's parallel path."""
    x = make_array(shape, dtype, channel_axis=axis, loc=3.0)
    dy = make_array(shape, dtype, loc=0.0, sd=1.0)
    C = shape[axis]
    scale, offset = _vec(rng, C, dtype), _vec(rng, C, dtype)
    axes = ref.reduced_axes(x.ndim, axis)

    mean, var = fbn.moments(x, axes, backend=backend)
    emean, evar = ref.moments(x, axes)
    ref.assert_close(mean, emean, "moments mean")
    ref.assert_close(var, evar, "moments var")

    y, mean, invstd = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, backend=backend)
    ey, emean, einvstd, _, _ = ref.batch_norm_train(x, scale, offset, axis)
    ref.assert_close(y, ey, "train y")
    ref.assert_close(invstd, einvstd, "train invstd")

    y = fbn.batch_norm_infer(x, scale, offset, emean, evar, channel_axis=axis, backend=backend)
    ref.assert_close(y, ref.batch_norm_infer(x, scale, offset, emean, evar, axis), "infer y")

    dx, dscale, doffset = fbn.batch_norm_backward(dy, x, scale, mean, invstd, channel_axis=axis,
                                                  backend=backend)
    edx, edscale, edoffset = ref.batch_norm_backward(dy, x, scale, mean, invstd, axis)
    ref.assert_close(dx, edx, "dx")
    ref.assert_close(dscale, edscale, "dscale")
    ref.assert_close(doffset, edoffset, "doffset")


# -- the canonical view ----------------------------------------------------------

@layouts
@memories
def test_batch_norm_layouts_map_to_a_view(make_array, shape, axis, memory):
    """C order, F order, reversed and cropped-spatial layouts map onto
    (outer, C, inner) without a copy, and each channel of the view holds
    exactly that channel's values.

    The "sliced" crop ``[..., 1:-1, ::2]`` leaves a 3-D view only when the
    two cropped axes are exactly the inner block (NCHW); NHWC or NCDHW crops
    need a copy, and so does C=1 (the plan then puts every axis inner), and
    this checks that copy's values."""
    x = make_array(shape, np.float64, memory)
    ax = axis % x.ndim
    plan = layout.make_plan(x.shape, x.strides, (ax,))
    x3 = layout.view3(x, plan)
    if memory == "sliced" and (ax != x.ndim - 3 or shape[ax] == 1):
        x3 = layout.as3(x, plan)
    else:
        assert x3 is not None, f"{memory}-order {shape} axis {axis} needs a copy"
        assert np.shares_memory(x3, x)
    assert x3.shape == plan.shape3 and x3.shape[1] == shape[ax]
    assert x3.shape[0] * x3.shape[2] == plan.count and plan.count * shape[ax] == x.size
    for c in range(shape[ax]):
        np.testing.assert_array_equal(np.sort(x3[:, c, :], axis=None),
                                      np.sort(np.take(x, c, axis=ax), axis=None))


@pytest.mark.parametrize("kept", [(0,), (1,), (3,), (0, 1), (1, 2), (0, 2), (1, 3), (0, 2, 3), (),
                                  (0, 1, 2, 3)], ids=str)
@memories
def test_as3_any_kept_axes(make_array, kept, memory):
    """Any set of kept axes gives a correct canonical array (a copy when strides forbid a view)."""
    x = make_array((3, 4, 5, 6), np.float64, memory)
    plan = layout.make_plan(x.shape, x.strides, kept)
    x3 = layout.as3(x, plan)
    assert x3.shape == plan.shape3
    assert plan.kept_shape == tuple(x.shape[a] for a in kept)
    reduced = tuple(a for a in range(4) if a not in kept)
    # Channel k of x3 is the kept index np.unravel_index(k, kept_shape).
    expect = np.moveaxis(x, kept + reduced, tuple(range(4))).reshape(x3.shape[1], -1)
    np.testing.assert_array_equal(np.sort(x3.transpose(1, 0, 2).reshape(x3.shape[1], -1), axis=1),
                                  np.sort(expect, axis=1))


@pytest.mark.parametrize("axis,ndim,expect", [
    (None, 3, (0, 1, 2)), (1, 3, (1,)), (-1, 3, (2,)), ((2, 0), 3, (0, 2)), ([0, -1], 3, (0, 2)),
    ((), 3, ()), (np.int64(1), 2, (1,)),
])
def test_normalize_axes(axis, ndim, expect):
    assert layout.normalize_axes(axis, ndim) == expect

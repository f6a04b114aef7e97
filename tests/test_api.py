"""Semantics of the public functions (API.md), against the float64 oracle and by hand.

Layout coverage (every function x dtype x channel axis x memory order) is in
test_layout.py; this file covers what each function means: ``moments`` over
every axis subset, broadcasting in ``batch_normalization``, running statistics,
the backward against finite differences, ``out=`` and aliasing, inputs left
alone, and the accuracy bar on data with a large mean.
"""

import itertools

import numpy as np
import pytest

import reference as ref

import fastbn as fbn

DTYPES = ref.DTYPES
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)


def _vec(rng, C, dtype, low=-1.5, high=1.5):
    return rng.uniform(low, high, C).astype(ref.param_dtype(dtype))


# -- moments ------------------------------------------------------------------------

SHAPE4 = (3, 4, 2, 5)
_SUBSETS = [s for k in range(5) for s in itertools.combinations(range(4), k)]
AXES = [None] + _SUBSETS + [0, -1, (-1, 0), (2, -3), [0, 2, 3]]


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("keepdims", [False, True], ids=["", "keepdims"])
@pytest.mark.parametrize("axis", AXES, ids=str)
@dtypes
def test_moments_every_axis_subset(backend, make_array, axis, keepdims, ddof, dtype):
    x = make_array(SHAPE4, dtype)
    mean, var = fbn.moments(x, axis, keepdims=keepdims, ddof=ddof, backend=backend)
    ax = tuple(axis) if isinstance(axis, list) else axis
    emean, evar = ref.moments(x, ax, keepdims=keepdims, ddof=ddof)
    shape = np.mean(np.zeros(SHAPE4), axis=ax, keepdims=keepdims).shape
    for got, want, what in ((mean, emean, "mean"), (var, evar, "var")):
        assert isinstance(got, np.ndarray) and got.shape == shape, what
        assert got.dtype == ref.param_dtype(dtype), what
        ref.assert_close(got, want, what)


@pytest.mark.parametrize("memory", ["F", "sliced", "negstride"])
@pytest.mark.parametrize("axis", [None] + _SUBSETS, ids=str)
def test_moments_every_axis_subset_strided(backend, make_array, axis, memory):
    """Kept axes that are not adjacent in memory (a copy is allowed) still give the right answer."""
    x = make_array(SHAPE4, np.float32, memory)
    mean, var = fbn.moments(x, axis, keepdims=True, backend=backend)
    emean, evar = ref.moments(x, axis, keepdims=True)
    ref.assert_close(mean, emean, "mean")
    ref.assert_close(var, evar, "var")


def test_moments_by_hand(backend):
    mean, var = fbn.moments([1.0, 2.0, 3.0, 4.0], backend=backend)
    assert mean.shape == () and mean == 2.5 and var == 1.25
    _, var = fbn.moments([1.0, 2.0, 3.0, 4.0], ddof=1, backend=backend)
    assert var == pytest.approx(5 / 3, rel=1e-15)
    mean, var = fbn.moments(np.float32(3.0), backend=backend)
    assert mean == 3.0 and var == 0.0 and mean.dtype == np.float32
    x = np.array([[1.0, 10.0], [3.0, 30.0]])
    mean, var = fbn.moments(x, 0, backend=backend)
    np.testing.assert_array_equal(mean, [2.0, 20.0])
    np.testing.assert_array_equal(var, [1.0, 100.0])


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (8, 3, 96, 97)], ids=["small", "parallel"])
def test_moments_nan_stays_in_its_channel(backend, make_array, shape):
    """A NaN gives NaN statistics for its channel only (fast-math must not drop it)."""
    x = make_array(shape, np.float32)
    x[2, 1, 3, 4] = np.nan
    mean, var = fbn.moments(x, (0, 2, 3), backend=backend)
    emean, evar = ref.moments(x, (0, 2, 3))
    assert np.isnan(mean[1]) and np.isnan(var[1])
    ref.assert_close(mean, emean, "mean")
    ref.assert_close(var, evar, "var")


# -- batch_normalization --------------------------------------------------------------

def _bn_case(rng, make_array, case, dtype):
    """(x, mean, variance, offset, scale) for one broadcasting pattern."""
    pdt = ref.param_dtype(dtype)
    if case == "nhwc-1d":  # trailing channel axis: plain length-C vectors broadcast
        x = make_array((2, 5, 3, 4), dtype)
        p = lambda lo=-1.5, hi=1.5: rng.uniform(lo, hi, 4).astype(pdt)  # noqa: E731
    elif case == "nchw-keepdims":  # what moments(..., keepdims=True) returns
        x = make_array((2, 4, 3, 5), dtype)
        p = lambda lo=-1.5, hi=1.5: rng.uniform(lo, hi, (1, 4, 1, 1)).astype(pdt)  # noqa: E731
    elif case == "nchw-c1hw":  # parameters without the leading batch axis
        x = make_array((2, 4, 3, 5), dtype)
        p = lambda lo=-1.5, hi=1.5: rng.uniform(lo, hi, (4, 1, 1)).astype(pdt)  # noqa: E731
    elif case == "two-axes":  # varying along channel and height: a 2-D "channel" block
        x = make_array((2, 4, 3, 5), dtype)
        p = lambda lo=-1.5, hi=1.5: rng.uniform(lo, hi, (1, 4, 3, 1)).astype(pdt)  # noqa: E731
    elif case == "non-adjacent":  # varying along axes 1 and 3: no canonical view
        x = make_array((2, 4, 3, 5), dtype)
        p = lambda lo=-1.5, hi=1.5: rng.uniform(lo, hi, (4, 1, 5)).astype(pdt)  # noqa: E731
    elif case == "elementwise":  # full-shape parameters
        x = make_array((3, 4, 5), dtype)
        p = lambda lo=-1.5, hi=1.5: rng.uniform(lo, hi, x.shape).astype(pdt)  # noqa: E731
    elif case == "scalars":
        x = make_array((3, 4, 5), dtype)
        p = lambda lo=-1.5, hi=1.5: float(rng.uniform(lo, hi))  # noqa: E731
    elif case == "mixed":  # a scalar, a 0-d array, a per-channel and a python list
        x = make_array((6, 3), dtype)
        return x, 0.25, np.float64(2.0), rng.uniform(-1, 1, 3).astype(pdt), [0.5, -1.0, 2.0]
    else:
        raise ValueError(case)
    return x, p(), p(0.5, 3.0), p(), p()


BN_CASES = ["nhwc-1d", "nchw-keepdims", "nchw-c1hw", "two-axes", "non-adjacent", "elementwise",
            "scalars", "mixed"]


@pytest.mark.parametrize("case", BN_CASES)
@dtypes
def test_batch_normalization_broadcasting(backend, rng, make_array, case, dtype):
    x, mean, variance, offset, scale = _bn_case(rng, make_array, case, dtype)
    y = fbn.batch_normalization(x, mean, variance, offset, scale, 1e-3, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    ref.assert_close(y, ref.batch_normalization(x, mean, variance, offset, scale, 1e-3), "y")


@pytest.mark.parametrize("drop", ["offset", "scale", "both"])
def test_batch_normalization_none_offset_scale(backend, rng, make_array, drop):
    x, mean, variance, offset, scale = _bn_case(rng, make_array, "nchw-keepdims", np.float64)
    offset = None if drop in ("offset", "both") else offset
    scale = None if drop in ("scale", "both") else scale
    y = fbn.batch_normalization(x, mean, variance, offset, scale, 1e-3, backend=backend)
    ref.assert_close(y, ref.batch_normalization(x, mean, variance, offset, scale, 1e-3), "y")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@dtypes
def test_train_is_moments_plus_batch_normalization(backend, rng, make_array, layout, dtype):
    """batch_norm_train == moments + batch_normalization (tf.nn style), to the dtype's rounding."""
    shape, axis = ((4, 3, 5, 6), 1) if layout == "NCHW" else ((4, 5, 6, 3), -1)
    x = make_array(shape, dtype, channel_axis=axis)
    scale, offset = _vec(rng, 3, dtype), _vec(rng, 3, dtype)
    axes = ref.reduced_axes(x.ndim, axis)
    mean, var = fbn.moments(x, axes, keepdims=True, backend=backend)
    kd = [1 if a in axes else 3 for a in range(x.ndim)]
    y1 = fbn.batch_normalization(x, mean, var, offset.reshape(kd), scale.reshape(kd), 1e-3,
                                 backend=backend)
    y2, mean2, invstd2 = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, eps=1e-3,
                                              backend=backend)
    ref.assert_close(y2, y1.astype(np.float64), "train y vs moments + batch_normalization")
    ref.assert_close(mean2, mean.reshape(-1).astype(np.float64), "mean")
    ref.assert_close(invstd2, 1 / np.sqrt(var.reshape(-1).astype(np.float64) + 1e-3), "invstd")


# -- fused batch norm: defaults and running statistics ------------------------------

@pytest.mark.parametrize("fn", ["train", "infer", "backward"])
def test_scale_offset_none_mean_ones_zeros(backend, rng, make_array, fn):
    x = make_array((4, 3, 5), np.float64, channel_axis=1)
    ones, zeros = np.ones(3), np.zeros(3)
    if fn == "train":
        a = fbn.batch_norm_train(x, backend=backend)
        b = fbn.batch_norm_train(x, ones, zeros, backend=backend)
    elif fn == "infer":
        m, v = _vec(rng, 3, np.float64), _vec(rng, 3, np.float64, 0.5, 2)
        a = (fbn.batch_norm_infer(x, None, None, m, v, backend=backend),)
        b = (fbn.batch_norm_infer(x, ones, zeros, m, v, backend=backend),)
    else:
        dy = make_array(x.shape, np.float64)
        _, m, s, _, _ = ref.batch_norm_train(x)
        a = fbn.batch_norm_backward(dy, x, None, m, s, backend=backend)
        b = fbn.batch_norm_backward(dy, x, ones, m, s, backend=backend)
        ref.assert_close(a[0], ref.batch_norm_backward(dy, x, None, m, s)[0], "dx")
    for u, v in zip(a, b):
        ref.assert_close(u, v, fn)


@dtypes
def test_running_stats_by_hand(backend, dtype):
    """N=3, C=2: batch mean (3, 6), unbiased var (4, 16); momentum 0.1 (TF decay 0.9)."""
    x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]], dtype=dtype)
    pdt = ref.param_dtype(dtype)
    rmean = np.array([0.5, -1.0], dtype=pdt)
    rvar = np.array([1.0, 2.0], dtype=pdt)
    _, mean, invstd = fbn.batch_norm_train(x, channel_axis=1, eps=0.0, running_mean=rmean,
                                           running_var=rvar, momentum=0.1, backend=backend)
    np.testing.assert_allclose(mean, [3.0, 6.0], rtol=1e-7)
    np.testing.assert_allclose(invstd, 1 / np.sqrt([8 / 3, 32 / 3]), rtol=1e-7)
    # 0.9 * old + 0.1 * batch
    np.testing.assert_allclose(rmean, [0.9 * 0.5 + 0.3, 0.9 * -1.0 + 0.6], rtol=1e-7)
    np.testing.assert_allclose(rvar, [0.9 * 1.0 + 0.4, 0.9 * 2.0 + 1.6], rtol=1e-7)
    assert rmean.dtype == pdt and rvar.dtype == pdt
    # A second step compounds on the updated values.
    fbn.batch_norm_train(x, channel_axis=1, running_mean=rmean, running_var=rvar, momentum=0.5,
                         backend=backend)
    np.testing.assert_allclose(rmean, [0.5 * 0.75 + 1.5, 0.5 * -0.3 + 3.0], rtol=1e-6)
    np.testing.assert_allclose(rvar, [0.5 * 1.3 + 2.0, 0.5 * 3.4 + 8.0], rtol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_running_stats_momentum_limits(backend, make_array, momentum):
    x = make_array((5, 3, 4), np.float64, channel_axis=1)
    rmean, rvar = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])
    old_mean, old_var = rmean.copy(), rvar.copy()
    fbn.batch_norm_train(x, running_mean=rmean, running_var=rvar, momentum=momentum,
                         backend=backend)
    if momentum == 0.0:
        np.testing.assert_array_equal(rmean, old_mean)
        np.testing.assert_array_equal(rvar, old_var)
    else:
        ref.assert_close(rmean, x.mean(axis=(0, 2)), "running_mean")
        ref.assert_close(rvar, x.var(axis=(0, 2), ddof=1), "running_var")


def test_running_mean_alone(backend, make_array):
    x = make_array((5, 3), np.float32, channel_axis=1)
    rmean = np.zeros(3, np.float32)
    fbn.batch_norm_train(x, running_mean=rmean, momentum=0.25, backend=backend)
    ref.assert_close(rmean, 0.25 * ref.f64(x).mean(axis=0), "running_mean")
    rvar = np.ones(3, np.float32)
    fbn.batch_norm_train(x, running_var=rvar, momentum=0.25, backend=backend)
    ref.assert_close(rvar, 0.75 + 0.25 * ref.f64(x).var(axis=0, ddof=1), "running_var")


def test_n_equals_2_is_enough(backend):
    """The smallest batch with a variance: two values per channel."""
    x = np.array([[1.0, -1.0], [3.0, 5.0]])
    rvar = np.zeros(2)
    y, mean, invstd = fbn.batch_norm_train(x, eps=0.0, running_var=rvar, momentum=1.0,
                                           backend=backend)
    np.testing.assert_allclose(y, [[-1.0, -1.0], [1.0, 1.0]], rtol=1e-14)
    np.testing.assert_allclose(rvar, [2.0, 18.0], rtol=1e-14)


def test_list_input(backend):
    y, mean, invstd = fbn.batch_norm_train([[1.0, 2.0], [3.0, 4.0]], backend=backend)
    assert isinstance(y, np.ndarray) and y.dtype == np.float64
    np.testing.assert_allclose(mean, [2.0, 3.0])


# -- backward: finite differences --------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((4, 3, 2), 1), ((3, 2, 2), -1), ((5, 2), 1)],
                         ids=["NCL", "NHWC", "NC"])
@pytest.mark.parametrize("impl", ["fastbn", "oracle"])
def test_backward_finite_differences(backend, rng, shape, axis, impl):
    """d/d(x, scale, offset) of L = sum(w * y(x)), y from the training forward (batch stats)."""
    x = rng.standard_normal(shape) * 1.5 + 0.5
    C = shape[axis]
    scale, offset = rng.uniform(0.5, 2.0, C), rng.uniform(-1, 1, C)
    w = rng.standard_normal(shape)
    eps = 0.1  # large, so a backward that ignores eps fails

    if impl == "fastbn":
        def loss():
            return np.sum(w * fbn.batch_norm_train(x, scale, offset, channel_axis=axis, eps=eps,
                                                   backend=backend)[0])
        _, mean, invstd = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, eps=eps,
                                               backend=backend)
        dx, dscale, doffset = fbn.batch_norm_backward(w, x, scale, mean, invstd, channel_axis=axis,
                                                      backend=backend)
    else:
        def loss():
            return np.sum(w * ref.batch_norm_train(x, scale, offset, axis, eps)[0])
        _, mean, invstd, _, _ = ref.batch_norm_train(x, scale, offset, axis, eps)
        dx, dscale, doffset = ref.batch_norm_backward(w, x, scale, mean, invstd, axis)

    for got, v, what in ((dx, x, "dx"), (dscale, scale, "dscale"), (doffset, offset, "doffset")):
        ref.assert_close(got, ref.numerical_gradient(loss, v, h=1e-5), what, rtol=1e-6)


# -- inputs are never modified ---------------------------------------------------------------

def _bytes(*arrays):
    """Snapshot of the whole memory behind each array (views: their base too)."""
    return [(a.base if a.base is not None else a).tobytes() for a in arrays]


@pytest.mark.parametrize("fn", ["moments", "batch_normalization", "train", "infer", "backward"])
@pytest.mark.parametrize("memory", ["C", "sliced"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["float16", "float32"])
def test_inputs_never_modified(backend, rng, make_array, fn, memory, dtype):
    x = make_array((3, 4, 5, 6), dtype, memory)
    dy = make_array(x.shape, dtype, memory)
    vecs = [_vec(rng, 4, dtype) for _ in range(4)]
    vecs[3] = np.abs(vecs[3]) + 0.5
    scale, offset, mean, var = vecs
    inputs = [x, dy, *vecs]
    before = _bytes(*inputs)
    if fn == "moments":
        fbn.moments(x, (0, 2, 3), backend=backend)
    elif fn == "batch_normalization":
        kd = lambda v: v.reshape(1, 4, 1, 1)  # noqa: E731
        fbn.batch_normalization(x, kd(mean), kd(var), kd(offset), kd(scale), 1e-3, backend=backend)
    elif fn == "train":
        fbn.batch_norm_train(x, scale, offset, backend=backend)
    elif fn == "infer":
        fbn.batch_norm_infer(x, scale, offset, mean, var, backend=backend)
    else:
        fbn.batch_norm_backward(dy, x, scale, mean, var, backend=backend)
    assert _bytes(*inputs) == before


# -- out= ----------------------------------------------------------------------------------

FNS_WITH_OUT = ["batch_normalization", "train", "infer", "backward"]


class _Case:
    """One call of a function with ``out=``, and its oracle."""

    def __init__(self, fn, x, dy, rng):
        self.fn, self.x, self.dy = fn, x, dy
        C = x.shape[1]
        self.scale, self.offset = _vec(rng, C, x.dtype), _vec(rng, C, x.dtype)
        self.mean, self.var = _vec(rng, C, x.dtype), _vec(rng, C, x.dtype, 0.5, 2.0)
        _, m, s, _, _ = ref.batch_norm_train(x)
        pdt = ref.param_dtype(x.dtype)
        self.bmean, self.binvstd = m.astype(pdt), s.astype(pdt)
        # The oracle sees copies: `out` may alias x or dy.
        self.expected = self._oracle(x.copy(), None if dy is None else dy.copy())

    def _oracle(self, x, dy):
        kd = lambda v: v.reshape([1, -1] + [1] * (x.ndim - 2))  # noqa: E731
        if self.fn == "batch_normalization":
            return ref.batch_normalization(x, kd(self.mean), kd(self.var), kd(self.offset),
                                           kd(self.scale), 1e-3)
        if self.fn == "train":
            return ref.batch_norm_train(x, self.scale, self.offset, 1, 1e-3)[0]
        if self.fn == "infer":
            return ref.batch_norm_infer(x, self.scale, self.offset, self.mean, self.var, 1, 1e-3)
        return ref.batch_norm_backward(dy, x, self.scale, self.bmean, self.binvstd, 1)[0]

    def __call__(self, out, backend):
        kd = lambda v: v.reshape([1, -1] + [1] * (self.x.ndim - 2))  # noqa: E731
        x = self.x
        if self.fn == "batch_normalization":
            return fbn.batch_normalization(x, kd(self.mean), kd(self.var), kd(self.offset),
                                           kd(self.scale), 1e-3, out=out, backend=backend)
        if self.fn == "train":
            return fbn.batch_norm_train(x, self.scale, self.offset, eps=1e-3, out=out,
                                        backend=backend)[0]
        if self.fn == "infer":
            return fbn.batch_norm_infer(x, self.scale, self.offset, self.mean, self.var, eps=1e-3,
                                        out=out, backend=backend)
        return fbn.batch_norm_backward(self.dy, x, self.scale, self.bmean, self.binvstd, out=out,
                                       backend=backend)[0]


OUT_KINDS = ["C", "F", "sliced", "is-x", "is-dy", "overlaps-x-ahead", "overlaps-x-behind"]


@pytest.mark.parametrize("kind", OUT_KINDS)
@pytest.mark.parametrize("xmem", ["C", "F", "sliced"])
@pytest.mark.parametrize("fn", FNS_WITH_OUT)
@pytest.mark.parametrize("dtype", [np.float16, np.float64], ids=["float16", "float64"])
def test_out(backend, rng, make_array, fn, xmem, kind, dtype):
    """out= is filled and returned: preallocated in any memory order, a strided view,
    x itself (in place), dy itself (backward), or a shifted view overlapping x."""
    shape = (3, 4, 5, 6)
    if kind.startswith("overlaps-x"):
        # x and out are two windows of one buffer, one element apart: a kernel
        # writing straight into out would overwrite x values it has yet to read
        # ("ahead": out runs one element ahead of x in memory).
        buf = make_array((shape[0], shape[1], shape[2], shape[3] + 1), dtype, xmem)
        x, out = (buf[..., :-1], buf[..., 1:]) if kind.endswith("ahead") else (buf[..., 1:],
                                                                                buf[..., :-1])
    else:
        x = make_array(shape, dtype, xmem)
    dy = make_array(shape, dtype, xmem) if fn == "backward" else None
    case = _Case(fn, x, dy, rng)
    if kind == "is-dy" and dy is None:
        pytest.skip("only the backward takes dy")
    if kind in ("C", "F"):
        out = np.full(shape, np.nan, dtype=dtype, order=kind)
    elif kind == "sliced":
        base = np.full((3, 4, 7, 12), np.nan, dtype=dtype)
        out = base[..., 1:-1, ::2]
        guard = base.copy()
    elif kind == "is-x":
        out = x
    elif kind == "is-dy":
        out = dy
    got = case(out, backend)
    assert got is out
    ref.assert_close(out, case.expected, f"out ({kind})")
    if kind == "sliced":  # the gaps of the strided out were not written
        mask = np.ones(base.shape, bool)
        mask[..., 1:-1, ::2] = False
        np.testing.assert_array_equal(base[mask], guard[mask])


# -- accuracy bar -------------------------------------------------------------------------

def _accuracy_data(rng, layout):
    x = (1e6 + rng.standard_normal((16, 32, 28, 28))).astype(np.float32)
    if layout == "NHWC":
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)), -1
    return x, 1


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_accuracy_bar_large_mean(backend, rng, layout):
    """float32 x = 1e6 + randn, (16,32,28,28): per-channel variance relative error <= 1e-6
    against float64 statistics of the same stored values, from moments, from
    batch_norm_train's invstd, and in running_var.  (PyTorch channels_last and
    TensorFlow NHWC are off by a factor of 2e3 here; see TARGETS.md.)"""
    x, axis = _accuracy_data(rng, layout)
    axes = ref.reduced_axes(x.ndim, axis)
    emean, evar = ref.moments(x, axes)

    def rel(got, want):
        return np.max(np.abs(np.asarray(got, np.float64) - want) / np.abs(want))

    mean, var = fbn.moments(x, axes, backend=backend)
    assert rel(var, evar) <= 1e-6, f"moments var rel error {rel(var, evar):.3g}"
    assert rel(mean, emean) <= 1e-7, f"moments mean rel error {rel(mean, emean):.3g}"

    rvar = np.zeros(32, np.float32)
    eps = 1e-5
    _, mean, invstd = fbn.batch_norm_train(x, channel_axis=axis, eps=eps, running_var=rvar,
                                           momentum=1.0, backend=backend)
    var_t = 1.0 / np.asarray(invstd, np.float64) ** 2 - eps
    assert rel(var_t, evar) <= 1e-6, f"batch_norm_train var rel error {rel(var_t, evar):.3g}"
    n = x.size // 32
    assert rel(rvar, evar * n / (n - 1)) <= 1e-6, "running_var"


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_accuracy_normalized_output_large_mean(backend, rng, layout):
    """y = (x - mean) * invstd on x = 1e6 + randn in float32: to float32 rounding of y
    (an FMA y = a*x + b with b rounded to float32 would be off by ~0.06 here)."""
    x, axis = _accuracy_data(rng, layout)
    x = x[:4]  # fewer values: the oracle's y is the cost here
    y, _, _ = fbn.batch_norm_train(x, channel_axis=axis, backend=backend)
    ref.assert_close(y, ref.batch_norm_train(x, None, None, axis)[0], "y")
    y = fbn.batch_norm_infer(x, None, None, np.full(32, 1e6, np.float32), np.ones(32, np.float32),
                             channel_axis=axis, backend=backend)
    ref.assert_close(y, ref.batch_norm_infer(x, None, None, np.full(32, 1e6), np.ones(32), axis),
                     "infer y")


# -- empty arrays ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((0, 3), 1), ((0, 3, 4, 5), 1), ((4, 3, 0), 1), ((4, 0), 1),
                                        ((2, 0, 5), 1), ((0, 5, 3), -1)], ids=str)
def test_empty_arrays(backend, shape, axis):
    """Zero-size x: empty outputs, zero gradient sums, NaN statistics (as NumPy)."""
    x = np.ones(shape, np.float32)
    C = shape[axis]
    v = np.ones(C, np.float32)
    axes = ref.reduced_axes(x.ndim, axis)
    mean, var = fbn.moments(x, axes, backend=backend)
    assert mean.shape == (C,) and (C == 0 or np.isnan(mean).all())
    y = fbn.batch_normalization(x, 0.0, 1.0, None, None, 1e-3, backend=backend)
    assert y.shape == shape and y.dtype == x.dtype
    y = fbn.batch_norm_infer(x, v, v, v, v, channel_axis=axis, backend=backend)
    assert y.shape == shape
    out = np.empty_like(x)
    dx, dscale, doffset = fbn.batch_norm_backward(x, x, v, v, v, channel_axis=axis, out=out,
                                                  backend=backend)
    assert dx is out and dscale.shape == doffset.shape == (C,)
    np.testing.assert_array_equal(dscale, 0.0)
    np.testing.assert_array_equal(doffset, 0.0)
    if ref.count(shape, axes) >= 2:  # channels of no values, but n >= 2: allowed
        y, mean, invstd = fbn.batch_norm_train(x, channel_axis=axis, backend=backend)
        assert y.shape == shape and mean.shape == invstd.shape == (C,)

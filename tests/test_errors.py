"""Bad input (API.md, Errors): ValueError / TypeError naming the argument, and nothing written.

Every case runs through ``_raises``: it snapshots the bytes of every array
involved (inputs, ``out``, running statistics), checks the exception type and
that the message names the argument, then checks that not one byte changed.
"""

import re

import numpy as np
import pytest

import fastbn as fbn

C = 3


class FakeCudaArray:
    """Claims to live on a GPU (``__cuda_array_interface__``): another array family."""

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self.strides = tuple(np.empty(shape, dtype).strides)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (0, False), "version": 3}


def _arrays():
    """A fresh, valid set of arguments (NCHW float32, C=3)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, C, 5, 2)).astype(np.float32)
    return dict(
        x=x, dy=rng.standard_normal(x.shape).astype(np.float32),
        scale=np.ones(C, np.float32), offset=np.zeros(C, np.float32),
        mean=np.zeros(C, np.float32), var=np.ones(C, np.float32), invstd=np.ones(C, np.float32),
        running_mean=np.full(C, 0.5, np.float32), running_var=np.full(C, 2.0, np.float32),
        out=np.full(x.shape, 7.0, np.float32),
    )


def _raises(exc, name, call, watched):
    """``call()`` raises ``exc`` whose message names ``name``; ``watched`` arrays unchanged."""
    arrays = [a for a in watched if isinstance(a, np.ndarray)]
    before = [(a.base if a.base is not None else a).tobytes() for a in arrays]
    with pytest.raises(exc, match=re.escape(name)):
        call()
    after = [(a.base if a.base is not None else a).tobytes() for a in arrays]
    assert after == before, "an array was written before the error was raised"


def _train(a, **kw):
    args = dict(scale=a["scale"], offset=a["offset"], channel_axis=1, eps=1e-5,
                running_mean=a["running_mean"], running_var=a["running_var"], momentum=0.1,
                out=a["out"])
    args.update(kw)
    x = args.pop("x", a["x"])
    return lambda: fbn.batch_norm_train(x, **args), [x, *a.values(), *args.values()]


def _infer(a, **kw):
    args = dict(scale=a["scale"], offset=a["offset"], mean=a["mean"], var=a["var"],
                channel_axis=1, eps=1e-5, out=a["out"])
    args.update(kw)
    x = args.pop("x", a["x"])
    return lambda: fbn.batch_norm_infer(x, **args), [x, *a.values(), *args.values()]


def _backward(a, **kw):
    args = dict(dy=a["dy"], scale=a["scale"], mean=a["mean"], invstd=a["invstd"], channel_axis=1,
                out=a["out"])
    args.update(kw)
    x = args.pop("x", a["x"])
    return lambda: fbn.batch_norm_backward(x=x, **args), [x, *a.values(), *args.values()]


def _bn(a, **kw):
    kd = lambda v: v.reshape(1, C, 1, 1)  # noqa: E731
    args = dict(mean=kd(a["mean"]), variance=kd(a["var"]), offset=kd(a["offset"]),
                scale=kd(a["scale"]), variance_epsilon=1e-3, out=a["out"])
    args.update(kw)
    x = args.pop("x", a["x"])
    return lambda: fbn.batch_normalization(x, **args), [x, *a.values(), *args.values()]


def _moments(a, **kw):
    args = dict(axis=(0, 2, 3))
    args.update(kw)
    x = args.pop("x", a["x"])
    return lambda: fbn.moments(x, **args), [x, *a.values()]


BUILDERS = {"train": _train, "infer": _infer, "backward": _backward,
            "batch_normalization": _bn, "moments": _moments}
FUSED = ["train", "infer", "backward"]


def _case(fn, backend, **kw):
    return BUILDERS[fn](_arrays(), backend=backend, **kw)


def test_valid_arguments_pass(backend):
    """The argument sets below are valid apart from the one bad argument."""
    for fn in BUILDERS:
        call, _ = _case(fn, backend)
        call()


# -- x: dtype, None, ndim, family ----------------------------------------------------

NON_FLOAT = {"int": np.int32, "bool": np.bool_, "complex": np.complex64}


@pytest.mark.parametrize("kind", list(NON_FLOAT))
@pytest.mark.parametrize("fn", list(BUILDERS))
def test_x_non_float_dtype(backend, fn, kind):
    x = np.ones((4, C, 5, 2), NON_FLOAT[kind])
    call, watched = _case(fn, backend, x=x, **({"out": None} if fn != "moments" else {}))
    _raises(TypeError, "x", call, watched)


@pytest.mark.parametrize("fn", list(BUILDERS))
def test_x_none(backend, fn):
    call, watched = _case(fn, backend, x=None)
    _raises(TypeError, "x", call, watched)


@pytest.mark.parametrize("x", [[[1.0, 2.0], [3.0]], "abc", object()], ids=["ragged", "str", "object"])
@pytest.mark.parametrize("fn", ["train", "moments"])
def test_x_not_an_array_of_floats(backend, fn, x):
    call, watched = _case(fn, backend, x=x, **({"out": None} if fn != "moments" else {}))
    _raises(TypeError, "x", call, watched)


@pytest.mark.parametrize("ddof", ["1", None, [1]])
def test_moments_ddof_not_a_number(backend, ddof):
    call, watched = _case("moments", backend, ddof=ddof)
    _raises(TypeError, "ddof", call, watched)


@pytest.mark.parametrize("fn", ["train", "infer", "backward"])
def test_x_0d(backend, fn):
    kw = {"out": None}
    if fn == "backward":
        kw["dy"] = np.float32(1.0)
    call, watched = _case(fn, backend, x=np.float32(1.0), **kw)
    _raises(ValueError, "x", call, watched)


@pytest.mark.parametrize("fn", FUSED)
@pytest.mark.parametrize("axis", [4, -5, 10])
def test_channel_axis_out_of_range(backend, fn, axis):
    call, watched = _case(fn, backend, channel_axis=axis)
    _raises(ValueError, "channel_axis", call, watched)


@pytest.mark.parametrize("fn", FUSED)
@pytest.mark.parametrize("axis", [1.0, "1", None, True])
def test_channel_axis_not_int(backend, fn, axis):
    call, watched = _case(fn, backend, channel_axis=axis)
    _raises(TypeError, "channel_axis", call, watched)


def test_channel_axis_on_1d_x(backend):
    """1-D x has only axis 0: channel_axis=1 is out of range."""
    x = np.ones(C, np.float32)
    _raises(ValueError, "channel_axis", lambda: fbn.batch_norm_train(x, backend=backend), [x])


@pytest.mark.parametrize("axis", [4, -5, (0, 4), (1, 1), (0, -4)])
def test_moments_bad_axis(backend, axis):
    call, watched = _case("moments", backend, axis=axis)
    _raises(ValueError, "axis", call, watched)


@pytest.mark.parametrize("axis", [1.0, "0", (0, 1.5)])
def test_moments_axis_not_int(backend, axis):
    call, watched = _case("moments", backend, axis=axis)
    _raises(TypeError, "axis", call, watched)


@pytest.mark.parametrize("fn", list(BUILDERS))
def test_mixed_families(backend, fn):
    """A GPU array beside NumPy x raises TypeError naming the argument (no GPU needed)."""
    name = {"train": "scale", "infer": "mean", "backward": "dy", "batch_normalization": "variance",
            "moments": None}[fn]
    if name is None:
        pytest.skip("moments takes one array")
    fake = FakeCudaArray((C,)) if fn != "backward" else FakeCudaArray((4, C, 5, 2))
    if fn == "batch_normalization":
        fake = FakeCudaArray((1, C, 1, 1))
    call, watched = _case(fn, backend, **{name: fake})
    _raises(TypeError, name, call, watched)


@pytest.mark.parametrize("fn", FUSED)
def test_out_of_another_family(backend, fn):
    call, watched = _case(fn, backend, out=FakeCudaArray((4, C, 5, 2)))
    _raises(TypeError, "out", call, watched)


# -- per-channel vectors ---------------------------------------------------------------

VECTORS = {"train": ["scale", "offset"], "infer": ["scale", "offset", "mean", "var"],
           "backward": ["scale", "mean", "invstd"]}
VECTOR_CASES = [(fn, name) for fn, names in VECTORS.items() for name in names]
vector_cases = pytest.mark.parametrize("fn,name", VECTOR_CASES, ids=[f"{f}-{n}" for f, n in VECTOR_CASES])


@vector_cases
@pytest.mark.parametrize("length", [C - 1, C + 1, 1, 0])
def test_vector_wrong_length(backend, fn, name, length):
    call, watched = _case(fn, backend, **{name: np.ones(length, np.float32)})
    _raises(ValueError, name, call, watched)


@vector_cases
def test_vector_wrong_ndim(backend, fn, name):
    call, watched = _case(fn, backend, **{name: np.ones((1, C), np.float32)})
    _raises(ValueError, name, call, watched)
    call, watched = _case(fn, backend, **{name: np.float32(1.0)})
    _raises(ValueError, name, call, watched)


@vector_cases
@pytest.mark.parametrize("kind", list(NON_FLOAT))
def test_vector_non_float_dtype(backend, fn, name, kind):
    call, watched = _case(fn, backend, **{name: np.ones(C, NON_FLOAT[kind])})
    _raises(TypeError, name, call, watched)


@pytest.mark.parametrize("fn,name", [("infer", "mean"), ("infer", "var"), ("backward", "mean"),
                                     ("backward", "invstd"), ("backward", "dy")])
def test_required_vector_none(backend, fn, name):
    call, watched = _case(fn, backend, **{name: None})
    _raises(TypeError, name, call, watched)


@pytest.mark.parametrize("name", ["mean", "variance"])
def test_batch_normalization_required_none(backend, name):
    call, watched = _case("batch_normalization", backend, **{name: None})
    _raises(TypeError, name, call, watched)


@pytest.mark.parametrize("name", ["mean", "variance", "offset", "scale"])
@pytest.mark.parametrize("bad", ["shape", "ndim", "bool", "complex"])
def test_batch_normalization_bad_param(backend, name, bad):
    v = {"shape": np.ones((1, C + 1, 1, 1), np.float32),  # does not broadcast to x
         "ndim": np.ones((1, 1, C, 1, 1), np.float32),  # more dimensions than x
         "bool": np.ones((1, C, 1, 1), np.bool_),
         "complex": np.ones((1, C, 1, 1), np.complex64)}[bad]
    call, watched = _case("batch_normalization", backend, **{name: v})
    _raises(ValueError if bad in ("shape", "ndim") else TypeError, name, call, watched)


# -- dy -----------------------------------------------------------------------------------

def test_dy_wrong_shape(backend):
    call, watched = _case("backward", backend, dy=np.ones((4, C, 5, 3), np.float32))
    _raises(ValueError, "dy", call, watched)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_dy_wrong_dtype(backend, dtype):
    call, watched = _case("backward", backend, dy=np.ones((4, C, 5, 2), dtype))
    _raises(TypeError, "dy", call, watched)


# -- scalars: eps, momentum ------------------------------------------------------------------

@pytest.mark.parametrize("fn", ["train", "infer"])
@pytest.mark.parametrize("eps", [-1e-5, -1.0, float("nan")])
def test_eps_negative(backend, fn, eps):
    call, watched = _case(fn, backend, eps=eps)
    _raises(ValueError, "eps", call, watched)


@pytest.mark.parametrize("eps", [-1e-3, float("nan")])
def test_variance_epsilon_negative(backend, eps):
    call, watched = _case("batch_normalization", backend, variance_epsilon=eps)
    _raises(ValueError, "variance_epsilon", call, watched)


@pytest.mark.parametrize("fn", ["train", "infer"])
@pytest.mark.parametrize("eps", ["1e-5", None, np.ones(2)])
def test_eps_not_a_number(backend, fn, eps):
    call, watched = _case(fn, backend, eps=eps)
    _raises(TypeError, "eps", call, watched)


@pytest.mark.parametrize("momentum", [-0.1, 1.0001, 2.0, float("nan")])
def test_momentum_out_of_range(backend, momentum):
    call, watched = _case("train", backend, momentum=momentum)
    _raises(ValueError, "momentum", call, watched)


@pytest.mark.parametrize("momentum", [None, "0.1"])
def test_momentum_not_a_number(backend, momentum):
    call, watched = _case("train", backend, momentum=momentum)
    _raises(TypeError, "momentum", call, watched)


# -- n == 1 in training ---------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((1, C), 1), ((1, C, 1, 1), 1), ((1, 1, 1, C), -1),
                                        ((C,), 0)], ids=str)
def test_train_needs_two_values_per_channel(backend, shape, axis):
    x = np.ones(shape, np.float32)
    out = np.full(shape, 7.0, np.float32)
    call, watched = _case("train", backend, x=x, out=out, channel_axis=axis)
    _raises(ValueError, "x", call, watched)


@pytest.mark.parametrize("shape,axis", [((0, C), 1), ((0, C, 4, 4), 1), ((0, 4, 4, C), -1)], ids=str)
def test_train_empty_batch_is_not_an_error(backend, shape, axis):
    """PyTorch: an empty batch gives an empty y; mean/invstd NaN; running stats untouched."""
    x = np.ones(shape, np.float32)
    rm, rv = np.full(C, 0.5, np.float32), np.full(C, 2.0, np.float32)
    y, mean, invstd = fbn.batch_norm_train(x, channel_axis=axis, running_mean=rm, running_var=rv,
                                           backend=backend)
    assert y.shape == shape and y.dtype == x.dtype
    assert mean.shape == invstd.shape == (C,) and np.isnan(mean).all() and np.isnan(invstd).all()
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)
    dx, dscale, doffset = fbn.batch_norm_backward(x, x, None, mean, invstd, channel_axis=axis,
                                                  backend=backend)
    assert dx.shape == shape
    np.testing.assert_array_equal(dscale, 0.0)
    np.testing.assert_array_equal(doffset, 0.0)


def test_train_eps0_constant_channel_gives_offset(backend):
    """PyTorch's rule: var + eps == 0 gives invstd 0 and y == offset, on every path."""
    for shape in [(4, C, 3), (300, C, 600)]:  # the small fused path and the general path
        x = np.full(shape, 3.0)
        off = np.arange(C, dtype=np.float64)
        y, mean, invstd = fbn.batch_norm_train(x, None, off, eps=0.0, backend=backend)
        np.testing.assert_array_equal(invstd, 0.0)
        np.testing.assert_array_equal(mean, 3.0)
        np.testing.assert_array_equal(y, np.broadcast_to(off[None, :, None], shape))


# -- out ---------------------------------------------------------------------------------------

OUT_FNS = ["train", "infer", "backward", "batch_normalization"]


@pytest.mark.parametrize("fn", OUT_FNS)
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_out_wrong_dtype(backend, fn, dtype):
    call, watched = _case(fn, backend, out=np.zeros((4, C, 5, 2), dtype))
    _raises(TypeError, "out", call, watched)


@pytest.mark.parametrize("fn", OUT_FNS)
@pytest.mark.parametrize("shape", [(4, C, 2, 5), (4, C, 5, 2, 1), (4 * C * 5 * 2,)], ids=str)
def test_out_wrong_shape(backend, fn, shape):
    call, watched = _case(fn, backend, out=np.zeros(shape, np.float32))
    _raises(ValueError, "out", call, watched)


@pytest.mark.parametrize("fn", OUT_FNS)
def test_out_read_only(backend, fn):
    out = np.zeros((4, C, 5, 2), np.float32)
    out.flags.writeable = False
    call, watched = _case(fn, backend, out=out)
    _raises(ValueError, "out", call, watched)


@pytest.mark.parametrize("fn", OUT_FNS)
def test_out_not_an_array(backend, fn):
    call, watched = _case(fn, backend, out=np.zeros((4, C, 5, 2), np.float32).tolist())
    _raises(TypeError, "out", call, watched)


# -- running statistics ------------------------------------------------------------------------

running = pytest.mark.parametrize("name", ["running_mean", "running_var"])


@running
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_running_wrong_dtype(backend, name, dtype):
    """float32 x: running statistics must be float32 (updated in place, no silent cast)."""
    call, watched = _case("train", backend, **{name: np.zeros(C, dtype)})
    _raises(TypeError, name, call, watched)


@running
def test_running_wrong_length(backend, name):
    call, watched = _case("train", backend, **{name: np.zeros(C + 1, np.float32)})
    _raises(ValueError, name, call, watched)


@running
def test_running_not_contiguous(backend, name):
    v = np.zeros(2 * C, np.float32)[::2]
    call, watched = _case("train", backend, **{name: v})
    _raises(ValueError, name, call, watched)


@running
def test_running_read_only(backend, name):
    v = np.zeros(C, np.float32)
    v.flags.writeable = False
    call, watched = _case("train", backend, **{name: v})
    _raises(ValueError, name, call, watched)


@running
def test_running_not_an_array(backend, name):
    call, watched = _case("train", backend, **{name: [0.0] * C})
    _raises(TypeError, name, call, watched)


def test_float16_x_wants_float32_running_stats(backend):
    a = _arrays()
    x = a["x"].astype(np.float16)
    call, watched = _case("train", backend, x=x, out=None, scale=None, offset=None,
                          running_mean=np.zeros(C, np.float16))
    _raises(TypeError, "running_mean", call, watched)


def test_no_half_update_of_running_stats(backend):
    """running_mean is valid, running_var is not: neither is touched."""
    rv = np.zeros(C, np.float32)
    rv.flags.writeable = False
    call, watched = _case("train", backend, running_var=rv)  # watched holds the running_mean passed
    _raises(ValueError, "running_var", call, watched)


# -- backend names ------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", list(BUILDERS))
def test_unknown_backend(fn):
    call, watched = BUILDERS[fn](_arrays(), backend="tensorflow")
    _raises(ValueError, "tensorflow", call, watched)


@pytest.mark.parametrize("fn", list(BUILDERS))
def test_backend_of_another_family(fn):
    """Forcing a backend that does not take NumPy arrays (here: 'dask' or 'cuda')."""
    status = fbn.backends()
    name = next((n for n in ("dask", "cuda") if status[n] == "available"), None)
    if name is None:
        pytest.skip("no non-NumPy backend available")
    call, watched = BUILDERS[fn](_arrays(), backend=name)
    _raises(TypeError, name, call, watched)


@pytest.mark.parametrize("fn", list(BUILDERS))
def test_unavailable_backend(fn):
    status = fbn.backends()
    name = next((n for n, s in status.items() if s != "available"), None)
    if name is None:
        pytest.skip("every backend is available here")
    call, watched = BUILDERS[fn](_arrays(), backend=name)
    _raises(ValueError, name, call, watched)


@pytest.mark.parametrize("bad", [1, ["numpy"]])
def test_backend_not_a_string(bad):
    call, watched = BUILDERS["train"](_arrays(), backend=bad)
    with pytest.raises((TypeError, ValueError), match="backend"):
        call()


# -- issue 14, item 9: messages of other families ----------------------------------------

@running
def test_dask_x_with_dask_running_stat_names_it(name):
    """Dask x with a Dask running statistic: TypeError naming it and saying it must be a
    NumPy array updated in place (not "but x is a numpy array"); nothing written."""
    da = pytest.importorskip("dask.array")
    a = _arrays()
    x = da.from_array(a["x"], chunks=(2, C, 5, 2))
    other = "running_var" if name == "running_mean" else "running_mean"
    kw = {name: da.from_array(a[name]), other: a[other]}
    watched = [a["x"], a[other], a[name]]
    call = lambda: fbn.batch_norm_train(x, a["scale"], a["offset"], **kw)  # noqa: E731
    _raises(TypeError, f"{name} must be a NumPy array updated in place", call, watched)
    with pytest.raises(TypeError) as info:
        call()
    assert "x is a numpy array" not in str(info.value)


def test_dask_x_with_dask_vectors_is_accepted():
    """The other per-channel arguments of a Dask call may be Dask arrays (they are read only)."""
    dask = pytest.importorskip("dask")
    da = pytest.importorskip("dask.array")
    a = _arrays()
    x = da.from_array(a["x"], chunks=(2, C, 5, 2))
    dy = da.from_array(a["dy"], chunks=(2, C, 5, 2))
    d = {k: da.from_array(a[k]) for k in ("scale", "offset", "mean", "var", "invstd")}
    y = fbn.batch_norm_infer(x, d["scale"], d["offset"], d["mean"], d["var"])
    dx, _, _ = fbn.batch_norm_backward(dy, x, d["scale"], d["mean"], d["invstd"])
    y_np = fbn.batch_norm_infer(a["x"], a["scale"], a["offset"], a["mean"], a["var"])
    dx_np, _, _ = fbn.batch_norm_backward(a["dy"], a["x"], a["scale"], a["mean"], a["invstd"])
    y, dx = dask.compute(y, dx)
    np.testing.assert_allclose(y, y_np, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, dx_np, rtol=1e-5, atol=1e-6)


def _no_cuda_here():
    if fbn.backends()["cuda"] == "available":
        pytest.skip("a CUDA backend runs here: the fake device array would be read")


CUDA_CALLS = dict(BUILDERS, partial_moments=lambda a, x, backend=None: (
    (lambda: fbn.partial_moments(x, 1, backend=backend)), list(a.values())))


@pytest.mark.parametrize("fn", list(CUDA_CALLS))
@pytest.mark.parametrize("backend_arg", [None, "numpy"])
def test_cuda_interface_without_cuda_is_a_clean_type_error(fn, backend_arg):
    """A bare ``__cuda_array_interface__`` object as x on a host where CUDA cannot start:
    the TypeError backend_for gives (naming x), not Numba's CudaSupportError; nothing written."""
    _no_cuda_here()
    with pytest.raises(TypeError) as info:
        fbn.backend_for(FakeCudaArray((4, C, 5, 2)))
    reason = str(info.value)
    a = _arrays()
    call, watched = CUDA_CALLS[fn](a, x=FakeCudaArray((4, C, 5, 2)), backend=backend_arg)
    _raises(TypeError, "x is a CUDA array", call, watched)
    with pytest.raises(Exception) as info:
        call()
    assert type(info.value) is TypeError and reason in str(info.value)


def test_cuda_interface_dy_without_cuda_is_a_clean_type_error():
    """The same for a device ``dy`` beside a device ``x``: x is refused first, cleanly."""
    _no_cuda_here()
    fake = FakeCudaArray((4, C, 5, 2))
    a = _arrays()
    call = lambda: fbn.batch_norm_backward(fake, fake, a["scale"], a["mean"], a["invstd"])  # noqa: E731
    _raises(TypeError, "x is a CUDA array", call, list(a.values()))


def test_cuda_interface_layer_without_cuda_is_a_clean_type_error():
    _no_cuda_here()
    layer = fbn.BatchNorm(C)
    with pytest.raises(TypeError):
        layer(FakeCudaArray((4, C, 5, 2)))


# -- issue 14, item 4: overlaps refused on every function (API.md, Errors) ----------------------

@pytest.mark.parametrize("name", ["scale", "offset"])
def test_batch_normalization_scale_offset_overlapping_out(backend, name):
    """tf.nn.batch_normalization's scale/offset overlapping out: ValueError naming both,
    nothing written (as for the fused functions)."""
    a = _arrays()
    out = a["out"]
    param = out[0, :, 0, 0].reshape(1, C, 1, 1)   # a view into out
    call, watched = _bn(a, backend=backend, **{name: param})
    _raises(ValueError, "out", call, watched)
    with pytest.raises(ValueError, match=name):
        call()

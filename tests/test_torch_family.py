"""The torch family: every public function takes CPU ``torch.Tensor``s and returns them.

Checked against the float64 oracle (``reference``) on every CPU backend, for
float16/32/64, contiguous, ``channels_last`` and strided tensors: results are
tensors (``out=`` the caller's own object), no copy on the way in or out
(running statistics updated through their memory, ``channels_last`` kept),
and what a view cannot honour is a ``TypeError`` naming the argument that
changes nothing.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastbn as fbn  # noqa: E402
import reference  # noqa: E402  (tests/reference.py)

TORCH_DTYPES = {np.float16: torch.float16, np.float32: torch.float32, np.float64: torch.float64}


def tensor(rng, shape, dtype, memory="contiguous", loc=0.5, sd=2.0):
    """Random CPU tensor (N, C, ...) in ``memory``: contiguous, channels_last or strided
    (a view with gaps, which must be read through its strides)."""
    a = (loc + sd * rng.standard_normal(shape)).astype(dtype)
    t = torch.from_numpy(a)
    if memory == "channels_last":
        perm = (0,) + tuple(range(2, len(shape))) + (1,)
        inv = np.argsort(perm)
        t = t.permute(*perm).contiguous().permute(*inv)
    elif memory == "strided":
        big = torch.full(shape[:-1] + (2 * shape[-1],), float("nan"), dtype=t.dtype)
        big[..., ::2] = t
        t = big[..., ::2]
    assert t.shape == tuple(shape)
    return t


def vec(rng, C, dtype, loc=0.0, sd=1.0):
    return torch.from_numpy((loc + sd * rng.standard_normal(C)).astype(reference.param_dtype(dtype)))


MEMORIES = ("contiguous", "channels_last", "strided")


@pytest.mark.parametrize("dtype", reference.DTYPES)
@pytest.mark.parametrize("memory", MEMORIES)
def test_train_infer_backward_on_tensors(backend, rng, dtype, memory):
    x = tensor(rng, (5, 3, 4, 7), dtype, memory)
    C = 3
    scale, offset = vec(rng, C, dtype, 1.0, 0.3), vec(rng, C, dtype)
    rm, rv = vec(rng, C, dtype), vec(rng, C, dtype, 2.0, 0.1).abs()
    rm0, rv0 = rm.clone(), rv.clone()
    y, mean, invstd = fbn.batch_norm_train(x, scale, offset, running_mean=rm, running_var=rv,
                                           momentum=torch.tensor(0.25, dtype=torch.float64), eps=torch.tensor(1e-3, dtype=torch.float64),
                                           backend=backend)
    for t in (y, mean, invstd):
        assert isinstance(t, torch.Tensor)
    assert y.dtype == x.dtype and mean.dtype == TORCH_DTYPES[reference.param_dtype(dtype).type]
    if memory == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    ry, rmean, rinv, rrm, rrv = reference.batch_norm_train(
        x.numpy(), scale.numpy(), offset.numpy(), eps=1e-3, running_mean=rm0.numpy(),
        running_var=rv0.numpy(), momentum=0.25)
    reference.assert_close(y.numpy(), ry, "y")
    reference.assert_close(mean.numpy(), rmean, "mean")
    reference.assert_close(invstd.numpy(), rinv, "invstd")
    reference.assert_close(rm.numpy(), rrm, "running_mean (updated in place)")
    reference.assert_close(rv.numpy(), rrv, "running_var (updated in place)")

    yi = fbn.batch_norm_infer(x, scale, offset, rm, rv, eps=1e-3, backend=backend)
    assert isinstance(yi, torch.Tensor)
    reference.assert_close(yi.numpy(), reference.batch_norm_infer(
        x.numpy(), scale.numpy(), offset.numpy(), rm.numpy(), rv.numpy(), eps=1e-3), "infer y")

    dy = tensor(rng, tuple(x.shape), dtype, memory, 0.0, 1.0)
    dx, dscale, doffset = fbn.batch_norm_backward(dy, x, scale, mean, invstd, backend=backend)
    rdx, rds, rdo = reference.batch_norm_backward(dy.numpy(), x.numpy(), scale.numpy(),
                                                  mean.numpy(), invstd.numpy())
    for got, want, what in ((dx, rdx, "dx"), (dscale, rds, "dscale"), (doffset, rdo, "doffset")):
        assert isinstance(got, torch.Tensor)
        reference.assert_close(got.numpy(), want, what, rtol=10 * reference.RTOL[got.numpy().dtype])

    dxi, dsi, doi = fbn.batch_norm_infer_backward(dy, x, scale, rm, rv, eps=1e-3, backend=backend)
    inv = 1 / np.sqrt(reference.f64(rv.numpy()) + 1e-3)
    along = lambda v: reference.along(v, 4, 1)  # noqa: E731
    reference.assert_close(dxi.numpy(), reference.f64(dy.numpy()) * along(scale.numpy() * inv),
                           "infer dx")
    xc = reference.f64(x.numpy()) - along(reference.f64(rm.numpy()))
    reference.assert_close(dsi.numpy(), (reference.f64(dy.numpy()) * xc).sum(axis=(0, 2, 3)) * inv,
                           "infer dscale", rtol=10 * reference.RTOL[dsi.numpy().dtype])
    assert isinstance(doi, torch.Tensor)


@pytest.mark.parametrize("dtype", reference.DTYPES)
def test_moments_and_batch_normalization_on_tensors(backend, rng, dtype):
    x = tensor(rng, (6, 4, 5), dtype, "strided")
    mean, var = fbn.moments(x, (0, 2), keepdims=True, backend=backend)
    assert isinstance(mean, torch.Tensor) and tuple(mean.shape) == (1, 4, 1)
    rmean, rvar = reference.moments(x.numpy(), (0, 2), keepdims=True)
    reference.assert_close(mean.numpy(), rmean, "mean")
    reference.assert_close(var.numpy(), rvar, "var")
    m0, v0 = fbn.moments(x, backend=backend)   # axis=None: 0-d tensors
    assert isinstance(m0, torch.Tensor) and m0.dim() == 0
    y = fbn.batch_normalization(x, mean, var, torch.tensor(0.5), None, 1e-3, backend=backend)
    assert isinstance(y, torch.Tensor)
    reference.assert_close(y.numpy(), reference.batch_normalization(
        x.numpy(), mean.numpy(), var.numpy(), 0.5, None, 1e-3), "y")


def test_out_tensor_is_returned_and_written(rng):
    x = tensor(rng, (4, 3, 5), np.float32)
    out = torch.empty_like(x)
    y, _, _ = fbn.batch_norm_train(x, out=out)
    assert y is out
    ry = reference.batch_norm_train(x.numpy())[0]
    reference.assert_close(out.numpy(), ry, "out")
    y2 = fbn.batch_norm_infer(x, None, None, torch.zeros(3), torch.ones(3), out=x)  # in place
    assert y2 is x
    dx, _, _ = fbn.batch_norm_backward(torch.ones_like(x), x, None, torch.zeros(3), torch.ones(3),
                                       out=out)
    assert dx is out


def test_tensor_calls_bind_arguments_as_python_does(rng):
    """The tensor wrapper matches arguments to names by position and keyword (not
    inspect's bind): every spelling of one call gives the same numbers, and a
    call that does not fit the signature gets Python's own TypeError."""
    x = tensor(rng, (4, 3, 5), np.float32)
    s, o, m, v = torch.rand(3) + 0.5, torch.rand(3), torch.rand(3), torch.rand(3) + 0.5
    want = fbn.batch_norm_infer(x.numpy(), s.numpy(), o.numpy(), m.numpy(), v.numpy())
    for args, kwargs in [((x, s, o, m, v), {}), ((x,), dict(scale=s, offset=o, mean=m, var=v)),
                         ((), dict(x=x, scale=s, offset=o, mean=m, var=v)),
                         ((x, s), dict(var=v, mean=m, offset=o, eps=torch.tensor(1e-5)))]:
        y = fbn.batch_norm_infer(*args, **kwargs)
        assert isinstance(y, torch.Tensor)
        np.testing.assert_array_equal(y.numpy(), want)
    with pytest.raises(TypeError, match="positional"):
        fbn.batch_norm_infer(x, s, o, m, v, 1)       # eps is keyword-only
    with pytest.raises(TypeError, match="unexpected keyword"):
        fbn.batch_norm_infer(x, s, o, m, v, epsilon=1e-3)
    with pytest.raises(TypeError, match="multiple values"):
        fbn.batch_norm_infer(x, s, o, m, v, scale=s)


def test_zero_copy_views(rng):
    """Outputs keep x's strides; running statistics are written through their own memory."""
    x = tensor(rng, (8, 3, 6, 6), np.float32, "channels_last")
    y, mean, _ = fbn.batch_norm_train(x)
    assert y.stride() == x.stride()   # channels_last kept, no reordering copy
    rm = torch.zeros(3)
    ptr = rm.data_ptr()
    fbn.batch_norm_train(x, running_mean=rm)
    assert rm.data_ptr() == ptr and rm.abs().sum() > 0


def test_sync_batchnorm_api_on_tensors(rng):
    xa, xb = tensor(rng, (3, 4, 5), np.float32), tensor(rng, (5, 4, 5), np.float32)
    parts = [fbn.partial_moments(xa), fbn.partial_moments(xb)]
    assert isinstance(parts[0].mean, torch.Tensor)
    total = fbn.merge_moments(*parts)
    assert isinstance(total, fbn.Moments) and isinstance(total.m2, torch.Tensor)
    y, mean, invstd = fbn.batch_norm_train_from_moments(xa, total)
    whole = np.concatenate([xa.numpy(), xb.numpy()])
    ry, rmean, rinv = reference.batch_norm_train(whole)[:3]
    reference.assert_close(y.numpy(), ry[:3], "y of shard a")
    reference.assert_close(mean.numpy(), rmean, "global mean")
    dy = tensor(rng, (3, 4, 5), np.float32, "contiguous", 0.0, 1.0)
    g = fbn.partial_grad_sums(dy, xa, mean, invstd)
    dx, ds, do = fbn.batch_norm_backward_from_sums(dy, xa, None, mean, invstd,
                                                   fbn.merge_grad_sums(g))
    assert isinstance(dx, torch.Tensor) and isinstance(ds, torch.Tensor)


def test_backend_for_tensor():
    x = torch.zeros(2, 3)
    assert fbn.backend_for(x) in ("numba", "cython", "numpy")
    with fbn.use_backend("numpy"):
        assert fbn.backend_for(x) == "numpy"


# -- what a view cannot honour ------------------------------------------------

def _unchanged(call, *tensors):
    before = [t.detach().clone() for t in tensors]
    with pytest.raises(TypeError) as info:
        call()
    for t, b in zip(tensors, before):
        assert torch.equal(t.detach(), b) or (torch.isnan(b).any())
    return str(info.value)


@pytest.mark.parametrize("arg", ["x", "scale", "offset"])
def test_requires_grad_names_the_argument(rng, arg):
    args = {"x": tensor(rng, (4, 3, 5), np.float32), "scale": torch.ones(3), "offset": torch.zeros(3)}
    args[arg] = args[arg].clone().requires_grad_(True)
    rm = torch.zeros(3)
    msg = _unchanged(lambda: fbn.batch_norm_train(args["x"], args["scale"], args["offset"],
                                                  running_mean=rm), rm)
    assert arg in msg and "requires grad" in msg and "fastbn.torch" in msg and ".detach()" in msg


def test_parameter_as_scale_names_it(rng):
    x = tensor(rng, (4, 3, 5), np.float32)
    w = torch.nn.Parameter(torch.ones(3))
    msg = _unchanged(lambda: fbn.batch_norm_infer(x, w, None, torch.zeros(3), torch.ones(3)))
    assert msg.startswith("scale ")


@pytest.mark.parametrize("arg", ["x", "running_var"])
def test_bfloat16_is_refused(rng, arg):
    x = tensor(rng, (4, 3, 5), np.float32)
    rv = torch.ones(3)
    if arg == "x":
        x = x.bfloat16()
    else:
        rv = rv.bfloat16()
    msg = _unchanged(lambda: fbn.batch_norm_train(x, running_var=rv), rv)
    assert arg in msg and "bfloat16" in msg


def test_mixing_numpy_and_tensors_is_refused(rng):
    x = tensor(rng, (4, 3, 5), np.float32)
    rm = torch.zeros(3)
    msg = _unchanged(lambda: fbn.batch_norm_train(x, np.ones(3, np.float32), running_mean=rm), rm)
    assert "scale" in msg and "torch" in msg
    msg = _unchanged(lambda: fbn.batch_norm_train(x.numpy(), torch.ones(3)))
    assert "scale" in msg
    out = np.empty((4, 3, 5), np.float32)
    msg = _unchanged(lambda: fbn.batch_norm_train(x, out=out))
    assert "out" in msg


def test_integer_tensor_is_a_type_error(rng):
    msg = _unchanged(lambda: fbn.batch_norm_train(torch.ones(4, 3, dtype=torch.int32)))
    assert "x" in msg and "float" in msg


def test_noncontiguous_running_stat_is_a_value_error(rng):
    x = tensor(rng, (4, 3, 5), np.float32)
    rm = torch.zeros(6)[::2]
    with pytest.raises(ValueError, match="running_mean"):
        fbn.batch_norm_train(x, running_mean=rm)
    assert torch.equal(rm, torch.zeros(3))


def test_overlapping_running_stats_are_refused(rng):
    x = tensor(rng, (4, 3, 5), np.float32)
    buf = torch.zeros(4)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        fbn.batch_norm_train(x, running_mean=buf[:3], running_var=buf[1:])
    assert torch.equal(buf, torch.zeros(4))


def test_empty_batch_of_tensors():
    x = torch.zeros(0, 3, 4)
    rm = torch.ones(3)
    y, mean, invstd = fbn.batch_norm_train(x, running_mean=rm)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape
    assert torch.isnan(mean).all() and torch.equal(rm, torch.ones(3))


def test_numpy_layer_refuses_tensors_with_a_pointer():
    with pytest.raises(TypeError, match="fastbn.torch"):
        fbn.BatchNorm(3)(torch.zeros(4, 3))


def test_tensor_dy_with_numpy_x_is_refused():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match="dy"):
        fbn.batch_norm_backward(torch.ones(4, 3), x, None, np.zeros(3, np.float32),
                                np.ones(3, np.float32))


def test_sync_batchnorm_refuses_dask_by_name():
    da = pytest.importorskip("dask.array")
    with pytest.raises(TypeError, match="x is a dask array"):
        fbn.partial_moments(da.zeros((4, 3)))


def test_sync_batchnorm_api_with_keyword_arguments(rng):
    """Tensors passed by keyword are recognised too (the first argument named, not placed)."""
    x = tensor(rng, (6, 4, 5), np.float32)
    part = fbn.partial_moments(x=x, channel_axis=1)
    assert isinstance(part.mean, torch.Tensor)
    y, mean, invstd = fbn.batch_norm_train_from_moments(x=x, moments=part)
    reference.assert_close(y.numpy(), reference.batch_norm_train(x.numpy())[0], "y")
    g = fbn.partial_grad_sums(dy=torch.ones_like(x), x=x, mean=mean, invstd=invstd)
    assert isinstance(g.sum_dy, torch.Tensor)

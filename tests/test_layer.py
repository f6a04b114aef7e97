"""The BatchNorm layer against float64 NumPy references and finite differences."""

import numpy as np
import pytest

import fastbn as fbn
import reference  # tests/reference.py, the float64 oracle (conftest puts tests/ on sys.path)


def random_layer(rng, C, dtype, **kw):
    """A layer with non-trivial scale/offset (so a mixed-up parameter cannot pass)."""
    bn = fbn.BatchNorm(C, dtype=dtype, **kw)
    if bn.affine:
        bn.scale[...] = rng.uniform(0.5, 2.0, C)
        bn.offset[...] = rng.normal(size=C)
    return bn


# shape, channel_axis: NCHW, NHWC, (N, C), NCL
LAYOUTS = [((4, 3, 5, 7), 1), ((4, 5, 7, 3), -1), ((16, 6), -1), ((5, 2, 9), 1)]


@pytest.mark.parametrize("dtype", reference.DTYPES)
@pytest.mark.parametrize("shape,channel_axis", LAYOUTS)
def test_train_forward_matches_reference(rng, make_array, dtype, shape, channel_axis):
    C = shape[channel_axis]
    bn = random_layer(rng, C, dtype, channel_axis=channel_axis)
    x = make_array(shape, dtype, channel_axis=channel_axis)
    x_before = x.copy()
    y = bn(x)
    assert y.dtype == dtype and y.shape == shape
    expected = reference.batch_norm_train(x, bn.scale, bn.offset, channel_axis, bn.eps)[0]
    reference.assert_close(y, expected, "y")
    np.testing.assert_array_equal(x, x_before)   # input untouched
    pdt = np.float32 if dtype == np.float16 else dtype
    for v in (bn.scale, bn.offset, bn.running_mean, bn.running_var):
        assert v.dtype == pdt


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,channel_axis", LAYOUTS)
def test_running_stats_and_eval_forward(rng, make_array, dtype, shape, channel_axis):
    """Several training steps update the running statistics as computed by hand
    (unbiased variance, PyTorch convention); eval mode then normalises with them."""
    C = shape[channel_axis]
    bn = random_layer(rng, C, dtype, channel_axis=channel_axis, momentum=0.3)
    rm, rv = np.zeros(C), np.ones(C)
    for _ in range(4):
        x = make_array(shape, dtype, channel_axis=channel_axis, loc=rng.normal(), sd=rng.uniform(0.5, 3))
        bn(x)
        mean, var = reference.moments(x, reference.reduced_axes(x.ndim, channel_axis))
        n = x.size // C
        rm = 0.7 * rm + 0.3 * mean
        rv = 0.7 * rv + 0.3 * var * n / (n - 1)
    assert bn.num_batches_tracked == 4
    reference.assert_close(bn.running_mean, rm, "running_mean")
    reference.assert_close(bn.running_var, rv, "running_var")

    assert bn.eval() is bn and bn.training is False
    x = make_array(shape, dtype, channel_axis=channel_axis)
    y = bn(x)
    reference.assert_close(y, reference.batch_norm_infer(x, bn.scale, bn.offset, bn.running_mean,
                                                         bn.running_var, channel_axis, bn.eps), "y")
    assert bn.num_batches_tracked == 4   # eval leaves the statistics alone
    reference.assert_close(bn.running_mean, rm, "running_mean")
    assert bn.train() is bn and bn.training is True


def test_momentum_none_is_cumulative_average(rng):
    """momentum=None: running stats are the plain average of all batches (PyTorch)."""
    bn = fbn.BatchNorm(3, momentum=None, dtype=np.float64)
    means, uvars = [], []
    for _ in range(5):
        x = rng.normal(rng.normal(size=(1, 3, 1)) * 5, 2.0, size=(8, 3, 4))
        bn(x)
        means.append(x.mean((0, 2)))
        uvars.append(x.var((0, 2), ddof=1))
    np.testing.assert_allclose(bn.running_mean, np.mean(means, axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.running_var, np.mean(uvars, axis=0), rtol=1e-12)


def check_backward(bn, x, rng):
    """bn.backward against finite differences of L = sum(w * bn(x)), float64."""
    w = rng.normal(size=x.shape)
    y = bn(x)
    dx = bn.backward(w)
    assert dx.shape == x.shape and dx.dtype == x.dtype

    def loss():   # (training-mode calls update running stats, which y does not depend on)
        return float((w * bn(x)).sum())

    params = [bn.scale, bn.offset] if bn.affine else []
    dscale, doffset = bn.dscale, bn.doffset
    if not bn.affine:
        assert dscale is None and doffset is None
    # central differences carry ~1e-8 absolute error on the loss's scale, so
    # a component near 0 is judged against the largest one
    for got, a in zip([dx, dscale, doffset], [x] + params):
        num = reference.numerical_gradient(loss, a)
        np.testing.assert_allclose(got, num, rtol=1e-6, atol=1e-7 * np.abs(num).max())
    return y


@pytest.mark.parametrize("shape,channel_axis", LAYOUTS[:3])
@pytest.mark.parametrize("affine", [True, False])
def test_train_backward_finite_differences(rng, shape, channel_axis, affine):
    bn = random_layer(rng, shape[channel_axis], np.float64, channel_axis=channel_axis, affine=affine)
    x = rng.normal(1.0, 2.0, size=shape)
    check_backward(bn, x, rng)


@pytest.mark.parametrize("shape,channel_axis", LAYOUTS[:3])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_backward_finite_differences(rng, shape, channel_axis, affine):
    """Eval mode is the fixed map (x - running_mean)*scale*invstd + offset."""
    C = shape[channel_axis]
    bn = random_layer(rng, C, np.float64, channel_axis=channel_axis, affine=affine)
    bn.running_mean[...] = rng.normal(size=C)
    bn.running_var[...] = rng.uniform(0.2, 3.0, C)
    bn.eval()
    x = rng.normal(1.0, 2.0, size=shape)
    check_backward(bn, x, rng)
    # and the closed form dx = dy * scale / sqrt(running_var + eps)
    w = rng.normal(size=shape)
    bn(x)
    a = (bn.scale if affine else 1.0) / np.sqrt(bn.running_var + bn.eps)
    reference.assert_close(bn.backward(w), w * reference.along(a, len(shape), channel_axis), "dx")


def test_eval_without_running_stats_uses_batch_stats(rng):
    """track_running_stats=False: eval mode normalises with the batch (PyTorch), and
    backward is the batch-statistics gradient."""
    bn = random_layer(rng, 3, np.float64, track_running_stats=False)
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    x = rng.normal(2.0, 3.0, size=(6, 3, 4))
    y_train = bn(x)
    reference.assert_close(y_train, reference.batch_norm_train(x, bn.scale, bn.offset, 1, bn.eps)[0], "y")
    bn.eval()
    np.testing.assert_allclose(bn(x), y_train, rtol=1e-14, atol=1e-14)
    check_backward(bn, x, rng)
    assert set(bn.state_dict()) == {"scale", "offset"}


def test_affine_false(rng):
    bn = fbn.BatchNorm(4, channel_axis=-1, affine=False)
    assert bn.scale is None and bn.offset is None
    x = rng.normal(3.0, 2.0, size=(10, 4)).astype(np.float32)
    y = bn(x)
    reference.assert_close(y, reference.batch_norm_train(x, None, None, -1, bn.eps)[0], "y")
    bn.backward(np.ones_like(y))
    assert bn.dscale is None and bn.doffset is None
    assert set(bn.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}


def test_float16_layer(rng):
    """float16 data, float32 per-channel arrays (API.md); float32 input also accepted."""
    bn = random_layer(rng, 3, np.float16)
    assert bn.param_dtype == np.float32
    assert all(v.dtype == np.float32 for v in (bn.scale, bn.offset, bn.running_mean, bn.running_var))
    x = rng.normal(size=(8, 3, 4, 4)).astype(np.float16)
    y = bn(x)
    assert y.dtype == np.float16
    dx = bn.backward(np.ones_like(y))
    assert dx.dtype == np.float16 and bn.dscale.dtype == np.float32 and bn.doffset.dtype == np.float32
    reference.assert_close(bn.doffset, np.full(3, 128.0), "doffset")
    assert bn(x.astype(np.float32)).dtype == np.float32


def test_state_dict_round_trip(rng):
    bn = random_layer(rng, 5, np.float32, channel_axis=-1)
    for _ in range(3):
        bn(rng.normal(2.0, 3.0, size=(7, 5)).astype(np.float32))
    state = bn.state_dict()
    assert set(state) == {"scale", "offset", "running_mean", "running_var", "num_batches_tracked"}
    assert state["num_batches_tracked"] == 3
    kept = {k: np.copy(v) for k, v in state.items()}
    state["scale"][...] = 0.0                     # a copy: the layer is unaffected
    assert np.all(bn.scale != 0.0)
    state["scale"][...] = kept["scale"]

    other = fbn.BatchNorm(5, channel_axis=-1)
    other.load_state_dict(state)
    state["running_mean"][...] = 99.0             # loaded as a copy too
    for k in ("scale", "offset", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(other, k), kept[k])
        assert getattr(other, k).dtype == np.float32
    assert other.num_batches_tracked == 3
    x = rng.normal(size=(4, 5)).astype(np.float32)
    np.testing.assert_array_equal(other.eval()(x), bn.eval()(x))


@pytest.mark.parametrize("edit,exc,match", [
    (lambda d: d.pop("running_var"), ValueError, "missing keys \\['running_var'\\]"),
    (lambda d: d.update(weight=np.ones(5)), ValueError, "unexpected keys \\['weight'\\]"),
    (lambda d: d.update(offset=np.zeros(4)), ValueError, "offset must have shape \\(5,\\)"),
    (lambda d: d.update(scale=np.ones(5, dtype=np.int64)), TypeError, "scale must be a float array"),
    (lambda d: d.update(num_batches_tracked=-1), ValueError, "num_batches_tracked"),
])
def test_load_state_dict_rejects_bad_state_and_changes_nothing(rng, edit, exc, match):
    bn = fbn.BatchNorm(5)
    bn(rng.normal(size=(4, 5, 3)).astype(np.float32))
    before = bn.state_dict()
    state = fbn.BatchNorm(5).state_dict()
    state["running_mean"][...] = 7.0              # a valid entry that must not be applied
    edit(state)
    with pytest.raises(exc, match=match):
        bn.load_state_dict(state)
    after = bn.state_dict()
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v)


def test_bad_input_raises_and_changes_nothing():
    bn = fbn.BatchNorm(3)
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    with pytest.raises(ValueError, match="num_features=3"):
        bn(np.zeros((4, 5, 2), np.float32))                 # 5 channels on axis 1
    with pytest.raises(TypeError, match="float64"):
        bn(np.zeros((4, 3, 2), np.float64))                 # float32 layer, float64 data
    with pytest.raises(TypeError, match="dtype"):
        bn(np.zeros((4, 3, 2), np.int32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(np.zeros((1, 3), np.float32))                    # n == 1 in training
    with pytest.raises(ValueError, match="channel_axis"):
        fbn.BatchNorm(3, channel_axis=3)(np.zeros((4, 3), np.float32))
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, rm)
    np.testing.assert_array_equal(bn.running_var, rv)
    # one sample per channel is fine in eval mode (running statistics)
    assert bn.eval()(np.ones((1, 3), np.float32)).shape == (1, 3)


def test_backward_errors(rng):
    bn = fbn.BatchNorm(3)
    with pytest.raises(RuntimeError, match="before a forward"):
        bn.backward(np.ones((4, 3), np.float32))
    bn(rng.normal(size=(4, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        bn.backward(np.ones((5, 3), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        bn.backward(np.ones((4, 3), np.float64))


@pytest.mark.parametrize("kwargs,exc", [
    (dict(num_features=0), ValueError), (dict(num_features=2.0), TypeError),
    (dict(eps=-1.0), ValueError), (dict(momentum=1.5), ValueError),
    (dict(dtype=np.int32), TypeError), (dict(channel_axis=1.0), TypeError),
])
def test_constructor_validates(kwargs, exc):
    kwargs = {"num_features": 3, **kwargs}
    with pytest.raises(exc):
        fbn.BatchNorm(**kwargs)


def test_repr_names_the_settings():
    r = repr(fbn.BatchNorm(30, channel_axis=-1, eps=1e-3, momentum=None, dtype=np.float64))
    assert r == ("BatchNorm(30, channel_axis=-1, eps=0.001, momentum=None, affine=True, "
                 "track_running_stats=True, dtype=float64)")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_backward_differentiates_the_forward_call(rng, mode):
    """An SGD update of scale between forward and backward (or a new state) does not
    change the gradient: backward belongs to the map of the last forward call."""
    bn = random_layer(rng, 3, np.float64).train(mode == "train")
    x = rng.normal(size=(6, 3, 2))
    w = rng.normal(size=x.shape)
    bn(x)
    expected = bn.backward(w)
    bn(x)
    bn.scale *= 3.0
    bn.load_state_dict({**bn.state_dict(), "running_var": np.full(3, 5.0)})
    np.testing.assert_array_equal(bn.backward(w), expected)


class _FakeCudaArray:
    """Looks like a device array to fastbn's dispatcher (never dereferenced)."""
    __cuda_array_interface__ = {"shape": (4, 3), "typestr": "<f4", "data": (0, False), "version": 3}
    dtype = np.dtype(np.float32)
    shape = (4, 3)
    ndim = 2


def test_cuda_input_without_cupy_is_a_clear_error_and_keeps_the_layer():
    """Parameters follow CUDA input to the GPU through CuPy; without CuPy that is a
    TypeError saying so, and the layer stays usable on the host."""
    from fastbn.layer import _cupy_module
    if _cupy_module() is not None:
        pytest.skip("CuPy is usable here: this test is about machines without it")
    bn = fbn.BatchNorm(3, channel_axis=-1)
    with pytest.raises(TypeError, match="CuPy is not installed"):
        bn(_FakeCudaArray())
    assert isinstance(bn.scale, np.ndarray) and isinstance(bn.running_mean, np.ndarray)
    assert bn(np.ones((4, 3), np.float32)).shape == (4, 3)


# -- state in place, PyTorch state dicts, float64 statistics, toggles, pickling (issues 12, 14) --

def test_load_state_dict_copies_in_place(rng):
    """References to the layer's arrays (an optimizer's) stay live after load_state_dict."""
    bn = fbn.BatchNorm(4)
    held = [bn.scale, bn.offset, bn.running_mean, bn.running_var]
    state = random_layer(rng, 4, np.float32).state_dict()
    state["num_batches_tracked"] = 5
    bn.load_state_dict(state)
    for name, arr in zip(("scale", "offset", "running_mean", "running_var"), held):
        assert getattr(bn, name) is arr
        np.testing.assert_array_equal(arr, state[name])
    assert bn.num_batches_tracked == 5


def test_load_state_dict_accepts_pytorch_state_dict(rng):
    torch = pytest.importorskip("torch")
    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0)
        ref.bias.normal_()
    ref(torch.randn(6, 3, 4, 4) * 2 + 1)
    ref(torch.randn(6, 3, 4, 4) * 2 + 1)
    bn = fbn.BatchNorm(3)
    held = bn.scale
    bn.load_state_dict(ref.state_dict())     # weight/bias keys, tensors, 0-d int64 tensor
    assert bn.scale is held and bn.num_batches_tracked == 2
    np.testing.assert_array_equal(bn.scale, ref.weight.detach().numpy())
    np.testing.assert_array_equal(bn.running_var, ref.running_var.numpy())
    x = rng.normal(size=(5, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(bn.eval()(x), ref.eval()(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-5, atol=1e-5)
    # NumPy arrays under PyTorch's names, too; mixing both names is refused
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    bn.load_state_dict(state)
    with pytest.raises(ValueError, match="unexpected keys"):
        bn.load_state_dict({**state, "scale": state["weight"]})
    with pytest.raises(TypeError, match="num_batches_tracked must be an int"):
        bn.load_state_dict({**state, "num_batches_tracked": torch.tensor(1.5)})


def test_backward_keeps_float64_batch_statistics(rng):
    """float32 x = 1e6 + randn: dscale and dx against the float64 oracle (the float32-
    rounded mean gave dscale off by 8e-3 relative; issue 14 item 7)."""
    bn = fbn.BatchNorm(4)
    x = (1e6 + rng.normal(size=(16, 4, 8, 8))).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    bn(x)
    dx = bn.backward(dy)
    ones = np.ones(4)
    _, mean, invstd = reference.batch_norm_train(x, ones, np.zeros(4), 1, bn.eps)[:3]
    rdx, rdscale, _ = reference.batch_norm_backward(dy, x, ones, mean, invstd, 1)
    np.testing.assert_allclose(bn.dscale, rdscale, rtol=1e-5, atol=1e-5 * np.abs(rdscale).max())
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-5 * np.abs(rdx).max())
    assert bn._saved[3].dtype == np.float64 and bn._saved[4].dtype == np.float64


def test_track_running_stats_switched_off_later_keeps_buffers_in_eval(rng):
    """As PyTorch (issue 14 item 8): no more updates in training, and eval mode keeps
    normalising with the stored statistics."""
    bn = random_layer(rng, 3, np.float64)
    bn(rng.normal(2.0, 3.0, size=(8, 3, 4)))
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    bn.track_running_stats = False
    bn(rng.normal(size=(8, 3, 4)))
    np.testing.assert_array_equal(bn.running_mean, rm)
    np.testing.assert_array_equal(bn.running_var, rv)
    assert bn.num_batches_tracked == 1
    x = rng.normal(size=(8, 3, 4))
    reference.assert_close(bn.eval()(x), reference.batch_norm_infer(x, bn.scale, bn.offset, rm, rv, 1,
                                                                    bn.eps), "y")


def test_pickle_and_copy_carry_state_not_the_last_input(rng):
    import copy
    import pickle
    bn = random_layer(rng, 8, np.float32)
    x = rng.normal(size=(32, 8, 28, 28)).astype(np.float32)
    bn(x)
    bn.backward(np.ones_like(x))
    blob = pickle.dumps(bn)
    assert len(blob) < 4096, len(blob)    # the input is 800 KB
    for clone in (pickle.loads(blob), copy.deepcopy(bn), copy.copy(bn)):
        for k, v in bn.state_dict().items():
            np.testing.assert_array_equal(clone.state_dict()[k], v)
        with pytest.raises(RuntimeError, match="before a forward"):
            clone.backward(np.ones_like(x))
        xe = x[:4]
        np.testing.assert_array_equal(clone.eval()(xe), copy.deepcopy(bn).eval()(xe))
    assert bn._saved is not None           # the original keeps what its backward needs

"""PyTorch's own BatchNorm module tests, run on fastbn.torch's modules.

Ported from PyTorch's test suite: the ModuleInfo cases of
``torch/testing/_internal/common_modules.py`` (``module_inputs_torch_nn_BatchNorm*``
and ``module_error_inputs_torch_nn_BatchNorm1d_2d_3d``, each run against
PyTorch's module in train and eval mode) and the ``test_batchnorm_*`` /
``test_BatchNorm_empty`` tests of ``test/test_nn.py`` (simple average, eval,
affine, update stats, stats not tracked, raising, empty batch, half input,
NHWC and non-contiguous CPU, load_state_dict).  Where PyTorch compares two
of its own code paths, fastbn's module is compared with PyTorch's.
"""

import itertools
from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import fastbn.torch as fbt  # noqa: E402

OURS = {nn.BatchNorm1d: fbt.BatchNorm1d, nn.BatchNorm2d: fbt.BatchNorm2d,
        nn.BatchNorm3d: fbt.BatchNorm3d}

# (torch class, constructor args, constructor kwargs, input shape, desc), from common_modules.py
MODULE_INPUTS = [
    (nn.BatchNorm1d, (10,), {}, (4, 10), "affine"),
    (nn.BatchNorm1d, (5,), {}, (4, 5, 3), "3d_input"),
    (nn.BatchNorm1d, (10, 1e-3, None), {}, (4, 10), "affine_simple_average"),
    (nn.BatchNorm1d, (10, 1e-3, 0.3, False), {}, (4, 10), "not_affine"),
    (nn.BatchNorm1d, (10, 1e-3, 0.3, True, False), {}, (4, 10), "not_tracking_stats"),
    (nn.BatchNorm1d, (5, 1e-3, 0.3, False), {}, (4, 5, 3), "3d_input_not_affine"),
    (nn.BatchNorm1d, (5, 1e-3, 0.3, False), {}, (0, 5, 9), "zero_batch"),
    (nn.BatchNorm1d, (10,), {"bias": False}, (4, 10), "affine_not_bias"),
    (nn.BatchNorm2d, (3,), {}, (2, 3, 6, 6), ""),
    (nn.BatchNorm2d, (3, 1e-3, None), {}, (2, 3, 6, 6), "2d_simple_average"),
    (nn.BatchNorm2d, (3, 1e-3, 0.8), {}, (2, 3, 6, 6), "momentum"),
    (nn.BatchNorm2d, (3, 1e-3, 0.8, False), {}, (2, 3, 6, 6), "not_affine"),
    (nn.BatchNorm2d, (3, 1e-3, 0.8, True, False), {}, (2, 3, 6, 6), "not_tracking_stats"),
    (nn.BatchNorm2d, (5, 1e-3, 0.3, False), {}, (0, 5, 2, 2), "zero_batch"),
    (nn.BatchNorm2d, (3,), {"bias": False}, (2, 3, 6, 6), "affine_not_bias"),
    (nn.BatchNorm3d, (3,), {}, (2, 3, 4, 4, 4), ""),
    (nn.BatchNorm3d, (3, 1e-3, None), {}, (2, 3, 4, 4, 4), "3d_simple_average"),
    (nn.BatchNorm3d, (3, 1e-3, 0.7), {}, (2, 3, 4, 4, 4), "momentum"),
    (nn.BatchNorm3d, (3, 1e-3, 0.7, False), {}, (2, 3, 4, 4, 4), "not_affine"),
    (nn.BatchNorm3d, (3, 1e-3, 0.7, True, False), {}, (2, 3, 4, 4, 4), "not_tracking_stats"),
    (nn.BatchNorm3d, (5, 1e-3, 0.3, False), {}, (0, 5, 2, 2, 2), "zero_batch"),
    (nn.BatchNorm3d, (3,), {"bias": False}, (2, 3, 4, 4, 4), "affine_not_bias"),
]


def _ids(case):
    return f"{case[0].__name__}-{case[4] or 'default'}"


def _pair(cls, args, kwargs, dtype):
    ref = cls(*args, dtype=dtype, **kwargs)
    ours = OURS[cls](*args, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _tol(dtype):
    return {"rtol": 1e-11, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case,memory", [
    pytest.param(case, memory, id=f"{_ids(case)}-{memory}") for case in MODULE_INPUTS
    for memory in (("contiguous", "channels_last") if len(case[3]) >= 4 else ("contiguous",))])
def test_module_inputs_match_pytorch(case, dtype, memory):
    """Each ModuleInfo case, 3 training steps then eval, forward and backward: output
    (values, dtype, layout), input/parameter gradients, buffers, state-dict keys."""
    cls, args, kwargs, shape, _ = case
    g = torch.Generator().manual_seed(hash((cls.__name__, args, shape)) % 2**31)
    ref, ours = _pair(cls, args, kwargs, dtype)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert repr(ours) == repr(ref)
    for training in (True, True, True, False):
        ref.train(training)
        ours.train(training)
        x = (1.5 + 2.0 * torch.randn(shape, generator=g, dtype=dtype))
        if memory == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4
                             else torch.channels_last_3d)
        dy = torch.randn(shape, generator=g, dtype=dtype)
        results = []
        for m in (ref, ours):
            xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
            m.zero_grad()
            y = m(xi)
            y.backward(dy)
            grads = [xi.grad] + [None if p is None else p.grad for p in (m.weight, m.bias)]
            results.append((y, grads))
        (y_ref, g_ref), (y, g_ours) = results
        assert y.dtype == y_ref.dtype and y.shape == y_ref.shape and y.stride() == y_ref.stride()
        torch.testing.assert_close(y, y_ref, **_tol(dtype))
        for a, e in zip(g_ours, g_ref):
            if e is None:
                assert a is None
            else:
                torch.testing.assert_close(a, e, **_tol(dtype))
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, **_tol(dtype))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("eps", [-1.0, 0.0])
@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm1d, (2, 10)), (nn.BatchNorm2d, (2, 10, 5, 5)),
                                       (nn.BatchNorm3d, (2, 10, 4, 4, 4))])
def test_module_error_inputs_match_pytorch(cls, shape, eps, training):
    """eps <= 0 in training, eps < 0 in eval: PyTorch's ValueError and message; nothing
    changes (fastbn checks before incrementing num_batches_tracked)."""
    x = torch.randn(shape)
    ref = cls(10, eps=eps).train(training)
    ours = OURS[cls](10, eps=eps).train(training)
    try:
        ref(x)
        ref_error = None
    except ValueError as exc:
        ref_error = str(exc)
    if ref_error is None:
        torch.testing.assert_close(ours(x), ref(x))
        return
    with pytest.raises(ValueError) as info:
        ours(x)
    assert str(info.value) == ref_error and "eps must be" in ref_error
    assert ours.num_batches_tracked.item() == 0


@pytest.mark.parametrize("cls,shape,msg", [
    (fbt.BatchNorm1d, (3,), "expected 2D or 3D input (got 1D input)"),
    (fbt.BatchNorm1d, (2, 3, 4, 5), "expected 2D or 3D input (got 4D input)"),
    (fbt.BatchNorm2d, (2, 3, 4), "expected 4D input (got 3D input)"),
    (fbt.BatchNorm3d, (2, 3, 4, 5), "expected 5D input (got 4D input)"),
])
def test_check_input_dim_messages(cls, shape, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        cls(3)(torch.randn(shape))


def test_batchnorm_raises_error_if_less_than_one_value_per_channel():
    x = torch.rand(10)[None, :, None]
    bn = fbt.BatchNorm1d(10)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, "
                                         r"got input size torch.Size\(\[1, 10, 1\]\)"):
        bn(x)
    assert bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_mean, torch.zeros(10))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fbt.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):   # batch stats in eval
        fbt.BatchNorm1d(10, track_running_stats=False).eval()(torch.rand(1, 10))
    assert fbt.BatchNorm1d(10).eval()(torch.rand(1, 10)).shape == (1, 10)


@pytest.mark.parametrize("size", [9, 11])
def test_batchnorm_raises_error_if_buffers_or_params_are_not_same_size_as_input(size):
    """test_batchnorm_raises_error_if_{running_mean,running_var,weight,bias}_is_not_same_size:
    through the module, PyTorch's RuntimeError."""
    for name in ("running_mean", "running_var", "weight", "bias"):
        bn = fbt.BatchNorm1d(10)
        with torch.no_grad():
            setattr(bn, name, nn.Parameter(torch.rand(size)) if name in ("weight", "bias")
                    else torch.rand(size))
        with pytest.raises(RuntimeError):
            bn(torch.rand(2, 10))


@pytest.mark.parametrize("dtype,module_dtype", [(torch.float32, torch.float32),
                                                (torch.float64, torch.float64),
                                                (torch.float16, torch.float32)])
def test_batchnorm_simple_average(dtype, module_dtype):
    module = fbt.BatchNorm1d(3, momentum=None).to(dtype=module_dtype)
    zeros, ones = torch.zeros(3, dtype=module_dtype), torch.ones(3, dtype=module_dtype)
    assert torch.equal(module.running_mean, zeros) and torch.equal(module.running_var, ones)
    data1, data2 = torch.rand(4, 3, dtype=dtype), torch.rand(4, 3, dtype=dtype)
    res1 = module(data1)
    running_mean1, running_var1 = module.running_mean.clone(), module.running_var.clone()
    assert not torch.equal(running_mean1, zeros) and not torch.equal(running_var1, ones)
    module.reset_running_stats()
    assert torch.equal(module.running_mean, zeros) and torch.equal(module.running_var, ones)
    res2 = module(data2)
    running_mean2, running_var2 = module.running_mean.clone(), module.running_var.clone()
    module.reset_running_stats()
    res3 = module(data1)
    res4 = module(data2)
    torch.testing.assert_close(res3, res1)
    torch.testing.assert_close(res4, res2)
    torch.testing.assert_close(module.running_mean, (running_mean1 + running_mean2) / 2)
    torch.testing.assert_close(module.running_var, (running_var1 + running_var2) / 2)


def _forward_backward(module, data, grad):
    """``(module(data), the gradient of data)`` for the output gradient ``grad``."""
    data.grad = None
    out = module(data)
    out.backward(grad)
    return out, data.grad.clone()


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype,module_dtype", [(torch.float32, torch.float32),
                                                (torch.float64, torch.float64),
                                                (torch.float16, torch.float32)])
def test_batchnorm_eval(ndim, dtype, module_dtype):
    module = fbt.BatchNorm1d(3).to(dtype=module_dtype)
    module.eval()
    data = torch.rand([3] * ndim, dtype=dtype, requires_grad=True)
    grad = torch.rand([3] * ndim, dtype=dtype)
    torch.testing.assert_close(_forward_backward(module, data, grad),
                               _forward_backward(module, data, grad))
    # track_running_stats=False: eval is the same as training
    module = fbt.BatchNorm1d(3, track_running_stats=False).to(dtype=module_dtype)
    data = torch.rand(4, 3, dtype=dtype, requires_grad=True)
    grad = torch.rand(4, 3, dtype=dtype)
    in_training = _forward_backward(module, data, grad)
    module.eval()
    torch.testing.assert_close(in_training, _forward_backward(module, data, grad))


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batchnorm_affine(ndim, dtype):
    module = fbt.BatchNorm1d(3, affine=False).to(dtype=dtype)
    module_affine = fbt.BatchNorm1d(3, affine=True).to(dtype=dtype)
    with torch.no_grad():
        module_affine.weight.fill_(1.0)
        module_affine.bias.zero_()
    data = torch.rand([3] * ndim, dtype=dtype, requires_grad=True)
    grad = torch.ones_like(data, requires_grad=False)
    torch.testing.assert_close(_forward_backward(module, data, grad),
                               _forward_backward(module_affine, data, grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batchnorm_update_stats(dtype):
    module = fbt.BatchNorm1d(3).to(dtype=dtype)
    data = torch.rand(4, 3, dtype=dtype)
    old_mean, old_var = module.running_mean.clone(), module.running_var.clone()
    old_nbt = module.num_batches_tracked.clone()
    module(data)
    assert not torch.equal(old_mean, module.running_mean)
    assert not torch.equal(old_var, module.running_var)
    assert torch.equal(old_nbt + 1, module.num_batches_tracked)
    module.eval()
    old_mean, old_var = module.running_mean.clone(), module.running_var.clone()
    old_nbt = module.num_batches_tracked.clone()
    module(data)
    assert torch.equal(old_mean, module.running_mean) and torch.equal(old_var, module.running_var)
    assert torch.equal(old_nbt, module.num_batches_tracked)


def test_batchnorm_buffer_update_when_stats_are_not_tracked():
    bn = fbt.BatchNorm1d(4, track_running_stats=True)
    bn.track_running_stats = False   # buffers used for normalisation but not updated
    num_batches, running_mean = bn.num_batches_tracked.clone(), bn.running_mean.clone()
    running_var = bn.running_var.clone()
    bn(torch.rand(32, 4))
    assert torch.equal(num_batches, bn.num_batches_tracked)
    assert torch.equal(running_mean, bn.running_mean) and torch.equal(running_var, bn.running_var)
    # ... and eval mode keeps using the stored buffers
    with torch.no_grad():
        bn.running_mean.fill_(2.0)
    x = torch.rand(8, 4)
    ref = nn.BatchNorm1d(4)
    ref.load_state_dict(bn.state_dict())
    ref.track_running_stats = False
    torch.testing.assert_close(bn.eval()(x), ref.eval()(x))


def test_batchnorm_empty():
    """test_BatchNorm_empty / _test_module_empty_input: empty output, zero gradients,
    running statistics untouched (num_batches_tracked counts the call, as PyTorch)."""
    mod = fbt.BatchNorm2d(3)
    inp = torch.randn(0, 3, 2, 2, requires_grad=True)
    out = mod(inp)
    out.backward(torch.rand_like(out))
    assert out.size() == inp.size()
    assert torch.equal(inp.grad, torch.zeros_like(inp))
    assert torch.equal(mod.running_mean, torch.zeros(3)) and torch.equal(mod.running_var, torch.ones(3))
    assert torch.equal(mod.weight.grad, torch.zeros(3)) and torch.equal(mod.bias.grad, torch.zeros(3))
    ref = nn.BatchNorm2d(3)
    ref(torch.randn(0, 3, 2, 2))
    assert mod.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1


def test_batchnorm_nonaffine_half_input():
    """test_batchnorm_nonaffine_cuda_half_input, on CPU: float16 input, float32 stats."""
    x = torch.randn(16, 3, 24, 24, dtype=torch.half)
    m = fbt.BatchNorm2d(3, affine=False).float()
    assert m(x).dtype == torch.half
    m.eval()
    assert m(x).dtype == torch.half


def test_batchnorm_half_overflow():
    """float16 input whose sums overflow float16: statistics accumulate in float32+,
    output and gradients stay finite and match PyTorch's."""
    x = (torch.randn(64, 2, 32, 32) * 3 + 1000).half().requires_grad_()
    bn, ref = fbt.BatchNorm2d(2), nn.BatchNorm2d(2)
    y = bn(x)
    y.float().pow(2).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    y_ref = ref(x)
    y_ref.float().pow(2).sum().backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(gx.float()).all()
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)


def test_batchnorm_large_batch():
    data = torch.rand(880801, 1, 1, 1)
    bn = fbt.BatchNorm2d(1)
    out = bn(data.requires_grad_())
    out.sum().backward()
    assert torch.isfinite(data.grad).all()


def test_batchnorm_nhwc_cpu():
    """test_batchnorm_nhwc_cpu: channels_last output, equal to the contiguous reference,
    for NC11, N1HW and general shapes."""
    for shape in [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)]:
        channels = shape[1]
        inp = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
        grad = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        bn = fbt.BatchNorm2d(channels)
        with torch.no_grad():
            bn.weight.uniform_()
            bn.bias.uniform_()
        ref_inp = inp.detach().clone().contiguous().requires_grad_()
        ref_bn = nn.BatchNorm2d(channels)
        ref_bn.load_state_dict(bn.state_dict())
        out = bn(inp)
        out.backward(grad)
        ref_out = ref_bn(ref_inp)
        ref_out.backward(grad.contiguous())
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert ref_out.is_contiguous()
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(bn.weight.grad, ref_bn.weight.grad)
        torch.testing.assert_close(bn.bias.grad, ref_bn.bias.grad)
        torch.testing.assert_close(inp.grad, ref_inp.grad)


def test_batchnorm_non_contig_cpu():
    inp = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    bn = fbt.BatchNorm2d(2).float().eval()
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    ref_bn = nn.BatchNorm2d(2).float().eval()
    ref_bn.load_state_dict(bn.state_dict())
    out = bn(inp)
    ref_out = ref_bn(inp.detach().clone().contiguous())
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref_out)


def test_batchnorm_load_state_dict():
    bn = fbt.BatchNorm2d(3)
    assert torch.equal(bn.state_dict()["num_batches_tracked"], torch.tensor(0))
    bn.num_batches_tracked = torch.tensor(10)
    assert torch.equal(bn.state_dict()["num_batches_tracked"], torch.tensor(10))
    bn.load_state_dict(OrderedDict(), strict=False)
    assert torch.equal(bn.state_dict()["num_batches_tracked"], torch.tensor(10))
    with torch.device("meta"):
        meta_bn = fbt.BatchNorm2d(3)
    assert meta_bn.num_batches_tracked.device == torch.device("meta")
    meta_bn.load_state_dict(OrderedDict(), assign=True, strict=False)
    assert torch.equal(meta_bn.state_dict()["num_batches_tracked"], torch.tensor(0))


@pytest.mark.parametrize("momentum,affine,track", list(itertools.product(
    [0.1, None], [True, False], [True, False])))
def test_constructor_and_factory_kwargs_as_pytorch(momentum, affine, track):
    kw = dict(eps=1e-3, momentum=momentum, affine=affine, track_running_stats=track,
              dtype=torch.float64, device="cpu")
    ours, ref = fbt.BatchNorm2d(7, **kw), nn.BatchNorm2d(7, **kw)
    assert isinstance(ours, nn.BatchNorm2d)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [(n, b.dtype) for n, b in ours.named_buffers()] == [(n, b.dtype) for n, b in ref.named_buffers()]
    assert repr(ours) == repr(ref)
    x = torch.randn(5, 7, 3, 2, dtype=torch.float64)
    for training in (True, False):
        torch.testing.assert_close(ours.train(training)(x), ref.train(training)(x))

"""fastbn.torch: autograd (gradcheck), layouts, dtypes, accuracy, state and convert().

The modules are compared with float64 finite differences (``gradcheck``),
with the float64 NumPy oracle (``reference``) and with PyTorch's own
``nn.BatchNorm*d`` on the same data.  PyTorch's module behaviours are in
test_torch_modules.py, the digits-CNN training bar in test_torch_cnn.py.
"""

import copy
import io
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import fastbn.torch as fbt  # noqa: E402
import reference  # noqa: E402  (tests/reference.py)

CLASSES = {1: (nn.BatchNorm1d, fbt.BatchNorm1d), 2: (nn.BatchNorm2d, fbt.BatchNorm2d),
           3: (nn.BatchNorm3d, fbt.BatchNorm3d)}


@pytest.fixture
def gen(rng):
    """A torch.Generator seeded from the test's printed NumPy seed."""
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


def randn(gen, *shape, dtype=torch.float64, loc=0.0, sd=1.0):
    return loc + sd * torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def layout(gen, shape, memory, dtype=torch.float64, loc=0.5, sd=2.0):
    """A leaf tensor of ``shape`` (N, C, ...) stored as ``memory``: "contiguous",
    "channels_last" (channels innermost, any ndim) or "strided" (a view with gaps,
    the gaps NaN so a kernel reading them fails)."""
    shape = tuple(shape)
    if memory == "contiguous":
        x = randn(gen, *shape, dtype=dtype, loc=loc, sd=sd)
    elif memory == "channels_last":
        perm = (0,) + tuple(range(2, len(shape))) + (1,)
        x = randn(gen, *[shape[p] for p in perm], dtype=dtype, loc=loc, sd=sd)
        x = x.permute(*np.argsort(perm).tolist())
    elif memory == "strided":
        big = list(shape)
        big[-1] = 2 * shape[-1] + 1
        big[0] += 1
        base = torch.full(big, float("nan"), dtype=dtype)
        view = base[1:, ..., 1::2]
        view.copy_(randn(gen, *shape, dtype=dtype, loc=loc, sd=sd))
        x = view
    else:
        raise ValueError(memory)
    return x.detach().requires_grad_()


def params(gen, C, dtype=torch.float64):
    w = (0.5 + torch.rand(C, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    b = randn(gen, C, dtype=dtype).requires_grad_()
    return w, b


# (shape, memory): NCHW, NHWC, (N, C), (N, C, L), NCDHW, NDHWC, strided views
GRAD_CASES = [((3, 4, 3, 2), "contiguous"), ((3, 4, 3, 2), "channels_last"),
              ((7, 3), "contiguous"), ((4, 3, 5), "contiguous"), ((4, 3, 5), "channels_last"),
              ((2, 3, 2, 3, 2), "contiguous"), ((2, 3, 2, 3, 2), "channels_last"),
              ((3, 4, 3, 2), "strided"), ((5, 3), "strided")]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,memory", GRAD_CASES)
def test_gradcheck(gen, shape, memory, affine, training):
    """Training (batch statistics) and eval (fixed running statistics) gradients."""
    C = shape[1]
    x = layout(gen, shape, memory)
    w, b = params(gen, C) if affine else (None, None)
    rm, rv = (None, None) if training else (randn(gen, C),
                                            0.2 + torch.rand(C, generator=gen, dtype=torch.float64))
    inputs = (x, w, b) if affine else (x,)

    def f(x, w=None, b=None):
        return fbt.BatchNormFunction.apply(x, w, b, rm, rv, training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,memory", GRAD_CASES)
def test_module_matches_torch_and_keeps_layout(gen, shape, memory, training):
    """Forward, all gradients and the running statistics equal PyTorch's module's
    (float64: to ~1e-12); the output and dx keep x's memory layout, as PyTorch's do."""
    ndim = len(shape) - 2
    ref_cls, cls = CLASSES[max(ndim, 1)]
    C = shape[1]
    ref, bn = ref_cls(C, momentum=0.3, dtype=torch.float64), cls(C, momentum=0.3, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0, generator=gen)
        ref.bias.normal_(generator=gen)
        ref.running_mean.normal_(generator=gen)
        ref.running_var.uniform_(0.5, 2.0, generator=gen)
    bn.load_state_dict(ref.state_dict())
    ref.train(training)
    bn.train(training)
    x = layout(gen, shape, memory)
    dy = randn(gen, *shape)
    y = bn(x)
    y.backward(dy)
    got = (y.detach(), x.grad, bn.weight.grad, bn.bias.grad)
    x.grad = None
    y_ref = ref(x)
    y_ref.backward(dy)
    for a, e in zip(got, (y_ref.detach(), x.grad, ref.weight.grad, ref.bias.grad)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-11)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(bn.state_dict()[k], v, rtol=1e-12, atol=1e-13)
    assert same_layout(y, y_ref) and same_layout(got[1], x.grad)   # PyTorch's layouts
    if memory == "channels_last" and len(shape) == 4:
        assert y.is_contiguous(memory_format=torch.channels_last)


def same_layout(a, b):
    """Same shape and the same strides on every axis longer than 1."""
    return a.shape == b.shape and all(s == 1 or p == q for s, p, q in zip(a.shape, a.stride(), b.stride()))


LAYOUT_CASES = {
    "NLC": lambda: torch.randn(4, 5, 3).permute(0, 2, 1),
    "(N,C).T": lambda: torch.randn(3, 7).t(),
    "channels_last": lambda: torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last),
    "channels_last_3d": lambda: torch.randn(2, 3, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d),
    "permuted_N1": lambda: torch.arange(6.0).reshape(1, 3, 2, 1).permute(0, 2, 1, 3),
    "NHCW": lambda: torch.randn(4, 5, 3, 6).permute(0, 2, 1, 3),
    "sliced": lambda: torch.randn(5, 3, 4, 9)[1:, :, :, 1::2],
    "sliced_channels_last": lambda: torch.randn(5, 4, 9, 3).permute(0, 3, 1, 2)[1:, :, :, 1::2],
    "NC11": lambda: torch.randn(4, 9, 1, 1).contiguous(memory_format=torch.channels_last),
    "N1HW": lambda: torch.randn(4, 1, 9, 9).contiguous(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
def test_output_and_grad_layouts_are_pytorchs(case, training):
    """y and dx come in the memory layout PyTorch's CPU batch norm gives them
    (channels_last stays channels_last, and so on), with PyTorch's values."""
    x = LAYOUT_CASES[case]()
    C = x.shape[1]
    ref_cls, cls = CLASSES[max(x.dim() - 2, 1)]
    out = []
    for m in (ref_cls(C).train(training), cls(C).train(training)):
        xi = x.detach().requires_grad_()
        y = m(xi)
        y.backward(torch.ones_like(y) + torch.arange(y.numel()).reshape(y.shape) % 3)
        out.append((y, xi.grad))
    (y_ref, dx_ref), (y, dx) = out
    assert same_layout(y, y_ref), (y.stride(), y_ref.stride())
    assert same_layout(dx, dx_ref), (dx.stride(), dx_ref.stride())
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
def test_channels_last_is_not_copied(gen, memory, monkeypatch):
    """fastbn sees the tensor's own memory (its NumPy view), not a contiguous copy,
    and writes y straight into the output tensor."""
    from fastbn import fastlane
    seen = []
    real = fastlane.train

    def spy(x, *a, **k):   # the lane takes both memory formats as they are
        r = real(x, *a, **k)
        if r is not None:
            seen.append((x.__array_interface__["data"][0], r[0].__array_interface__["data"][0]))
        return r

    monkeypatch.setattr(fastlane, "train", spy)
    x = layout(gen, (4, 6, 5, 3), memory, dtype=torch.float32)
    y = fbt.BatchNorm2d(6)(x)
    assert seen == [(x.data_ptr(), y.data_ptr())]
    assert y.stride() == x.stride()


def test_float32_and_float16_against_reference(gen):
    """float32 and float16 data (float32 parameters, as PyTorch's mixed mode) against
    the float64 oracle computed from the stored values."""
    for dtype in (torch.float32, torch.float16):
        bn = fbt.BatchNorm2d(5)   # float32 parameters
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0, generator=gen)
            bn.bias.normal_(generator=gen)
        x = layout(gen, (8, 5, 6, 7), "channels_last", dtype=dtype, loc=3.0)
        y = bn(x)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        xn = x.detach().double().numpy()
        w, b = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
        expected, mean, invstd = reference.batch_norm_train(xn, w, b, 1, 1e-5)[:3]
        reference.assert_close(y.detach().numpy(), expected, "y")
        dy = randn(gen, *x.shape, dtype=dtype)
        y.backward(dy)
        assert x.grad.dtype == dtype and bn.weight.grad.dtype == torch.float32
        dx, dscale, doffset = reference.batch_norm_backward(dy.double().numpy(), xn, w, mean, invstd, 1)
        reference.assert_close(x.grad.numpy(), dx, "dx")
        reference.assert_close(bn.weight.grad.numpy(), dscale, "dscale")
        reference.assert_close(bn.bias.grad.numpy(), doffset, "doffset")
        n = x.numel() // 5
        var_unbiased = xn.var(axis=(0, 2, 3)) * n / (n - 1)
        reference.assert_close(bn.running_var.numpy(), 0.9 + 0.1 * var_unbiased, "running_var")


def test_backward_accurate_at_large_mean(gen):
    """float32 x = 1e6 + randn (issue 14 item 7): the backward uses the float64 batch
    mean, so dscale and dx stay float32-accurate (the float32-rounded mean gave
    dscale off by 8e-3 relative)."""
    bn = fbt.BatchNorm2d(4)
    x = (1e6 + torch.randn(16, 4, 8, 8, generator=gen)).requires_grad_()
    dy = torch.randn(x.shape, generator=gen)
    bn(x).backward(dy)
    xn, dyn = x.detach().double().numpy(), dy.double().numpy()
    ones, zeros = np.ones(4), np.zeros(4)
    _, mean, invstd = reference.batch_norm_train(xn, ones, zeros, 1, 1e-5)[:3]
    dx, dscale, doffset = reference.batch_norm_backward(dyn, xn, ones, mean, invstd, 1)
    np.testing.assert_allclose(bn.weight.grad.numpy(), dscale, rtol=1e-5, atol=1e-5 * np.abs(dscale).max())
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=1e-4, atol=1e-5 * np.abs(dx).max())


def test_gradient_of_expanded_and_permuted_dy(gen):
    """dy as autograd hands it over: a stride-0 expansion (from .sum()) or another
    layout than x's."""
    x = layout(gen, (4, 3, 5, 2), "channels_last", dtype=torch.float32)
    bn, ref = fbt.BatchNorm2d(3), nn.BatchNorm2d(3)
    (bn(x) * 2.0).sum().backward()
    g = x.grad.clone()
    x.grad = None
    (ref(x) * 2.0).sum().backward()
    torch.testing.assert_close(g, x.grad, atol=1e-5, rtol=1e-5)
    dy = torch.randn(4, 3, 5, 2, generator=gen)   # contiguous, x is channels_last
    x.grad = None
    bn(x).backward(dy)
    g = x.grad.clone()
    x.grad = None
    ref(x).backward(dy)
    torch.testing.assert_close(g, x.grad, atol=1e-5, rtol=1e-4)


def test_double_backward_is_a_clear_error(gen):
    for training in (True, False):
        bn = fbt.BatchNorm2d(3, dtype=torch.float64).train(training)
        x = layout(gen, (4, 3, 2, 2), "contiguous")
        (gx,) = torch.autograd.grad(bn(x).pow(2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            gx.sum().backward()
    # without create_graph, nothing is wrapped: plain first-order gradients
    x = layout(gen, (4, 3, 2, 2), "contiguous")
    (gx,) = torch.autograd.grad(fbt.BatchNorm2d(3, dtype=torch.float64)(x).pow(2).sum(), x)
    assert not gx.requires_grad


def test_frozen_parameters_and_input_without_grad(gen):
    """Fine-tuning with frozen BN: weight/bias without grad get none; x without grad
    still gives the parameters theirs."""
    bn = fbt.BatchNorm2d(3).eval()
    bn.weight.requires_grad_(False)
    x = layout(gen, (4, 3, 2, 2), "contiguous", dtype=torch.float32)
    bn(x).sum().backward()
    assert bn.weight.grad is None and bn.bias.grad is not None and x.grad is not None
    bn = fbt.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2, generator=gen)).sum().backward()
    assert bn.weight.grad is not None
    torch.testing.assert_close(bn.bias.grad, torch.full((3,), 16.0))


def test_state_dicts_load_both_ways_and_save(gen):
    ref = nn.BatchNorm2d(6)
    ref(torch.randn(5, 6, 3, 3, generator=gen) * 3 + 1)
    with torch.no_grad():
        ref.weight.uniform_(generator=gen)
    bn = fbt.BatchNorm2d(6)
    bn.load_state_dict(ref.state_dict())
    assert list(bn.state_dict()) == list(ref.state_dict()) == [
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    for k, v in ref.state_dict().items():
        assert torch.equal(bn.state_dict()[k], v)
    bn(torch.randn(5, 6, 3, 3, generator=gen))
    back = nn.BatchNorm2d(6)
    back.load_state_dict(bn.state_dict())
    assert back.num_batches_tracked.item() == 2
    # torch.save / torch.load: the state dict (weights_only) and the whole module
    buf = io.BytesIO()
    torch.save(bn.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in bn.state_dict().items())
    buf = io.BytesIO()
    torch.save(bn, buf)
    buf.seek(0)
    whole = torch.load(buf, weights_only=False)
    assert type(whole) is fbt.BatchNorm2d
    x = torch.randn(2, 6, 3, 3, generator=gen)
    assert torch.equal(whole.eval()(x), bn.eval()(x))
    for clone in (pickle.loads(pickle.dumps(bn)), copy.deepcopy(bn)):
        assert type(clone) is fbt.BatchNorm2d and torch.equal(clone(x), bn(x))


def test_convert_swaps_every_batchnorm_and_keeps_state(gen):
    shared = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 4), shared),
                          nn.ModuleList([shared, nn.BatchNorm3d(2, affine=False, momentum=None)]))
    model[1].running_mean.fill_(0.25)
    model[1].num_batches_tracked.fill_(7)
    model[1].eval()
    model = model.double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old_weight = model[1].weight
    hook_calls = []
    model[1].register_forward_hook(lambda m, i, o: hook_calls.append(1))
    out = fbt.convert(model)
    assert out is model
    assert type(model[1]) is fbt.BatchNorm2d and type(model[3][2]) is fbt.BatchNorm1d
    assert type(model[4][1]) is fbt.BatchNorm3d and model[4][1].momentum is None
    assert model[4][0] is model[3][2]           # a shared module stays shared
    assert model[1].weight is old_weight         # same tensors: the optimizer keeps training them
    assert model[1].training is False and model[0].training is True
    assert model[1].running_mean.dtype == torch.float64
    assert list(model.state_dict()) == list(before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    model[1](torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)).sum().backward()
    assert hook_calls == [1]
    opt.step()
    assert not torch.equal(model[1].bias, before["1.bias"])
    single = fbt.convert(nn.BatchNorm2d(3))
    assert type(single) is fbt.BatchNorm2d
    with pytest.raises(TypeError, match="nn.Module"):
        fbt.convert("not a module")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch.jit.trace is deprecated
def test_fallbacks_run_pytorch_unchanged(gen):
    """What fastbn does not compute goes to F.batch_norm: bfloat16, float16 parameters,
    torch.func transforms, tracing; and dtype mixes PyTorch rejects raise PyTorch's error."""
    x = torch.randn(4, 3, 2, 2, generator=gen)
    for make in (lambda: (fbt.BatchNorm2d(3), x.bfloat16()),
                 lambda: (fbt.BatchNorm2d(3, dtype=torch.float16), x.half())):
        bn, xi = make()
        ref = nn.BatchNorm2d(3, dtype=bn.weight.dtype)
        assert torch.equal(bn(xi), ref(xi))
    with pytest.raises(RuntimeError, match="mixed dtype"):
        fbt.BatchNorm2d(3)(x.double())
    bn = fbt.BatchNorm2d(3).eval()
    y = torch.func.vmap(bn)(x.unsqueeze(0).expand(2, *x.shape))
    torch.testing.assert_close(y[0], nn.BatchNorm2d(3).eval()(x))
    traced = torch.jit.trace(fbt.BatchNorm2d(3).eval(), x)
    torch.testing.assert_close(traced(x), nn.BatchNorm2d(3).eval()(x))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch.jit.script is deprecated
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_jit_script_compiles_pytorchs_forward(gen, tmp_path, momentum):
    """``torch.jit.script`` on a converted model (deployment, export) compiles
    PyTorch's BatchNorm forward on the module's own parameters and buffers: the
    same outputs and running statistics as PyTorch's modules, train and eval;
    the eager model keeps fastbn's modules; save/load round-trips."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                             nn.Flatten(2), nn.BatchNorm1d(4, momentum=momentum))
    ref, ours = model(), fbt.convert(model())
    scripted = torch.jit.script(ours)
    assert type(ours[1]) is fbt.BatchNorm2d and type(ours[4]) is fbt.BatchNorm1d
    for step in range(3):
        x = torch.randn(5, 3, 7, 7, generator=gen)
        torch.testing.assert_close(scripted(x), ref(x))
    for a, b in zip(ref.state_dict().values(), ours.state_dict().values()):
        torch.testing.assert_close(b, a)   # the scripted model updated ours' buffers
    assert int(ours[1].num_batches_tracked) == 3
    scripted.eval()
    ref.eval()
    x = torch.randn(5, 3, 7, 7, generator=gen)
    torch.testing.assert_close(scripted(x), ref(x))
    path = str(tmp_path / "model.pt")
    torch.jit.save(scripted, path)
    torch.testing.assert_close(torch.jit.load(path)(x), ref(x))
    ours.eval()
    torch.testing.assert_close(ours(x), ref(x))   # eager: fastbn's forward


def test_import_fastbn_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, fastbn; fastbn.BatchNorm(3); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("grad", ["no_grad", "frozen", "inference_mode"])
@pytest.mark.parametrize("training", [True, False])
def test_calls_without_autograd_match_torch(gen, monkeypatch, grad, training):
    """Nothing to differentiate (torch.no_grad(), inference_mode, frozen parameters and
    an input without grad): the module skips the autograd node, and y, the running
    statistics and num_batches_tracked still equal PyTorch's; an empty batch too."""
    ref = nn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    bn = fbt.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0, generator=gen)
        ref.bias.normal_(generator=gen)
    bn.load_state_dict(ref.state_dict())
    ref.train(training)
    bn.train(training)
    if grad == "frozen":
        for m in (ref, bn):
            m.requires_grad_(False)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(
        grad, torch.enable_grad)
    monkeypatch.setattr(fbt, "_node",
                        lambda *a: pytest.fail("an autograd node with nothing to differentiate"))
    for shape, memory in (((4, 3, 5, 2), "contiguous"), ((2, 3, 1, 7), "channels_last"),
                          ((3, 3, 2, 3), "strided"), ((0, 3, 2, 2), "contiguous")):
        x = layout(gen, shape, memory).detach()
        with ctx():
            want, got = ref(x), bn(x)
        assert got.grad_fn is None and not got.requires_grad
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)
    for name, t in ref.state_dict().items():
        torch.testing.assert_close(bn.state_dict()[name], t, rtol=1e-11, atol=1e-12, msg=name)


@pytest.mark.parametrize("training", [True, False])
def test_parametrized_and_reassigned_members_are_used(gen, training):
    """The forward reads weight/bias/buffers from the module's dicts, falling back to
    attribute lookup: a parametrized weight (torch.nn.utils.parametrize: not in
    ``_parameters``) and buffers reassigned by ``bn.running_mean = t`` are the ones
    used, with the gradient reaching the parametrization's original, as PyTorch's."""
    from torch.nn.utils import parametrize

    class Softplus(nn.Module):
        def forward(self, w):
            return nn.functional.softplus(w)

    ref = nn.BatchNorm2d(3, dtype=torch.float64)
    bn = fbt.BatchNorm2d(3, dtype=torch.float64)
    w0, b0 = params(gen, 3)
    rm, rv = randn(gen, 3).detach(), (0.5 + torch.rand(3, generator=gen, dtype=torch.float64))
    for m in (ref, bn):
        with torch.no_grad():
            m.weight.copy_(w0)
            m.bias.copy_(b0)
        parametrize.register_parametrization(m, "weight", Softplus())
        m.running_mean = rm.clone()
        m.running_var = rv.clone()
        m.train(training)
    assert "weight" not in bn._parameters
    x = layout(gen, (4, 3, 2, 3), "contiguous")
    dy = randn(gen, 4, 3, 2, 3)
    want = ref(x)
    gx_want, gw_want = torch.autograd.grad(want, (x, ref.parametrizations.weight.original), dy)
    got = bn(x)
    gx, gw = torch.autograd.grad(got, (x, bn.parametrizations.weight.original), dy)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, gx_want, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gw, gw_want, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("training", [True, False])
def test_forward_mode_ad_gives_pytorchs_tangents(gen, training):
    """Inside ``torch.autograd.forward_ad.dual_level`` (forward-mode AD, which the
    Function has no jvp for) the module runs PyTorch's op: the same primal and
    tangent as torch.nn's, the running statistics updated alike; outside, fastbn."""
    import torch.autograd.forward_ad as fwAD

    ref = nn.BatchNorm2d(3, dtype=torch.float64).train(training)
    bn = fbt.BatchNorm2d(3, dtype=torch.float64).train(training)
    x = randn(gen, 4, 3, 2, 3, loc=0.5, sd=2.0)
    t = randn(gen, 4, 3, 2, 3)
    got = []
    for m in (ref, bn):
        with fwAD.dual_level():
            primal, tangent = fwAD.unpack_dual(m(fwAD.make_dual(x, t)))
        got.append((primal, tangent))
    torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1][1], got[0][1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-12, atol=1e-14)
    assert not fbt._transforms_active()   # the level is closed: fastbn's path again

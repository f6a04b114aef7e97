"""The digits CNN bar: PyTorch's BN vs fastbn.torch.convert, trained from the same seed.

Uses examples/torch_digits_cnn.py (the example is the model and loop under test).
"""

import copy
import importlib.util
import io
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
import fastbn.torch as fbt  # noqa: E402

_EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples",
                        "torch_digits_cnn.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("torch_digits_cnn", _EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def one_thread():
    # Deterministic conv/linear reductions and no oversubscription of a shared machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _losses(example, model, x, y, steps, dtype):
    return np.array(example.train(model.to(dtype), x.to(dtype), y, steps))


def test_digits_cnn_trains_like_pytorch(example, one_thread, rng):
    """float64: the issue's bar (per-step losses within 1e-5 over >= 50 steps) with room to spare.

    In float64 both batch norms are exact to ~1e-16, so the training runs agree
    to ~1e-14 for every seed.  (In float32 they agree to ~1e-6 for most seeds,
    but on some the 1-ulp rounding differences tip a ReLU or max-pool branch and
    the runs drift apart by 1e-3..1e-1 within 60 steps: PyTorch's own float32
    BN drifts as far from an exactly rounded float64 BN on those seeds.  The
    float32 test below checks the steps before any drift.)
    """
    seed = int(rng.integers(2**31))
    x, y, xt, yt = example.digits(seed)
    ref = example.make_model(seed).double()
    fast = fbt.convert(copy.deepcopy(ref))
    assert sum(isinstance(m, (fbt.BatchNorm1d, fbt.BatchNorm2d)) for m in fast.modules()) == 3
    steps = 60
    l_ref = _losses(example, ref, x, y, steps, torch.float64)
    l_fast = _losses(example, fast, x, y, steps, torch.float64)
    rel = np.abs(l_fast - l_ref) / np.abs(l_ref)
    assert rel.max() <= 1e-10, f"per-step losses differ by up to {rel.max():.2e} (relative)"
    assert l_ref[-10:].mean() < 0.5 * l_ref[0]   # it did train
    state_ref, state_fast = ref.state_dict(), fast.state_dict()
    assert list(state_ref) == list(state_fast)
    for k, v in state_ref.items():
        if k.endswith("num_batches_tracked"):
            assert v.item() == state_fast[k].item() == steps
        else:
            torch.testing.assert_close(state_fast[k], v, rtol=1e-9, atol=1e-12)
    xt = xt.double()
    # state dicts interchangeable both ways (through torch.save / torch.load)
    for src, dst in ((fast, example.make_model(seed + 1).double()),
                     (ref, fbt.convert(example.make_model(seed + 1).double()))):
        buf = io.BytesIO()
        torch.save(src.state_dict(), buf)
        buf.seek(0)
        dst.load_state_dict(torch.load(buf, weights_only=True))
        dst.eval()
        src.eval()
        with torch.no_grad():
            torch.testing.assert_close(dst(xt), src(xt))
    assert example.accuracy(fast, xt, yt) == example.accuracy(ref, xt, yt)


def _branches(model, x):
    """(is a max-pool, input) of ``model``'s ReLU and max-pool layers in a forward pass on ``x``."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(
        (isinstance(mod, torch.nn.MaxPool2d), args[0].detach().clone())))
        for m in model if isinstance(m, (torch.nn.ReLU, torch.nn.MaxPool2d))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _same_branches(ref, fast, x):
    """True if the two models' ReLUs and max-pools take the same branches on ``x``;
    where they do not, asserts that each differing branch was a near tie (the
    inputs a few float32 ulps apart), i.e. a rounding difference, not a wrong value."""
    same = True
    for (pool, a), (_, b) in zip(_branches(ref, x), _branches(fast, x)):
        tol = 1e-5 * float(a.abs().max())
        torch.testing.assert_close(b, a, rtol=0, atol=tol)
        if pool:   # 2x2 windows, as the example's MaxPool2d(2)
            ia = torch.nn.functional.max_pool2d(a, 2, return_indices=True)[1]
            ib = torch.nn.functional.max_pool2d(b, 2, return_indices=True)[1]
            if not torch.equal(ia, ib):
                same = False
            continue
        flips = (a > 0) != (b > 0)
        if flips.any():   # a ReLU input on either side of 0 by a rounding difference
            assert float(a[flips].abs().max()) <= tol
            same = False
    return same


def test_digits_cnn_float32_first_steps(example, one_thread, rng):
    """float32: the first gradients and the first two steps' losses agree with PyTorch's.

    A 1-ulp difference in a batch norm output can tip a ReLU or a max-pool
    branch: the gradient then flows through another element, and the runs drift
    apart (from step 3 or 4 on for ~3% of seeds; with such a tip in the first
    forward pass for ~2% of seeds, found on an AVX-512 host: one max-pool
    index, gradients 2% apart).  So the first seed (of up to six) on which both
    first forward passes take the same branches is compared, after checking
    that every differing branch was a near tie; later float32 steps are not
    compared (150 seeds: the first two steps within 2.1e-7, the first three
    within 9.2e-6, the first ten up to 1.1e-3 apart); the float64 test above
    covers the long run.
    """
    for _ in range(6):
        seed = int(rng.integers(2**31))
        x, y, _, _ = example.digits(seed)
        ref = example.make_model(seed)
        fast = fbt.convert(copy.deepcopy(ref))
        if _same_branches(ref, fast, x[:64]):
            break
    else:
        pytest.fail("six seeds in a row tipped a ReLU or max-pool branch in the first step")
    loss_fn = torch.nn.CrossEntropyLoss()
    for m in (ref, fast):
        loss_fn(m(x[:64]), y[:64]).backward()
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        scale = p_ref.grad.abs().max()
        err = (p_fast.grad - p_ref.grad).abs().max()
        assert err <= 1e-5 * scale, f"{name}: gradients differ by {err:.2e} (max |grad| {scale:.2e})"
    ref, fast = example.make_model(seed), fbt.convert(example.make_model(seed))
    l_ref = _losses(example, ref, x, y, 2, torch.float32)
    l_fast = _losses(example, fast, x, y, 2, torch.float32)
    rel = np.abs(l_fast - l_ref) / np.abs(l_ref)
    assert rel.max() <= 1e-5, f"per-step losses differ by up to {rel.max():.2e} (relative)"

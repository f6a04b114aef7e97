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


def test_digits_cnn_trains_like_pytorch(example, one_thread, rng):
    seed = int(rng.integers(2**31))
    x, y, xt, yt = example.digits(seed)
    ref = example.make_model(seed)
    fast = fbt.convert(copy.deepcopy(ref))
    assert sum(isinstance(m, (fbt.BatchNorm1d, fbt.BatchNorm2d)) for m in fast.modules()) == 3
    steps = 60
    l_ref = np.array(example.train(ref, x, y, steps))
    l_fast = np.array(example.train(fast, x, y, steps))
    rel = np.abs(l_fast - l_ref) / np.abs(l_ref)
    assert rel.max() <= 1e-5, f"per-step losses differ by up to {rel.max():.2e} (relative)"
    assert l_ref[-10:].mean() < 0.5 * l_ref[0]   # it did train
    state_ref, state_fast = ref.state_dict(), fast.state_dict()
    assert list(state_ref) == list(state_fast)
    for k, v in state_ref.items():
        if k.endswith("num_batches_tracked"):
            assert v.item() == state_fast[k].item() == steps
        else:
            torch.testing.assert_close(state_fast[k], v, rtol=1e-4, atol=1e-5)
    # state dicts interchangeable both ways (through torch.save / torch.load)
    acc = example.accuracy(ref, xt, yt)
    for src, dst in ((fast, example.make_model(seed + 1)), (ref, fbt.convert(example.make_model(seed + 1)))):
        buf = io.BytesIO()
        torch.save(src.state_dict(), buf)
        buf.seek(0)
        dst.load_state_dict(torch.load(buf, weights_only=True))
        dst.eval()
        src.eval()
        with torch.no_grad():
            torch.testing.assert_close(dst(xt), src(xt))
    assert abs(example.accuracy(fast, xt, yt) - acc) <= 0.01

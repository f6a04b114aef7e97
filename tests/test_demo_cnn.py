"""``python -m fastbn demo cnn``: its NumPy CNN is right (float64 finite differences,
direct loops), ``--style tf`` computes what ``fbn.BatchNorm`` computes, and the
command runs and reports."""

import re

import numpy as np
import pytest

import reference as ref  # tests/reference.py (conftest puts tests/ on sys.path)
from fastbn import demo_cnn as dc
from fastbn import demo_nn as nn
from fastbn.__main__ import main

pytest.importorskip("sklearn")

#: A small net with every piece of the demo's: stride 2 and 1, padding, pooling, 2 dense layers.
SMALL = {"image": 8, "channels": (3, 4, 5), "strides": (2, 1, 1), "pools": (False, True, True),
         "hidden": 6, "classes": 4}


def _conv_loop(x, W, b, stride, pad):
    """Direct definition: y[n, f, i, j] = b[f] + sum_{c,u,v} W[f,c,u,v] xp[n, c, s i + u, s j + v]."""
    N, C, H, W_ = x.shape
    F, _, k, _ = W.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    Ho, Wo = (H + 2 * pad - k) // stride + 1, (W_ + 2 * pad - k) // stride + 1
    y = np.empty((N, F, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            patch = xp[:, :, stride * i:stride * i + k, stride * j:stride * j + k]
            y[:, :, i, j] = np.einsum("ncuv,fcuv->nf", patch, W) + b
    return y


@pytest.mark.parametrize("stride,pad,shape", [(1, 1, (3, 2, 7, 5)), (2, 1, (2, 3, 8, 9)),
                                              (2, 0, (4, 1, 9, 7)), (1, 0, (1, 4, 5, 6))])
def test_conv_and_pool_forward_match_direct_loops(stride, pad, shape):
    rng = np.random.default_rng([11, stride, pad])
    x = rng.standard_normal(shape)
    W, b = rng.standard_normal((5, shape[1], 3, 3)), rng.standard_normal(5)
    y = nn.Conv2D(W, b, stride, pad).forward(x)
    np.testing.assert_allclose(y, _conv_loop(x, W, b, stride, pad), rtol=1e-12, atol=1e-12)
    z = rng.standard_normal((2, 3, 6, 4))
    pooled = nn.MaxPool2().forward(z)
    want = np.array([[[[z[n, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max() for j in range(2)] for i in range(3)]
                      for c in range(3)] for n in range(2)])
    np.testing.assert_array_equal(pooled, want)


def _loss(net, x, labels):
    return nn.softmax_cross_entropy(net.forward(x), labels)[0]


def _check(f, p, g, rng, what):
    """The derivative of the scalar f() along directions in ``p`` (moved in place, then
    restored) by central differences, against ``g``: two random directions and three
    single coordinates."""
    dirs = [rng.standard_normal(p.shape) for _ in range(2)]
    for _ in range(3):
        e = np.zeros(p.shape)
        e.flat[rng.integers(p.size)] = 1.0
        dirs.append(e)
    p0 = p.copy()
    t = np.zeros(())   # the step along the direction, which numerical_gradient perturbs
    for v in dirs:
        v = v / np.linalg.norm(v)

        def moved(v=v):
            p[...] = p0 + t * v
            return f()
        fd = float(ref.numerical_gradient(moved, t))
        p[...] = p0
        an = float(np.sum(g * v))
        assert abs(fd - an) <= 1e-7 + 1e-6 * abs(an), (what, fd, an)


@pytest.mark.parametrize("bn,training", [(None, True), ("layer", True), ("layer", False), ("tf", True),
                                         ("tf", False)])
def test_cnn_gradients_match_float64_finite_differences(bn, training):
    """Every parameter tensor (conv/im2col, pool, dense, softmax-CE, BN scale and offset)
    and the input: BN in training mode (batch statistics, through which every
    image's gradient depends on the others) and in eval mode (running statistics)."""
    rng = np.random.default_rng([5, (None, "layer", "tf").index(bn), training])
    params = [(W * 1.5, rng.standard_normal(b.shape) * 0.1)
              for W, b in dc.init_params(rng, SMALL, np.float64)]
    net = dc.CNN(params, bn, SMALL, np.float64)
    x = rng.standard_normal((7, 1, 8, 8))
    labels = rng.integers(0, SMALL["classes"], 7)
    for norm in net.bns:   # scale, offset and running statistics away from 1, 0
        state = norm.state_dict()
        c = len(state["scale"])
        state.update(scale=rng.uniform(0.5, 2, c), offset=rng.normal(0, 0.5, c),
                     running_mean=rng.normal(0, 0.5, c), running_var=rng.uniform(0.3, 2, c))
        norm.load_state_dict(state)
    net.train(training)
    loss, grads, dx = net.loss_and_grads(x, labels)
    assert len(grads) == len(net.params) == 10 + (10 if bn else 0)
    assert np.isclose(loss, _loss(net, x, labels), rtol=1e-14)
    for i, (p, g) in enumerate(zip(net.params, grads)):
        assert g.shape == p.shape
        _check(lambda: _loss(net, x, labels), p, g, rng, f"parameter {i}")
    _check(lambda: _loss(net, x, labels), x, dx, rng, "input")


def test_tf_style_matches_the_layer_per_step():
    """``moments`` + ``batch_normalization`` with the EMA written out against ``fbn.BatchNorm``,
    float32, each step from the same state: loss, gradients, running statistics
    and the eval-mode loss and gradients agree to float32 rounding."""
    xtr, ytr, _, _ = dc.load_data(3)
    # The upsampled digits hold ~14 distinct values per image, so max-pool windows
    # hold exact ties that float32 and float64 (and BLAS builds: numpy 2.4's took
    # another branch on every step of this test) break apart differently; a little
    # noise leaves only near-ties, which rounding rarely reaches.
    xtr = (xtr + np.random.default_rng(0).normal(0, 1e-2, xtr.shape)).astype(xtr.dtype)
    with dc._one_blas_thread():
        worst = dc.compare_styles(xtr, ytr, steps=4, seed=3, batch=32)
    assert worst["loss"] < 1e-5 and worst["eval_loss"] < 1e-5, worst
    assert worst["running"] < 1e-5, worst
    assert worst["eval_grads"] < 1e-4, worst
    # Training-mode gradients of biases just before a BN nearly cancel, so their float32
    # rounding error reaches ~1e-4 (measured against float64 for both styles).
    assert worst["grads"] < 1e-3 and max(worst["grads_f32"], worst["grads_tf_f32"]) < 1e-3, worst
    assert worst["branch_steps"] < 4, worst    # gradients were compared on some step


def test_tf_style_moving_averages_are_the_layers():
    """decay = 1 - momentum, unbiased variance: the update ops give fbn.BatchNorm's running statistics."""
    import fastbn as fbn
    rng = np.random.default_rng(8)
    layer = fbn.BatchNorm(3, momentum=0.25, eps=1e-3, dtype=np.float64)
    tf = nn.TFStyleBatchNorm(3, momentum=0.25, eps=1e-3, dtype=np.float64)
    for _ in range(3):
        x = rng.normal(2.0, 3.0, (5, 3, 4, 2))
        np.testing.assert_allclose(tf(x), layer(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tf.running_mean, layer.running_mean, rtol=1e-12)
    np.testing.assert_allclose(tf.running_var, layer.running_var, rtol=1e-12)
    assert not np.allclose(tf.running_var, 1.0)


def test_batch_statistics_accuracy_leaves_the_net_as_it_was():
    rng = np.random.default_rng(2)
    net = dc.CNN(dc.init_params(rng, SMALL), "layer", SMALL)
    x = rng.standard_normal((9, 1, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 4, 9)
    before = [p.copy() for p in net.params], net.state()
    dc.accuracy(net, x, labels, training=True)
    assert all(np.array_equal(a, b) for a, b in zip(before[0], net.params))
    for s0, bn in zip(before[1], net.bns):
        np.testing.assert_array_equal(s0["running_mean"], bn.running_mean)
        np.testing.assert_array_equal(s0["running_var"], bn.running_var)
    # the optimizer's references are still the layers' arrays (load_state_dict copies in place)
    assert net.params[0] is net.bns[0].scale and net.params[1] is net.bns[0].offset


def _rows(out):
    return {int(m[0]): m[1] for m in re.findall(r"^\s+(\d+) \|(.*)$", out, flags=re.M)}


def test_demo_cnn_runs_reports_and_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "cnn.png"
    assert main(["demo", "cnn", "--epochs", "2", "--seed", "4", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 30_000
    rows = _rows(out)
    assert sorted(rows) == [0, 1, 2]
    accs = [float(v) for v in rows[2].split("|")[1].split()]
    assert len(accs) == 3 and all(0 <= a <= 1 for a in accs)
    assert accs[1] > 0.5                       # the BN net learns in 2 epochs (chance: 0.1)
    assert re.search(r"^\s+90 %\s+(epoch|not reached)", out, flags=re.M), out
    assert "about 5x faster" in out and f"figure written to {png}" in out


def test_demo_cnn_tf_style_runs_and_checks_itself(capsys):
    assert main(["demo", "cnn", "--style", "tf", "--epochs", "1", "--no-plot"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"largest relative differences: loss (\S+), gradients (\S+), "
                  r"running statistics (\S+);", out)
    assert m, out
    assert float(m[1]) < 1e-5 and float(m[2]) < 1e-3 and float(m[3]) < 1e-5
    assert "fbn.moments + fbn.batch_normalization" in out and sorted(_rows(out)) == [0, 1]


@pytest.mark.parametrize("argv,flag", [(["demo", "cnn", "--steps", "3"], "--steps"),
                                       (["demo", "mlp", "--epochs", "3"], "--epochs"),
                                       (["demo", "--style", "tf"], "--style"),
                                       (["demo", "cnn", "--epochs", "0"], "--epochs")])
def test_options_of_the_other_demo_are_refused(argv, flag):
    with pytest.raises(SystemExit, match=flag):
        main(argv)

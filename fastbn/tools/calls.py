"""``python -m fastbn bench --calls``: what a small call costs outside its kernel.

For each public function (and the ``BatchNorm`` layer's forward and backward,
both modes) on small NumPy inputs (and the fused three on CPU tensors, where
PyTorch is installed and not ``--no-torch``), the whole call against the default
backend's fused kernel alone, called with arguments prepared beforehand (its
(outer, C, inner) views and outputs): the difference is the per-call cost of
the checks, the layout plan, the output allocation and the Python around them.
``out=`` is given where the function takes it; the layer allocates.  Timed
with the shared harness (interleaved repeats, min and median).  With PyTorch, a
second table: a training step (forward + backward through autograd) of
``fastbn.torch``'s BatchNorm module against ``torch.nn``'s on the same inputs.
"""

import numpy as np

from .. import dispatch
from . import harness

#: (name, shape, channel_axis): small inputs where the per-call cost shows
SHAPES = [("NCHW", (4, 16, 4, 4), 1), ("NHWC", (4, 4, 4, 16), -1), ("(N, C)", (64, 16), -1)]


def _pairs(bk, shape, axis, rng, with_torch=False):
    """``[(label, whole call, kernel alone)]`` for one float32 input shape (and, with
    ``with_torch``, the fused functions on CPU tensors)."""
    import fastbn as fbn

    ax = axis % len(shape)
    C = shape[ax]
    axes = tuple(a for a in range(len(shape)) if a != ax)
    x = rng.standard_normal(shape).astype(np.float32) + 3
    dy = rng.standard_normal(shape).astype(np.float32)
    s, o, m, v = (rng.uniform(0.5, 2, C).astype(np.float32) for _ in range(4))
    rm, rv = m.copy(), v.copy()
    y = np.empty_like(x)
    x3 = (x.reshape(-1, C, 1) if ax == len(shape) - 1
          else x.reshape(int(np.prod(shape[:ax])), C, -1))
    dy3, y3 = dy.reshape(x3.shape), y.reshape(x3.shape)
    s1, s2 = np.empty(C, np.float32), np.empty(C, np.float32)
    f1, f2 = np.empty(C), np.empty(C)
    keep = tuple(C if a == ax else 1 for a in range(len(shape)))
    layer, frozen = fbn.BatchNorm(C, channel_axis=axis), fbn.BatchNorm(C, channel_axis=axis)
    frozen.eval()
    layer(x)
    frozen(x)
    train = lambda: bk.train_small3(x3, s, o, 1e-5, 0.1, rm, rv, y3, s1, s2)  # noqa: E731
    infer = lambda: bk.infer_small3(x3, s, o, m, v, 1e-5, y3)  # noqa: E731
    back = lambda: bk.backward_small3(dy3, x3, s, m, v, y3, s1, s2)  # noqa: E731
    iback = lambda: bk.infer_backward_small3(dy3, x3, s, m, v, 1e-5, y3, s1, s2)  # noqa: E731
    pairs = [
        ("batch_norm_train", lambda: fbn.batch_norm_train(
            x, s, o, channel_axis=axis, running_mean=rm, running_var=rv, out=y), train),
        ("batch_norm_infer", lambda: fbn.batch_norm_infer(x, s, o, m, v, channel_axis=axis, out=y),
         infer),
        ("batch_norm_backward", lambda: fbn.batch_norm_backward(
            dy, x, s, m, v, channel_axis=axis, out=y), back),
        ("batch_norm_infer_backward", lambda: fbn.batch_norm_infer_backward(
            dy, x, s, m, v, channel_axis=axis, out=y), iback),
        ("moments", lambda: fbn.moments(x, axes), lambda: bk.moments_small3(x3, 0, s1, s2)),
        ("batch_normalization", lambda: fbn.batch_normalization(
            x, m.reshape(keep), v.reshape(keep), o.reshape(keep), s.reshape(keep), 1e-5, out=y),
         infer),
        ("BatchNorm forward (train)", lambda: layer(x),
         lambda: bk.train_small3(x3, s, o, 1e-5, 0.1, rm, rv, y3, f1, f2)),
        ("BatchNorm backward (train)", lambda: layer.backward(dy), back),
        ("BatchNorm forward (eval)", lambda: frozen(x), infer),
        ("BatchNorm backward (eval)", lambda: frozen.backward(dy), iback),
    ]
    if with_torch:   # the same calls on CPU tensors over the same memory (the torch family)
        import torch
        xt, dyt, yt, st, ot, mt, vt, rmt, rvt = (torch.from_numpy(a)
                                                for a in (x, dy, y, s, o, m, v, rm, rv))
        pairs += [
            ("batch_norm_train, tensors", lambda: fbn.batch_norm_train(
                xt, st, ot, channel_axis=axis, running_mean=rmt, running_var=rvt, out=yt), train),
            ("batch_norm_infer, tensors", lambda: fbn.batch_norm_infer(
                xt, st, ot, mt, vt, channel_axis=axis, out=yt), infer),
            ("batch_norm_backward, tensors", lambda: fbn.batch_norm_backward(
                dyt, xt, st, mt, vt, channel_axis=axis, out=yt), back),
        ]
    return pairs


def run(args):
    """Print the table; returns 0 (1 when the default backend has no fused kernels)."""
    bk = dispatch.numpy_default()
    if getattr(bk, "infer_backward_small3", None) is None:
        print(f"bench --calls: the default backend ({bk.NAME}) has no fused small kernels")
        return 1
    repeat = args.repeat or (3 if args.quick else 15)
    rng = np.random.default_rng(0)
    print(f"Per-call cost outside the kernel, float32, backend {bk.NAME}, "
          f"{repeat} repeats (us, min / median)\n")
    print("| input | function | whole call | kernel alone | outside the kernel (min) |")
    print("|---|---|---|---|---|")
    import importlib.util
    with_torch = not getattr(args, "no_torch", False) and importlib.util.find_spec("torch") is not None
    for name, shape, axis in SHAPES:
        runners = []
        for label, whole, kern in _pairs(bk, shape, axis, rng, with_torch):
            runners += [harness.Runner(label, whole, "fastbn"), harness.Runner(label, kern, "kernel")]
        harness.measure(runners, repeat, min_batch=0.002 if args.quick else 0.01)
        for w, k in zip(runners[::2], runners[1::2]):
            (wmin, wmed), (kmin, kmed) = harness.min_median(w.times), harness.min_median(k.times)
            print(f"| {name} {shape} | {w.label} | {wmin * 1e6:.2f} / {wmed * 1e6:.2f} | "
                  f"{kmin * 1e6:.2f} / {kmed * 1e6:.2f} | {(wmin - kmin) * 1e6:.2f} |")
    if with_torch:
        _modules_table(repeat, args.quick, rng)
    return 0


def _module_steps(shape, axis, rng):
    """``(fastbn.torch step, torch.nn step)``: a training forward + backward of each
    BatchNorm module on the same float32 ``x`` (NCHW order; channels_last memory where
    ``axis`` is the last axis), ``x`` requiring grad."""
    import torch
    from .. import torch as fbt

    x = rng.standard_normal(shape).astype(np.float32) + 3
    xt = torch.from_numpy(x)
    if axis % len(shape) == len(shape) - 1 and len(shape) > 2:
        xt = xt.movedim(-1, 1)   # channels_last memory, as a tensor in (N, C, ...) order
    xt.requires_grad_(True)
    dy = torch.empty_like(xt).copy_(torch.from_numpy(rng.standard_normal(xt.shape).astype(np.float32)))
    cls = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    C = xt.shape[1]

    def step(module):
        def run():
            module(xt).backward(dy)
            xt.grad = None
        return run
    return step(getattr(fbt, cls)(C)), step(getattr(torch.nn, cls)(C))


def _modules_table(repeat, quick, rng):
    """fastbn.torch's BatchNorm modules against torch.nn's, a training step each
    (forward + backward through autograd), on the same small inputs."""
    print("\nfastbn.torch vs torch.nn BatchNorm modules, training forward + backward "
          f"through autograd, float32, {repeat} repeats (us, min / median)\n")
    print("| input | fastbn.torch | torch.nn | torch.nn / fastbn.torch (min) |")
    print("|---|---|---|---|")
    for name, shape, axis in SHAPES:
        ours, theirs = _module_steps(shape, axis, rng)
        runners = [harness.Runner("module step", ours, "fastbn"),
                   harness.Runner("module step", theirs, "torch")]
        harness.measure(runners, repeat, min_batch=0.002 if quick else 0.01)
        (fmin, fmed), (tmin, tmed) = (harness.min_median(r.times) for r in runners)
        print(f"| {name} {shape} | {fmin * 1e6:.1f} / {fmed * 1e6:.1f} | "
              f"{tmin * 1e6:.1f} / {tmed * 1e6:.1f} | {tmin / fmin:.2f} |")

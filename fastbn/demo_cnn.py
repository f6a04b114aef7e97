"""``python -m fastbn demo cnn``: a small CNN with and without batch norm, NumPy + fastbn.

After the two convolutional tutorials this project started from: the
TensorFlow MNIST one (conv 32 -> pool -> conv 64 -> pool -> dense 1024 -> 10,
``tf.nn.moments`` + ``tf.nn.batch_normalization`` with an ``is_training``
switch and update ops, Adam lr 0.001) and the CIFAR-10 one
(``tf.layers.batch_normalization`` before every conv and dense layer of a
3-conv / 2-dense net, filters 30/50/60, 3x3 kernels, strides 2/1/1, Adam),
which reported that the net with BN reached its accuracy about 5x faster.

- data: scikit-learn's bundled 8x8 digits (1797 images, no download),
  pixels / 16, upsampled to 16x16 (each pixel repeated 2x2) so that the
  stride-2 first convolution keeps an 8x8 map; a stratified 30 % test split;
  NCHW float32;
- network (the CIFAR tutorial's layer sizes, the MNIST tutorial's pooling)::

      [BN] conv 30 3x3 stride 2 pad 1 -> ReLU                 (30, 8, 8)
      [BN] conv 50 3x3 stride 1 pad 1 -> ReLU -> max-pool 2   (50, 4, 4)
      [BN] conv 60 3x3 stride 1 pad 1 -> ReLU -> max-pool 2   (60, 2, 2)
      flatten -> [BN] dense 100 -> ReLU -> [BN] dense 10 -> softmax cross-entropy

  ``[BN]`` (the BN net only): batch norm before every conv and dense layer,
  as in the CIFAR tutorial, TensorFlow's epsilon 1e-3, momentum 0.1
  (TensorFlow ``decay = 0.9``); weights Glorot-uniform and biases 0
  (``tf.layers``' defaults); Adam lr 0.001, mini-batches of 50, 12 epochs
  (``--epochs``).
- Both nets start from the same weights and see the same batches.  Training
  mode uses batch statistics and updates the running statistics; the test
  accuracy, measured after every epoch, uses the running statistics
  (``is_training=False``).  For comparison the BN net's test accuracy with the
  test set's own batch statistics is shown too, marked as such.

``--style tf`` builds the BN net from ``fbn.moments`` + ``fbn.batch_normalization``
with the moving averages written out (``demo_nn.TFStyleBatchNorm``) instead of
``fbn.BatchNorm``, and first checks, step by step, that it computes what the
layer computes.  Nothing is tuned: the numbers printed are what the run gives.
"""

import time

import numpy as np

import fastbn as fbn

from . import demo_nn as nn

DTYPE = np.float32
IMAGE = 16                      # digits are upsampled 8x8 -> 16x16
BATCH = 50
LR = 1e-3
EPS = 1e-3                      # TensorFlow's batch-norm epsilon
MOMENTUM = 0.1                  # TensorFlow's decay = 1 - momentum = 0.9
TEST_FRACTION = 0.3
THRESHOLDS = (0.90, 0.95, 0.97)

#: The demo's architecture; tests build smaller ones with the same keys.
ARCH = {"image": IMAGE, "channels": (30, 50, 60), "strides": (2, 1, 1), "pools": (False, True, True),
        "hidden": 100, "classes": 10}


def load_data(seed):
    """The digits as ``(x_train, y_train, x_test, y_test)``: images ``(N, 1, 16, 16)``
    float32 in [0, 1], labels ``(N,)`` int64; a stratified 30 % test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).repeat(2, axis=1).repeat(2, axis=2)[:, None].astype(DTYPE)
    xtr, xte, ytr, yte = train_test_split(x, digits.target, test_size=TEST_FRACTION,
                                          stratify=digits.target, random_state=seed)
    return xtr, ytr.astype(np.int64), xte, yte.astype(np.int64)


def _shapes(arch):
    """[(kind, weight shape, stride)] for the 5 weight layers, and the flattened size."""
    c_in, size, out = 1, arch["image"], []
    for c, s, pool in zip(arch["channels"], arch["strides"], arch["pools"]):
        out.append(("conv", (c, c_in, 3, 3), s))
        size = (size + 2 - 3) // s + 1
        size //= 2 if pool else 1
        c_in = c
    flat = c_in * size * size
    out += [("dense", (flat, arch["hidden"]), None), ("dense", (arch["hidden"], arch["classes"]), None)]
    return out, flat


def init_params(rng, arch=ARCH, dtype=DTYPE):
    """[(W, b)] for the 5 weight layers: Glorot-uniform W (conv ``(F, C, 3, 3)``,
    dense ``(n_in, n_out)``), b = 0."""
    params = []
    for kind, shape, _ in _shapes(arch)[0]:
        if kind == "conv":
            fan_in, fan_out = shape[1] * 9, shape[0] * 9
            n_out = shape[0]
        else:
            fan_in, fan_out = shape
            n_out = shape[1]
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        params.append((rng.uniform(-limit, limit, shape).astype(dtype), np.zeros(n_out, dtype)))
    return params


class CNN:
    """The demo's CNN (see the module docstring), optionally with batch norm.

    ``params``: as ``init_params`` returns (copied).  ``bn``: None (no batch
    norm), ``"layer"`` (``fbn.BatchNorm``) or ``"tf"`` (``TFStyleBatchNorm``).
    Input ``(N, 1, image, image)``; logits ``(N, classes)``.
    """

    def __init__(self, params, bn=None, arch=ARCH, dtype=DTYPE):
        if bn not in (None, "layer", "tf"):
            raise ValueError(f"bn must be None, 'layer' or 'tf', got {bn!r}")
        self.style = bn
        shapes, _ = _shapes(arch)
        pools = list(arch["pools"]) + [False, False]
        self.layers, self.bns, self.taps, self.tap_names = [], [], [], []
        for i, ((kind, wshape, stride), (W, b), pool) in enumerate(zip(shapes, params, pools)):
            if bn is not None:
                c = wshape[1] if kind == "conv" else wshape[0]
                norm = (fbn.BatchNorm(c, eps=EPS, momentum=MOMENTUM, dtype=dtype) if bn == "layer"
                        else nn.TFStyleBatchNorm(c, eps=EPS, momentum=MOMENTUM, dtype=dtype))
                self.bns.append(norm)
                self.layers.append(nn.BN(norm))
            if kind == "conv":
                self.layers.append(nn.Conv2D(W.copy(), b.copy(), stride=stride, pad=1))
                name = f"conv{i + 1}"
            else:
                if shapes[i - 1][0] == "conv":
                    self.layers.insert(len(self.layers) - (bn is not None), nn.Flatten())
                self.layers.append(nn.Dense(W.copy(), b.copy()))
                name = f"dense{i - len(arch['channels']) + 1}"
            if i < len(shapes) - 1:
                self.layers.append(nn.ReLU())
                self.tap_names.append(f"{name} ReLU output")
            else:
                self.tap_names.append(f"{name} output (logits)")
            self.taps.append(len(self.layers) - 1)     # index of the layer whose output is tapped
            if pool:
                self.layers.append(nn.MaxPool2())
        self.params = [p for layer in self.layers for p in layer.params]

    def train(self, mode=True):
        """Training (batch statistics, running statistics updated) or eval mode."""
        for bn in self.bns:
            bn.train(mode)
        return self

    def forward(self, x, keep=False):
        """Logits ``(N, classes)``; with ``keep``, also the tapped activations
        (each hidden layer's ReLU output, and the logits) as a list."""
        acts = []
        for i, layer in enumerate(self.layers):
            x = layer.forward(x)
            if keep and i in self.taps:
                acts.append(x)
        return (x, acts) if keep else x

    def loss_and_grads(self, x, labels):
        """Loss, gradients (aligned with ``params``) and ``dL/dx`` for one batch,
        in the current mode."""
        loss, d = nn.softmax_cross_entropy(self.forward(x), labels)
        for layer in reversed(self.layers):
            d = layer.backward(d)
        return loss, [g for layer in self.layers for g in layer.grads], d

    def branches(self):
        """The last forward's decisions at the non-smooth points: every ReLU's
        ``x > 0`` mask and every max-pool's winner per window."""
        return [layer._pos if isinstance(layer, nn.ReLU) else layer._arg for layer in self.layers
                if isinstance(layer, (nn.ReLU, nn.MaxPool2))]

    def predict(self, x, batch=600):
        """Class predictions ``(N,)`` in the current mode, ``batch`` images at a time."""
        return np.concatenate([self.forward(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])

    def state(self):
        """Copies of the BN layers' states (to evaluate in training mode and restore)."""
        return [bn.state_dict() for bn in self.bns]

    def load_state(self, states):
        for bn, s in zip(self.bns, states):
            bn.load_state_dict(s)


def accuracy(net, x, labels, training=False):
    """Test accuracy in eval mode (running statistics) or, with ``training``, with
    the whole of ``x`` as one batch; the running statistics are left as they were."""
    if not training:
        return float(np.mean(net.train(False).predict(x) == labels))
    saved = net.state()
    acc = float(np.mean(net.train(True).forward(x).argmax(1) == labels))
    net.load_state(saved)
    return acc


def compare_styles(x, labels, steps, seed=0, arch=ARCH, dtype=DTYPE, batch=BATCH):
    """Per-step check that the ``--style tf`` BN net computes what the ``fbn.BatchNorm`` net does.

    Before every step the tf-style net (and a float64 copy of the layer net)
    is given the layer net's exact state (weights, BN parameters and running
    statistics), so that each step is compared from the same point; they then
    take a training step on the same batch and an eval-mode forward/backward
    on it.  Returns the largest relative difference seen over ``steps``
    steps, per quantity: ``loss`` (training loss), ``grads`` (max over tensors
    of max|g1 - g2| / max|g1|), ``running`` (the updated running statistics),
    ``eval_loss`` and ``eval_grads`` (eval mode).  For scale, ``grads_f32`` and
    ``grads_tf_f32``: the same measure between the float32 layer (tf-style)
    net's gradients and the float64 net's, i.e. their float32 rounding error
    (large for a bias whose gradient nearly cancels in the next BN's backward).

    Rounding can tip a ReLU or max-pool decision (a value within an ulp of 0,
    two window values within an ulp of each other): the nets then take a
    different branch of a non-smooth function and their gradients differ by
    more than rounding.  Such a step's gradients are left out of the
    comparison; ``branch_steps`` counts them (a gradient comparison is made
    when two nets took the same branches everywhere).
    """
    rng = np.random.default_rng(seed)
    params = init_params(rng, arch, dtype)
    ref, tf = CNN(params, "layer", arch, dtype), CNN(params, "tf", arch, dtype)
    ref64 = CNN(params, "layer", arch, np.float64)
    opt = nn.Adam(ref.params, LR)
    worst = dict.fromkeys(("loss", "grads", "running", "eval_loss", "eval_grads", "grads_f32",
                           "grads_tf_f32", "branch_steps"), 0.0)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))

    def grads_rel(key, a, b, same_branches):
        if same_branches:
            worst[key] = max(worst[key], max(rel(g, h) for g, h in zip(a, b)))
        return same_branches

    for step in range(steps):
        idx = rng.choice(len(x), batch, replace=False)
        xb, yb = x[idx], labels[idx]
        for net in (tf, ref64):
            for p, q in zip(net.params, ref.params):
                p[...] = q
            net.load_state(ref.state())
        g64 = ref64.train(True).loss_and_grads(xb.astype(np.float64), yb)[1]
        b64 = ref64.branches()
        results = [net.train(True).loss_and_grads(xb, yb) for net in (ref, tf)]
        b_ref, b_tf = ref.branches(), tf.branches()
        ok = [grads_rel("grads_f32", g64, results[0][1], _same(b64, b_ref)),
              grads_rel("grads_tf_f32", g64, results[1][1], _same(b64, b_tf)),
              grads_rel("grads", results[0][1], results[1][1], _same(b_ref, b_tf))]
        worst["loss"] = max(worst["loss"], rel(results[0][0], results[1][0]))
        for a, b in zip(ref.bns, tf.bns):
            worst["running"] = max(worst["running"], rel(a.running_mean, b.running_mean),
                                   rel(a.running_var, b.running_var))
        evals = [net.train(False).loss_and_grads(xb, yb) for net in (ref, tf)]
        worst["eval_loss"] = max(worst["eval_loss"], rel(evals[0][0], evals[1][0]))
        ok.append(grads_rel("eval_grads", evals[0][1], evals[1][1], _same(ref.branches(), tf.branches())))
        worst["branch_steps"] += not all(ok)
        opt.step(results[0][1])
    worst["branch_steps"] = int(worst["branch_steps"])
    return worst


def _same(a, b):
    return all(np.array_equal(u, v) for u, v in zip(a, b))


def train(nets, data, epochs, rng, log=print):
    """Train ``nets`` ({"without BN": CNN, "with BN": CNN}) side by side for ``epochs``
    epochs (the same batches, drawn from ``rng``); ``log`` gets each epoch's table row.

    Returns a history dict: ``epoch`` [0..epochs]; per net name ``loss``
    (mean training loss of each epoch, NaN at epoch 0), ``acc`` (test accuracy,
    eval mode), ``seconds`` (cumulative training time, evaluation excluded),
    ``steps`` (every step's training loss); and ``batch_acc`` for the BN net
    (test accuracy with the test set's own statistics).
    """
    xtr, ytr, xte, yte = data
    hist = {"epoch": [0]}
    for name, net in nets.items():
        hist[name] = {"loss": [np.nan], "acc": [accuracy(net, xte, yte)], "seconds": [0.0], "steps": []}
        if net.bns:
            hist[name]["batch_acc"] = [accuracy(net, xte, yte, training=True)]
    log(_row(hist, 0))
    opts = {name: nn.Adam(net.params, LR) for name, net in nets.items()}
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(xtr))
        batches = [order[i:i + BATCH] for i in range(0, len(order) - BATCH + 1, BATCH)]  # full batches only
        for name, net in nets.items():
            h, t0, losses = hist[name], time.perf_counter(), []
            net.train(True)
            for idx in batches:
                loss, grads, _ = net.loss_and_grads(xtr[idx], ytr[idx])
                opts[name].step(grads)
                losses.append(loss)
            h["seconds"].append(h["seconds"][-1] + time.perf_counter() - t0)
            h["steps"] += losses
            h["loss"].append(float(np.mean(losses)))
            h["acc"].append(accuracy(net, xte, yte))
            if "batch_acc" in h:
                h["batch_acc"].append(accuracy(net, xte, yte, training=True))
        hist["epoch"].append(epoch)
        log(_row(hist, len(hist["epoch"]) - 1))
    return hist


NAMES = ("without BN", "with BN")


def _header():
    return ("\n epoch |  train loss: without BN   with BN | test accuracy: without BN   with BN   "
            "(BN, test-set stats) | train seconds: without BN  with BN\n" + "-" * 134)


def _row(hist, i):
    a, b = hist[NAMES[0]], hist[NAMES[1]]
    loss = "" if i == 0 else f"{a['loss'][i]:10.4f} {b['loss'][i]:9.4f}"
    return (f" {hist['epoch'][i]:5d} | {loss:>33} | {a['acc'][i]:25.3f} {b['acc'][i]:9.3f} "
            f"{b['batch_acc'][i]:22.3f} | {a['seconds'][i]:25.1f} {b['seconds'][i]:8.1f}")


def first_reaching(hist, name, threshold):
    """(epoch, cumulative training seconds) at which ``name``'s test accuracy first
    reached ``threshold``, or None."""
    for e, acc, s in zip(hist["epoch"], hist[name]["acc"], hist[name]["seconds"]):
        if e > 0 and acc >= threshold:
            return e, s
    return None


def targets(hist):
    """The accuracies the speed-up is measured at: [(label, accuracy)].

    The fixed ``THRESHOLDS``, then the tutorial's measure: the test accuracy
    the net without BN ends the run with ("BN reached its accuracy 5x faster")."""
    final = hist[NAMES[0]]["acc"][-1]
    return ([(f"{100 * t:.0f} %", t) for t in THRESHOLDS]
            + [(f"{100 * final:.1f} % (where the net without BN ends)", final)])


def speedups(hist):
    """[(label, accuracy, reach without BN, reach with BN, speed-up text)] for ``targets``.

    A reach is ``(epoch, seconds)`` or None; the speed-up is the ratio of the
    epochs (and of the training seconds) the two nets needed, or, when only
    the BN net got there, a lower bound on the epoch ratio."""
    epochs = hist["epoch"][-1]
    out = []
    for label, t in targets(hist):
        a, b = first_reaching(hist, NAMES[0], t), first_reaching(hist, NAMES[1], t)
        if a and b:
            speed = f"{a[0] / b[0]:.2g}x in epochs, {a[1] / b[1]:.2g}x in seconds"
        elif b:
            speed = f"> {epochs / b[0]:.2g}x in epochs (without BN: not within {epochs} epochs)"
        elif a:
            speed = "none: only the net without BN got there"
        else:
            speed = "neither net got there"
        out.append((label, t, a, b, speed))
    return out


def _reach(r):
    return "not reached" if r is None else f"epoch {r[0]:2d} ({r[1]:4.1f} s)"


def report(hist):
    """Print the epochs/seconds-to-X% table and the speed-up, next to the tutorial's 5x."""
    epochs = hist["epoch"][-1]
    rows = speedups(hist)
    print("\ntest accuracy reached (eval mode)                   without BN         with BN            "
          "speed-up from BN")
    for label, t, a, b, speed in rows:
        print(f"  {label:50}{_reach(a):19}{_reach(b):19}{speed}")
    print(f"\nafter {epochs} epochs: test accuracy without BN {hist[NAMES[0]]['acc'][-1]:.3f}, with BN "
          f"{hist[NAMES[1]]['acc'][-1]:.3f}; training time without BN {hist[NAMES[0]]['seconds'][-1]:.1f} s, "
          f"with BN {hist[NAMES[1]]['seconds'][-1]:.1f} s (seconds on this machine, noisy when it is shared)")
    print(f"The CIFAR-10 tutorial reported that the net with BN reached its accuracy about 5x faster; "
          f"here, to the {100 * rows[-1][1]:.1f} % test accuracy the net without BN ends with: "
          f"{rows[-1][4]}.")


def run(args):
    t0 = time.perf_counter()
    epochs = 12 if args.epochs is None else args.epochs
    if epochs < 1:
        raise SystemExit("--epochs must be >= 1")
    seed = 1 if args.seed is None else args.seed
    style = args.style or "layer"
    try:
        import sklearn  # noqa: F401  (the digits)
    except ImportError:
        raise SystemExit("demo cnn needs scikit-learn for its data (the bundled digits): "
                         "pip install 'fastbn[demo]'") from None
    out = args.out or ("bn_demo_cnn_tf.png" if style == "tf" else "bn_demo_cnn.png")
    data = load_data(seed)
    rng = np.random.default_rng(seed)
    params = init_params(rng)
    print(f"fastbn {fbn.__version__} demo cnn: scikit-learn digits upsampled to {IMAGE}x{IMAGE}, "
          f"{len(data[0])} training / {len(data[2])} test images; seed {seed}; fastbn backend: "
          f"{fbn.backend_for(data[0])}")
    print(f"net: conv 30/50/60 3x3 strides 2/1/1 (pool after conv 2 and 3), dense 100, dense 10; "
          f"ReLU; Glorot-uniform weights; Adam lr {LR}, batch {BATCH}")
    bn_what = ("fbn.moments + fbn.batch_normalization, moving averages written out (--style tf)"
               if style == "tf" else "fbn.BatchNorm")
    print(f"with BN: batch norm before every conv and dense layer ({bn_what}), eps {EPS:g}, "
          f"momentum {MOMENTUM:g} (TensorFlow decay {1 - MOMENTUM:g})")
    if style == "tf":
        with _one_blas_thread():
            w = compare_styles(data[0], data[1], steps=10, seed=seed)
        print("--style tf against fbn.BatchNorm, 10 training steps each from the same state; largest "
              f"relative differences: loss {w['loss']:.1e}, gradients {w['grads']:.1e}, running "
              f"statistics {w['running']:.1e}; eval mode: loss {w['eval_loss']:.1e}, gradients "
              f"{w['eval_grads']:.1e}; for scale, the gradients' float32 rounding error (against "
              f"float64): layer {w['grads_f32']:.1e}, tf style {w['grads_tf_f32']:.1e}"
              + (f" ({w['branch_steps']} step(s) where rounding tipped a ReLU or max-pool decision: "
                 "gradients not compared there)" if w["branch_steps"] else ""))
    nets = {NAMES[0]: CNN(params, None), NAMES[1]: CNN(params, style)}
    with _one_blas_thread():
        t_warm = warm_up(params, style, data)
    print(f"fastbn's first calls (Numba compiling or loading its kernels) took {t_warm:.1f} s, on a "
          "throw-away copy of the BN net; not counted below.")
    print("test accuracy in eval mode (running statistics); '(BN, test-set stats)' normalises with the "
          "statistics of the\nwhole test set instead (training mode), for comparison; train seconds: "
          "cumulative, evaluation excluded.")
    print(_header())
    with _one_blas_thread():
        hist = train(nets, data, epochs, rng, log=print)
    report(hist)
    if not args.no_plot:
        _plot(out, hist, nets, data, args, seed, style)
    print(f"wall time {time.perf_counter() - t0:.1f} s (includes Numba compilation on a first run)")
    return 0


def warm_up(params, style, data):
    """One training and one eval step of a throw-away BN net, so that fastbn's
    one-time costs (Numba compiling its kernels, or loading them from the
    cache) are not counted as the BN net's training time.  Returns seconds."""
    t0 = time.perf_counter()
    net = CNN(params, style)
    x, labels = data[0][:BATCH], data[1][:BATCH]
    for mode in (True, False):
        net.train(mode).loss_and_grads(x, labels)
    net.predict(data[2])
    return time.perf_counter() - t0


class _one_blas_thread:
    """Run the block with one BLAS thread (restored afterwards).

    These matrix products are small (at most 3200 x 270 by 270 x 50); on a
    loaded 2-core machine OpenBLAS's second thread made them 10-20x slower
    (0.8 ms -> 8-16 ms measured).  Needs threadpoolctl (a scikit-learn
    dependency); without it the block runs as it is."""

    def __enter__(self):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            self._limit = None
        else:
            self._limit = threadpool_limits(1, user_api="blas")
        return self

    def __exit__(self, *exc):
        if self._limit is not None:
            self._limit.restore_original_limits()


def _plot(path, hist, nets, data, args, seed, style):
    try:
        from matplotlib.figure import Figure   # no pyplot: no global backend state, Agg output
    except ImportError:
        print("matplotlib is not installed: no figure (pip install 'fastbn[demo]')")
        return
    colors = {NAMES[0]: "#d62728", NAMES[1]: "#1f77b4"}
    fig = Figure(figsize=(15, 10), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 1])
    ax_loss, ax_acc = top.subplots(1, 2)
    epochs = np.array(hist["epoch"])
    for name in NAMES:
        h = hist[name]
        steps_per_epoch = len(h["steps"]) / max(len(epochs) - 1, 1)
        ax_loss.plot((np.arange(len(h["steps"])) + 1) / steps_per_epoch, h["steps"], color=colors[name],
                     lw=0.6, alpha=0.45)
        ax_loss.plot(epochs[1:] - 0.5, h["loss"][1:], color=colors[name], marker="o",
                     label=f"{name}: mean over each epoch")
        ax_acc.plot(epochs, 1 - np.array(h["acc"]), color=colors[name], marker="o",
                    label=f"{name}" + (" (eval mode: running statistics)" if name == NAMES[1] else ""))
    ax_acc.plot(epochs, 1 - np.array(hist[NAMES[1]]["batch_acc"]), color=colors[NAMES[1]], ls="--",
                alpha=0.6, label="with BN, normalised with the test set's own statistics")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch (thin lines: every mini-batch)")
    ax_loss.set_ylabel("training loss (cross-entropy, training mode)")
    ax_loss.set_title("training loss")
    ax_loss.legend(fontsize=9)
    ax_loss.grid(True, which="both", alpha=0.3)
    lines = ["first reached (eval mode):  without BN / with BN  ->  speed-up"]
    for label, t, a, b, speed in speedups(hist):
        ax_acc.axhline(1 - t, color="gray", ls=":", lw=1)
        short = f"{100 * t:.3g} %"
        ax_acc.annotate(f"{short} accuracy", (0, 1 - t), xycoords=("axes fraction", "data"),
                        xytext=(3, 2), textcoords="offset points", fontsize=8, color="dimgray")
        ep = [("-" if r is None else f"epoch {r[0]}") for r in (a, b)]
        lines.append(f"{short}:  {ep[0]} / {ep[1]}  ->  {speed}")
    ax_acc.text(0.98, 0.97, "\n".join(lines), transform=ax_acc.transAxes, ha="right", va="top",
                fontsize=8.5, bbox=dict(boxstyle="round", fc="white", ec="lightgray"))
    ax_acc.set_yscale("log")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test error = 1 - test accuracy (log scale)")
    ax_acc.set_title(f"test error ({len(data[2])} held-out digits)")
    ax_acc.legend(loc="center right", fontsize=9)
    ax_acc.grid(True, which="both", alpha=0.3)
    bn_what = "fbn.moments + fbn.batch_normalization" if style == "tf" else "fbn.BatchNorm"
    top.suptitle(f"CNN on scikit-learn digits ({IMAGE}x{IMAGE}), without / with batch norm ({bn_what}) "
                 f"before every conv and dense layer; Adam lr {LR}, batch {BATCH}, seed {seed}")

    xte = data[2]
    rows = []
    for name, net in nets.items():
        net.train(False)
        rows.append((name, net.forward(xte, keep=True)[1], net.tap_names))
    axes = bottom.subplots(2, len(rows[0][1]))
    for r, (name, acts, names) in enumerate(rows):
        for i, (a, title) in enumerate(zip(axes[r], names)):
            v = np.asarray(acts[i], np.float64).ravel()
            last = i == len(names) - 1
            zeros = np.mean(v == 0)
            a.hist(v if last else v[v > 0], bins=40, color=colors[name])
            note = f"sd {v.std():.3g}" + ("" if last else f", {100 * zeros:.0f} % zeros (not drawn)")
            a.set_title(f"{title}\n{note}", fontsize=9)
            a.set_yticks(())
            a.tick_params(axis="x", labelsize=7)
        axes[r, 0].set_ylabel(name + ("\n(eval mode)" if name == NAMES[1] else ""), fontsize=10)
    bottom.suptitle(f"Activations after {hist['epoch'][-1]} epochs, over the {len(xte)} test images: "
                    "each hidden layer's ReLU output (its zeros counted, not drawn) and the logits",
                    fontsize=11)
    fig.savefig(path, dpi=80)
    print(f"figure written to {path}")

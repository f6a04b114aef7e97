"""``python -m fastbn demo [mlp|cnn]``: the batch-normalization tutorial experiments, in NumPy + fastbn.

``demo`` (= ``demo mlp``) is the MLP experiment below; ``demo cnn`` is the
convolutional one (``fastbn.demo_cnn``: a CNN on scikit-learn's digits, with
and without batch norm, ``--style tf`` for the ``moments`` +
``batch_normalization`` form).

The MLP experiment, after Morvan Zhou's TensorFlow tutorial "Batch Normalization": fit
``y = x**2 - 5 + noise`` with a deep ReLU network that is badly initialised on
purpose, once without and once with batch normalization, and compare the cost.

- data: ``x = linspace(-7, 10, 2500)``, shuffled; ``y = x**2 - 5 + N(0, 8)``;
- network: 7 hidden dense layers of 30 ReLU units, weights ``N(0, 1)``,
  biases 0.1, a linear output unit; mean squared error;
- training: plain SGD, learning rate 0.001, mini-batches of 10, 250 steps
  (one pass over the data); both networks start from the same weights and
  see the same batches;
- with BN: a ``fastbn.BatchNorm`` on the input and before every activation
  (``channel_axis=-1`` on ``(N, features)``, eps 1e-3 as in the tutorial),
  its scale and offset trained too.

The dense layers are plain NumPy (forward and backward by hand); batch norm
forward and backward are fastbn's.  The cost is measured on all 2500 points
after every step.  The BN network is measured the way it would be used: in eval
mode, with its running statistics.  The tutorial instead normalised the full
data with its own statistics; that figure is shown too, marked as such.
Nothing is tuned: the numbers printed are what the run gives, divergence
included.
"""

import time

import numpy as np

import fastbn as fbn

N_DATA = 2500
N_LAYERS = 7
N_HIDDEN = 30
BATCH = 10
LR = 0.001
EPS = 1e-3          # the tutorial's epsilon
NOISE_SD = 8.0
DTYPE = np.float32  # as the tutorial's TensorFlow graph


def add_arguments(parser):
    """The ``demo`` sub-command's arguments: ``[mlp|cnn]`` and the options of both demos."""
    parser.add_argument("which", nargs="?", choices=("mlp", "cnn"), default="mlp",
                        help="mlp (default): the MLP on y = x^2 - 5 + noise; cnn: a CNN on "
                             "scikit-learn's digits")
    parser.add_argument("--steps", type=int, default=None, help="mlp: SGD steps (default 250: one epoch)")
    parser.add_argument("--epochs", type=int, default=None, help="cnn: training epochs (default 12)")
    parser.add_argument("--style", choices=("layer", "tf"), default=None,
                        help="cnn: batch norm as fbn.BatchNorm (layer, default) or as fbn.moments + "
                             "fbn.batch_normalization with the moving averages written out (tf)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for data, weights and batch order (default 1)")
    parser.add_argument("--out", default=None,
                        help="PNG to write (default bn_demo.png; cnn: bn_demo_cnn.png, "
                             "bn_demo_cnn_tf.png with --style tf)")
    parser.add_argument("--no-plot", action="store_true", help="skip the figure (no matplotlib needed)")


def run(args):
    """Run the demo that ``args.which`` names ("mlp" when absent)."""
    which = getattr(args, "which", None) or "mlp"
    if which == "cnn":
        if getattr(args, "steps", None) is not None:
            raise SystemExit("demo cnn: --steps is an option of the mlp demo; use --epochs")
        from . import demo_cnn
        return demo_cnn.run(args)
    for name, flag in (("epochs", "--epochs"), ("style", "--style")):
        if getattr(args, name, None) is not None:
            raise SystemExit(f"demo mlp: {flag} is an option of the cnn demo (python -m fastbn demo cnn)")
    return run_mlp(args)


def make_data(rng):
    """Shuffled ``x`` (2500, 1) and ``y = x**2 - 5 + N(0, 8)`` (2500, 1), float32."""
    x = np.linspace(-7, 10, N_DATA)[:, None]
    rng.shuffle(x)
    y = np.square(x) - 5 + rng.normal(0.0, NOISE_SD, x.shape)
    return x.astype(DTYPE), y.astype(DTYPE)


def make_params(rng):
    """[(W, b)] for 7 hidden layers and the output layer: W ~ N(0, 1), b = 0.1."""
    sizes = [1] + [N_HIDDEN] * N_LAYERS + [1]
    return [(rng.normal(0.0, 1.0, (m, n)).astype(DTYPE), np.full(n, 0.1, DTYPE))
            for m, n in zip(sizes[:-1], sizes[1:])]


class MLP:
    """The tutorial's network, optionally with ``fastbn.BatchNorm`` on the input
    and before every ReLU.  Forward and backward by hand; SGD in place."""

    def __init__(self, params, use_bn):
        self.W = [w.copy() for w, _ in params]
        self.b = [b.copy() for _, b in params]
        self.bns = None
        if use_bn:
            self.bns = [fbn.BatchNorm(n, channel_axis=-1, eps=EPS, dtype=DTYPE)
                        for n in [1] + [N_HIDDEN] * N_LAYERS]
        self.diverged_at = None   # step at which the cost stopped being finite

    def _norm(self, i, z, mode):
        if self.bns is None:
            return z
        bn = self.bns[i]
        if mode == "full":
            # The tutorial's evaluation: this x's own statistics; running stats untouched.
            return fbn.batch_norm_train(z, bn.scale, bn.offset, channel_axis=-1, eps=bn.eps)[0]
        return bn.train(mode == "train")(z)

    def forward(self, x, mode="train"):
        """Prediction (N, 1) and the inputs of the 8 ReLU-free stages, for histograms:
        the (normalised) network input, then each hidden layer's pre-activation.

        ``mode`` (BN only): "train" (batch statistics, running stats updated),
        "eval" (running statistics), "full" (statistics of this ``x``).
        """
        h = self._norm(0, x, mode)
        pre = [h]
        self._cache = []
        for layer in range(N_LAYERS):
            z = self._norm(layer + 1, h @ self.W[layer] + self.b[layer], mode)
            self._cache.append((h, z))
            pre.append(z)
            h = np.maximum(z, 0)
        self._cache.append(h)
        return h @ self.W[-1] + self.b[-1], pre

    def sgd_step(self, x, y, lr):
        """One SGD step on the batch; returns the batch cost before the step.

        If the cost or any updated parameter is not finite, no parameter is
        updated and the cost returned is NaN: the network keeps its last finite
        weights.
        """
        pred, _ = self.forward(x, "train")
        cost = float(np.mean(np.square(pred - y)))
        d = 2 * (pred - y) / len(x)                  # dcost/dpred
        h = self._cache[-1]
        gW, gb = [h.T @ d], [d.sum(0)]
        dh = d @ self.W[-1].T
        for layer in reversed(range(N_LAYERS)):
            h_in, z = self._cache[layer]
            dz = dh * (z > 0)                       # through the ReLU
            if self.bns is not None:
                dz = self.bns[layer + 1].backward(dz)
            gW.insert(0, h_in.T @ dz)
            gb.insert(0, dz.sum(0))
            dh = dz @ self.W[layer].T
        params, grads = self.W + self.b, gW + gb
        if self.bns is not None:
            self.bns[0].backward(dh)                # the input BN's scale and offset
            for bn in self.bns:
                params += [bn.scale, bn.offset]
                grads += [bn.dscale, bn.doffset]
        new = [p - lr * g for p, g in zip(params, grads)]
        if not np.isfinite(cost) or not all(np.isfinite(v).all() for v in new):
            return float("nan")
        for p, v in zip(params, new):
            p[...] = v
        return cost


def full_cost(net, x, y, mode):
    pred, _ = net.forward(x, mode)
    return float(np.mean(np.square(pred - y)))


def _fmt(c):
    return "diverged" if not np.isfinite(c) else f"{c:12.5g}"


def train_mlp(steps, seed, log=print, t0=None):
    """Train both MLPs ``steps`` SGD steps; returns ``(cols, plain, bn_net, x, y)``.

    ``cols``: {"step": [0..steps], "without BN", "with BN", "BN, full-data stats":
    the cost on all 2500 points after each step}; a cost is +inf where it
    overflowed float32 and NaN from the step at which the net diverged on.
    """
    t0 = time.perf_counter() if t0 is None else t0
    rng = np.random.default_rng(seed)
    x, y = make_data(rng)
    params = make_params(rng)
    plain, bn_net = MLP(params, use_bn=False), MLP(params, use_bn=True)
    log(f"cost = mean squared error on all 2500 points (for scale: predicting the mean of y "
        f"costs {np.var(y, dtype=np.float64):.4g}, the noise alone {NOISE_SD ** 2:g}).\n"
        "'with BN' is the BN net in eval mode, with its running statistics (at step 0 these are "
        "still 0 and 1,\nso it then computes what the plain net does); 'BN, full-data stats' "
        "normalises with the statistics\nof all 2500 points, as the tutorial did.")

    cols = {"step": [], "without BN": [], "with BN": [], "BN, full-data stats": []}

    def record(step):
        cols["step"].append(step)
        with np.errstate(all="ignore"):
            cols["without BN"].append(np.nan if plain.diverged_at is not None
                                      else full_cost(plain, x, y, "eval"))
            ok = bn_net.diverged_at is None
            cols["with BN"].append(full_cost(bn_net, x, y, "eval") if ok else np.nan)
            cols["BN, full-data stats"].append(full_cost(bn_net, x, y, "full") if ok else np.nan)

    record(0)
    for step in range(1, steps + 1):
        start = (step - 1) * BATCH % N_DATA
        if start == 0:
            order = rng.permutation(N_DATA)          # each epoch in a new order
        idx = order[start:start + BATCH]
        for net in (plain, bn_net):
            if net.diverged_at is None:
                with np.errstate(all="ignore"):
                    cost = net.sgd_step(x[idx], y[idx], LR)
                if not np.isfinite(cost):
                    net.diverged_at = step
        record(step)
        if step % 50 == 0 or step == steps:
            log(f"step {step:4d}/{steps}: cost without BN {_fmt(cols['without BN'][-1])}, "
                f"with BN {_fmt(cols['with BN'][-1])}   [{time.perf_counter() - t0:.1f} s]")
    return cols, plain, bn_net, x, y


def run_mlp(args):
    """``python -m fastbn demo mlp``: train both MLPs, print the table, write the PNG."""
    t0 = time.perf_counter()
    steps = 250 if args.steps is None else args.steps
    seed = 1 if args.seed is None else args.seed
    out = args.out or "bn_demo.png"
    if steps < 0:
        raise SystemExit("--steps must be >= 0")
    print(f"fastbn {fbn.__version__} demo: MLP {N_LAYERS}x{N_HIDDEN} ReLU, weights N(0,1), biases 0.1, "
          f"SGD lr {LR}, batch {BATCH}, {steps} steps, seed {seed}; "
          f"fastbn backend: {fbn.backend_for(np.zeros(1, DTYPE))}")
    cols, plain, bn_net, x, y = train_mlp(steps, seed, log=print, t0=t0)
    for name, net in (("without BN", plain), ("with BN", bn_net)):
        if net.diverged_at is not None:
            print(f"the network {name} diverged at step {net.diverged_at} (its cost or an updated "
                  f"weight was not finite); it is kept as it was after step {net.diverged_at - 1}")

    _print_table(cols)
    print(f"final cost after {steps} steps: without BN {_fmt(cols['without BN'][-1]).strip()}, "
          f"with BN {_fmt(cols['with BN'][-1]).strip()} (eval mode, running statistics)")
    if not args.no_plot:
        _plot(out, cols, plain, bn_net, x, y, seed)
    print(f"wall time {time.perf_counter() - t0:.1f} s (includes Numba compilation on a first run)")
    return 0


def _print_table(cols):
    steps = cols["step"]
    show = [i for i, s in enumerate(steps) if s % 50 == 0 or i == len(steps) - 1]
    names = list(cols)[1:]
    print("\n  step | " + " | ".join(f"{n:>19}" for n in names))
    print("-------+" + "+".join(["-" * 21] * len(names)))
    for i in show:
        print(f"  {steps[i]:4d} | " + " | ".join(f"{_fmt(cols[n][i]):>19}" for n in names))
    print()


def _plot(path, cols, plain, bn_net, x, y, seed):
    try:
        from matplotlib.figure import Figure   # no pyplot: no global backend state, Agg output
    except ImportError:
        print("matplotlib is not installed: no figure (pip install 'fastbn[demo]')")
        return
    fig = Figure(figsize=(15, 9.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.15, 1])
    ax = top.subplots()
    steps = np.array(cols["step"])
    # A zoom on the first steps, where a net without BN diverges.
    zoom = ax.inset_axes([0.3, 0.5, 0.3, 0.45])
    zoom_to = min(int(steps[-1]), 10)
    for a in (ax, zoom):
        _cost_curves(a, steps, cols, plain, bn_net)
    ax.axhline(float(np.var(y, dtype=np.float64)), color="gray", ls="-.", lw=1,
               label="predicting the mean of y")
    ax.axhline(NOISE_SD ** 2, color="gray", ls=":", lw=1, label=f"noise variance ({NOISE_SD:g}²)")
    ax.set_xlabel("SGD step (mini-batches of 10)")
    ax.set_ylabel("cost: MSE on all 2500 points")
    ax.set_title(f"Deep ReLU MLP ({N_LAYERS}x{N_HIDDEN}, weights N(0,1)) fitting y = x² - 5 + "
                 f"N(0, {NOISE_SD:g}), SGD lr {LR}, seed {seed}")
    ax.legend(loc="upper right", fontsize=9)
    zoom.set_xlim(-0.3, zoom_to + 0.3)
    zoom.set_xticks(range(zoom_to + 1))
    zoom.set_title(f"steps 0-{zoom_to}", fontsize=9)
    zoom.tick_params(labelsize=8)
    for a in (ax, zoom):
        _mark_divergence(a, cols, plain, bn_net)

    with np.errstate(all="ignore"):
        rows = [(net, name, net.forward(x, "eval")[1])
                for net, name in ((plain, "without BN"), (bn_net, "with BN"))]
    axes = bottom.subplots(2, N_LAYERS + 1)
    for r, (net, name, pre) in enumerate(rows):
        for i, values in enumerate(pre):
            a = axes[r, i]
            v = np.asarray(values, dtype=np.float64).ravel()
            v = v[np.isfinite(v)]
            # What is drawn differs between the rows: the BN net's values are normalised.
            if i == 0:
                label = "input x" if net.bns is None else "BN(input x)"
            else:
                label = f"layer {i}: " + ("pre-activation z" if net.bns is None else "BN(z)")
            if v.size:
                a.hist(v, bins=30, color="#ff5733" if r == 0 else "#2ca02c")
                label += f"\nsd {v.std():.3g}"
            a.set_title(label, fontsize=9)
            a.set_yticks(())
            a.tick_params(axis="x", labelsize=7)
        when = (f"after step {net.diverged_at - 1}\n(its last finite weights)" if net.diverged_at is not None
                else f"after step {cols['step'][-1]}")
        axes[r, 0].set_ylabel(f"{name}\n{when}", fontsize=9)
    bottom.suptitle("Histograms over all 2500 points of what enters the first layer and each ReLU: "
                    "without BN the input x and each pre-activation z = h W + b, with BN their "
                    "normalised values (eval mode)", fontsize=11)
    fig.savefig(path, dpi=90)
    print(f"figure written to {path}")
    return fig


def _cost_curves(ax, steps, cols, plain, bn_net):
    """Both nets' cost per step, on a log axis.  A cost that overflowed float32
    (inf, before the net diverged) is drawn as a triangle at the top edge."""
    ax.set_yscale("log")
    specs = (("without BN", "#d62728", "-", 1.0, "without BN (▲: its cost overflowed float32)"),
             ("with BN", "#1f77b4", "-", 1.0, "with BN (eval mode: running statistics)"),
             ("BN, full-data stats", "#1f77b4", "--", 0.6,
              "with BN, normalised with the full data's statistics (the tutorial's evaluation)"))
    for key, color, ls, alpha, label in specs:
        c = np.asarray(cols[key], np.float64)
        few = np.isfinite(c).sum() <= 12           # a short curve (a net that diverged) gets markers
        ax.plot(steps, np.where(np.isfinite(c), c, np.nan), color=color, ls=ls, alpha=alpha,
                marker="o" if few else None, ms=4, zorder=3 if key == "without BN" else 2, label=label)
    ax.grid(True, which="both", alpha=0.3)
    ax.autoscale_view()
    top = ax.get_ylim()[1]
    for key, color, ls, *_ in specs:
        c = np.asarray(cols[key], np.float64)
        over = np.isposinf(c)
        if over.any():
            ax.plot(steps[over], np.full(over.sum(), top), ls="none", marker="^", ms=9, color=color,
                    clip_on=False)
            # the line from the last finite cost up to the edge
            first = int(np.argmax(over))
            if first > 0 and np.isfinite(c[first - 1]):
                ax.plot(steps[first - 1:first + 1], [c[first - 1], top], color=color, ls=ls, zorder=3)
    ax.set_ylim(top=top)


def _mark_divergence(ax, cols, plain, bn_net):
    for net, color, name in ((plain, "#d62728", "without BN"), (bn_net, "#1f77b4", "with BN")):
        if net.diverged_at is None:
            continue
        k = net.diverged_at
        c = np.asarray(cols["without BN" if net is plain else "with BN"], np.float64)
        overflow = [s for s, v in zip(cols["step"], c) if np.isposinf(v)]
        ax.axvline(k, color=color, ls=":")
        text = f" {name}: diverged at step {k}"
        if overflow:
            text += f"\n (its cost after step {overflow[0]} overflowed float32: ▲)"
        ax.annotate(text, (k, 0.35), xycoords=("data", "axes fraction"), color=color, fontsize=9)

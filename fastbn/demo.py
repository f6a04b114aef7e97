"""``python -m fastbn demo``: the batch-normalization tutorial experiment, in NumPy + fastbn.

After Morvan Zhou's TensorFlow tutorial "Batch Normalization": fit
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
every 5 steps.  The BN network is measured the way it would be used: in eval
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
RECORD_EVERY = 5
EPS = 1e-3          # the tutorial's epsilon
NOISE_SD = 8.0
DTYPE = np.float32  # as the tutorial's TensorFlow graph


def add_arguments(parser):
    parser.add_argument("--steps", type=int, default=250, help="SGD steps (default 250: one epoch)")
    parser.add_argument("--seed", type=int, default=1, help="seed for data, weights and batch order")
    parser.add_argument("--out", default="bn_demo.png", help="PNG to write (default bn_demo.png)")
    parser.add_argument("--no-plot", action="store_true", help="skip the figure (no matplotlib needed)")


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


def run(args):
    t0 = time.perf_counter()
    if args.steps < 0:
        raise SystemExit("--steps must be >= 0")
    rng = np.random.default_rng(args.seed)
    x, y = make_data(rng)
    params = make_params(rng)
    plain, bn_net = MLP(params, use_bn=False), MLP(params, use_bn=True)
    print(f"fastbn {fbn.__version__} demo: MLP {N_LAYERS}x{N_HIDDEN} ReLU, weights N(0,1), biases 0.1, "
          f"SGD lr {LR}, batch {BATCH}, {args.steps} steps, seed {args.seed}; "
          f"fastbn backend: {fbn.backend_for(x)}")
    print(f"cost = mean squared error on all 2500 points (for scale: predicting the mean of y "
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
    for step in range(1, args.steps + 1):
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
        if step % RECORD_EVERY == 0 or step == args.steps:
            record(step)
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}/{args.steps}: cost without BN {_fmt(cols['without BN'][-1])}, "
                  f"with BN {_fmt(cols['with BN'][-1])}   [{time.perf_counter() - t0:.1f} s]")
    for name, net in (("without BN", plain), ("with BN", bn_net)):
        if net.diverged_at is not None:
            print(f"the network {name} diverged at step {net.diverged_at} (its cost or an updated "
                  f"weight was not finite); it is kept as it was after step {net.diverged_at - 1}")

    _print_table(cols)
    print(f"final cost after {args.steps} steps: without BN {_fmt(cols['without BN'][-1]).strip()}, "
          f"with BN {_fmt(cols['with BN'][-1]).strip()} (eval mode, running statistics)")
    if not args.no_plot:
        _plot(args.out, cols, plain, bn_net, x, y, args)
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


def _plot(path, cols, plain, bn_net, x, y, args):
    try:
        from matplotlib.figure import Figure   # no pyplot: no global backend state, Agg output
    except ImportError:
        print("matplotlib is not installed: no figure (pip install 'fastbn[demo]')")
        return
    fig = Figure(figsize=(15, 9.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.15, 1])

    ax = top.subplots()
    steps = np.array(cols["step"])
    ax.plot(steps, cols["without BN"], color="#d62728", marker="x", label="without BN")
    ax.plot(steps, cols["with BN"], color="#1f77b4", label="with BN (eval mode: running statistics)")
    ax.plot(steps, cols["BN, full-data stats"], color="#1f77b4", ls="--", alpha=0.6,
            label="with BN, normalised with the full data's statistics (the tutorial's evaluation)")
    ax.axhline(float(np.var(y, dtype=np.float64)), color="gray", ls="-.", lw=1,
               label="predicting the mean of y")
    ax.axhline(NOISE_SD ** 2, color="gray", ls=":", lw=1, label=f"noise variance ({NOISE_SD:g}²)")
    for net, color in ((plain, "#d62728"), (bn_net, "#1f77b4")):
        if net.diverged_at is not None:
            ax.axvline(net.diverged_at, color=color, ls=":")
            ax.annotate(f" diverged at step {net.diverged_at}", (net.diverged_at, 0.5),
                        xycoords=("data", "axes fraction"), color=color)
    ax.set_yscale("log")
    ax.set_xlabel("SGD step (mini-batches of 10)")
    ax.set_ylabel("cost: MSE on all 2500 points")
    ax.set_title(f"Deep ReLU MLP ({N_LAYERS}x{N_HIDDEN}, weights N(0,1)) fitting y = x² - 5 + "
                 f"N(0, {NOISE_SD:g}), SGD lr {LR}, seed {args.seed}")
    ax.legend(loc="upper right", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)

    with np.errstate(all="ignore"):
        rows = [(net, name, net.forward(x, "eval")[1])
                for net, name in ((plain, "without BN"), (bn_net, "with BN"))]
    axes = bottom.subplots(2, N_LAYERS + 1)
    for r, (net, name, pre) in enumerate(rows):
        for i, values in enumerate(pre):
            a = axes[r, i]
            v = np.asarray(values, dtype=np.float64).ravel()
            v = v[np.isfinite(v)]
            label = "input" if i == 0 else f"layer {i}"
            if v.size:
                a.hist(v, bins=30, color="#ff5733" if r == 0 else "#2ca02c")
                label += f"\nsd {v.std():.3g}"
            a.set_title(label, fontsize=9)
            a.set_yticks(())
            a.tick_params(axis="x", labelsize=7)
        when = (f"after step {net.diverged_at - 1}\n(last finite)" if net.diverged_at is not None
                else f"after step {cols['step'][-1]}")
        axes[r, 0].set_ylabel(f"{name}\n{when}", fontsize=9)
    bottom.suptitle("Histograms over all 2500 points of the network input and of each hidden "
                    "layer's pre-activation (what enters the ReLU); BN net in eval mode", fontsize=11)
    fig.savefig(path, dpi=90)
    print(f"figure written to {path}")

"""``python -m fastbn bench --sweep``: fastbn against PyTorch at every size, op and layout.

Every point of the sweep is one operation -- training forward (batch
statistics), inference (given statistics) or backward (the training
forward's gradients) -- on one layout -- NCHW, NHWC (for PyTorch a
``channels_last`` tensor over the same memory) or (N, C) -- at one size, from
4 KiB to 98 MiB (103 MB, the 128x64x56x56 float32 layer) in x4 steps.  Both
sides write into preallocated outputs (``out=``) and compute the same things:

=========  =======================================  ==============================================
op         fastbn                                   PyTorch (``torch.ops.aten``)
=========  =======================================  ==============================================
train      ``batch_norm_train(x, scale, offset)``   ``native_batch_norm.out(x, w, b, None, None,
           -> y, mean, invstd                       True, ...)`` -> y, save_mean, save_invstd
infer      ``batch_norm_infer(x, scale, offset,     ``native_batch_norm.out(x, w, b, rm, rv,
           mean, var)``                             False, ...)``
backward   ``batch_norm_backward(dy, x, scale,      ``native_batch_norm_backward.out(dy, x, w,
           mean, invstd)`` -> dx, dscale, doffset   None, None, mean, invstd, True, ...)``, all
                                                    three gradients
=========  =======================================  ==============================================

float16 data takes float32 parameters and statistics on both sides.  After
timing, each point checks that fastbn's and PyTorch's outputs agree (a
benchmark of two different computations would be worthless).

Timing (:mod:`fastbn.tools.harness`): both runners warmed up, then
interleaved batches of calls, the order alternating between repeats; the
repeats are chosen by size so every point costs about the same wall time
(``--repeat`` overrides).  The speed-up is PyTorch's time over fastbn's
(> 1: fastbn faster), from the min times and from the median times.
"""

import json
import math
import statistics
import sys
import time

import numpy as np

from .harness import (Env, Runner, calibrate, default_backend, load_average, load_note, measure,
                      min_median)

EPS = 1e-5
OPS = ("train", "infer", "backward")
OP_TITLES = {"train": "train forward", "infer": "inference", "backward": "backward"}
LAYOUTS = ("NCHW", "NHWC", "(N, C)")
CHANNEL_AXIS = {"NCHW": 1, "NHWC": -1, "(N, C)": -1}
DTYPES = ("float16", "float32", "float64")

#: The sizes: (label, NCHW shape, (N, C) shape).  Labels are the float32 bytes
#: of x; every layout of a size has the same number of values.  NHWC stores
#: the NCHW shape's dimensions as (N, H, W, C).  Channel counts grow with the
#: size as in real networks (16 in a first small layer, 1024 in a wide MLP).
SIZES = (
    ("4 KiB", (4, 16, 4, 4), (64, 16)),
    ("16 KiB", (8, 32, 4, 4), (128, 32)),
    ("64 KiB", (16, 16, 8, 8), (256, 64)),
    ("256 KiB", (16, 64, 8, 8), (256, 256)),
    ("1 MiB", (16, 64, 16, 16), (512, 512)),
    ("4 MiB", (32, 128, 16, 16), (1024, 1024)),
    ("16 MiB", (32, 128, 32, 32), (4096, 1024)),
    ("64 MiB", (64, 64, 64, 64), (16384, 1024)),
    ("98 MiB", (128, 64, 56, 56), (25088, 1024)),
)
#: ``--quick``: a smoke test of the whole pipeline (table, JSON, plot).
QUICK_SIZES = ("4 KiB", "16 KiB")

#: Wall time per point and runner the repeat count aims at (s), and its bounds.
POINT_BUDGET = 0.3
MIN_REPEAT, MAX_REPEAT = 5, 25
#: Seconds a timed batch lasts at least (many calls for small sizes).  Short:
#: one scheduler hiccup spoils the whole batch it falls in.
MIN_BATCH = 0.002
#: A runner's min is *settled* when its STABLE_K fastest samples lie within
#: STABLE_TOL of it (one lucky sample is not a time).  Until both runners'
#: are, a point takes more rounds of MIN_REPEAT repeats, up to STABLE_CAP
#: times its first round's wall time; a point still unsettled is marked.
STABLE_K, STABLE_TOL, STABLE_CAP = 3, 0.15, 4.0
#: Tolerance of the fastbn-vs-PyTorch agreement check: max |difference| over
#: max |PyTorch's output| (the two sum in different orders and precisions).
AGREE = {"float16": 2e-2, "float32": 1e-4, "float64": 1e-9}


def shape_of(size, layout):
    """The stored shape of x for a size label and layout."""
    label, nchw, nc = next(s for s in SIZES if s[0] == size)
    if layout == "NCHW":
        return nchw
    if layout == "NHWC":
        n, c, h, w = nchw
        return (n, h, w, c)
    return nc


def _key(text):
    """A size label as typed: spaces and case ignored, KB/MB read as KiB/MiB, and
    103MB (the decimal name of the largest size, as the README says) as 98 MiB."""
    k = text.replace(" ", "").lower()
    if k.endswith(("kb", "mb")) and not k.endswith(("kib", "mib")):
        k = k[:-1] + "ib"
    return {"103mib": "98mib"}.get(k, k)


def select_sizes(spec, quick=False):
    """Size labels from a comma-separated ``--sizes`` spec (spaces and case ignored)."""
    if spec:
        want = [_key(s) for s in spec.split(",") if s.strip()]
        known = {_key(s[0]): s[0] for s in SIZES}
        bad = [w for w in want if w not in known]
        if bad:
            raise ValueError(f"--sizes: unknown size(s) {bad}; known: {[s[0] for s in SIZES]}")
        return [known[w] for w in want]
    return list(QUICK_SIZES if quick else (s[0] for s in SIZES))


def point_name(op, layout, size):
    """What ``--cases`` matches, e.g. ``train NHWC 4 MiB``."""
    return f"{op} {layout} {size}"


# -- data and runners ---------------------------------------------------------------------

class Data:
    """x, dy and parameters of one (dtype, layout, size), built once for its three ops.

    ``scale``/``offset``/statistics are float32 for float16 data.  ``mean`` and
    ``var`` are x's own (biased) statistics, so the inference and backward
    points see the values a training step would give them.
    """

    def __init__(self, shape, layout, dtype, seed=0):
        rng = np.random.default_rng(seed)
        dt = np.dtype(dtype)
        self.layout, self.shape, self.dtype = layout, shape, dt
        self.axis = CHANNEL_AXIS[layout] % len(shape)
        self.C = C = shape[self.axis]
        pdt = np.float32 if dt == np.float16 else dt
        self.x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5).astype(dt, copy=False)
        self.dy = rng.standard_normal(shape, dtype=np.float32).astype(dt, copy=False)
        self.scale = (1 + 0.1 * rng.standard_normal(C)).astype(pdt)
        self.offset = (0.1 * rng.standard_normal(C)).astype(pdt)
        red = tuple(a for a in range(len(shape)) if a != self.axis)
        var = self.x.var(axis=red, dtype=np.float64)
        self.mean = self.x.mean(axis=red, dtype=np.float64).astype(pdt)
        self.var = var.astype(pdt)
        self.invstd = (1 / np.sqrt(var + EPS)).astype(pdt)

    def out(self):
        """A preallocated output, pre-faulted (its pages written once)."""
        y = np.empty_like(self.x)
        y.fill(0)
        return y


def fastbn_runner(op, d):
    """The fastbn call of ``op`` on ``d`` (the default backend: see
    harness.default_backend), writing into a preallocated output; returns
    ``(Runner, output array)``."""
    import fastbn as fbn
    ax, x, s, o, y = d.axis, d.x, d.scale, d.offset, d.out()
    if op == "train":
        fn = lambda: fbn.batch_norm_train(x, s, o, channel_axis=ax, eps=EPS, out=y)  # noqa: E731
    elif op == "infer":
        m, v = d.mean, d.var
        fn = lambda: fbn.batch_norm_infer(x, s, o, m, v, channel_axis=ax, eps=EPS,  # noqa: E731
                                          out=y)
    elif op == "backward":
        dy, m, inv = d.dy, d.mean, d.invstd
        fn = lambda: fbn.batch_norm_backward(dy, x, s, m, inv, channel_axis=ax, out=y)  # noqa: E731
    else:
        raise ValueError(f"op: {op!r}")
    return Runner("fastbn", fn, "fastbn"), y


def _nc_view(torch, a, ax):
    """A zero-copy tensor over ``a`` with channels on dim 1 (channels_last strides
    when ``a`` stores them last)."""
    t = torch.from_numpy(a)
    if ax == 1 or t.dim() == 2:
        return t
    return t.permute(0, ax, *[k for k in range(1, t.dim()) if k != ax])


def torch_runner(op, d, env):
    """PyTorch's ``op`` on ``d``'s memory, writing into a preallocated output;
    returns ``(Runner, output array)``.  Raises RuntimeError if PyTorch would not
    write into that output (then it would time an allocation too)."""
    torch = env.torch
    ops = torch.ops.aten
    ax = d.axis
    y = d.out()
    x, yt = _nc_view(torch, d.x, ax), _nc_view(torch, y, ax)
    w, b = torch.from_numpy(d.scale), torch.from_numpy(d.offset)
    sm, si = torch.empty(d.C, dtype=w.dtype), torch.empty(d.C, dtype=w.dtype)
    if op == "train":
        fn = lambda: ops.native_batch_norm.out(x, w, b, None, None, True, 0.1, EPS,  # noqa: E731
                                               out=yt, save_mean=sm, save_invstd=si)
    elif op == "infer":
        rm, rv = torch.from_numpy(d.mean), torch.from_numpy(d.var)
        fn = lambda: ops.native_batch_norm.out(x, w, b, rm, rv, False, 0.1, EPS,  # noqa: E731
                                               out=yt, save_mean=sm, save_invstd=si)
    elif op == "backward":
        dy = _nc_view(torch, d.dy, ax)
        m, inv = torch.from_numpy(d.mean), torch.from_numpy(d.invstd)
        dw, db = torch.empty(d.C, dtype=w.dtype), torch.empty(d.C, dtype=w.dtype)
        mask = [True, True, True]
        fn = lambda: ops.native_batch_norm_backward.out(  # noqa: E731
            dy, x, w, None, None, m, inv, True, EPS, mask, out0=yt, out1=dw, out2=db)
    else:
        raise ValueError(f"op: {op!r}")
    if fn()[0].data_ptr() != yt.data_ptr():
        raise RuntimeError(f"PyTorch {op} did not write into the preallocated output")
    return Runner("torch", fn, "peer", env.torch_threads(env.threads), f"{env.threads}t"), y


def agreement(a, b):
    """max |a - b| / max |b| in float64 (0 when both are all zero)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    scale = float(np.max(np.abs(b64))) if b64.size else 0.0
    diff = float(np.max(np.abs(a64 - b64))) if b64.size else 0.0
    return diff / scale if scale > 0 else diff


def settled(times):
    """The STABLE_K fastest of ``times`` are within STABLE_TOL of the fastest."""
    if len(times) < STABLE_K:
        return False
    fastest = sorted(times)[:STABLE_K]
    return fastest[-1] <= (1 + STABLE_TOL) * fastest[0]


# -- one point -------------------------------------------------------------------------

def _repeats(per_call, n_runners, settle):
    """Repeats that keep a point near POINT_BUDGET seconds per runner."""
    batch = max(per_call, MIN_BATCH) + settle
    return int(min(MAX_REPEAT, max(MIN_REPEAT, round(POINT_BUDGET / batch))))


def run_point(op, d, size, env, backend=None, repeat=None, settle=0.02, min_batch=MIN_BATCH,
              stabilize=True):
    """Measure one (op, layout, size, dtype); returns a result dict (times in s).

    ``stabilize``: take more rounds until the mins are :func:`settled` (see STABLE_K)."""
    fb, y_fb = fastbn_runner(op, d)
    runners, outs = [fb], [y_fb]
    if env.torch is not None:
        tr, y_t = torch_runner(op, d, env)
        runners.append(tr)
        outs.append(y_t)
    warmup = 2 if d.x.size >= 1 << 20 else 20
    per = 0.0
    with default_backend(backend):
        for r in runners:
            time.sleep(settle)          # as before every timed batch (harness.measure)
            per = max(per, calibrate(r, warmup, min_batch))
        reps = repeat or _repeats(per, len(runners), settle)
        t0 = time.perf_counter()
        measure(runners, reps, settle=settle, calibrated=True)
        cap = t0 + STABLE_CAP * (time.perf_counter() - t0)
        while stabilize and not all(settled(r.times) for r in runners) and time.perf_counter() < cap:
            measure(runners, MIN_REPEAT, settle=settle, calibrated=True)
    res = {"op": op, "layout": d.layout, "size": size, "dtype": str(d.dtype), "shape": list(d.shape),
           "channel_axis": d.axis, "bytes": int(d.x.nbytes), "repeat": len(fb.times),
           "settled": all(settled(r.times) for r in runners)}
    for r in runners:
        tmin, tmed = min_median(r.times)
        res[r.label] = {"min_s": tmin, "median_s": tmed, "number": r.number, "times_s": r.times}
    if env.torch is not None:
        res["speedup_min"] = res["torch"]["min_s"] / res["fastbn"]["min_s"]
        res["speedup_median"] = res["torch"]["median_s"] / res["fastbn"]["median_s"]
        res["rel_diff"] = agreement(y_fb, outs[1])
        res["agree"] = bool(res["rel_diff"] <= AGREE[str(d.dtype)])
    return res


def sweep(dtypes, sizes, env, *, layouts=LAYOUTS, ops=OPS, backend=None, repeat=None, settle=0.02,
          min_batch=MIN_BATCH, stabilize=True, pattern=None, progress=None):
    """Run the sweep; returns the list of point results (see :func:`run_point`).

    ``pattern``: as ``--cases`` ('|'-separated substrings of point names).
    ``progress``: a file to write one line per (dtype, size, layout) to.
    """
    pats = [p.strip().lower() for p in (pattern or "").split("|") if p.strip()]
    results = []
    for dtype in dtypes:
        for size in sizes:
            for layout in layouts:
                todo = [op for op in ops
                        if not pats or any(p in point_name(op, layout, size).lower() for p in pats)]
                if not todo:
                    continue
                t0 = time.perf_counter()
                d = Data(shape_of(size, layout), layout, dtype)
                for op in todo:
                    results.append(run_point(op, d, size, env, backend, repeat, settle, min_batch,
                                             stabilize))
                del d
                if progress is not None:
                    print(f"  {dtype} {layout} {size}: {time.perf_counter() - t0:.1f} s",
                          file=progress, flush=True)
    return results


# -- output ------------------------------------------------------------------------------

def fmt_time(s):
    """Seconds as a short string with a unit (us / ms / s)."""
    if s is None or math.isnan(s):
        return "—"
    for unit, f in (("s", 1.0), ("ms", 1e3), ("us", 1e6)):
        if s * f >= 1 or unit == "us":
            v = s * f
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}" if v >= 10 else f"{v:.2f} {unit}"
    return "—"


def fmt_bytes(b):
    for unit, f in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= f:
            v = b / f
            return f"{v:.0f} {unit}" if v >= 10 or v == int(v) else f"{v:.1f} {unit}"
    return f"{b} B"


def _rows(results, dtype):
    """{(layout, size): {op: result}} for one dtype, in sweep order."""
    rows = {}
    for r in results:
        if r["dtype"] == dtype:
            rows.setdefault((r["layout"], r["size"]), {})[r["op"]] = r
    order = {s[0]: i for i, s in enumerate(SIZES)}
    return dict(sorted(rows.items(), key=lambda kv: (LAYOUTS.index(kv[0][0]), order[kv[0][1]])))


def speedup_table(results, dtype):
    """Markdown: speed-up (PyTorch time / fastbn time, min / median) per layout x size x op;
    bold where fastbn is slower (min)."""
    lines = ["| layout | shape | x | " + " | ".join(OP_TITLES[o] for o in OPS) + " |",
             "|---|---|---|" + "---|" * len(OPS)]
    for (layout, size), ops in _rows(results, dtype).items():
        any_r = next(iter(ops.values()))
        cells = []
        for op in OPS:
            r = ops.get(op)
            if r is None or "speedup_min" not in r:
                cells.append("—")
                continue
            a, m = r["speedup_min"], r["speedup_median"]
            txt = f"{a:.2f} / {m:.2f}"
            if not r["settled"]:
                txt += "†"
            if not r["agree"]:
                txt += " (outputs differ!)"
            cells.append(f"**{txt}**" if a < 1 else txt)
        shape = "(" + ",".join(map(str, any_r["shape"])) + ")"
        lines.append(f"| {layout} | {shape} | {fmt_bytes(any_r['bytes'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def times_table(results, dtype):
    """Markdown: min times, fastbn / PyTorch, per layout x size x op."""
    lines = ["| layout | x | " + " | ".join(OP_TITLES[o] for o in OPS) + " |",
             "|---|---|" + "---|" * len(OPS)]
    for (layout, size), ops in _rows(results, dtype).items():
        cells = []
        for op in OPS:
            r = ops.get(op)
            if r is None:
                cells.append("—")
                continue
            t = fmt_time(r["fastbn"]["min_s"])
            if "torch" in r:
                t += " / " + fmt_time(r["torch"]["min_s"])
            cells.append(t)
        nbytes = next(iter(ops.values()))["bytes"]
        lines.append(f"| {layout} | {fmt_bytes(nbytes)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(results, dtype):
    """One paragraph: how often fastbn is at least as fast, and the sweep's medians."""
    pts = [r for r in results if r["dtype"] == dtype and "speedup_min" in r]
    if not pts:
        return ""
    mins = [r["speedup_min"] for r in pts]
    meds = [r["speedup_median"] for r in pts]
    worst = min(pts, key=lambda r: r["speedup_min"])
    text = (f"{dtype}: fastbn >= 1.0x PyTorch (min) at {sum(v >= 1 for v in mins)} of {len(pts)} "
            f"points; median over the sweep {statistics.median(mins):.2f}x (min times), "
            f"{statistics.median(meds):.2f}x (median times); geometric mean "
            f"{math.exp(statistics.fmean(math.log(v) for v in mins)):.2f}x; lowest "
            f"{worst['speedup_min']:.2f}x ({point_name(worst['op'], worst['layout'], worst['size'])}).")
    loose = sum(not r["settled"] for r in pts)
    if loose:
        text += (f" † {loose} points did not settle (the {STABLE_K} fastest samples of each side "
                 f"within {STABLE_TOL:.0%}) in the time allowed: less certain.")
    bad = [r for r in pts if not r["agree"]]
    if bad:
        text += (f" **Outputs differ from PyTorch's at {len(bad)} points** (relative difference > "
                 f"{AGREE[dtype]:g}): " + ", ".join(
                     f"{point_name(r['op'], r['layout'], r['size'])} {r['rel_diff']:.1e}" for r in bad))
    return text


def plot(results, path):
    """Speed-up (PyTorch / fastbn) against the bytes of x: one panel per dtype x op,
    one colour per layout; solid from min times, dashed from median times."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = [dt for dt in DTYPES if any(r["dtype"] == dt and "speedup_min" in r for r in results)]
    if not dtypes:
        raise ValueError("nothing to plot: no point has a PyTorch time")
    fig, axes = plt.subplots(len(dtypes), len(OPS), figsize=(4.2 * len(OPS), 3.4 * len(dtypes)),
                             squeeze=False, sharex=True)
    colours = dict(zip(LAYOUTS, ("tab:blue", "tab:orange", "tab:green")))
    for i, dt in enumerate(dtypes):
        for j, op in enumerate(OPS):
            ax = axes[i][j]
            for layout in LAYOUTS:
                pts = sorted((r for r in results if r["dtype"] == dt and r["op"] == op
                              and r["layout"] == layout and "speedup_min" in r), key=lambda r: r["bytes"])
                if not pts:
                    continue
                xs = [r["bytes"] for r in pts]
                ax.plot(xs, [r["speedup_min"] for r in pts], "o-", color=colours[layout], label=layout,
                        markersize=3)
                ax.plot(xs, [r["speedup_median"] for r in pts], "--", color=colours[layout], alpha=0.6,
                        linewidth=1)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{dt}: {OP_TITLES[op]}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("speed-up (PyTorch time / fastbn)")
            if i == len(dtypes) - 1:
                ax.set_xlabel("bytes of x")
    axes[0][0].legend(fontsize=8, title="solid: min, dashed: median", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _command(args, dtypes):
    parts = ["python -m fastbn bench --sweep"]
    if len(dtypes) > 1:
        parts.append("--dtype all")
    elif dtypes != ["float32"]:
        parts.append(f"--dtype {dtypes[0]}")
    for opt in ("sizes", "backend", "repeat", "threads", "cases"):
        v = getattr(args, opt, None)
        if v is not None:
            parts.append(f"--{opt} {v!r}" if isinstance(v, str) and " " in v else f"--{opt} {v}")
    if getattr(args, "settle", 0.02) != 0.02:
        parts.append(f"--settle {args.settle}")
    parts += [f"--{f.replace('_', '-')}" for f in ("quick", "no_torch") if getattr(args, f, False)]
    return " ".join(parts)


def run(args):
    """``python -m fastbn bench --sweep``: measure, print the tables, write JSON / PNG."""
    quick = bool(getattr(args, "quick", False))
    dtype = getattr(args, "dtype", "float32") or "float32"
    dtypes = list(DTYPES) if dtype == "all" else [dtype]
    sizes = select_sizes(getattr(args, "sizes", None), quick)
    if getattr(args, "list", False):
        for dt in dtypes:
            for size in sizes:
                for layout in LAYOUTS:
                    for op in OPS:
                        print(f"{point_name(op, layout, size):28s} {dt:8s} {shape_of(size, layout)}")
        return 0
    load0 = load_average()
    env = Env(getattr(args, "threads", None), torch=not getattr(args, "no_torch", False),
              backend=getattr(args, "backend", None))
    settle = getattr(args, "settle", 0.02)
    repeat = getattr(args, "repeat", None) or (3 if quick else None)
    t0 = time.perf_counter()
    results = sweep(dtypes, sizes, env, backend=getattr(args, "backend", None), repeat=repeat,
                    settle=settle, min_batch=0.001 if quick else MIN_BATCH, stabilize=not quick,
                    pattern=getattr(args, "cases", None), progress=sys.stderr)
    wall = time.perf_counter() - t0
    machine = env.describe()
    note = " (--quick: tiny sizes, NOT a measurement)" if quick else ""
    print(f"\n## fastbn bench --sweep{note}\n")
    print(machine + "\n")
    print(load_note(load0, load_average()) + "\n")
    print(f"Command: `{_command(args, dtypes)}`; {wall:.0f} s. Both sides write into preallocated "
          "outputs (out=); NHWC is a channels_last tensor for PyTorch over the same memory; "
          "float16 with float32 parameters. fastbn and PyTorch interleaved; repeats by size "
          f"({'--repeat ' + str(repeat) if repeat else f'{MIN_REPEAT}-{MAX_REPEAT}'}"
          + ("" if quick else f", more until the {STABLE_K} fastest samples of each side are "
             f"within {STABLE_TOL:.0%}") + ").\n")
    for dt in dtypes:
        if env.torch is not None:
            print(f"### {dt}: speed-up, PyTorch time / fastbn time (min / median; > 1: fastbn faster)\n")
            print(speedup_table(results, dt) + "\n")
            print(summary(results, dt) + "\n")
            print(f"### {dt}: min time per call, fastbn / PyTorch\n")
        else:
            print(f"### {dt}: fastbn min time per call (PyTorch not available: no speed-up)\n")
        print(times_table(results, dt) + "\n")
    if getattr(args, "json", None):
        with open(args.json, "w") as fh:
            json.dump({"machine": machine, "command": _command(args, dtypes), "quick": quick,
                       "threads": env.threads, "wall_s": wall, "results": results}, fh, indent=1)
    if getattr(args, "plot", None):
        if env.torch is None:
            print("(no plot: the speed-up needs PyTorch)")
        else:
            print(f"Plot: {plot(results, args.plot)}")
    return 0

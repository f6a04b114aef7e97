"""``python -m fastbn bench``: fastbn against its peers and the bandwidth roofline.

Batch norm moves a few bytes per flop, so the honest yardstick is the memory
bandwidth measured *in the same run*: every case times, interleaved, fastbn,
its peers (PyTorch CPU when importable, NumPy naive) and a 2-thread copy of
the same number of bytes as ``x``.  With ``B`` = bytes of ``x`` and the copy
moving ``2B`` (read + write) in ``t_copy``, the bandwidth is ``2B / t_copy``
and the fraction of the roofline of a kernel that must move ``k*B`` bytes
(training forward k=3, inference 2, backward 5) in ``t`` is
``(k*B / bandwidth) / t``.  Two kinds of copy run: ordinary ones, which pay
the write-allocate read of the destination like any ordinary store, and one
with streaming (non-temporal) stores, which does not.  The fraction uses the
fastest copy of the size; where fastbn streams its output (big float32
outputs) a fraction above 1 against an ordinary copy is that saved read.

Timing (:mod:`fastbn.tools.harness`): warm-up, then batches of calls,
runners interleaved, order alternating between repeats; min and median over
repeats.

The cases are fastbn's performance goals (roofline fractions at 103 MB, call
times for tiny inputs, ratios to PyTorch); ``--quick`` shrinks them for a
smoke test.  ``--sweep`` runs :mod:`fastbn.tools.sweep` instead (every op x
layout x size against PyTorch); ``--gpu`` / ``--dask`` add
:mod:`fastbn.tools.bench_gpu` / :mod:`fastbn.tools.bench_dask`.
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from .harness import (Env, Runner, cpu_count, default_backend, load_average, load_note, measure,
                      min_median)

EPS = 1e-5
# The environment as this module loads (before any benchmark runs): new
# processes of the import case start from it.
_USER_ENV = dict(os.environ)
_ROOF = {"train": 3, "fresh": 3, "infer": 2, "backward": 5}  # bytes moved, in units of B


# -- cases ---------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A goal on one case: ``kind`` is ``"frac"`` (fastbn's roofline fraction
    >= goal), ``"time"`` (fastbn's time <= goal, in the case's unit) or
    ``"ratio"`` (peer time / fastbn time >= goal, against ``peer``)."""
    kind: str
    goal: float
    peer: str = "torch"     # for kind "ratio": which peer's ratio


@dataclass(frozen=True)
class Case:
    """One row family of the table.  ``shape`` is used normally, ``quick_shape``
    with ``--quick``; ``unit`` is how times are printed (``ms``, ``us``, ``s``)."""
    title: str
    mode: str               # train, fresh, infer, backward, import
    shape: tuple
    quick_shape: tuple
    channel_axis: int = 1
    dtype: str = "float32"
    unit: str = "ms"
    torch_threads: int = 0  # 0: as many as fastbn; 1: the single-thread peer (small calls)
    targets: tuple = ()
    suffix: str = ""

    @property
    def name(self):
        """Name with the full-size shape (what ``--cases`` matches)."""
        return self.label(False)

    def label(self, quick):
        shape = self.quick_shape if quick else self.shape
        return f"{self.title} ({','.join(map(str, shape))}){self.suffix}"


def _frac(goal):
    return Target("frac", goal)


CASES = (
    Case("train NCHW", "train", (128, 64, 56, 56), (4, 8, 12, 12), 1,
         targets=(_frac(0.80), Target("ratio", 2.0))),
    Case("train NHWC", "train", (128, 56, 56, 64), (4, 12, 12, 8), -1,
         targets=(_frac(0.80), Target("ratio", 1.0))),
    Case("infer NCHW", "infer", (128, 64, 56, 56), (4, 8, 12, 12), 1,
         targets=(_frac(0.85),)),
    Case("infer NHWC", "infer", (128, 56, 56, 64), (4, 12, 12, 8), -1,
         targets=(_frac(0.85),)),
    Case("backward NCHW", "backward", (128, 64, 56, 56), (4, 8, 12, 12), 1,
         targets=(_frac(0.75),)),
    Case("backward NHWC", "backward", (128, 56, 56, 64), (4, 12, 12, 8), -1,
         targets=(_frac(0.75),)),
    Case("train NCHW", "train", (32, 64, 56, 56), (2, 8, 12, 12), 1,
         targets=(_frac(0.5),), suffix=" L3-resident"),
    Case("train NHWC", "train", (32, 56, 56, 64), (2, 12, 12, 8), -1,
         targets=(_frac(0.5),), suffix=" L3-resident"),
    Case("train", "train", (4096, 1024), (256, 64), -1,
         targets=(_frac(0.6),), suffix=" over axis 0"),
    Case("train", "train", (2500, 30), (250, 30), -1, unit="us",
         torch_threads=1, targets=(Target("time", 15.0),), suffix=" over axis 0"),
    Case("train", "train", (16, 4), (16, 4), -1, unit="us",
         torch_threads=1, targets=(Target("time", 5.0),), suffix=" over axis 0, whole call"),
    Case("fresh out NCHW", "fresh", (128, 64, 56, 56), (4, 8, 12, 12), 1,
         targets=(Target("ratio", 1.0, "torch F.batch_norm"),)),
    Case("fresh out NHWC", "fresh", (128, 56, 56, 64), (4, 12, 12, 8), -1,
         targets=(Target("ratio", 1.0, "torch F.batch_norm"),)),
    Case("train float64 NCHW", "train", (32, 64, 56, 56), (2, 8, 12, 12), 1,
         dtype="float64", targets=(_frac(0.7),)),
    Case("import + first train call, new process, NCHW", "import", (8, 16, 28, 28), (8, 16, 28, 28), 1,
         unit="s", targets=(Target("time", 0.5),)),
)


# -- command line ----------------------------------------------------------------

def add_arguments(parser):
    """Options of ``python -m fastbn bench`` (the cases and ``--sweep``)."""
    parser.add_argument("--backend", default=None,
                        help="fastbn CPU backend: numba, cython or numpy (default: the dispatcher's choice)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats: a smoke test, not a measurement")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed repeats per runner (default 7; 3 with --quick; "
                             "with --sweep: chosen by size)")
    parser.add_argument("--cases", default=None,
                        help="run only cases whose name contains this substring (case-insensitive; "
                             "several separated by '|', e.g. 'NCHW (128|(16,4)'; with --sweep: "
                             "points named like 'train NHWC 4 MB')")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for fastbn (Numba) and PyTorch (default: the CPUs this process may use)")
    parser.add_argument("--settle", type=float, default=0.02, metavar="S",
                        help="seconds of sleep before each timed batch, so the other OpenMP "
                             "runtime's spinning threads are idle (default 0.02)")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if importable")
    parser.add_argument("--no-naive", action="store_true", help="leave the NumPy naive peer out")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU cases (with --gpu / --dask)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--list", action="store_true", help="list the cases (or sweep points) and exit")
    parser.add_argument("--gpu", action="store_true",
                        help="also run the CUDA benchmark (needs CuPy and a GPU)")
    parser.add_argument("--dask", action="store_true",
                        help="also run the Dask benchmark (needs dask[distributed])")
    parser.add_argument("--calls", action="store_true",
                        help="instead of the cases: what a small call of each public function "
                             "costs outside its kernel (whole call against the fused kernel alone)")
    sweep = parser.add_argument_group(
        "sweep", "--sweep: train forward, inference and backward x NCHW, NHWC (channels_last) and "
                 "(N, C) x sizes from 4 KB to 103 MB, fastbn against PyTorch, out= on both sides")
    sweep.add_argument("--sweep", action="store_true",
                       help="run the sweep instead of the cases; prints the speed-up table")
    sweep.add_argument("--dtype", default="float32", choices=("float16", "float32", "float64", "all"),
                       help="data type of the sweep (default float32; float16 uses float32 "
                            "parameters; 'all': the three)")
    sweep.add_argument("--sizes", default=None, metavar="LIST",
                       help="comma-separated sizes of the sweep, as in its table (e.g. '4KB,103MB'; "
                            "default all)")
    sweep.add_argument("--plot", default=None, metavar="PATH",
                       help="write a PNG of speed-up against size per op and layout (matplotlib)")
    return parser


# -- data and callables ----------------------------------------------------------------

def _reduced(ndim, ax):
    return tuple(a for a in range(ndim) if a != ax)


def _bshape(ndim, ax, C):
    s = [1] * ndim
    s[ax] = C
    return tuple(s)


class Data:
    """Arrays of one case, built once: x (and dy), parameters, outputs."""

    def __init__(self, shape, ax, dtype, backward):
        rng = np.random.default_rng(0)
        self.ax = ax % len(shape)
        self.C = shape[self.ax]
        dt = np.dtype(dtype)
        self.x = rng.standard_normal(shape, dtype=dt) * 2 + 0.5
        self.dy = rng.standard_normal(shape, dtype=dt) if backward else None
        self.scale = (1 + 0.1 * rng.standard_normal(self.C)).astype(dt)
        self.offset = (0.1 * rng.standard_normal(self.C)).astype(dt)
        red = _reduced(len(shape), self.ax)
        self.mean = self.x.mean(axis=red, dtype=np.float64).astype(dt)
        self.var = self.x.var(axis=red, dtype=np.float64).astype(dt)
        self.invstd = (1 / np.sqrt(self.var.astype(np.float64) + EPS)).astype(dt)
        self.n = self.x.size // self.C

    def out(self):
        """A preallocated output, pre-faulted (its pages written once)."""
        y = np.empty_like(self.x)
        y.fill(0)
        return y


def fastbn_runner(case, d):
    """The fastbn call of ``case`` on ``d``, with the default backend (see
    harness.default_backend)."""
    import fastbn as fbn
    ax = case.channel_axis
    x, s, o = d.x, d.scale, d.offset
    if case.mode == "train":
        y = d.out()
        fn = lambda: fbn.batch_norm_train(x, s, o, channel_axis=ax, eps=EPS, out=y)  # noqa: E731
    elif case.mode == "fresh":
        fn = lambda: fbn.batch_norm_train(x, s, o, channel_axis=ax, eps=EPS)  # noqa: E731
    elif case.mode == "infer":
        y, m, v = d.out(), d.mean, d.var
        fn = lambda: fbn.batch_norm_infer(x, s, o, m, v, channel_axis=ax, eps=EPS,  # noqa: E731
                                          out=y)
    elif case.mode == "backward":
        dx, dy, m, inv = d.out(), d.dy, d.mean, d.invstd
        fn = lambda: fbn.batch_norm_backward(dy, x, s, m, inv, channel_axis=ax,  # noqa: E731
                                             out=dx)
    else:
        raise ValueError(case.mode)
    label = "fastbn" + ("" if case.mode != "fresh" else " (no out=)")
    return Runner(label, fn, "fastbn")


def _nc(t, ax):
    """A tensor view with the channel axis at dim 1 (channels_last strides for NHWC)."""
    if ax == 1:
        return t
    perm = [0, ax] + [a for a in range(1, t.dim()) if a != ax]
    return t.permute(*perm)


def torch_runners(case, d, env):
    """PyTorch peers of ``case`` sharing ``d``'s memory (torch.from_numpy)."""
    torch = env.torch
    nt = case.torch_threads or env.threads
    before = env.torch_threads(nt)
    ax = d.ax
    x = _nc(torch.from_numpy(d.x), ax)
    w, b = torch.from_numpy(d.scale), torch.from_numpy(d.offset)
    pdt = w.dtype
    sm, si = torch.empty(d.C, dtype=pdt), torch.empty(d.C, dtype=pdt)
    ops = torch.ops.aten
    th = f"{nt}t"
    if case.mode == "train":
        y = _nc(torch.from_numpy(d.out()), ax)
        fn = lambda: ops.native_batch_norm.out(x, w, b, None, None, True, 0.1, EPS,  # noqa: E731
                                               out=y, save_mean=sm, save_invstd=si)
        return [Runner("torch native_batch_norm.out", fn, "peer", before, th)]
    if case.mode == "fresh":
        F = torch.nn.functional
        fn = lambda: F.batch_norm(x, None, None, w, b, True, 0.1, EPS)  # noqa: E731
        return [Runner("torch F.batch_norm", fn, "peer", before, th)]
    if case.mode == "infer":
        y = _nc(torch.from_numpy(d.out()), ax)
        rm, rv = torch.from_numpy(d.mean), torch.from_numpy(d.var)
        fn = lambda: ops.native_batch_norm.out(x, w, b, rm, rv, False, 0.1, EPS,  # noqa: E731
                                               out=y, save_mean=sm, save_invstd=si)
        return [Runner("torch native_batch_norm.out", fn, "peer", before, th)]
    if case.mode == "backward":
        dy = _nc(torch.from_numpy(d.dy), ax)
        m, inv = torch.from_numpy(d.mean), torch.from_numpy(d.invstd)
        dx = _nc(torch.from_numpy(d.out()), ax)
        dw, db = torch.empty(d.C, dtype=pdt), torch.empty(d.C, dtype=pdt)
        mask = [True, True, True]
        f_out = lambda: ops.native_batch_norm_backward.out(  # noqa: E731
            dy, x, w, None, None, m, inv, True, EPS, mask, out0=dx, out1=dw, out2=db)
        f_new = lambda: ops.native_batch_norm_backward(dy, x, w, None, None, m, inv, True,  # noqa: E731
                                                       EPS, mask)
        return [Runner("torch native_batch_norm_backward.out", f_out, "peer", before, th),
                Runner("torch native_batch_norm_backward", f_new, "peer", before, th)]
    raise ValueError(case.mode)


def naive_runner(case, d):
    """NumPy naive: mean, var, normalize (allocating, one thread)."""
    x, ax = d.x, d.ax
    red = _reduced(x.ndim, ax)
    bs = _bshape(x.ndim, ax, d.C)
    s, o = d.scale.reshape(bs), d.offset.reshape(bs)
    if case.mode in ("train", "fresh"):
        def fn():
            m = x.mean(axis=red, keepdims=True)
            v = x.var(axis=red, keepdims=True)
            return (x - m) / np.sqrt(v + EPS) * s + o
    elif case.mode == "infer":
        m, v = d.mean.reshape(bs), d.var.reshape(bs)

        def fn():
            return (x - m) / np.sqrt(v + EPS) * s + o
    elif case.mode == "backward":
        dy, m, inv, n = d.dy, d.mean.reshape(bs), d.invstd.reshape(bs), d.n

        def fn():
            xhat = (x - m) * inv
            doff = dy.sum(axis=red, keepdims=True)
            dscale = (dy * xhat).sum(axis=red, keepdims=True)
            return s * inv / n * (n * dy - doff - xhat * dscale), dscale, doff
    else:
        raise ValueError(case.mode)
    return Runner("numpy naive", fn, "peer", threads="1t")


# -- one case -------------------------------------------------------------------------

_UNIT = {"s": 1.0, "ms": 1e3, "us": 1e6}


def run_case(case, args, env, backend, repeat):
    """Measure one (non-import) case; returns a result dict."""
    shape = case.quick_shape if args.quick else case.shape
    d = Data(shape, case.channel_axis, case.dtype, case.mode == "backward")
    nbytes = d.x.nbytes
    runners = [fastbn_runner(case, d)]
    if env.backend in ("numba", "cython"):
        runners[0].threads = f"{env.threads}t"
    if env.torch is not None:
        runners += torch_runners(case, d, env)
    if not args.no_naive and case.mode != "fresh" and (case.unit != "us" or not args.quick):
        runners.append(naive_runner(case, d))
    roof = _ROOF.get(case.mode) if case.unit == "ms" else None
    if roof:
        runners += env.copy_runners(nbytes)
    small = case.unit == "us"
    with default_backend(backend):
        measure(runners, repeat * (3 if small else 1), warmup=(20 if small else 2),
                min_batch=(0.001 if args.quick else 0.01 if small else 0.005), settle=args.settle)
    rows = []
    for r in runners:
        tmin, tmed = min_median(r.times)
        row = {"label": r.label, "role": r.role, "threads": r.threads, "number": r.number,
               "min_s": tmin, "median_s": tmed, "times_s": r.times}
        if r.role == "copy":
            row["gbps_min"] = 2 * nbytes / tmin / 1e9
        rows.append(row)
    copies = [r for r in rows if r["role"] == "copy"]
    best = max(copies, key=lambda r: r["gbps_min"]) if copies else None
    res = {"case": case.label(args.quick), "mode": case.mode, "shape": list(shape), "dtype": case.dtype,
           "unit": case.unit, "bytes": nbytes, "roofline_bytes": (roof * nbytes if roof else None),
           "case_bandwidth_gbps": best["gbps_min"] if best else None,
           "runners": rows}
    set_bandwidth(res, best["gbps_min"] if best else None, best["label"] if best else None)
    return res


def set_bandwidth(res, gbps, source):
    """Roofline fractions of ``res``'s runners at ``gbps`` (GB/s, read + write counted):
    ``frac = roofline_bytes / bandwidth / time`` for min and median times."""
    res["bandwidth_gbps"], res["bandwidth_from"] = gbps, source
    if not gbps or not res["roofline_bytes"]:
        return
    t_roof = res["roofline_bytes"] / (gbps * 1e9)
    for row in res["runners"]:
        if row["role"] != "copy":
            row["frac_min"], row["frac_median"] = t_roof / row["min_s"], t_roof / row["median_s"]


def use_best_bandwidth(results):
    """Re-base every fraction on the best copy of the same byte count anywhere in
    this run (TARGETS.md: "bytes / best measured bandwidth at that size"): one
    case's copies can all land in a slow window of a shared machine, and a
    fraction against a slow copy flatters the kernel.  Returns
    ``{bytes: (GB/s, source)}``."""
    best = {}
    for res in results:
        for row in res["runners"]:
            if row["role"] == "copy" and row["gbps_min"] > best.get(res["bytes"], (0, ""))[0]:
                best[res["bytes"]] = (row["gbps_min"], f"{row['label']} in '{res['case']}'")
    for res in results:
        if res["bytes"] in best and res["roofline_bytes"]:
            set_bandwidth(res, *best[res["bytes"]])
    return best


_IMPORT_SCRIPT = """\
import time
t0 = time.perf_counter()
import numpy as np
{imp}
t1 = time.perf_counter()
x = np.random.default_rng(0).standard_normal({shape}, dtype=np.float32)
t2 = time.perf_counter()
{call}
t3 = time.perf_counter()
print("TIMES", t1 - t0, t3 - t2, (t1 - t0) + (t3 - t2))
"""


def _subprocess_time(script, env_vars):
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env_vars, timeout=300)
    wall = time.perf_counter() - t0
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("TIMES")]
    if res.returncode != 0 or not line:
        raise RuntimeError(f"subprocess failed (rc {res.returncode}): {res.stderr[-2000:]}")
    imp, call, total = (float(v) for v in line[-1].split()[1:])
    return imp, call, total, wall


def run_import_case(case, args, env, backend, repeat):
    """Import + first call in a fresh interpreter (warm Numba cache): fastbn vs torch."""
    shape = case.quick_shape if args.quick else case.shape
    be = repr(backend)
    scripts = {"fastbn": _IMPORT_SCRIPT.format(
        imp="import fastbn as fbn", shape=shape,
        call=f"fbn.batch_norm_train(x, channel_axis={case.channel_axis}, backend={be})")}
    if env.torch is not None and not args.quick:  # importing torch takes seconds
        scripts["torch F.batch_norm"] = _IMPORT_SCRIPT.format(
            imp="import torch\nimport torch.nn.functional as F", shape=shape,
            call="F.batch_norm(torch.from_numpy(x), None, None, training=True)")
    env_vars = dict(_USER_ENV)
    # Warm-up processes: fill Numba's on-disk cache, page in the libraries.
    for s in scripts.values():
        _subprocess_time(s, env_vars)
    res = {k: [] for k in scripts}
    for i in range(repeat):
        for k in (list(scripts) if i % 2 == 0 else list(scripts)[::-1]):
            res[k].append(_subprocess_time(scripts[k], env_vars))
    rows = []
    for k, vals in res.items():
        totals = [v[2] for v in vals]
        tmin, tmed = min_median(totals)
        rows.append({"label": k + " (import + first call)", "role": "fastbn" if k == "fastbn" else "peer",
                     "threads": "", "number": 1, "min_s": tmin, "median_s": tmed, "times_s": totals,
                     "import_s_median": statistics.median(v[0] for v in vals),
                     "first_call_s_median": statistics.median(v[1] for v in vals),
                     "process_wall_s_median": statistics.median(v[3] for v in vals)})
    return {"case": case.label(args.quick), "mode": "import", "shape": list(shape), "dtype": case.dtype,
            "unit": "s", "bytes": None, "roofline_bytes": None, "bandwidth_gbps": None,
            "case_bandwidth_gbps": None, "bandwidth_from": None, "runners": rows}


# -- targets and printing ------------------------------------------------------------------

def _fmt(v, unit):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    v = v * _UNIT[unit]
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _pair(a, b, fmt="{:.2f}"):
    if a is None:
        return "—"
    return f"{fmt.format(a)} / {fmt.format(b)}"


def evaluate(result, case):
    """Target verdicts of one case: list of dicts (text, value min/median, met)."""
    rows = {r["label"]: r for r in result["runners"]}
    fb = next(r for r in result["runners"] if r["role"] == "fastbn")
    out = []
    for t in case.targets:
        if t.kind == "frac":
            if "frac_min" not in fb:
                continue
            vals = (fb["frac_min"], fb["frac_median"])
            met = [v >= t.goal for v in vals]
            text = f">= {t.goal:g} of the {_ROOF[case.mode]}B roofline"
            shown = _pair(*vals)
        elif t.kind == "time":
            vals = (fb["min_s"] * _UNIT[case.unit], fb["median_s"] * _UNIT[case.unit])
            met = [v <= t.goal for v in vals]
            text = f"<= {t.goal:g} {case.unit}"
            shown = _pair(*vals, fmt="{:.3g}") + f" {case.unit}"
        else:  # ratio against a peer
            peer = next((r for label, r in rows.items() if label.startswith(t.peer) and r["role"] == "peer"),
                        None)
            if peer is None:
                continue
            vals = (peer["min_s"] / fb["min_s"], peer["median_s"] / fb["median_s"])
            met = [v >= t.goal if t.goal > 1 else v > t.goal for v in vals]
            text = (f"{t.goal:g}x faster than {peer['label']}" if t.goal > 1
                    else f"faster than {peer['label']}")
            shown = _pair(*vals) + " x"
        verdict = "yes" if all(met) else ("min only" if met[0] else "no")
        out.append({"case": result["case"], "target": text, "value": shown, "met": verdict})
    return out


def table(results):
    """The results as a markdown table (one row per fastbn/peer runner; copies summarised)."""
    head = ("| case | runner | threads | unit | min | median | peer/fastbn (min / med) "
            "| roofline fraction (min / med) | copy GB/s (case / best) |")
    lines = [head, "|" + "---|" * 9]
    for res in results:
        unit = res["unit"]
        fb = next(r for r in res["runners"] if r["role"] == "fastbn")
        gbps = (f"{res['case_bandwidth_gbps']:.1f} / {res['bandwidth_gbps']:.1f}"
                if res["bandwidth_gbps"] else "—")
        for r in res["runners"]:
            if r["role"] == "copy":
                continue
            ratio = ("—" if r["role"] == "fastbn" else
                     _pair(r["min_s"] / fb["min_s"], r["median_s"] / fb["median_s"]))
            # 3 significant digits: a --quick case's few-KB fraction (0.004) showed as 0.00
            frac = (_pair(r.get("frac_min"), r.get("frac_median"), fmt="{:.3g}")
                    if "frac_min" in r else "—")
            lines.append(f"| {res['case']} | {r['label']} | {r['threads'] or '—'} | {unit} "
                         f"| {_fmt(r['min_s'], unit)} | {_fmt(r['median_s'], unit)} | {ratio} "
                         f"| {frac} | {gbps} |")
    return "\n".join(lines)


def targets_table(verdicts):
    lines = ["| case | target | fastbn (min / median) | met |", "|---|---|---|---|"]
    for v in verdicts:
        lines.append(f"| {v['case']} | {v['target']} | {v['value']} | {v['met']} |")
    return "\n".join(lines)


def describe_machine(env, args_no_torch=False):
    """The machine and libraries of this run, one paragraph."""
    text = env.describe(", 1 for the us cases")
    if env.torch is None:
        text = text.replace("not installed or left out", "left out (--no-torch)" if args_no_torch
                            else "not installed")
    return text


def select(cases, pattern):
    if not pattern:
        return list(cases)
    pats = [p.strip().lower() for p in pattern.split("|") if p.strip()]
    return [c for c in cases if any(p in c.name.lower() for p in pats)]


def run(args):
    """Entry point of ``python -m fastbn bench``; prints the tables, returns 0."""
    if args.sweep:
        from . import sweep
        return sweep.run(args)
    if args.calls:
        from . import calls
        return calls.run(args)
    cases = select(CASES, args.cases)
    if args.list:
        for c in CASES:
            print(f"{c.name:40s} {c.mode:9s} {c.dtype:8s} shape {c.shape}  quick {c.quick_shape}")
        return 0
    rc = 0
    if not args.no_cpu and cases:
        rc = run_cpu(cases, args)
    if args.gpu:
        from .bench_gpu import run_gpu
        rc = run_gpu(args) or rc
    if args.dask:
        from .bench_dask import run_dask
        rc = run_dask(args) or rc
    return rc


def _bytes(b):
    return f"{b / 1e6:.0f} MB" if b >= 1e7 else f"{b / 1e6:.1f} MB" if b >= 1e6 else f"{b / 1e3:.0f} kB"


def _command(args):
    """The command line that reproduces this run (from the parsed options)."""
    parts = ["python -m fastbn bench"]
    for opt in ("backend", "repeat", "cases", "threads"):
        v = getattr(args, opt, None)
        if v is not None:
            parts.append(f"--{opt} {v!r}" if opt == "cases" else f"--{opt} {v}")
    if args.settle != 0.02:
        parts.append(f"--settle {args.settle}")
    parts += [f"--{f.replace('_', '-')}" for f in ("quick", "no_torch", "no_naive") if getattr(args, f)]
    return " ".join(parts)


def run_cpu(cases, args):
    load0 = load_average()
    env = Env(args.threads, torch=not args.no_torch, backend=args.backend)
    backend = args.backend
    repeat = args.repeat or (3 if args.quick else 7)
    results = []
    t_start = time.perf_counter()
    for case in cases:
        t0 = time.perf_counter()
        if case.mode == "import":
            res = run_import_case(case, args, env, backend, 1 if args.quick else min(repeat, 3))
        else:
            res = run_case(case, args, env, backend, repeat)
        results.append(res)
        print(f"  {res['case']}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    best = use_best_bandwidth(results)
    verdicts = [v for case, res in zip(cases, results) for v in evaluate(res, case)]
    quick = " (--quick: tiny sizes, NOT a measurement)" if args.quick else ""
    print(f"\n## fastbn bench{quick}\n")
    print(describe_machine(env, args.no_torch) + "\n")
    print(load_note(load0, load_average()) + "\n")
    print(f"Command: `{_command(args)}`; "
          f"repeats: {repeat} (x3 for us cases); float32 unless the case says; out= preallocated "
          "except 'fresh out'. Roofline: train 3B, infer 2B, backward 5B (B = bytes of x) at the "
          "bandwidth of the best 2-thread copy of B bytes in this run (copies interleaved with "
          "every case; GB/s count read + write; 'case' = the best copy within that case).\n")
    if best:
        print("Bandwidth (best copy per size, this run): " + "; ".join(
            f"{_bytes(b)}: {g:.1f} GB/s ({src})" for b, (g, src) in sorted(best.items())) + "\n")
    print(table(results))
    if verdicts:
        print("\n### Targets\n")
        print(targets_table(verdicts))
        met = sum(v["met"] == "yes" for v in verdicts)
        print(f"\n{met} of {len(verdicts)} targets met (min and median); "
              f"total bench time {time.perf_counter() - t_start:.0f} s.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": describe_machine(env, args.no_torch), "quick": bool(args.quick),
                       "repeat": repeat, "bandwidth": {str(b): v for b, v in best.items()},
                       "results": results, "targets": verdicts}, fh, indent=1)
    return 0

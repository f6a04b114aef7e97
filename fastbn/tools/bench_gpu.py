"""``python -m fastbn bench --gpu``: fastbn's CUDA backend against cuDNN and the copy roofline.

In one run, on the same device tensors, every case times:

* ``fastbn`` on CuPy arrays (``out=`` preallocated: the fast path; and ``fresh``,
  a new output from CuPy's pool every call);
* PyTorch ``F.batch_norm`` (cuDNN) on the same memory, NCHW
  (``contiguous_format``) or NHWC (``channels_last``) as the case says; for the
  backward ``aten.native_batch_norm_backward``;
* a naive CuPy version (``mean``, ``var``, normalize: several passes);
* a device-to-device copy of ``x`` (``cudaMemcpyAsync`` and a CuPy elementwise
  copy; the faster one) for the bandwidth: ``bw = 2B / t_copy`` with ``B`` the
  bytes of ``x``.

A kernel that must move ``k*B`` bytes (training forward k=3: read x for the
statistics, read x again, write y; inference 2; backward 5) in ``t`` reaches
``frac = (k*B / bw) / t`` of the roofline.  ``x torch`` is torch's time over
the runner's (> 1: faster than torch).

Timing: CUDA events on the current stream around a batch of calls (enough to
last ~2 ms), after warm-up (compilation, pool growth); runners interleaved per
repeat; min and median over repeats.  Also printed: the float32 variance
relative error at offset 1e6 (the issue's accuracy bar) for fastbn and torch.
"""

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

EPS = 1e-5
_ROOF = {"train": 3, "infer": 2, "backward": 5}

# (title, mode, shape as stored, channel axis, dtype, quick shape)
CASES = (
    ("NCHW 268 MB", "train", (256, 64, 64, 64), 1, "float32", (8, 16, 32, 32)),
    ("NHWC 268 MB", "train", (256, 64, 64, 64), -1, "float32", (8, 32, 32, 16)),
    ("NCHW 268 MB", "infer", (256, 64, 64, 64), 1, "float32", (8, 16, 32, 32)),
    ("NHWC 268 MB", "infer", (256, 64, 64, 64), -1, "float32", (8, 32, 32, 16)),
    ("NCHW 268 MB", "backward", (256, 64, 64, 64), 1, "float32", (8, 16, 32, 32)),
    ("NHWC 268 MB", "backward", (256, 64, 64, 64), -1, "float32", (8, 32, 32, 16)),
    ("NCHW 103 MB", "train", (128, 64, 56, 56), 1, "float32", (4, 16, 28, 28)),
    ("NHWC 103 MB", "train", (128, 56, 56, 64), -1, "float32", (4, 28, 28, 16)),
    ("NCHW 1 GiB", "train", (256, 256, 64, 64), 1, "float32", (8, 16, 32, 32)),
    ("NCHW f16 134 MB", "train", (256, 64, 64, 64), 1, "float16", (8, 16, 32, 32)),
    ("NHWC f16 134 MB", "train", (256, 64, 64, 64), -1, "float16", (8, 32, 32, 16)),
    ("NCHW f64 205 MB", "train", (32, 64, 112, 112), 1, "float64", (4, 16, 28, 28)),
    ("(4096,1024) axis 0", "train", (4096, 1024), -1, "float32", (256, 128)),
    ("(2500,30) axis 0", "train", (2500, 30), -1, "float32", (2500, 30)),
    ("(16,4) axis 0 (overhead)", "train", (16, 4), -1, "float32", (16, 4)),
)


def add_arguments(parser):
    """Options when run as ``python -m fastbn.bench_gpu`` (``bench --gpu`` passes its own)."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--repeat", type=int, default=None, help="timed repeats (default 15; 3 quick)")
    parser.add_argument("--cases", default=None, help="substrings of case names, comma-separated")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--no-naive", action="store_true", help="leave naive CuPy out")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write results as JSON")
    return parser


# -- timing ------------------------------------------------------------------------

def _time_batch(cp, fn, number):
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(number):
        fn()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / 1e3 / number


def measure(cp, runners, repeat):
    """{label: [seconds per call, ...]} over ``repeat`` interleaved batches."""
    numbers = {}
    for label, fn in runners.items():
        for _ in range(3):  # warm-up: compilation, pool growth
            fn()
        cp.cuda.get_current_stream().synchronize()
        t = _time_batch(cp, fn, 1)
        numbers[label] = max(1, min(1000, int(0.002 / max(t, 1e-7))))
    times = {label: [] for label in runners}
    order = list(runners)
    for r in range(repeat):
        for label in (order if r % 2 == 0 else order[::-1]):
            times[label].append(_time_batch(cp, runners[label], numbers[label]))
    return times


# -- runners -------------------------------------------------------------------------

def _torch_cuda():
    try:
        import torch
        if torch.cuda.is_available():
            return torch
    except ImportError:
        pass
    return None


def _make_case(cp, shape, ax, dtype, mode, seed=0):
    rs = cp.random.RandomState(seed)
    x = (0.5 + 2.0 * rs.standard_normal(shape, dtype=np.float32)).astype(dtype)
    C = shape[ax]
    pdt = np.float32 if dtype == np.float16 else dtype
    d = {"x": x, "C": C, "ax": ax % len(shape), "pdt": pdt,
         "scale": (1.0 + 0.1 * rs.standard_normal(C)).astype(pdt),
         "offset": (0.1 * rs.standard_normal(C)).astype(pdt),
         "rm": cp.zeros(C, pdt), "rv": cp.ones(C, pdt), "out": cp.empty_like(x)}
    if mode == "backward":
        d["dy"] = rs.standard_normal(shape, dtype=np.float32).astype(dtype)
        axes = tuple(a for a in range(x.ndim) if a != d["ax"])
        xf = x.astype(np.float64)
        d["mean"] = xf.mean(axis=axes).astype(pdt)
        d["invstd"] = (1.0 / cp.sqrt(xf.var(axis=axes) + EPS)).astype(pdt)
    return d


def fastbn_runners(fbn, mode, d):
    x, ax = d["x"], d["ax"]
    if mode == "train":
        return {
            "fastbn out=": lambda: fbn.batch_norm_train(
                x, d["scale"], d["offset"], channel_axis=ax, eps=EPS, running_mean=d["rm"],
                running_var=d["rv"], out=d["out"]),
            "fastbn fresh": lambda: fbn.batch_norm_train(
                x, d["scale"], d["offset"], channel_axis=ax, eps=EPS, running_mean=d["rm"],
                running_var=d["rv"]),
        }
    if mode == "infer":
        return {"fastbn out=": lambda: fbn.batch_norm_infer(
            x, d["scale"], d["offset"], d["rm"], d["rv"], channel_axis=ax, eps=EPS, out=d["out"])}
    return {"fastbn out=": lambda: fbn.batch_norm_backward(
        d["dy"], x, d["scale"], d["mean"], d["invstd"], channel_axis=ax, out=d["out"])}


def _as_torch_nchw(torch, a, ax):
    """A zero-copy torch view of CuPy array ``a`` with channels on dim 1 (channels_last memory
    when ``a`` stores them last)."""
    t = torch.as_tensor(a, device="cuda")
    if ax != 1 and t.ndim > 1:
        t = t.movedim(ax, 1)
    return t


def torch_runners(torch, mode, d):
    F = torch.nn.functional
    x = _as_torch_nchw(torch, d["x"], d["ax"])
    nhwc = d["ax"] != 1 and x.ndim == 4
    tag = "torch channels_last" if nhwc else "torch"
    w, b = torch.as_tensor(d["scale"], device="cuda"), torch.as_tensor(d["offset"], device="cuda")
    rm, rv = torch.as_tensor(d["rm"], device="cuda").clone(), torch.as_tensor(d["rv"], device="cuda").clone()
    if x.dtype == torch.float16:  # cuDNN takes float32 parameters with half data
        w, b, rm, rv = w.float(), b.float(), rm.float(), rv.float()

    def train():
        with torch.no_grad():
            return F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=EPS)

    def infer():
        with torch.no_grad():
            return F.batch_norm(x, rm, rv, w, b, training=False, eps=EPS)

    if mode == "train":
        return {f"{tag} F.batch_norm": train}
    if mode == "infer":
        return {f"{tag} F.batch_norm": infer}
    dy = _as_torch_nchw(torch, d["dy"], d["ax"])
    sdt = torch.float32 if x.dtype == torch.float16 else x.dtype  # saved stats: float32 for half
    mean = torch.as_tensor(d["mean"], device="cuda").to(sdt)
    invstd = torch.as_tensor(d["invstd"], device="cuda").to(sdt)

    def backward():
        return torch.ops.aten.native_batch_norm_backward(dy, x, w, rm, rv, mean, invstd, True, EPS,
                                                         [True, True, True])
    return {f"{tag} native_bn_backward": backward}


def naive_runners(cp, mode, d):
    x, ax = d["x"], d["ax"]
    axes = tuple(a for a in range(x.ndim) if a != ax)
    shp = [d["C"] if a == ax else 1 for a in range(x.ndim)]
    scale, offset = d["scale"].reshape(shp), d["offset"].reshape(shp)
    if mode == "train":
        def fn():
            mean = x.mean(axis=axes, keepdims=True)
            var = x.var(axis=axes, keepdims=True)
            return (x - mean) / cp.sqrt(var + EPS) * scale + offset
    elif mode == "infer":
        def fn():
            return (x - d["rm"].reshape(shp)) / cp.sqrt(d["rv"].reshape(shp) + EPS) * scale + offset
    else:
        dy = d["dy"]
        mean, invstd = d["mean"].reshape(shp), d["invstd"].reshape(shp)
        n = x.size // d["C"]

        def fn():
            xhat = (x - mean) * invstd
            doff = dy.sum(axis=axes, keepdims=True)
            dsc = (dy * xhat).sum(axis=axes, keepdims=True)
            return scale * invstd / n * (n * dy - doff - xhat * dsc)
    return {"cupy naive": fn}


def copy_runners(cp, d):
    x = d["x"]
    dst = cp.empty_like(x)
    nbytes = x.nbytes

    def memcpy():
        dst.data.copy_from_device_async(x.data, nbytes)

    def elementwise():
        cp.copyto(dst, x)
    return {"copy memcpy": memcpy, "copy cupy": elementwise}


# -- accuracy ---------------------------------------------------------------------------

def accuracy(cp, fbn, torch):
    """f32 variance rel. error at offset 1e6, (64,32,28,28): fastbn and torch (NCHW, NHWC)."""
    rs = cp.random.RandomState(1)
    x = (1e6 + rs.standard_normal((64, 32, 28, 28))).astype(np.float32)
    axes = (0, 2, 3)
    ref = x.astype(np.float64).var(axis=axes)
    n = x.size // 32
    rows = {}
    _, var = fbn.moments(x, axes)
    rows["fastbn NCHW"] = float(cp.max(cp.abs(var.astype(np.float64) - ref) / ref))
    xl = cp.ascontiguousarray(cp.moveaxis(x, 1, -1))
    _, var = fbn.moments(xl, (0, 1, 2))
    rows["fastbn NHWC"] = float(cp.max(cp.abs(var.astype(np.float64) - ref) / ref))
    if torch is not None:
        for tag, t in (("torch NCHW", torch.as_tensor(x, device="cuda")),
                       ("torch channels_last", torch.as_tensor(xl, device="cuda").movedim(3, 1))):
            rv = torch.zeros(32, device="cuda")
            with torch.no_grad():
                torch.nn.functional.batch_norm(t, torch.zeros(32, device="cuda"), rv, training=True,
                                               momentum=1.0, eps=0.0)
            var_b = cp.asarray(rv).astype(np.float64) * (n - 1) / n  # running_var is unbiased
            rows[tag] = float(cp.max(cp.abs(var_b - ref) / ref))
    return rows


# -- the run --------------------------------------------------------------------------------

def _select(cases, spec):
    if not spec:
        return list(cases)
    keys = [s.strip().lower() for s in spec.split(",") if s.strip()]
    return [c for c in cases if any(k in f"{c[0]} {c[1]}".lower() for k in keys)]


def _device_name(cp):
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def run_gpu(args):
    """Run the GPU cases and print the table; 0 on success or when no GPU is here."""
    quick = bool(getattr(args, "quick", False))
    repeat = getattr(args, "repeat", None) or (3 if quick else 15)
    try:
        import cupy as cp
        cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no CuPy, no driver, no device
        print(f"\nGPU benchmark skipped: CuPy with a CUDA device is needed ({type(exc).__name__}: {exc})")
        return 0
    import fastbn as fbn
    status = fbn.backends()["cuda"]
    if status != "available":
        print(f"\nGPU benchmark skipped: fastbn's cuda backend is not available ({status})")
        return 0
    torch = None if getattr(args, "no_torch", False) else _torch_cuda()
    print(f"\nGPU: {_device_name(cp)}; CuPy {cp.__version__}"
          + (f"; PyTorch {torch.__version__} (cuDNN {torch.backends.cudnn.version()})" if torch else "")
          + f"; repeats {repeat}; times per call in ms (min / median)")
    results = []
    header = f"{'case':28s} {'mode':9s} {'runner':34s} {'min ms':>9s} {'med ms':>9s} {'frac':>6s} {'x torch':>8s}"
    print(header)
    print("-" * len(header))
    for title, mode, shape, ax, dtype, qshape in _select(CASES, getattr(args, "cases", None)):
        shape = qshape if quick else shape
        d = _make_case(cp, shape, ax, np.dtype(dtype), mode)
        runners = fastbn_runners(fbn, mode, d)
        if torch is not None:
            runners.update(torch_runners(torch, mode, d))
        if not getattr(args, "no_naive", False):
            runners.update(naive_runners(cp, mode, d))
        runners.update(copy_runners(cp, d))
        times = measure(cp, runners, repeat)
        nbytes = d["x"].nbytes
        t_copy = min(min(times["copy memcpy"]), min(times["copy cupy"]))
        bw = 2 * nbytes / t_copy
        t_torch = next((min(v) for k, v in times.items() if k.startswith("torch")), None)
        label = f"{title} {tuple(shape)}"
        for name, ts in times.items():
            tmin, tmed = min(ts), statistics.median(ts)
            k = 2 if name.startswith("copy") else _ROOF[mode]
            frac = k * nbytes / bw / tmin
            ratio = t_torch / tmin if t_torch else float("nan")
            print(f"{label[:28]:28s} {mode:9s} {name:34s} {tmin * 1e3:9.4f} {tmed * 1e3:9.4f} "
                  f"{frac:6.2f} {ratio:8.2f}")
            results.append({"case": label, "mode": mode, "dtype": dtype, "runner": name,
                            "min_s": tmin, "median_s": tmed, "frac": frac, "ratio_to_torch": ratio,
                            "bytes_x": nbytes, "copy_bw_GBs": bw / 1e9})
        print(f"{'':28s} {'':9s} {'(copy bandwidth %.0f GB/s)' % (bw / 1e9):34s}")
        del d, runners
        cp.get_default_memory_pool().free_all_blocks()
    acc = accuracy(cp, fbn, torch)
    print("\nfloat32 variance rel. error at offset 1e6, (64,32,28,28): "
          + "; ".join(f"{k} {v:.2e}" for k, v in acc.items()))
    path = getattr(args, "json", None)
    if path:
        gpath = path[:-5] + "-gpu.json" if path.endswith(".json") else path + "-gpu.json"
        with open(gpath, "w") as f:
            json.dump({"device": _device_name(cp), "results": results, "accuracy": acc,
                       "time": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)
        print(f"(GPU results written to {gpath})")
    return 0


def main(argv=None):
    parser = add_arguments(argparse.ArgumentParser(prog="python -m fastbn.bench_gpu",
                                                   description=__doc__.split("\n")[0]))
    return run_gpu(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""Time a CNN training step with PyTorch's batch norm vs fastbn.torch (CPU).

    python examples/torch_bench_step.py [--repeat 30] [--threads N]

Two CNNs: digits-size (batch 64 of 1x8x8, BN over 16 and 32 channels) and a
32x32 one (batch 32 of 3x32x32, BN over 64 channels at 32x32 and 16x16).
Each step is forward + backward + SGD update; each model runs in NCHW and in
channels_last.  The two variants are timed interleaved (one step each, in
turn) so machine noise hits both alike; min and median seconds per step are
printed with the ratio PyTorch/fastbn (> 1: fastbn faster), and the median of
the paired ratios (each PyTorch step over the fastbn step next to it) with a
95% confidence interval from order statistics (distribution-free: ranks
n/2 -+ 1.96 sqrt(n)/2): "faster" where its lower end is above 1.
"""

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn

import fastbn.torch as fbt


def digits_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10)), (64, 1, 8, 8)


def cnn32():
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)), (32, 3, 32, 32)


def stepper(model, x, y, channels_last):
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return step


def bench(make, channels_last, repeat):
    torch.manual_seed(0)
    model, shape = make()
    x = torch.randn(shape)
    y = torch.randint(0, 10, (shape[0],))
    steps = {"torch": stepper(model, x, y, channels_last),
             "fastbn": stepper(fbt.convert(copy.deepcopy(model)), x, y, channels_last)}
    times = {k: [] for k in steps}
    for _ in range(3):   # warm-up (Numba compilation, allocator)
        for s in steps.values():
            s()
    for _ in range(repeat):
        for k, s in steps.items():
            t = time.perf_counter()
            s()
            times[k].append(time.perf_counter() - t)
    res = {k: (min(v), float(np.median(v))) for k, v in times.items()}
    res["paired"] = paired_ratio(times["torch"], times["fastbn"])
    return res


def paired_ratio(a, b):
    """(median, low, high): the median of a[i] / b[i] and its ~95% confidence
    interval (order statistics of the sorted ratios at ranks n/2 -+ 0.98 sqrt(n))."""
    r = np.sort(np.asarray(a) / np.asarray(b))
    n = len(r)
    h = 0.98 * np.sqrt(n)
    lo, hi = max(0, int(np.floor(n / 2 - h))), min(n - 1, int(np.ceil(n / 2 + h)) - 1)
    return float(np.median(r)), float(r[lo]), float(r[hi])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeat} steps each")
    print(f"{'model':8s} {'layout':14s} {'torch min/median ms':>22s} {'fastbn min/median ms':>22s} "
          f"{'ratio min/median':>17s} {'paired ratio [95% CI]':>23s}")
    for name, make in (("digits", digits_cnn), ("32x32x64", cnn32)):
        for cl in (False, True):
            r = bench(make, cl, args.repeat)
            (tm, tmed), (fm, fmed) = r["torch"], r["fastbn"]
            print(f"{name:8s} {'channels_last' if cl else 'NCHW':14s} "
                  f"{tm * 1e3:10.2f} /{tmed * 1e3:9.2f} {fm * 1e3:10.2f} /{fmed * 1e3:9.2f} "
                  f"{tm / fm:8.2f} /{tmed / fmed:6.2f} "
                  "{:9.2f} [{:.2f}, {:.2f}]".format(*r["paired"]))


if __name__ == "__main__":
    main()

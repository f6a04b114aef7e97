"""Synchronised batch norm across processes with fastbn's mergeable state.

Several worker processes each hold a shard of one batch -- of unequal sizes,
one of them empty -- and run batch norm as if they held the whole batch:

forward   each worker computes ``fbn.partial_moments`` of its shard (a (3, C)
          float64 array: count, mean, m2 per channel), the workers all-gather
          them, and each merges them with ``fbn.merge_moments`` (Chan's
          formula, weighted by the counts) and normalises its shard with
          ``fbn.batch_norm_train_from_moments``.
backward  each worker computes ``fbn.partial_grad_sums`` (count, sum(dy),
          sum(dy * xhat)), the workers all-reduce them with a sum, and each
          applies ``fbn.batch_norm_backward_from_sums``.

The transport is ``multiprocessing`` pipes to a hub process that only relays
bytes (stand-in for MPI / ``torch.distributed`` collectives).  At the end
the parent checks that the concatenated outputs and gradients, and every
worker's mean, invstd, dscale, doffset and running statistics, equal
single-process ``fbn.batch_norm_train`` / ``fbn.batch_norm_backward`` on the
concatenated batch.  Averaging the shards' means and variances instead
(PyTorch's SyncBatchNorm bug with unequal shard sizes, pytorch#22192) would
be visibly wrong here; the script prints by how much.

    python examples/sync_batchnorm.py [--sizes 7,1,0,24] [--channels 5] [--seed 0]

Exits 0 and prints ``OK`` when everything matches.
"""

import argparse
import multiprocessing as mp
import sys

import numpy as np


def worker(rank, conn, x, dy, scale, offset):
    """One data-parallel worker: x, dy are its (n_rank, C, H, W) shard."""
    import fastbn as fbn

    # -- forward: all-gather partial moments, merge locally
    part = fbn.partial_moments(x, channel_axis=1)          # Moments of (C,) float64
    conn.send(part.pack())                                 # (3, C)
    gathered = conn.recv()                                 # (P, 3, C), every worker's part
    total = fbn.merge_moments(gathered)                    # moments of the whole batch
    running_mean = np.zeros(x.shape[1], np.float32)
    running_var = np.ones(x.shape[1], np.float32)
    y, mean, invstd = fbn.batch_norm_train_from_moments(
        x, total, scale, offset, channel_axis=1, running_mean=running_mean, running_var=running_var)

    # -- backward: all-reduce (sum) the gradient sums
    sums = fbn.partial_grad_sums(dy, x, mean, invstd, channel_axis=1)
    conn.send(sums.pack())                                 # (3, C)
    sums = fbn.GradSums.unpack(conn.recv())                # summed over all workers
    dx, dscale, doffset = fbn.batch_norm_backward_from_sums(dy, x, scale, mean, invstd, sums,
                                                            channel_axis=1)
    conn.send(dict(rank=rank, y=y, dx=dx, mean=mean, invstd=invstd, dscale=dscale,
                   doffset=doffset, running_mean=running_mean, running_var=running_var,
                   part=part.pack()))
    conn.close()


def all_gather(conns):
    """Receive one array from every worker, send every worker the stack of all."""
    parts = np.stack([c.recv() for c in conns])
    for c in conns:
        c.send(parts)


def all_reduce_sum(conns):
    """Receive one array from every worker, send every worker their sum."""
    total = sum(c.recv() for c in conns)
    for c in conns:
        c.send(total)


def check(name, got, want, rtol):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    scale = max(np.abs(want).max(initial=0.0), 1e-30)
    err = np.abs(got - want).max(initial=0.0) / scale
    if got.shape != want.shape or not err <= rtol:
        raise AssertionError(f"{name}: shape {got.shape} vs {want.shape}, "
                             f"max error / max|expected| = {err:.3g} > {rtol:g}")
    return err


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="7,1,0,24",
                        help="comma-separated shard sizes (batch items per worker); 0 is allowed")
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    C, H, W = args.channels, 6, 5

    import fastbn as fbn

    rng = np.random.default_rng(args.seed)
    # float32 data with a large, channel-dependent mean and spread: a naive
    # E[x^2] - E[x]^2 or an unweighted average of shard statistics fails here.
    N = sum(sizes)
    loc = 1e3 * (1 + np.arange(C)).reshape(1, C, 1, 1)
    x = (loc + (1 + np.arange(N)).reshape(N, 1, 1, 1) * 0.1
         + rng.standard_normal((N, C, H, W))).astype(np.float32)
    dy = rng.standard_normal((N, C, H, W)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, C).astype(np.float32)
    offset = rng.standard_normal(C).astype(np.float32)
    bounds = np.cumsum([0] + sizes)
    shards = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    # spawn: workers start clean (no inherited thread pools), as MPI ranks would.
    ctx = mp.get_context("spawn")
    conns, procs = [], []
    for rank, sl in enumerate(shards):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker, args=(rank, child, x[sl], dy[sl], scale, offset))
        p.start()
        conns.append(parent)
        procs.append(p)
    all_gather(conns)        # forward
    all_reduce_sum(conns)    # backward
    results = [c.recv() for c in conns]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"worker {p.name} exited with code {p.exitcode}")

    # -- the single-process reference on the concatenated batch
    rm = np.zeros(C, np.float32)
    rv = np.ones(C, np.float32)
    y_ref, mean_ref, invstd_ref = fbn.batch_norm_train(x, scale, offset, channel_axis=1,
                                                       running_mean=rm, running_var=rv)
    dx_ref, dscale_ref, doffset_ref = fbn.batch_norm_backward(dy, x, scale, mean_ref, invstd_ref,
                                                              channel_axis=1)
    rtol = 2e-6  # float32 outputs: a few ulp
    worst = 0.0
    worst = max(worst, check("y", np.concatenate([r["y"] for r in results]), y_ref, rtol))
    worst = max(worst, check("dx", np.concatenate([r["dx"] for r in results]), dx_ref, rtol))
    for r in results:
        for key, want in (("mean", mean_ref), ("invstd", invstd_ref), ("dscale", dscale_ref),
                          ("doffset", doffset_ref), ("running_mean", rm), ("running_var", rv)):
            worst = max(worst, check(f"worker {r['rank']} {key}", r[key], want, rtol))

    # What an unweighted average of the non-empty shards' statistics would give.
    parts = [fbn.Moments.unpack(r["part"]) for r in results if r["part"][0, 0] > 0]
    naive_var = np.mean([p.var() for p in parts], axis=0)
    true_var = fbn.merge_moments(*parts).var()
    naive_err = np.max(np.abs(naive_var - true_var) / true_var)
    print(f"{len(sizes)} workers, shard sizes {sizes}, x {x.shape} float32: outputs, gradients "
          f"and running stats match single-process batch norm (max rel. error {worst:.2g}); "
          f"averaging shard variances instead would be off by {naive_err:.1%}")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m fastbn bench --dask``: fastbn's moments on a Dask array, beside plain Dask.

On a ``dask.distributed`` LocalCluster (worker processes, one thread each),
times over one float32 array of ``--dask-gb`` GB (default 4) made by
``da.random`` (uniform [0, 1): the cheapest generator, ~4x faster than
``standard_normal``, which would dominate every row) in chunks of
``--dask-chunk-mb`` MB (default 64), NCHW with 64 channels:

* ``fbn.moments(x)`` vs ``dask.compute(x.mean(), x.var())`` (over all axes);
* ``fbn.moments(x, (0, 2, 3))`` vs the same per-channel with ``axis=(0, 2, 3)``
  (what batch norm needs);
* generation only: each chunk drawn and reduced to one value, the floor of
  every row above, since ``da.random`` makes the data on the workers as the
  reduction streams through it (nothing is held in memory).

Throughput is GB of x per second of wall time (``4 GB / t``), best and median
of ``--repeat`` runs, rows interleaved.  The last column subtracts the best
generation time, an estimate of the reduction's own throughput (noisy: a
difference of two wall times).  Also prints fastbn's and Dask's mean and
variance over all axes side by side.

Standalone: ``python -m fastbn.bench_dask [--dask-gb 4] [--dask-workers 2] [--repeat 3]``.
"""

import argparse
import logging
import statistics
import sys
import time

import numpy as np

GB = 1e9


def add_arguments(parser):
    """Options of the Dask benchmark (standalone; ``run_dask`` reads them with defaults)."""
    parser.add_argument("--dask-gb", type=float, default=4.0, help="size of x in GB (default 4)")
    parser.add_argument("--dask-chunk-mb", type=float, default=64.0, help="chunk size in MB (default 64)")
    parser.add_argument("--dask-workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per row (default 3)")
    parser.add_argument("--quick", action="store_true", help="0.25 GB, 1 run: a smoke test")
    return parser


def _first(block):
    """Reduce a chunk to one value without looking at the rest: the generation-only floor."""
    return np.asarray(block.reshape(-1)[:1], dtype=np.float64).reshape((1,) * block.ndim)


def _shape(gb, chunk_mb, channels=64, hw=128):
    """NCHW float32 shape of ~gb GB with chunks of ~chunk_mb MB along N."""
    per_item = channels * hw * hw * 4
    n = max(1, int(round(gb * GB / per_item)))
    cn = max(1, int(round(chunk_mb * 2**20 / per_item)))
    return (n, channels, hw, hw), (cn, channels, hw, hw)


def run_dask(args):
    """Run the benchmark, print a Markdown table; returns 0 (1 if dask is missing)."""
    try:
        import dask
        import dask.array as da
        import distributed
    except ImportError as exc:
        print(f"\n(dask[distributed] is not installed: skipping the Dask benchmark: {exc})")
        return 1
    import fastbn as fbn

    quick = bool(getattr(args, "quick", False))
    gb = 0.25 if quick else float(getattr(args, "dask_gb", None) or 4.0)
    chunk_mb = float(getattr(args, "dask_chunk_mb", None) or 64.0)
    workers = int(getattr(args, "dask_workers", None) or 2)
    repeat = 1 if quick else int(getattr(args, "repeat", None) or 3)
    shape, chunks = _shape(gb, chunk_mb)
    nbytes = int(np.prod(shape)) * 4

    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  memory_limit="4GB", dashboard_address=None,
                                  silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster) as client:
        x = da.random.default_rng(12345).random(shape, dtype=np.float32, chunks=chunks)
        # Warm up: Numba kernels load (or compile) once per worker process.
        small = da.random.default_rng(0).standard_normal((8, 64, 32, 32), dtype=np.float32,
                                                          chunks=(2, 64, 32, 32))
        dask.compute(*fbn.moments(small), *fbn.moments(small, (0, 2, 3)), scheduler=client)

        per = (0, 2, 3)
        rows = {
            "fastbn  fbn.moments(x)": lambda: fbn.moments(x),
            "dask    x.mean(), x.var()": lambda: (x.mean(), x.var()),
            "fastbn  fbn.moments(x, (0,2,3))": lambda: fbn.moments(x, per),
            "dask    x.mean((0,2,3)), x.var((0,2,3))": lambda: (x.mean(axis=per), x.var(axis=per)),
            "generation only": lambda: (x.map_blocks(_first, chunks=(1,) * 4, dtype=np.float64).sum(),),
        }
        times = {k: [] for k in rows}
        values = {}
        for r in range(repeat):
            order = list(rows) if r % 2 == 0 else list(rows)[::-1]
            for name in order:
                graph = rows[name]()
                t0 = time.perf_counter()
                out = dask.compute(*graph, scheduler=client)
                times[name].append(time.perf_counter() - t0)
                values[name] = out
                print(f"  dask bench {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)

    gen = min(times["generation only"])
    print(f"\n## fastbn bench --dask{' (--quick: NOT a measurement)' if quick else ''}\n")
    print(f"x: da.random uniform float32 {shape} = {nbytes / GB:.2f} GB in "
          f"{int(np.ceil(shape[0] / chunks[0]))} chunks of {chunks} ({np.prod(chunks) * 4 / 2**20:.0f} MiB); "
          f"LocalCluster {workers} worker processes x 1 thread; {repeat} runs per row, interleaved; "
          f"dask {dask.__version__}.\n")
    print("| what | best s | median s | GB/s (best) | GB/s (median) | GB/s beyond generation (best) |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        best, med = min(ts), statistics.median(ts)
        beyond = "—" if name == "generation only" else (
            f"{nbytes / GB / (best - gen):.1f}" if best > gen else "n/a (within noise)")
        print(f"| {name} | {best:.2f} | {med:.2f} | {nbytes / GB / best:.2f} | {nbytes / GB / med:.2f} | {beyond} |")
    fm, fv = (np.asarray(v, np.float64) for v in values["fastbn  fbn.moments(x)"])
    dm, dv = (np.asarray(v, np.float64) for v in values["dask    x.mean(), x.var()"])
    print(f"\nAgreement over all axes: mean {float(fm):.9f} vs {float(dm):.9f}; "
          f"var {float(fv):.9f} vs {float(dv):.9f} (rel. diff {abs(fv - dv) / dv:.1e}).")
    return 0


def main(argv=None):
    parser = add_arguments(argparse.ArgumentParser(prog="python -m fastbn.bench_dask",
                                                   description=__doc__.splitlines()[0]))
    return run_dask(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

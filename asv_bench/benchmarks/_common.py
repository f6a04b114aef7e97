"""Shared set-up of fastbn's asv benchmarks: environment, shapes, data, warm-up.

Why timings of Numba parallel kernels were noisy under asv, and what this
module does about it (details and measurements in asv_bench/README.md):

* asv re-runs ``setup`` before every sample (and between calls when a class
  sets ``number > 1``; asv#966).  A ``setup`` that allocates its arrays hands
  every sample fresh, never-touched pages: the timed call then pays page
  faults (taken by both threads at once, serialised in the kernel) instead of
  the kernel's work.  Here arrays are built once per process, in
  :func:`data`, and ``setup`` only looks them up; outputs are pre-faulted.
* The first call in a process loads the compiled kernel from Numba's cache
  (or compiles it) and starts the OpenMP thread pool.  :func:`warm` makes two
  untimed calls per process before asv's own warm-up.
* Numba's thread count follows the machine unless pinned:
  ``NUMBA_NUM_THREADS`` is fixed here (``FASTBN_ASV_THREADS``, default: the
  CPUs this process may use) before Numba is imported, so results from one
  machine are comparable over time.
* A libgomp worker spins for ~4 ms of CPU after each parallel region and then
  sleeps; a kernel that starts after a gap pays a futex wake-up, which on a
  loaded 2-core machine waits for a scheduler slice (ms).  Samples are taken
  back to back, so the pool stays hot; ``OMP_WAIT_POLICY`` is left to the
  user (set it before running asv to study its effect).
* Samples: many (``repeat`` = 10 to 40 per process, two processes), so the
  median asv reports is not decided by one scheduler hiccup.

The timer stays asv's default wall clock: ``time.process_time`` would add up
the CPU time of both threads and the spinning of idle workers.
"""

import os

# Must happen before Numba is imported (it reads NUMBA_NUM_THREADS once).
def _cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


THREADS = int(os.environ.get("FASTBN_ASV_THREADS") or os.environ.get("NUMBA_NUM_THREADS") or _cpus())
os.environ["NUMBA_NUM_THREADS"] = str(THREADS)

import numpy as np  # noqa: E402

import fastbn as fbn  # noqa: E402

#: The backend under test (``FASTBN_BACKEND`` chooses).  Resolving it loads the
#: backend module now, before any benchmark is timed, so no timing includes the
#: import (fastbn changes no threading setting: see kernels/_jit.py).
BACKEND = fbn.backend_for(np.zeros(1, np.float32))

DTYPES = ["float16", "float32", "float64"]
LAYOUTS = ["NCHW", "NHWC", "NC"]
SIZES = ["S", "M", "L"]

#: ``FASTBN_ASV_SMOKE=1``: a smoke run (CI, tests/test_asv_smoke.py).  The
#: parameter grids stay the same -- every benchmark and every combination
#: still runs its ``setup`` and body -- but the S/M/L arrays are tiny (below),
#: so ``asv run --quick`` costs process start-ups, not data.  Its numbers
#: measure nothing; never record results with it set.
SMOKE = os.environ.get("FASTBN_ASV_SMOKE", "").strip() not in ("", "0")

#: Same element count per size in every layout: S 131 072 (0.5 MB float32,
#: L2-resident), M 6.4 M (26 MB, fits the 32 MB L3), L 25.7 M (103 MB, DRAM).
SHAPES = {
    "NCHW": {"S": (8, 16, 32, 32), "M": (32, 64, 56, 56), "L": (128, 64, 56, 56)},
    "NHWC": {"S": (8, 32, 32, 16), "M": (32, 56, 56, 64), "L": (128, 56, 56, 64)},
    "NC": {"S": (128, 1024), "M": (6272, 1024), "L": (25088, 1024)},
}
if SMOKE:
    # S 1 024 values (fused small-input path), M 16 384 (serial kernels),
    # L 294 912 (1.2 MB float32: above the Numba backend's SERIAL_BELOW, so the
    # parallel kernels run too).
    SHAPES = {
        "NCHW": {"S": (2, 8, 8, 8), "M": (4, 16, 16, 16), "L": (8, 16, 48, 48)},
        "NHWC": {"S": (2, 8, 8, 8), "M": (4, 16, 16, 16), "L": (8, 48, 48, 16)},
        "NC": {"S": (128, 8), "M": (1024, 16), "L": (18432, 16)},
    }
CHANNEL_AXIS = {"NCHW": 1, "NHWC": -1, "NC": -1}
EPS = 1e-5


#: The dtype x layout x size grid, as two products (asv runs every parameter
#: combination in its own process, so a full 3x3x3 product with skips would
#: cost ~30 process start-ups per benchmark): float32 over every layout and
#: size (``Grid``), and every dtype over every layout at size M (``DTYPE_GRID``).
GRID = [["float32"], LAYOUTS, SIZES]
DTYPE_GRID = [["float16", "float64"], LAYOUTS, ["M"]]


def check_params(dtype, layout, size):
    """Reject unknown combinations (asv marks NotImplementedError as skipped)."""
    if dtype not in DTYPES or layout not in LAYOUTS or size not in SIZES:
        raise NotImplementedError(f"no such case: {dtype} {layout} {size}")


def fill_normal(a, seed=0, loc=0.5, scale=2.0):
    """Fill ``a`` with N(loc, scale^2) in 1 M-value blocks: no full-size temporaries
    (they would inflate the peak-memory benchmarks)."""
    rng = np.random.default_rng(seed)
    flat = a.reshape(-1)
    step = 1 << 20
    for i in range(0, flat.size, step):
        n = min(step, flat.size - i)
        flat[i:i + n] = rng.standard_normal(n, dtype=np.float32) * scale + loc
    return a


class Data:
    """Arrays of one (dtype, layout, size), built once per process."""

    def __init__(self, dtype, layout, size, *, backward=False, out=True):
        dt = np.dtype(dtype)
        self.shape = SHAPES[layout][size]
        self.axis = CHANNEL_AXIS[layout]
        ax = self.axis % len(self.shape)
        self.reduce = tuple(a for a in range(len(self.shape)) if a != ax)
        self.C = C = self.shape[ax]
        self.x = fill_normal(np.empty(self.shape, dt))
        self.dy = fill_normal(np.empty(self.shape, dt), seed=1, loc=0.0, scale=1.0) if backward else None
        pdt = np.float32 if dt == np.float16 else dt
        rng = np.random.default_rng(2)
        self.scale = (1 + 0.1 * rng.standard_normal(C)).astype(pdt)
        self.offset = (0.1 * rng.standard_normal(C)).astype(pdt)
        self.mean = np.full(C, 0.5, pdt)
        self.var = np.full(C, 4.0, pdt)
        self.invstd = (1 / np.sqrt(self.var + EPS)).astype(pdt)
        self.running_mean = np.zeros(C, pdt)
        self.running_var = np.ones(C, pdt)
        # Pre-faulted output: its pages exist before any timed call.
        self.out = np.zeros_like(self.x) if out else None


_cache = {}


def data(dtype, layout, size, **kw):
    """The :class:`Data` for these parameters; built on first use in this process.

    Only one entry is kept: asv runs each parameter combination in its own
    process, and ``asv dev``-style in-process runs must not hold them all.
    """
    key = (dtype, layout, size, tuple(sorted(kw.items())))
    if key not in _cache:
        _cache.clear()
        _cache[key] = Data(dtype, layout, size, **kw)
    return _cache[key]


_warmed = set()


def warm(key, fn, calls=2):
    """Call ``fn`` ``calls`` times, once per process per ``key``: loads or compiles
    the kernels, starts the thread pool, faults in any scratch memory."""
    if key not in _warmed:
        for _ in range(calls):
            fn()
        _warmed.add(key)


class Grid:
    """Base of the dtype x layout x size benchmarks (timing attributes).

    A family defines ``class Train(Grid)`` and ``class TrainDtypes(Train)`` with
    ``params = DTYPE_GRID``.

    ``number`` is 1 (asv forces it when ``setup`` exists): a sample is one call,
    at least 0.1 ms for size S.  ``repeat = (10, 40, 4.0)``: 10 to 40 samples
    within 4 s, per process; ``rounds = 2`` processes.
    """
    params = GRID
    param_names = ["dtype", "layout", "size"]
    number = 1
    repeat = (10, 40, 4.0)
    rounds = 2
    min_run_count = 5
    warmup_time = 0.3
    timeout = 180


def copy_kernel():
    """2-thread Numba copy ``f(src, dst, nblocks)`` (the one ``fastbn bench`` uses)."""
    import numba

    from fastbn.tools.harness import make_numba_copy
    return make_numba_copy() or None


__all__ = ["fbn", "np", "BACKEND", "THREADS", "SMOKE", "DTYPES", "LAYOUTS", "SIZES", "SHAPES", "EPS", "GRID", "DTYPE_GRID",
           "Data", "data",
           "warm", "Grid", "check_params", "fill_normal", "copy_kernel"]

"""The timing harness every fastbn benchmark shares (``bench``, ``bench --sweep``, asv).

* :class:`Runner` and :func:`measure`: interleaved repeats of timed batches.
* :class:`Env`: what a run uses -- thread count, PyTorch (or None), Numba.
* :func:`make_numba_copy` and :func:`streaming_copy`: 2-thread copies of B
  bytes, the bandwidth yardstick (a copy moves 2B: read + write).

Timing: every callable is warmed up first (Numba compilation, page faults on
preallocated outputs), then each repeat times a batch of ``number`` calls
(``number`` chosen so a batch lasts ``min_batch`` seconds; 1 for large
arrays) for every runner in turn, alternating the order between repeats so
machine noise hits every runner alike.  A repeat's time is its batch's mean
per call; benchmarks report the min and the median over repeats.
"""

import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Runner:
    """One timed callable.  ``role``: ``fastbn``, ``peer`` or ``copy``.
    ``before`` runs untimed before each batch (e.g. set PyTorch's thread count)."""
    label: str
    fn: object
    role: str
    before: object = None
    threads: str = ""
    number: int = 1
    times: list = field(default_factory=list)   # seconds per call, one per repeat


def calibrate(r, warmup, min_batch):
    """Warm ``r`` up and set ``r.number`` so a batch lasts about ``min_batch`` s;
    returns the seconds per call seen in the warm-up."""
    if r.before:
        r.before()
    r.fn()                      # first call: compiles, faults in output pages
    t0 = time.perf_counter()
    for _ in range(warmup):
        r.fn()
    per = (time.perf_counter() - t0) / max(warmup, 1)
    r.number = max(1, min(100_000, int(min_batch / max(per, 1e-9))))
    return per


def measure(runners, repeat, warmup=2, min_batch=0.005, settle=0.0, calibrated=False):
    """Time every runner ``repeat`` times, interleaved; appends to ``r.times`` (s per call).

    ``calibrated``: the runners were already warmed up (:func:`calibrate`).
    ``settle`` seconds of sleep precede each timed batch.  Why: PyTorch and
    Numba each bring their own OpenMP runtime (two libgomp copies), and a
    libgomp worker spins for a while after every parallel region.  On a
    2-core machine a batch started right after the other runtime's call
    shares the cores with those spinning threads: a systematic penalty
    (measured here: 6 ms for a tiny Numba copy after torch, 20+ ms for a tiny
    torch call after Numba), not noise.
    """
    if not calibrated:
        for r in runners:
            calibrate(r, warmup, min_batch)
    gc_was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for i in range(repeat):
            for r in (runners if i % 2 == 0 else runners[::-1]):
                if r.before:
                    r.before()
                if settle:
                    time.sleep(settle)
                fn, n = r.fn, r.number
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                r.times.append((time.perf_counter() - t0) / n)
    finally:
        if gc_was:
            gc.enable()
    return runners


def default_backend(name):
    """Context: ``name`` (None: the dispatcher's own choice) as the default CPU
    backend, as ``fastbn.use_backend`` sets it.  The benchmarks time calls made
    without ``backend=``, as a user of that backend makes them: an explicit
    ``backend=`` argument takes the general path, never the small-call fast lane
    (``fastbn.fastlane``), which would time ~20 us of checks per call that the
    backend's users do not pay (Cython at 4 KiB: 30 us against 8)."""
    if name is None:
        return contextlib.nullcontext()
    import fastbn as fbn
    return fbn.use_backend(name)


def min_median(times):
    """``(min, median)`` of a list of times (NaN, NaN when empty)."""
    return (min(times), statistics.median(times)) if times else (float("nan"), float("nan"))


# -- the machine ------------------------------------------------------------------------

def cpu_count():
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average():
    """1-minute load average (NaN where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def omp_env():
    """The OpenMP spin settings in this process's environment, as text."""
    vals = [f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ]
    return " ".join(vals) or "libgomp defaults"


def load_note(load0, load1, ncpu=None):
    """A sentence on the load average at start / end, warning when the machine is busy."""
    ncpu = ncpu or cpu_count()
    busy = max(load0, load1) > 0.5 * ncpu
    return (f"Load average (1 min) at start / end: {load0:.2f} / {load1:.2f} on {ncpu} CPUs"
            + (" -- **machine busy: other processes share the cores; medians are noisy, "
               "trust the min columns and rerun on a quiet machine**" if busy else ""))


def backend_name(backend=None):
    """The CPU backend a float32 NumPy call with ``backend=`` uses (loading, and so
    validating, it)."""
    import fastbn as fbn
    return fbn.backend_for(np.zeros(1, np.float32), backend=backend)


class Env:
    """What this run uses: thread count, PyTorch (or None), Numba (or None).

    ``threads``: for fastbn (Numba) and PyTorch; default the CPUs this process
    may use.  ``torch``: False leaves PyTorch out even if importable.
    """

    def __init__(self, threads=None, torch=True, backend=None):
        self.threads = threads or cpu_count()
        self.torch = None
        self.torch_omp = None
        if torch:
            # libgomp reads its spin settings when it loads: record what torch's
            # copy got (the environment now, if torch loads first).
            fresh = "torch" not in sys.modules
            try:
                import torch as torch_mod
                self.torch = torch_mod
                self.torch_omp = omp_env() if fresh else "set before this run"
            except ImportError:
                pass
        # Load fastbn's backend now, before any OpenMP pool starts, whichever
        # runner calls first.
        self.backend = backend_name(backend)
        self.numba = None
        try:
            import numba
            numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
            self.numba = numba
        except Exception:  # noqa: BLE001 - no Numba: no Numba copy, fastbn uses another backend
            self.numba = None
        if self.torch is not None:
            self.torch.set_num_threads(self.threads)
        self._pcopy = None

    def torch_threads(self, n):
        """A ``before`` hook that sets PyTorch's thread count to ``n``."""
        torch = self.torch

        def before():
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)
        return before

    def numba_copy(self):
        """A parallel Numba copy kernel (compiled once per process), or None."""
        if self._pcopy is None and self.numba is not None:
            self._pcopy = make_numba_copy()
        return self._pcopy or None

    def copy_runners(self, nbytes):
        """Copies of ``nbytes``: PyTorch ``copy_`` and the Numba kernels where
        available, else a single-thread ``np.copyto``."""
        n = max(nbytes // 4, 1)
        src = np.random.default_rng(1).standard_normal(n, dtype=np.float32)
        dst = np.zeros_like(src)
        out = []
        if self.torch is not None:
            ts, td = self.torch.from_numpy(src), self.torch.from_numpy(dst)
            out.append(Runner("copy torch copy_", lambda: td.copy_(ts), "copy",
                              self.torch_threads(self.threads), f"{self.threads}t"))
        pcopy = self.numba_copy()
        if pcopy is not None:
            nt = self.numba.get_num_threads()
            out.append(Runner("copy numba prange", lambda: pcopy(src, dst, nt), "copy",
                              threads=f"{nt}t"))
        scopy = streaming_copy()
        if scopy is not None:
            out.append(Runner("copy numba streaming stores", lambda: scopy(src, dst), "copy",
                              threads=f"{self.numba.get_num_threads()}t"))
        if not out:
            out.append(Runner("copy np.copyto", lambda: np.copyto(dst, src), "copy", threads="1t"))
        return out

    def describe(self, torch_note=""):
        """One paragraph on the machine and the libraries of this run."""
        parts = [f"CPU: {cpu_model()}, {cpu_count()} usable CPUs; threads: {self.threads}",
                 f"numpy {np.__version__}"]
        if self.numba is not None:
            layer = "?"
            try:
                layer = self.numba.threading_layer()
            except ValueError:      # no parallel region has run yet
                pass
            parts.append(f"numba {self.numba.__version__} ({self.numba.get_num_threads()} threads, "
                         f"layer {layer}{', ' + omp_env() if layer == 'omp' else ''})")
        if self.torch is not None:
            parts.append(f"torch {self.torch.__version__} ({self.threads} threads{torch_note}, "
                         f"OpenMP {self.torch_omp})")
        else:
            parts.append("torch: not installed or left out (no torch peer)")
        parts.append(f"fastbn backend: {self.backend}")
        envs = [f"{k}={os.environ[k]}" for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS",
                                                  "FASTBN_BACKEND") if k in os.environ]
        if envs:
            parts.append("env: " + " ".join(envs))
        return "; ".join(parts)


# -- copy kernels -------------------------------------------------------------------------

_PCOPY = []


def make_numba_copy():
    """``copy(src, dst, nblocks)`` for 1-D arrays, a parallel Numba kernel (compiled
    once per process): one contiguous block per thread, so each thread streams its
    own part (prefetch friendly).  None where Numba's parallel target fails.

    The inner loop walks 1-D views from index 0: indexing ``dst[i]`` with
    ``i`` running from ``lo`` kept LLVM from vectorising it (Numba's
    negative-index wraparound), which ran at 9 GB/s instead of 33 GB/s here
    and made every roofline fraction look > 1.
    """
    if _PCOPY:
        return _PCOPY[0]
    try:
        import numba

        @numba.njit(parallel=True, nogil=True, cache=True)
        def pcopy(src, dst, nblocks):
            n = src.size
            blk = (n + nblocks - 1) // nblocks
            for t in numba.prange(nblocks):
                lo = min(n, t * blk)
                hi = min(n, lo + blk)
                s = src[lo:hi]
                d = dst[lo:hi]
                for i in range(s.size):
                    d[i] = s[i]
        a = np.zeros(16, np.float32)
        pcopy(a, a.copy(), 2)
    except Exception:  # noqa: BLE001 - no Numba, a missing threading layer etc.
        pcopy = None
    _PCOPY.append(pcopy)
    return pcopy


#: Table period of the streaming copy (values).  The flat streaming kernel's
#: contract (kernels/_stream.py): y[f] = q[k]*(x[f] - m[k]) + r[k] with
#: k = f % P, tables of P + V entries, P a multiple of the channel count and
#: P >= V, V = float32 values per cache line (16 for 64-byte lines).  One
#: channel with P = 64 meets it for lines up to 256 bytes.
_STREAM_P = 64


def streaming_copy():
    """``copy(src, dst)`` for flat contiguous float32 arrays with streaming
    (non-temporal) stores, 2 threads, or None (not x86, no Numba backend).

    It is fastbn's own streaming kernel with y = 1*(x - 0) + 0, which is exact.
    It moves 2B where an ordinary copy also reads the destination first
    (write-allocate), so with it the "best copy" is the true streaming limit
    for fastbn's streamed passes.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        from fastbn.kernels import cpu_numba
        kern = cpu_numba.affine_flat_stream
    except (ImportError, AttributeError):
        return None
    mt = np.zeros(2 * _STREAM_P)
    qt = np.ones(2 * _STREAM_P)

    def scopy(src, dst):
        cpu_numba.run(kern, True, src, dst, None, mt, qt, mt, qt, _STREAM_P, cpu_numba.TILE)

    try:
        a = np.arange(1001, dtype=np.float32)
        b = np.zeros_like(a)
        scopy(a, b)
    except Exception:  # noqa: BLE001 - the intrinsics do not compile here
        return None
    return scopy if np.array_equal(a, b) else None

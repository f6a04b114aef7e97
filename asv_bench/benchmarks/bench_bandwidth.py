"""The bandwidth limit, measured like the kernels: copies of x's bytes, and
fastbn's fraction of the roofline measured against a copy in the same process.

``time_copy_*``: a copy of B bytes moves 2B (read + write); an ordinary store
also reads the destination line first, a streaming one does not.  The ``track_``
benchmarks report ratios taken within one process (min of interleaved runs,
``fastbn.bench.measure``), so they are far less sensitive to a busy machine
than absolute times: ``track_bandwidth_gbps`` (2B / best copy time) and
``track_roofline_fraction`` = (k*B / bandwidth) / best fastbn time with k = 3
(train), 2 (infer), 5 (backward).
"""

import math

import numpy as np

from ._common import (SHAPES, THREADS, Grid, check_params, copy_kernel, data, fbn, fill_normal,
                      warm)

SIZES = ["S", "M", "L"]
#: float32 values per size, as in _common.SHAPES: S 131 072, M 6 422 528, L 25 690 112
#: (tiny under FASTBN_ASV_SMOKE).
ELEMS = {s: math.prod(SHAPES["NC"][s]) for s in SIZES}


def _streaming_copy():
    """fastbn.bench's streaming-store copy, or None (not x86, no Numba backend)."""
    from fastbn.tools.harness import streaming_copy as make
    return make()


class _CopyCase(Grid):
    """The copies: Grid's timing settings over dtype x size, and src/dst arrays
    built once per process."""
    params = [["float32"], SIZES]
    param_names = ["dtype", "size"]
    timeout = 120

    def _arrays(self, dtype, size):
        key = (type(self).__name__, dtype, size)
        if getattr(self, "_key", None) != key:
            self.src = fill_normal(np.empty(ELEMS[size], dtype))
            self.dst = np.zeros_like(self.src)
            self._key = key
        return key


class Copy(_CopyCase):
    def setup(self, dtype, size):
        key = self._arrays(dtype, size)
        self.kernel = copy_kernel()
        if self.kernel is not None:
            warm(key, lambda: self.kernel(self.src, self.dst, THREADS))

    def time_copy_numba(self, dtype, size):
        """Numba prange copy, one contiguous block per thread (THREADS threads)."""
        self.kernel(self.src, self.dst, THREADS)

    def time_copy_numpy(self, dtype, size):
        """np.copyto: one thread."""
        np.copyto(self.dst, self.src)

    def track_bandwidth_gbps(self, dtype, size):
        from fastbn.tools.harness import Runner, measure
        r = Runner("copy", lambda: self.kernel(self.src, self.dst, THREADS), "copy")
        measure([r], repeat=15, warmup=2, min_batch=0.005)
        return 2 * self.src.nbytes / min(r.times) / 1e9

    track_bandwidth_gbps.unit = "GB/s"


class StreamingCopy(_CopyCase):
    """A copy with streaming (non-temporal) stores: no write-allocate read of dst."""

    def setup(self, dtype, size):
        self.scopy = _streaming_copy()
        if self.scopy is None:
            raise NotImplementedError("streaming stores are x86-only")
        key = self._arrays(dtype, size)
        warm(key, lambda: self.scopy(self.src, self.dst))

    def time_copy_streaming(self, dtype, size):
        self.scopy(self.src, self.dst)


_ROOF = {"train": 3, "infer": 2, "backward": 5}


class Roofline:
    """fastbn's fraction of the bandwidth roofline, copy measured in the same process."""
    params = [list(_ROOF), ["NCHW", "NHWC"], ["M", "L"]]
    param_names = ["mode", "layout", "size"]
    unit = "fraction"
    timeout = 180

    def setup(self, mode, layout, size):
        check_params("float32", layout, size)
        self.d = d = data("float32", layout, size, backward=(mode == "backward"))
        calls = {
            "train": lambda: fbn.batch_norm_train(d.x, d.scale, d.offset, channel_axis=d.axis, out=d.out),
            "infer": lambda: fbn.batch_norm_infer(d.x, d.scale, d.offset, d.mean, d.var,
                                                  channel_axis=d.axis, out=d.out),
            "backward": lambda: fbn.batch_norm_backward(d.dy, d.x, d.scale, d.mean, d.invstd,
                                                        channel_axis=d.axis, out=d.out),
        }
        self.call = calls[mode]
        self.src = d.x.reshape(-1)
        self.dst = np.zeros_like(self.src)
        self.kernel = copy_kernel()
        if self.kernel is None:
            raise NotImplementedError("no Numba copy kernel (Numba unavailable)")
        warm(("roof", mode, layout, size), self.call)

    def track_roofline_fraction(self, mode, layout, size):
        """Against the faster of an ordinary and a streaming-store copy (fastbn streams
        big float32 outputs, so the ordinary copy alone would flatter it)."""
        from fastbn.tools.harness import Runner, measure
        runs = [Runner("fastbn", self.call, "fastbn"),
                Runner("copy", lambda: self.kernel(self.src, self.dst, THREADS), "copy")]
        scopy = _streaming_copy()
        if scopy is not None:
            runs.append(Runner("streaming copy", lambda: scopy(self.src, self.dst), "copy"))
        measure(runs, repeat=15, warmup=2, min_batch=0.005)
        bandwidth = 2 * self.src.nbytes / min(min(r.times) for r in runs[1:])
        return _ROOF[mode] * self.d.x.nbytes / bandwidth / min(runs[0].times)



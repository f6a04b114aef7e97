"""Peak memory (asv ``peakmem_``: the process's max RSS, inputs included) and the
temporary NumPy memory a call allocates beyond its output (``track_``, via
tracemalloc, in units of x's bytes: 0 means no hidden copy of x)."""

import tracemalloc

import numpy as np

from ._common import Data, data, fbn

LAYOUTS = ["NCHW", "NHWC"]
SIZES = ["M", "L"]


class PeakMem:
    params = [LAYOUTS, SIZES]
    param_names = ["layout", "size"]
    timeout = 120

    def setup(self, layout, size):
        self.d = data("float32", layout, size, backward=True)

    def peakmem_train_out(self, layout, size):
        d = self.d
        fbn.batch_norm_train(d.x, d.scale, d.offset, channel_axis=d.axis, out=d.out)

    def peakmem_train_fresh(self, layout, size):
        d = self.d
        fbn.batch_norm_train(d.x, d.scale, d.offset, channel_axis=d.axis)

    def peakmem_backward_out(self, layout, size):
        d = self.d
        fbn.batch_norm_backward(d.dy, d.x, d.scale, d.mean, d.invstd, channel_axis=d.axis, out=d.out)


def _temp(fn, nbytes):
    fn()                        # compile / load outside the trace
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return (tracemalloc.get_traced_memory()[1] - base) / nbytes
    finally:
        tracemalloc.stop()


class TempMemory:
    params = [LAYOUTS + ["F-order NCHW"]]
    param_names = ["layout"]
    unit = "x.nbytes"
    timeout = 120

    def setup(self, layout):
        if layout.startswith("F"):   # a private copy: the cached C-order data stays as it is
            d = Data("float32", "NCHW", "M", backward=True)
            d.x, d.dy, d.out = (np.asfortranarray(a) for a in (d.x, d.dy, d.out))
        else:
            d = data("float32", layout, "M", backward=True)
        self.d = d

    def track_train_out(self, layout):
        d = self.d
        return _temp(lambda: fbn.batch_norm_train(d.x, d.scale, d.offset, channel_axis=d.axis, out=d.out),
                     d.x.nbytes)

    def track_infer_out(self, layout):
        d = self.d
        return _temp(lambda: fbn.batch_norm_infer(d.x, d.scale, d.offset, d.mean, d.var,
                                                  channel_axis=d.axis, out=d.out), d.x.nbytes)

    def track_backward_out(self, layout):
        d = self.d
        return _temp(lambda: fbn.batch_norm_backward(d.dy, d.x, d.scale, d.mean, d.invstd,
                                                     channel_axis=d.axis, out=d.out), d.x.nbytes)

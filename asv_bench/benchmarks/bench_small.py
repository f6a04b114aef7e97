"""Per-call overhead: tiny inputs where validation, dispatch and the serial
kernels' start-up are the whole cost (targets: (16,4) <= 5 us, (2500,30) <= 15 us).

The tiny arrays come from ``setup_cache``; ``setup`` only warms up (loads
the compiled kernels) once per process, which ``asv run --quick`` (one call,
no warm-up) needs.  Because a ``setup`` exists, asv re-runs it between the
``number`` calls of a sample and times each call on its own (asv#966): two
clock reads, well under 0.1 us, per call.
"""

import numpy as np

from ._common import EPS, fbn, fill_normal, warm

SHAPES = {"16x4": (16, 4), "2500x30": (2500, 30), "NCHW 4x3x7x5": (4, 3, 7, 5)}


def _arrays(shape):
    x = fill_normal(np.empty(shape, np.float32))
    C = shape[1]
    return {"x": x, "dy": fill_normal(np.empty(shape, np.float32), seed=1),
            "out": np.zeros_like(x), "scale": np.ones(C, np.float32), "offset": np.zeros(C, np.float32),
            "mean": np.full(C, 0.5, np.float32), "var": np.full(C, 4.0, np.float32),
            "invstd": np.full(C, 0.5, np.float32), "axis": -1 if len(shape) == 2 else 1}


class SmallCalls:
    params = [list(SHAPES)]
    param_names = ["shape"]
    number = 1000
    repeat = (10, 30, 3.0)
    rounds = 2
    warmup_time = 0.5
    timeout = 120

    def setup_cache(self):
        return {k: _arrays(s) for k, s in SHAPES.items()}

    def setup(self, cache, shape):
        warm(("small", shape), lambda: [getattr(self, m)(cache, shape) for m in self._methods], calls=3)

    _methods = ("time_train_out", "time_train_fresh", "time_infer_out", "time_backward_out",
                "time_moments")

    def time_train_out(self, cache, shape):
        a = cache[shape]
        fbn.batch_norm_train(a["x"], a["scale"], a["offset"], channel_axis=a["axis"], out=a["out"])

    def time_train_fresh(self, cache, shape):
        a = cache[shape]
        fbn.batch_norm_train(a["x"], a["scale"], a["offset"], channel_axis=a["axis"])

    def time_infer_out(self, cache, shape):
        a = cache[shape]
        fbn.batch_norm_infer(a["x"], a["scale"], a["offset"], a["mean"], a["var"],
                             channel_axis=a["axis"], eps=EPS, out=a["out"])

    def time_backward_out(self, cache, shape):
        a = cache[shape]
        fbn.batch_norm_backward(a["dy"], a["x"], a["scale"], a["mean"], a["invstd"],
                                channel_axis=a["axis"], out=a["out"])

    def time_moments(self, cache, shape):
        a = cache[shape]
        fbn.moments(a["x"], 0 if a["axis"] == -1 else (0, 2, 3))


class LayerStep:
    """``BatchNorm`` layer forward + backward on the BN-tutorial MLP batch (10, 30)."""
    number = 500
    repeat = (10, 30, 3.0)
    rounds = 2
    warmup_time = 0.5

    def setup_cache(self):
        x = fill_normal(np.empty((10, 30), np.float32))
        return x, fill_normal(np.empty((10, 30), np.float32), seed=1)

    def setup(self, cache):
        warm("layer", lambda: self.time_layer_train_step(cache), calls=3)

    def time_layer_train_step(self, cache):
        x, dy = cache
        layer = _layer()
        layer(x)
        layer.backward(dy)


_LAYER = []


def _layer():
    if not _LAYER:
        _LAYER.append(fbn.BatchNorm(30, channel_axis=-1))
    return _LAYER[0]

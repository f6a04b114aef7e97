"""Inference-mode forward (2B of traffic) and tf.nn.batch_normalization."""

from ._common import DTYPE_GRID, Grid, check_params, data, fbn, warm


def _infer_out(d):
    fbn.batch_norm_infer(d.x, d.scale, d.offset, d.mean, d.var, channel_axis=d.axis, out=d.out)


class _Setup(Grid):
    def setup(self, dtype, layout, size):
        check_params(dtype, layout, size)
        self.d = data(dtype, layout, size)
        warm(("infer", dtype, layout, size), lambda: _infer_out(self.d))


class Infer(_Setup):

    def time_infer_out(self, dtype, layout, size):
        _infer_out(self.d)


class InferDtypes(Infer):
    params = DTYPE_GRID


class BatchNormalization(_Setup):
    """``tf.nn.batch_normalization`` with moments(..., keepdims=True)-shaped parameters."""
    params = [["float32"], ["NCHW", "NHWC"], ["M", "L"]]

    def setup(self, dtype, layout, size):
        check_params(dtype, layout, size)
        self.d = d = data(dtype, layout, size)
        shape = [1] * d.x.ndim
        shape[d.axis] = d.C
        s = tuple(shape)
        self.args = (d.mean.reshape(s), d.var.reshape(s), d.offset.reshape(s), d.scale.reshape(s))
        warm(("batch_normalization", dtype, layout, size),
             lambda: self.time_batch_normalization_out(dtype, layout, size))

    def time_batch_normalization_out(self, dtype, layout, size):
        fbn.batch_normalization(self.d.x, *self.args, 1e-5, out=self.d.out)

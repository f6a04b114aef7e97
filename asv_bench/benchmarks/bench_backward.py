"""Backward of the training forward (5B of traffic: x and dy read twice, dx written)."""

from ._common import DTYPE_GRID, Grid, check_params, data, fbn, warm


class Backward(Grid):

    def setup(self, dtype, layout, size):
        check_params(dtype, layout, size)
        self.d = data(dtype, layout, size, backward=True)
        warm(("backward", dtype, layout, size), lambda: self.time_backward_out(dtype, layout, size))

    def time_backward_out(self, dtype, layout, size):
        d = self.d
        fbn.batch_norm_backward(d.dy, d.x, d.scale, d.mean, d.invstd, channel_axis=d.axis, out=d.out)


class BackwardDtypes(Backward):
    params = DTYPE_GRID

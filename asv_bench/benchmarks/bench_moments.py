"""moments: per-channel mean and variance in one read of x (1B of traffic)."""

from ._common import DTYPE_GRID, Grid, check_params, data, fbn, warm


class Moments(Grid):
    """``fbn.moments(x, axes)`` over every axis but the channel axis."""

    def setup(self, dtype, layout, size):
        check_params(dtype, layout, size)
        self.d = data(dtype, layout, size, out=False)
        warm(("moments", dtype, layout, size), lambda: self.time_moments(dtype, layout, size))

    def time_moments(self, dtype, layout, size):
        fbn.moments(self.d.x, self.d.reduce)


class MomentsDtypes(Moments):
    params = DTYPE_GRID

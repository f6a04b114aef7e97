"""Training-mode forward (3B of traffic): out= preallocated; running statistics;
a fresh output (first-touch page faults included, as a user would see them)."""

from ._common import DTYPE_GRID, Grid, check_params, data, fbn, warm


def _train_out(d):
    fbn.batch_norm_train(d.x, d.scale, d.offset, channel_axis=d.axis, out=d.out)


class _Setup(Grid):
    def setup(self, dtype, layout, size):
        check_params(dtype, layout, size)
        self.d = data(dtype, layout, size)
        warm(("train", dtype, layout, size), lambda: _train_out(self.d))


class Train(_Setup):

    def time_train_out(self, dtype, layout, size):
        _train_out(self.d)


class TrainDtypes(Train):
    params = DTYPE_GRID


class TrainVariants(_Setup):
    """float32, the large layouts only: the cost of running statistics and of
    allocating the output."""
    params = [["float32"], ["NCHW", "NHWC"], ["M", "L"]]

    def time_train_running_stats(self, dtype, layout, size):
        d = self.d
        fbn.batch_norm_train(d.x, d.scale, d.offset, channel_axis=d.axis, out=d.out,
                             running_mean=d.running_mean, running_var=d.running_var)

    def time_train_fresh_output(self, dtype, layout, size):
        d = self.d
        fbn.batch_norm_train(d.x, d.scale, d.offset, channel_axis=d.axis)

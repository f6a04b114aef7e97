"""The fused one-call training forward for small C-contiguous inputs.

``batch_norm_train`` takes it for NumPy float32/64 C-contiguous input of at
most ``cpu_numba.SMALL`` values on the Numba backend.  Its channels-last
kernel walks k rows at a time as one wide row; shapes here cover wide rows
only, leftover rows only, and both.
"""

import numpy as np
import pytest

import fastbn as fbn
import reference as ref

numba_backend = pytest.importorskip("fastbn.kernels.cpu_numba")
pytestmark = pytest.mark.skipif(fbn.backends()["numba"] != "available", reason="needs numba")

SHAPES = [((16, 4), -1), ((50, 3), -1), ((64, 1), -1), ((2500, 30), -1), ((1000, 33), -1),
          ((2, 7), -1), ((7, 3, 5, 5), 1), ((3, 5, 4, 2), -1), ((6, 65, 3), 1), ((2, 1), 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("affine", [False, True])
def test_small_path_matches_reference(rng, shape, axis, dtype, affine):
    assert np.prod(shape) <= numba_backend.SMALL
    C = shape[axis]
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 3, C).reshape(
        [C if a == axis % len(shape) else 1 for a in range(len(shape))]) + 50).astype(dtype)
    scale = rng.uniform(0.5, 2, C).astype(dtype) if affine else None
    offset = rng.standard_normal(C).astype(dtype) if affine else None
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.5, 2, C).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    x0 = x.copy()
    y, mean, invstd = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, running_mean=rm,
                                           running_var=rv, momentum=0.3)
    want = ref.batch_norm_train(x0, scale, offset, channel_axis=axis, running_mean=rm0,
                                running_var=rv0, momentum=0.3)
    ref.assert_close(y, want[0])
    ref.assert_close(mean, want[1])
    ref.assert_close(invstd, want[2])
    ref.assert_close(rm, want[3])
    ref.assert_close(rv, want[4])
    assert np.array_equal(x, x0)
    # in place: out=x gives the same numbers
    y2, _, _ = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, out=x, backend="numba")
    assert y2 is x
    ref.assert_close(x, want[0])

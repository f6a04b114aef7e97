"""The register kernels for channels-last statistics (kernels/_rowsums.py), used by
the Numba backend when C is 16, 32, 48 or 64 with unit-stride channels."""

import numpy as np
import pytest

import fastbn as fbn
import reference as ref

cpu_numba = pytest.importorskip("fastbn.kernels.cpu_numba")
_rowsums = pytest.importorskip("fastbn.kernels._rowsums")


@pytest.fixture
def used(monkeypatch):
    """Records the ``groups`` verdict of every channels-last moments call.  The
    fused small kernel (``moments_small3``, which small C-contiguous input takes
    instead of ``moments3``) is bypassed, so that these sizes reach moments3."""
    monkeypatch.delattr(cpu_numba, "moments_small3")
    seen = []
    real = _rowsums.groups

    def spy(C, x):
        seen.append(real(C, x))
        return seen[-1]
    monkeypatch.setattr(_rowsums, "groups", spy)
    return seen


@pytest.mark.parametrize("C", [16, 32, 48, 64])
@pytest.mark.parametrize("dtype", ref.DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("rows", [1, 3, 257, 5000, 70001])
def test_moments_and_train_match_the_oracle(used, rng, C, dtype, rows):
    # |mean| / std up to 100: float64 outputs are checked to 1e-12, which a larger
    # ratio's cancellation in x - mean would not allow (any backend, any order)
    x = (rng.standard_normal((rows, C)) * rng.uniform(0.5, 5, C) + rng.uniform(-50, 50, C))
    x = x.astype(dtype)
    mean, var = fbn.moments(x, 0, backend="numba")
    emean, evar = ref.moments(x, 0)
    ref.assert_close(mean, emean, "mean")
    ref.assert_close(var, evar, "var")
    assert used and used[-1] == C // 16, "the register kernel ran"
    if rows > 1:
        y = fbn.batch_norm_train(x, channel_axis=-1, backend="numba")[0]
        ref.assert_close(y, ref.batch_norm_train(x, channel_axis=-1)[0], "train y")


def test_strided_rows_and_nhwc(used, rng):
    """Rows with a gap (x[::2]) and a 4-D NHWC array: still the register kernel."""
    x = rng.standard_normal((801, 64)).astype(np.float32)[::2]
    ref.assert_close(fbn.moments(x, 0, backend="numba")[1], ref.moments(x, 0)[1], "strided var")
    x4 = rng.standard_normal((3, 17, 19, 32)).astype(np.float32)
    ref.assert_close(fbn.moments(x4, (0, 1, 2), backend="numba")[1], ref.moments(x4, (0, 1, 2))[1],
                     "NHWC var")
    assert used == [4, 2]


@pytest.mark.parametrize("C", [15, 17, 30, 80, 128])
def test_other_widths_use_the_loop(used, rng, C):
    x = rng.standard_normal((300, C)).astype(np.float32)
    ref.assert_close(fbn.moments(x, 0, backend="numba")[1], ref.moments(x, 0)[1], "var")
    assert used == [0]


def test_channel_stride_not_one_uses_the_loop(used, rng):
    x = rng.standard_normal((300, 64)).astype(np.float32)[:, ::2]  # channel stride 8 bytes
    ref.assert_close(fbn.moments(x, 0, backend="numba")[1], ref.moments(x, 0)[1], "var")
    assert used == [0]


def test_special_values_stay_in_their_channel(used, rng):
    x = rng.standard_normal((999, 32)).astype(np.float32)
    x[5, 3] = np.nan
    x[7, 9] = np.inf
    x[8, 10], x[9, 10] = np.inf, -np.inf
    with np.errstate(invalid="ignore"):
        mean, var = fbn.moments(x, 0, backend="numba")
        emean, evar = ref.moments(x, 0)
    np.testing.assert_array_equal(np.isnan(mean), np.isnan(emean))
    np.testing.assert_array_equal(np.isnan(var), np.isnan(evar))
    assert mean[9] == np.inf and np.isnan(var[9])
    clean = [c for c in range(32) if c not in (3, 9, 10)]
    ref.assert_close(var[clean], evar[clean], "clean channels")
    assert used == [2]

"""Mergeable batch-norm state (fastbn.merge): partial moments, Chan merging, and
synchronised batch norm over shards, against the float64 oracle on the
concatenated batch.  Plus the multi-process example, run as a script."""

import os
import subprocess
import sys

import numpy as np
import pytest

import reference as ref

import fastbn as fbn

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "sync_batchnorm.py")


def split(x, sizes, axis=0):
    """x cut into consecutive shards of ``sizes`` along ``axis`` (sizes may be 0)."""
    bounds = np.cumsum([0] + list(sizes))
    assert bounds[-1] == x.shape[axis]
    return [np.take(x, np.arange(a, b), axis=axis) for a, b in zip(bounds[:-1], bounds[1:])]


def oracle_moments(x, channel_axis):
    axes = ref.reduced_axes(x.ndim, channel_axis)
    mean, var = ref.moments(x, axes)
    n = ref.count(x.shape, axes)
    return n, mean, var * n


# -- partial moments and merging -----------------------------------------------------

@pytest.mark.parametrize("sizes", [(5, 1, 0, 17), (0, 23), (1, 1, 1), (9,)], ids=str)
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_merge_equals_moments_of_concatenation(make_array, backend, sizes, channel_axis):
    shape = (sum(sizes), 3, 4, 5) if channel_axis == 1 else (sum(sizes), 4, 5, 3)
    x = make_array(shape, np.float64, channel_axis=channel_axis)
    parts = [fbn.partial_moments(s, channel_axis, backend=backend) for s in split(x, sizes)]
    for p, size in zip(parts, sizes):
        assert p.count.dtype == np.float64 and p.count.shape == (3,)
        np.testing.assert_array_equal(p.count, size * 20)
    total = fbn.merge_moments(*parts)
    n, mean, m2 = oracle_moments(x, channel_axis)
    np.testing.assert_array_equal(total.count, n)
    ref.assert_close(total.mean, mean, "mean")
    ref.assert_close(total.m2, m2, "m2")
    ref.assert_close(total.var(ddof=1), m2 / (n - 1), "unbiased var")


def test_unequal_counts_with_different_means(rng):
    """One value against many, far apart: what averaging shard statistics gets wrong (pytorch#22192)."""
    a = np.full((1, 2), 10.0)
    b = rng.standard_normal((99, 2))
    total = fbn.merge_moments(fbn.partial_moments(a), fbn.partial_moments(b))
    n, mean, m2 = oracle_moments(np.concatenate([a, b]), 1)
    ref.assert_close(total.mean, mean, "mean")
    ref.assert_close(total.m2, m2, "m2")


def test_float32_large_offset_shards(rng):
    """float32 data at offset 1e6, many unequal shards: variance to ~1e-7 relative."""
    x = (1e6 + rng.standard_normal((64, 8, 7, 7))).astype(np.float32)
    sizes = [int(s) for s in np.diff(np.sort(np.r_[0, rng.choice(63, 12, replace=False) + 1, 64]))]
    total = fbn.merge_moments(*[fbn.partial_moments(s) for s in split(x, sizes)])
    n, mean, m2 = oracle_moments(x, 1)
    assert np.max(np.abs(total.m2 - m2) / m2) <= 1e-6
    assert np.max(np.abs(total.mean - mean) / mean) <= 1e-12


def test_associative_and_commutative(rng):
    parts = [fbn.partial_moments(1e3 + rng.standard_normal((k, 4)) * (1 + k)) for k in (3, 0, 11, 1, 6)]
    a, b, c, d, e = parts
    flat = fbn.merge_moments(*parts)
    trees = [fbn.merge_moments(fbn.merge_moments(a, b), fbn.merge_moments(c, fbn.merge_moments(d, e))),
             fbn.merge_moments(e, d, c, b, a),
             fbn.merge_moments(fbn.merge_moments(fbn.merge_moments(fbn.merge_moments(a, b), c), d), e)]
    for t in trees:
        np.testing.assert_array_equal(t.count, flat.count)
        np.testing.assert_allclose(t.mean, flat.mean, rtol=1e-14)
        np.testing.assert_allclose(t.m2, flat.m2, rtol=1e-12)


def test_empty_shards(rng):
    empty = fbn.partial_moments(np.empty((0, 3, 4), np.float32))
    for v in empty:
        np.testing.assert_array_equal(v, np.zeros(3))
    only_empty = fbn.merge_moments(empty, empty)
    np.testing.assert_array_equal(only_empty.count, 0)
    full = fbn.partial_moments(rng.standard_normal((5, 3, 4)))
    for merged in (fbn.merge_moments(empty, full), fbn.merge_moments(full, empty, empty)):
        np.testing.assert_array_equal(merged.pack(), full.pack())
    # A zero-count part is ignored whatever its mean and m2 say.
    junk = fbn.Moments(np.zeros(3), np.full(3, np.nan), np.full(3, np.inf))
    np.testing.assert_array_equal(fbn.merge_moments(full, junk).pack(), full.pack())


def test_nan_stays_in_its_channel(rng):
    x = rng.standard_normal((6, 3, 2))
    x[4, 1, 0] = np.nan
    total = fbn.merge_moments(*[fbn.partial_moments(s) for s in split(x, (4, 2))])
    assert np.isnan(total.mean[1]) and np.isnan(total.m2[1])
    assert np.isfinite(total.mean[[0, 2]]).all() and np.isfinite(total.m2[[0, 2]]).all()


def test_pack_forms(rng):
    parts = [fbn.partial_moments(rng.standard_normal((k, 5))) for k in (2, 7, 3)]
    want = fbn.merge_moments(*parts)
    stacked = np.stack([p.pack() for p in parts])               # what an all-gather gives
    for got in (fbn.merge_moments(stacked), fbn.merge_moments(*[p.pack() for p in parts]),
                fbn.merge_moments(parts[0], stacked[1:])):
        np.testing.assert_allclose(got.pack(), want.pack(), rtol=1e-14)
    for a, b in zip(fbn.Moments.unpack(want.pack()), want):
        np.testing.assert_array_equal(a, b)


def test_merge_errors(rng):
    a = fbn.partial_moments(rng.standard_normal((3, 4)))
    b = fbn.partial_moments(rng.standard_normal((3, 5)))
    with pytest.raises(ValueError, match="different channel counts"):
        fbn.merge_moments(a, b)
    with pytest.raises(ValueError, match="at least one"):
        fbn.merge_moments()
    with pytest.raises(ValueError, match=r"\(3, C\)"):
        fbn.merge_moments(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="shape"):
        fbn.Moments.unpack(np.zeros(4))
    with pytest.raises(TypeError):
        fbn.partial_moments(np.zeros((3, 4), np.int32))


# -- synchronised batch norm -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_sync_forward_and_backward(make_array, backend, dtype, channel_axis):
    sizes = (6, 0, 1, 13)
    C = 4
    shape = (sum(sizes), C, 3, 5) if channel_axis == 1 else (sum(sizes), 3, 5, C)
    x = make_array(shape, dtype, channel_axis=channel_axis)
    dy = make_array(shape, dtype)
    rng = np.random.default_rng(0)
    scale, offset = rng.uniform(0.5, 2, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    xs, dys = split(x, sizes), split(dy, sizes)

    total = fbn.merge_moments(*[fbn.partial_moments(s, channel_axis, backend=backend) for s in xs])
    runs = [(np.zeros(C, dtype), np.ones(C, dtype)) for _ in sizes]
    fwd = [fbn.batch_norm_train_from_moments(s, total, scale, offset, channel_axis=channel_axis,
                                             running_mean=rm, running_var=rv, backend=backend)
           for s, (rm, rv) in zip(xs, runs)]
    mean, invstd = fwd[0][1], fwd[0][2]
    sums = fbn.merge_grad_sums(*[fbn.partial_grad_sums(d, s, mean, invstd, channel_axis=channel_axis,
                                                       backend=backend) for d, s in zip(dys, xs)])
    bwd = [fbn.batch_norm_backward_from_sums(d, s, scale, mean, invstd, sums,
                                             channel_axis=channel_axis, backend=backend)
           for d, s in zip(dys, xs)]

    y_ref, mean_ref, invstd_ref, rm_ref, rv_ref = ref.batch_norm_train(
        x, scale, offset, channel_axis=channel_axis, running_mean=np.zeros(C), running_var=np.ones(C))
    dx_ref, dscale_ref, doffset_ref = ref.batch_norm_backward(dy, x, scale, mean_ref, invstd_ref,
                                                              channel_axis=channel_axis)
    y = np.concatenate([f[0] for f in fwd])
    assert y.dtype == dtype and y.shape == x.shape
    ref.assert_close(y, y_ref, "y")
    ref.assert_close(np.concatenate([b[0] for b in bwd]), dx_ref, "dx")
    for (yk, mk, ik), (dxk, dsk, dok), (rm, rv) in zip(fwd, bwd, runs):
        assert mk.dtype == dtype and dsk.dtype == dtype
        ref.assert_close(mk, mean_ref, "mean")
        ref.assert_close(ik, invstd_ref, "invstd")
        ref.assert_close(dsk, dscale_ref, "dscale")
        ref.assert_close(dok, doffset_ref, "doffset")
        ref.assert_close(rm, rm_ref, "running_mean")
        ref.assert_close(rv, rv_ref, "running_var")


def test_sync_equals_single_process_fastbn(rng):
    """Bit-for-bit on this data: the shard path is the same arithmetic as batch_norm_train."""
    x = (100 + rng.standard_normal((11, 3, 8))).astype(np.float32)
    total = fbn.merge_moments(*[fbn.partial_moments(s) for s in split(x, (4, 7))])
    y = np.concatenate([fbn.batch_norm_train_from_moments(s, total)[0] for s in split(x, (4, 7))])
    y1 = fbn.batch_norm_train(x)[0]
    np.testing.assert_allclose(y, y1, rtol=2e-6, atol=2e-6)


def test_sync_errors_change_nothing(rng):
    x = rng.standard_normal((1, 3, 1))
    total = fbn.partial_moments(x)  # one value per channel in the whole batch
    rm = np.zeros(3)
    with pytest.raises(ValueError, match="more than 1 value"):
        fbn.batch_norm_train_from_moments(x, total, running_mean=rm)
    np.testing.assert_array_equal(rm, 0)
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        fbn.batch_norm_train_from_moments(x, fbn.partial_moments(rng.standard_normal((2, 4))))
    with pytest.raises(ValueError, match="dy"):
        fbn.partial_grad_sums(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros(4), np.ones(4))
    with pytest.raises(ValueError, match="sums"):
        fbn.batch_norm_backward_from_sums(x, x, None, np.zeros(3), np.ones(3), np.zeros((3, 2)))


@pytest.mark.integration
def test_example_script_runs():
    proc = subprocess.run([sys.executable, EXAMPLE, "--sizes", "5,0,1,9", "--channels", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("OK")
    assert "match single-process" in proc.stdout

"""The Dask backend on a dask.distributed LocalCluster (2 worker processes, 1 thread each),
against the float64 oracle.  Skipped when dask[distributed] is not installed."""

import logging
import math

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.integration

import reference as ref  # noqa: E402

import fastbn as fbn  # noqa: E402


@pytest.fixture(scope="module")
def client():
    """One cluster for the module: starting worker processes costs seconds."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=logging.ERROR) as cluster:
        with distributed.Client(cluster) as c:
            yield c


def compute(client, *arrays):
    """Compute on the cluster's worker processes (not the local threads)."""
    return dask.compute(*arrays, scheduler=client)


def uneven(rng, n, pieces):
    """``n`` split into ``pieces`` positive chunk sizes, not all equal (1 < pieces < n)."""
    while True:
        cuts = np.sort(rng.choice(np.arange(1, n), pieces - 1, replace=False))
        sizes = tuple(int(s) for s in np.diff(np.r_[0, cuts, n]))
        if len(set(sizes)) > 1:
            return sizes


def max_rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want) / np.abs(want)))


# -- the bar: >= 50 uneven chunks, float32 at offset 1e6 ----------------------------------

def test_moments_large_offset_many_uneven_chunks(client, rng):
    x = (1e6 + rng.standard_normal((96, 4, 16, 16))).astype(np.float32)
    chunks = (uneven(rng, 96, 13), (1, 3), (16,), (5, 11))
    xd = da.from_array(x, chunks=chunks)
    assert xd.npartitions >= 50
    mean, var = fbn.moments(xd, (0, 2, 3))
    assert isinstance(mean, da.Array) and isinstance(var, da.Array)
    # ... and over every axis: one number from all 104 chunks.
    mean, var, mean_all, var_all = compute(client, mean, var, *fbn.moments(xd))
    want_mean, want_var = ref.moments(x, (0, 2, 3))
    assert mean.dtype == np.float32 and var.dtype == np.float32 and var.shape == (4,)
    assert max_rel(var, want_var) <= 1e-6
    assert max_rel(mean, want_mean) <= 1e-6
    want_mean, want_var = ref.moments(x)
    assert max_rel(var_all, want_var) <= 1e-6 and max_rel(mean_all, want_mean) <= 1e-6


@pytest.mark.parametrize("split", ["batch", "channel", "both"])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_train_large_offset_many_uneven_chunks(client, rng, split, channel_axis):
    C = 12
    shape = (60, C, 8, 10) if channel_axis == 1 else (60, 8, 10, C)
    ax = channel_axis % 4
    x = (1e6 + rng.standard_normal(shape) + np.arange(C).reshape(
        [C if a == ax else 1 for a in range(4)])).astype(np.float32)
    chunks = [(s,) for s in shape]
    h, w = (2, 3) if channel_axis == 1 else (1, 2)  # the spatial axes
    if split == "batch":      # 17 x 3 chunks, every one holding all channels
        chunks[0], chunks[h] = uneven(rng, 60, 17), (2, 3, 3)
    if split == "channel":    # 6 x 9 chunks, each holding the whole batch
        chunks[ax], chunks[w] = uneven(rng, C, 6), uneven(rng, 10, 9)
    if split == "both":       # 9 x 6 chunks
        chunks[0], chunks[ax] = uneven(rng, 60, 9), uneven(rng, C, 6)
    xd = da.from_array(x, chunks=tuple(chunks))
    assert xd.npartitions >= 50
    scale = rng.uniform(0.5, 2, C).astype(np.float32)
    offset = rng.standard_normal(C).astype(np.float32)
    y, mean, invstd = fbn.batch_norm_train(xd, scale, offset, channel_axis=channel_axis)
    assert all(isinstance(v, da.Array) for v in (y, mean, invstd))
    assert y.chunks == xd.chunks
    y, mean, invstd = compute(client, y, mean, invstd)
    y_ref, mean_ref, invstd_ref, _, _ = ref.batch_norm_train(x, scale, offset, channel_axis=channel_axis)
    assert y.dtype == np.float32 and mean.dtype == np.float32 and invstd.dtype == np.float32
    assert max_rel(mean, mean_ref) <= 1e-6
    assert max_rel(invstd, invstd_ref) <= 1e-6  # var to ~2e-6 at worst; in practice ~1e-7
    ref.assert_close(y, y_ref, "y")


# -- every function against the oracle ---------------------------------------------------

def test_moments_axes(client, make_array):
    x = make_array((13, 5, 6, 7), np.float64, channel_axis=1)
    xd = da.from_array(x, chunks=((4, 9), (2, 3), (6,), (1, 6)))
    cases = [(axis, keepdims, ddof) for axis in (None, 0, (0, 2), -1, (1, 2, 3), ())
             for keepdims in (False, True) for ddof in (0, 1)]
    results = compute(client, *[fbn.moments(xd, a, keepdims=k, ddof=d) for a, k, d in cases])
    for (axis, keepdims, ddof), (mean, var) in zip(cases, results):
        what = f"axis={axis} keepdims={keepdims} ddof={ddof}"
        want_mean, want_var = ref.moments(x, axis, keepdims=keepdims, ddof=ddof)
        assert mean.shape == want_mean.shape and var.shape == want_var.shape, what
        ref.assert_close(mean, want_mean, "mean " + what)
        ref.assert_close(var, want_var, "var " + what)


def test_float16_gives_float32_statistics(client, make_array):
    x = make_array((40, 3, 9), np.float16, channel_axis=1)
    xd = da.from_array(x, chunks=(7, 2, 4))
    y, mean, invstd = compute(client, *fbn.batch_norm_train(xd))
    y_ref, mean_ref, invstd_ref, _, _ = ref.batch_norm_train(x)
    assert y.dtype == np.float16 and mean.dtype == np.float32 and invstd.dtype == np.float32
    ref.assert_close(y, y_ref, "y")
    ref.assert_close(mean, mean_ref, "mean")
    ref.assert_close(invstd, invstd_ref, "invstd")


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_backward_with_lazy_statistics(client, make_array, channel_axis):
    C = 5
    shape = (23, C, 4, 6) if channel_axis == 1 else (23, 4, 6, C)
    x = make_array(shape, np.float64, channel_axis=channel_axis)
    dy = make_array(shape, np.float64)
    xd = da.from_array(x, chunks=(5, 3, 4, 3))
    dyd = da.from_array(dy, chunks=(11, 2, 2, 6))   # other chunks than x: aligned inside
    scale = np.linspace(0.5, 2.0, C)
    _, mean, invstd = fbn.batch_norm_train(xd, scale, channel_axis=channel_axis)
    dx, dscale, doffset = fbn.batch_norm_backward(dyd, xd, scale, mean, invstd,
                                                  channel_axis=channel_axis)
    assert dx.chunks == xd.chunks
    dx, dscale, doffset = compute(client, dx, dscale, doffset)
    _, mean_ref, invstd_ref, _, _ = ref.batch_norm_train(x, scale, channel_axis=channel_axis)
    want = ref.batch_norm_backward(dy, x, scale, mean_ref, invstd_ref, channel_axis=channel_axis)
    for got, w, what in zip((dx, dscale, doffset), want, ("dx", "dscale", "doffset")):
        ref.assert_close(got, w, what)


def test_infer_and_batch_normalization(client, make_array):
    x = make_array((17, 6, 5), np.float32, channel_axis=1)
    xd = da.from_array(x, chunks=(4, (1, 5), 5))
    rng = np.random.default_rng(0)
    scale, offset = rng.uniform(0.5, 2, 6), rng.standard_normal(6)
    mean, var = rng.standard_normal(6), rng.uniform(0.5, 2, 6)
    y = fbn.batch_norm_infer(xd, scale, offset, da.from_array(mean, chunks=3), var)
    # tf.nn.moments + tf.nn.batch_normalization, with lazy per-(C, W) parameters
    m, v = fbn.moments(xd, 0, keepdims=True)
    y2 = fbn.batch_normalization(xd, m, v, None, 2.0, 1e-3)
    y, y2 = compute(client, y, y2)
    ref.assert_close(y, ref.batch_norm_infer(x, scale, offset, mean, var), "infer")
    m_ref, v_ref = ref.moments(x, 0, keepdims=True)
    ref.assert_close(y2, ref.batch_normalization(x, m_ref, v_ref, None, 2.0, 1e-3),
                     "batch_normalization")


def test_zero_size_chunks(client, make_array):
    x = make_array((12, 3, 4), np.float64, channel_axis=1)
    xd = da.from_array(x, chunks=((0, 5, 0, 7), (3,), (4,)))
    mean, var, y = compute(client, *fbn.moments(xd, (0, 2)), fbn.batch_norm_train(xd)[0])
    want_mean, want_var = ref.moments(x, (0, 2))
    ref.assert_close(mean, want_mean, "mean")
    ref.assert_close(var, want_var, "var")
    ref.assert_close(y, ref.batch_norm_train(x)[0], "y")


# -- running statistics, laziness, errors ----------------------------------------------------

def test_running_stats_updated_during_the_call(client, make_array):
    x = make_array((30, 4, 5), np.float32, channel_axis=1)
    xd = da.from_array(x, chunks=(7, 2, 5))
    rm, rv = np.full(4, 0.5, np.float32), np.full(4, 2.0, np.float32)
    with dask.config.set(scheduler=client):
        y, mean, invstd = fbn.batch_norm_train(xd, running_mean=rm, running_var=rv, momentum=0.3)
    _, _, _, rm_ref, rv_ref = ref.batch_norm_train(x, running_mean=np.full(4, 0.5),
                                                   running_var=np.full(4, 2.0), momentum=0.3)
    ref.assert_close(rm, rm_ref, "running_mean")   # already updated: nothing computed yet by us
    ref.assert_close(rv, rv_ref, "running_var")
    assert isinstance(y, da.Array)
    y, mean = compute(client, y, mean)
    y_ref, mean_ref, _, _, _ = ref.batch_norm_train(x)
    ref.assert_close(y, y_ref, "y")
    ref.assert_close(mean, mean_ref, "mean")


def test_errors_raise_before_anything_changes(client):
    xd = da.ones((4, 3, 2), chunks=2, dtype=np.float32)
    rm = np.zeros(3, np.float32)
    with pytest.raises(TypeError, match="out="):
        fbn.batch_norm_train(xd, out=np.empty((4, 3, 2), np.float32), running_mean=rm)
    with pytest.raises(ValueError, match="more than 1 value"):
        fbn.batch_norm_train(da.ones((1, 3), chunks=1, dtype=np.float32),
                             running_mean=rm)
    with pytest.raises(TypeError, match="running_mean"):
        fbn.batch_norm_train(xd, running_mean=np.zeros(3))        # float64 for float32 x
    with pytest.raises(ValueError, match="scale"):
        fbn.batch_norm_train(xd, np.ones(4), running_mean=rm)
    np.testing.assert_array_equal(rm, 0)
    with pytest.raises(TypeError, match="dtype"):
        fbn.moments(da.ones((4, 3), chunks=2, dtype=np.int32))
    with pytest.raises(TypeError, match="numba"):
        fbn.moments(xd, backend="numba")
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        fbn.moments(xd[xd[:, 0, 0] > 0])
    with pytest.raises(ValueError, match="dy"):
        fbn.batch_norm_backward(xd[:3], xd, None, np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="broadcast"):
        fbn.batch_normalization(xd, np.zeros(5), 1.0, None, None, 1e-3)


def test_dispatch_routes_dask_arrays():
    xd = da.ones((4, 3), chunks=2)
    assert fbn.backend_for(xd) == "dask"
    assert fbn.backends()["dask"] == "available"
    mean, var = fbn.moments(xd, 0)
    assert isinstance(mean, da.Array) and isinstance(var, da.Array)
    # lazy: building the graph computed nothing, and the graph is one task per chunk + a tree
    assert len(dict(mean.__dask_graph__())) < 4 * math.prod(xd.numblocks) + 10


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_chunks_run_the_cpu_backend_the_dispatcher_chooses(backend, monkeypatch):
    """The Dask backend's chunk tasks import the CPU backend chosen at graph build time
    (use_backend / FASTBN_BACKEND), by module path (no dispatcher on the workers)."""
    import importlib

    import fastbn.kernels.dask_chunks as dc
    if fbn.backends()[backend] != "available":
        pytest.skip(fbn.backends()[backend])
    seen = []

    class Spy:
        @staticmethod
        def import_module(path):
            seen.append(path)
            return importlib.import_module(path)

    monkeypatch.setattr(dc, "importlib", Spy)
    x = da.from_array(np.random.default_rng(0).standard_normal((40, 3, 5)).astype(np.float32),
                      chunks=(10, 3, 5))
    with fbn.use_backend(backend):
        y, mean, _ = fbn.batch_norm_train(x)
    dask.compute(y, mean, scheduler="sync")
    want = {"cython": "fastbn.kernels.cpu_cython", "numpy": "fastbn.kernels.reference"}[backend]
    assert seen and set(seen) == {want}

"""The fused one-call kernels for small C-contiguous inputs.

``batch_norm_train``, ``batch_norm_infer`` and ``batch_norm_backward`` take
them for NumPy float16/32/64 C-contiguous input of at most ``cpu_numba.SMALL``
values on the Numba backend.  Channels-last input, and channels-first input
with short rows, run as rows of C*I values, k rows at a time as one wide row
(the row form); shapes here cover wide rows only, leftover rows only, and
both, serially and in blocks of wide rows (in parallel from
ROWS_PARALLEL_FROM values), and channel-by-channel input run serially and in
parallel.
"""

import numba
import numpy as np
import pytest

import fastbn as fbn
import reference as ref

numba_backend = pytest.importorskip("fastbn.kernels.cpu_numba")
pytestmark = pytest.mark.skipif(fbn.backends()["numba"] != "available", reason="needs numba")

SHAPES = [((16, 4), -1), ((50, 3), -1), ((64, 1), -1), ((2500, 30), -1), ((1000, 33), -1),
          ((2, 7), -1), ((7, 3, 5, 5), 1), ((3, 5, 4, 2), -1), ((6, 65, 3), 1), ((2, 1), 1),
          # channels-first in the row form: one row per wide row; wide rows and leftovers
          ((40, 6, 4, 4), 1), ((33, 5, 3), 1), ((9, 4, 2, 2), 1),
          # ... in blocks of wide rows, with rows left over: the backward ((2500, 30) too),
          # the training forward too
          ((1601, 5, 7), 1), ((4001, 25), -1),
          # channel by channel, in parallel (FUSED_PARALLEL_FROM)
          ((40, 16, 8, 8), 1)]


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("affine", [False, True])
def test_small_path_matches_reference(rng, monkeypatch, shape, axis, dtype, affine):
    assert np.prod(shape) <= numba_backend.SMALL
    C = shape[axis]
    pdt = _param_dtype(dtype)
    train_calls = _spy(monkeypatch, "train_small3")
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 3, C).reshape(
        [C if a == axis % len(shape) else 1 for a in range(len(shape))]) + 50).astype(dtype)
    scale = rng.uniform(0.5, 2, C).astype(pdt) if affine else None
    offset = rng.standard_normal(C).astype(pdt) if affine else None
    rm = rng.standard_normal(C).astype(pdt)
    rv = rng.uniform(0.5, 2, C).astype(pdt)
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
    assert mean.dtype == invstd.dtype == rm.dtype == pdt
    assert train_calls, "the fused kernel did not run"
    # in place: out=x gives the same numbers
    y2, _, _ = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, out=x, backend="numba")
    assert y2 is x
    ref.assert_close(x, want[0])


def test_shapes_cover_every_loop_nest():
    forms = set()
    for shape, axis in SHAPES:
        ax = axis % len(shape)
        s3 = (int(np.prod(shape[:ax])), shape[ax], int(np.prod(shape[ax + 1:])))
        x3 = np.empty(s3, np.float32)
        k = numba_backend._row_form(x3)
        parallel = (numba_backend._channel_blocked(x3, 3)
                    and x3.size >= numba_backend.FUSED_PARALLEL_FROM)
        # rows: (channels-last, several rows per wide row, leftover rows, blocks of the
        # training forward, of the backward); else parallel
        forms.add(("rows", s3[2] == 1, k > 1, s3[0] % max(k, 1) > 0,
                   numba_backend._row_blocks("train", x3, k) > 1,
                   numba_backend._row_blocks("backward", x3, k) > 1) if k
                  else ("channels", parallel))
    need = {("rows", False, False, False, False, False), ("rows", False, True, True, False, False),
            ("rows", True, True, True, False, False), ("rows", True, True, True, False, True),
            ("rows", False, True, True, False, True), ("rows", True, True, True, True, True),
            ("channels", False), ("channels", True)}
    if numba.get_num_threads() < 2:   # one thread: no blocks (test_row_form_blocks_* covers them)
        need = {f for f in need if not (f[0] == "rows" and (f[4] or f[5]))}
    assert need <= forms


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("shape3", [(2500, 30, 1), (1601, 5, 7), (37, 16, 1), (9, 3, 1)])
@pytest.mark.parametrize("nb", [2, 3, 5])
def test_row_form_blocks_match_one_block(rng, dtype, shape3, nb):
    """The row-form kernels split into nb blocks of wide rows (the last one also
    taking the rows left over; blocks may be empty) give the one-block numbers,
    serially and in parallel, whatever the machine's thread count."""
    k = numba_backend._row_form(np.empty(shape3, np.float32))
    C = shape3[1]
    pdt = _param_dtype(dtype)
    x = (rng.standard_normal(shape3) * 2 + 50).astype(dtype)
    dy = rng.standard_normal(shape3).astype(dtype)
    scale, offset = rng.uniform(0.5, 2, C).astype(pdt), rng.standard_normal(C).astype(pdt)
    mean = (50 + rng.standard_normal(C)).astype(pdt)
    inv = rng.uniform(0.5, 2, C).astype(pdt)
    bits = numba_backend._bits

    def run(kern, blocks):
        y, dx = np.empty_like(x), np.empty_like(x)
        stats = [np.empty(C, pdt) for _ in range(6)]   # mean, invstd, running x2, dscale, doffset
        stats[2][:], stats[3][:] = 0.0, 1.0
        kern(numba_backend._train_rows)(bits(x), k, blocks, scale, offset, 1e-3, 0.1, stats[2],
                                        stats[3], bits(y), stats[0], stats[1])
        kern(numba_backend._backward_rows)(bits(dy), bits(x), k, blocks, scale, mean, inv, False,
                                           0.0, bits(dx), stats[4], stats[5])
        return [y, dx] + stats

    one = run(lambda K: K.serial, 1)
    for kern in (lambda K: K.serial, lambda K: K.parallel):
        for got, want in zip(run(kern, nb), one):
            ref.assert_close(got, want, rtol=2 * ref.RTOL[got.dtype])


def _param_dtype(dtype):
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(dtype)


def _spy(monkeypatch, name):
    """Count calls of the Numba backend's fused kernel ``name`` (so a test knows it ran)."""
    calls = []
    real = getattr(numba_backend, name)

    def spy(*args):
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(numba_backend, name, spy)
    return calls


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("affine", [False, True])
def test_small_infer_and_backward_match_reference(rng, monkeypatch, shape, axis, dtype, affine):
    C = shape[axis]
    pdt = _param_dtype(dtype)
    x = (rng.standard_normal(shape) * 2 + 50).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    scale = rng.uniform(0.5, 2, C).astype(pdt) if affine else None
    offset = rng.standard_normal(C).astype(pdt) if affine else None
    mean = (50 + rng.standard_normal(C)).astype(pdt)
    var = rng.uniform(0.5, 2, C).astype(pdt)
    x0, dy0 = x.copy(), dy.copy()
    infer_calls = _spy(monkeypatch, "infer_small3")
    back_calls = _spy(monkeypatch, "backward_small3")

    y = fbn.batch_norm_infer(x, scale, offset, mean, var, channel_axis=axis, eps=1e-3,
                             backend="numba")
    ref.assert_close(y, ref.batch_norm_infer(x0, scale, offset, mean, var, channel_axis=axis,
                                             eps=1e-3))
    # statistics in float64 with float32 data (what the layers pass), and as given
    for stats_dtype in {pdt, np.dtype(np.float64)}:
        m, inv = mean.astype(stats_dtype), (1 / np.sqrt(var.astype(np.float64) + 1e-3)).astype(stats_dtype)
        dx, dscale, doffset = fbn.batch_norm_backward(dy, x, scale, m, inv, channel_axis=axis,
                                                      backend="numba")
        want = ref.batch_norm_backward(dy0, x0, scale, m, inv, channel_axis=axis)
        rtol = 10 * ref.RTOL[np.dtype(dtype)]
        ref.assert_close(dx, want[0], "dx", rtol=rtol)
        ref.assert_close(dscale, want[1], "dscale", rtol=rtol)
        ref.assert_close(doffset, want[2], "doffset", rtol=rtol)
        assert dscale.dtype == doffset.dtype == pdt
    assert np.array_equal(x, x0) and np.array_equal(dy, dy0)
    assert infer_calls and back_calls, "the fused kernels did not run"
    # in place: out=x / out=dy give the same numbers
    y2 = fbn.batch_norm_infer(x, scale, offset, mean, var, channel_axis=axis, eps=1e-3, out=x,
                              backend="numba")
    assert y2 is x
    ref.assert_close(x, y)
    dx2, _, _ = fbn.batch_norm_backward(dy, x0, scale, m, inv, channel_axis=axis, out=dy,
                                        backend="numba")
    assert dx2 is dy
    np.testing.assert_array_equal(dy, dx)   # the same serial kernel, in place


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_small_moments_and_infer_backward_match_reference(rng, monkeypatch, shape, axis, dtype):
    """moments (fused: moments_small3, the training forward's statistics) and
    batch_norm_infer_backward (fused: the backward's kernels, frozen) on every
    loop nest, against the oracle; as the general path gives them."""
    C = shape[axis]
    pdt = _param_dtype(dtype)
    ax = axis % len(shape)
    axes = tuple(a for a in range(len(shape)) if a != ax)
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 3, C).reshape(
        [C if a == ax else 1 for a in range(len(shape))]) + 1e3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    mom_calls = _spy(monkeypatch, "moments_small3")
    ib_calls = _spy(monkeypatch, "infer_backward_small3")
    ddof = 1 if x.size > C else 0
    mean, var = fbn.moments(x, axes, ddof=ddof)
    emean, evar = ref.moments(x, axes, ddof=ddof)
    ref.assert_close(mean, emean, "mean", magnitude=ref.abs_reduction(x, axes, mean=True))
    ref.assert_close(var, evar, "var")
    for g, w in zip((mean, var), fbn.moments(x, axes, ddof=ddof, backend="numba")):
        np.testing.assert_array_equal(g, w)
    scale = rng.uniform(0.5, 2, C).astype(pdt)
    m, v = emean.astype(pdt), rng.uniform(0.5, 2, C).astype(pdt)
    dx, dscale, doffset = fbn.batch_norm_infer_backward(dy, x, scale, m, v, channel_axis=axis,
                                                        eps=1e-3)
    inv = 1 / np.sqrt(v.astype(np.float64) + 1e-3)
    xc = ref.f64(x) - ref.along(m, x.ndim, axis)
    ref.assert_close(dx, ref.f64(dy) * ref.along(scale * inv, x.ndim, axis), "dx")
    ref.assert_close(dscale, (ref.f64(dy) * xc).sum(axis=axes) * inv, "dscale",
                     magnitude=ref.abs_reduction(ref.f64(dy) * xc, axes) * inv)
    ref.assert_close(doffset, ref.f64(dy).sum(axis=axes), "doffset",
                     magnitude=ref.abs_reduction(dy, axes))
    for g, w in zip((dx, dscale, doffset), fbn.batch_norm_infer_backward(
            dy, x, scale, m, v, channel_axis=axis, eps=1e-3, backend="numba")):
        np.testing.assert_array_equal(g, w)
    assert mom_calls and ib_calls, "the fused kernels did not run"

"""The small-call fast lane (fastbn/fastlane.py) against the general path.

The lane must (1) give exactly what the general path gives for the calls it
takes -- both end in the same fused kernel, so bit for bit, running
statistics included -- and (2) decline (return None, changing nothing) every
call that is not plainly valid, so that the general path answers it with its
checks and messages.
"""

import numpy as np
import pytest

import fastbn as fbn
from fastbn import fastlane
import reference as ref

pytestmark = pytest.mark.skipif(fbn.backends()["numba"] != "available", reason="needs numba")


@pytest.fixture(autouse=True, params=["compiled", "python"])
def checks(request, monkeypatch):
    """Every test here runs with the compiled argument checks and with their
    Python twins (fastlane.checks)."""
    if request.param == "python":
        monkeypatch.setattr(fastlane, "checks", fastlane)
    elif fastlane.compiled is None:
        pytest.skip("fastbn.kernels.lane_checks is not built")
    return request.param

CASES = [((4, 16, 4, 4), 1), ((7, 5, 3), 1), ((50, 3), -1), ((2500, 30), 1), ((3, 5, 4, 6), -1),
         ((2, 3), 0), ((5, 7, 2), 2), ((6, 1, 5), 1), ((40, 1), -1)]


def _pdt(dtype):
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(dtype)


def _args(rng, shape, axis, dtype):
    C = shape[axis]
    pdt = _pdt(dtype)
    x = (rng.standard_normal(shape) * 2 + 30).astype(dtype)
    vec = lambda lo, hi: rng.uniform(lo, hi, C).astype(pdt)  # noqa: E731
    return x, C, vec


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("variant", ["plain", "affine_running", "out", "in_place",
                                     "channels_last"])
def test_lane_equals_general_path(rng, dtype, shape, axis, variant):
    x, C, vec = _args(rng, shape, axis, dtype)
    if variant == "channels_last":   # x's memory channels-last (a channels_last tensor's view)
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, axis, -1)), -1, axis)
    scale, offset = (vec(0.5, 2), vec(-1, 1)) if variant != "plain" else (None, None)
    rm, rv = (vec(-1, 1), vec(0.5, 2)) if variant == "affine_running" else (None, None)
    rm2, rv2 = (None, None) if rm is None else (rm.copy(), rv.copy())
    # The same fused kernel on both paths: bit for bit.  Channels-last memory
    # takes the general path's primitives there (another kernel: float64 may
    # differ in its last bit where LLVM contracted to an FMA).
    same = ref.assert_close if variant == "channels_last" else np.testing.assert_array_equal
    mk_out = {"out": lambda a: np.empty_like(a), "in_place": lambda a: a,
              "channels_last": lambda a: np.empty_like(a)}.get(variant, lambda a: None)
    x2 = x.copy(order="K")
    out = mk_out(x)
    got = fastlane.train(x, scale, offset, axis, 1e-3, rm, rv, 0.25, out)
    assert got is not None, "the lane declined a plain call"
    if out is not None:
        assert got[0] is out
    want = fbn.batch_norm_train(x2, scale, offset, channel_axis=axis, eps=1e-3, running_mean=rm2,
                                running_var=rv2, momentum=0.25, out=mk_out(x2), backend="numba")
    for g, w in zip(got, want):
        same(g, w)
        assert g.dtype == w.dtype and g.shape == w.shape
    if rm is not None:
        same(rm, rm2)
        same(rv, rv2)

    mean, var = vec(25, 35), vec(0.5, 4)
    x, x2 = x2.copy(order="K"), x2.copy(order="K")
    got = fastlane.infer(x, scale, offset, mean, var, axis, 1e-3, mk_out(x))
    want = fbn.batch_norm_infer(x2, scale, offset, mean, var, channel_axis=axis, eps=1e-3,
                                out=mk_out(x2), backend="numba")
    assert got is not None
    same(got, want)

    dy = np.empty_like(x)
    dy[...] = rng.standard_normal(shape)
    dy2 = dy.copy(order="K")
    invstd = mean.astype(np.float64) * 0 + 1 / np.sqrt(var.astype(np.float64))
    got = fastlane.backward(dy, x, scale, mean, invstd, axis, mk_out(dy))
    want = fbn.batch_norm_backward(dy2, x2, scale, mean, invstd, channel_axis=axis,
                                   out=mk_out(dy2), backend="numba")
    assert got is not None
    for g, w in zip(got, want):
        same(g, w)


@pytest.fixture(params=["numba", "cython"])
def lane_backend(request):
    """The default backend for the lane's calls (skipped where not built)."""
    if fbn.backends()[request.param] != "available":
        pytest.skip(f"{request.param} backend not available")
    with fbn.use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("shape,axis", [((16, 64, 16, 16), 1), ((4096, 64), 1),
                                        ((8, 9, 9, 400), -1), ((2, 3, 400000), 1)])
def test_lane_beyond_small(rng, dtype, shape, axis, lane_backend):
    """Beyond SMALL the lane runs the backend's entry points on the parallel
    primitives (Numba: per-channel math compiled, inference as one parallel
    kernel up to INFER_MAX, then affine3; Cython: per-channel math in NumPy,
    then affine3): the oracle's numbers and the general path's to its
    tolerance (other kernels: float64 may differ where LLVM contracted to an
    FMA), in place too, running statistics included."""
    x, C, vec = _args(rng, shape, axis, dtype)
    assert x.size > fbn.dispatch.module(lane_backend).SMALL
    x0 = x.copy()
    scale, offset, mean, var = vec(0.5, 2), vec(-1, 1), vec(25, 35), vec(0.5, 4)
    got = fastlane.infer(x, scale, offset, mean, var, axis, 1e-3, None)
    assert got is not None
    want = fbn.batch_norm_infer(x, scale, offset, mean, var, channel_axis=axis, eps=1e-3,
                                backend=lane_backend)
    ref.assert_close(got, want)
    ref.assert_close(got, ref.batch_norm_infer(x0, scale, offset, mean, var, channel_axis=axis,
                                               eps=1e-3))

    rm, rv = vec(-1, 1), vec(0.5, 2)
    rm2, rv2 = rm.copy(), rv.copy()
    got = fastlane.train(x, scale, offset, axis, 1e-3, rm, rv, 0.25, None)
    assert got is not None
    want = ref.batch_norm_train(x0, scale, offset, channel_axis=axis, eps=1e-3, running_mean=rm2,
                                running_var=rv2, momentum=0.25)
    for g, w, what in zip(got + (rm, rv), want, ("y", "mean", "invstd", "rm", "rv")):
        ref.assert_close(g, w, what)
        assert g.dtype == _pdt(dtype) or what == "y"

    dy = rng.standard_normal(shape).astype(dtype)
    dy0 = dy.copy()
    _, m, inv = got
    gotb = fastlane.backward(dy, x, scale, m, inv, axis, None)
    assert gotb is not None
    wantb = ref.batch_norm_backward(dy0, x0, scale, m, inv, channel_axis=axis)
    rtol = 10 * ref.RTOL[np.dtype(dtype)]
    for g, w, what in zip(gotb, wantb, ("dx", "dscale", "doffset")):
        ref.assert_close(g, w, what, rtol=rtol)
    # eval mode (frozen statistics): batch_norm_infer_backward's lane
    gotf = fastlane.infer_backward(dy, x, scale, mean, var, axis, 1e-3, None)
    assert gotf is not None
    wantf = fbn.batch_norm_infer_backward(dy0, x0, scale, mean, var, channel_axis=axis, eps=1e-3,
                                          backend=lane_backend)
    for g, w, what in zip(gotf, wantf, ("dx", "dscale", "doffset")):
        ref.assert_close(g, w, what, rtol=rtol)
    q = ref.f64(scale) / np.sqrt(ref.f64(var) + 1e-3)
    ref.assert_close(gotf[0], ref.f64(dy0) * ref.along(q, x.ndim, axis), "dx")
    # in place: out = dy, and out = x
    assert fastlane.backward(dy, x, scale, m, inv, axis, dy)[0] is dy
    np.testing.assert_array_equal(dy, gotb[0])
    assert fastlane.infer(x, scale, offset, mean, var, axis, 1e-3, x) is x
    assert np.array_equal(x, fastlane.infer(x0, scale, offset, mean, var, axis, 1e-3, None))


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("shape,axis", [((4, 16, 4, 4), 1), ((50, 3), -1), ((16, 64, 16, 16), 1),
                                        ((2, 3, 70000), 1)])
def test_lane_float64_statistics(rng, dtype, shape, axis):
    """``f64_stats=True`` (fastbn.layer.train_forward_f64): the same y and running
    statistics as the ordinary call, and the batch mean/invstd in float64 as the
    kernel computed them -- the float64 oracle's to ~1e-12, even where rounding
    them to float32 would not be (mean 1e6); every fused loop nest (small
    channels-first and channels-last, channel-blocked, the primitives)."""
    x, C, vec = _args(rng, shape, axis, dtype)
    if dtype != np.float16:
        x = x + np.asarray(1e6, dtype)   # float16 cannot hold it
    scale, offset, rm, rv = vec(0.5, 2), vec(-1, 1), vec(-1, 1), vec(0.5, 2)
    rm2, rv2 = rm.copy(), rv.copy()
    got = fastlane.train(x, scale, offset, axis, 1e-3, rm, rv, 0.25, None, f64_stats=True)
    want = fastlane.train(x, scale, offset, axis, 1e-3, rm2, rv2, 0.25, None)
    assert got is not None and want is not None
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(rm, rm2)
    np.testing.assert_array_equal(rv, rv2)
    assert got[1].dtype == got[2].dtype == np.float64
    mean, var = ref.moments(x, axis=ref.reduced_axes(x.ndim, axis))
    np.testing.assert_allclose(got[1], mean, rtol=1e-13)
    np.testing.assert_allclose(got[2], 1 / np.sqrt(var + 1e-3), rtol=1e-10)
    with fbn.use_backend("cython"):   # its kernel writes the per-channel dtype only
        if fbn.backends()["cython"] == "available":
            assert fastlane.train(x, scale, offset, axis, 1e-3, None, None, 0.25, None,
                                  f64_stats=True) is None


@pytest.mark.parametrize("mean_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((8, 16, 6, 6), 1), ((300, 24), -1),
                                        ((16, 64, 16, 16), 1)])
def test_float32_inference_arithmetic(rng, monkeypatch, shape, axis, mean_dtype):
    """float32 inference in float32 arithmetic (cpu_numba.INFER_F32, opt-in): within a
    few float32 ulps of the float64 oracle at a large mean (x = 1e6 + randn), also
    for a float64 mean that float32 cannot hold (its rounding folded into r; without
    the fold y would be off by scale*invstd*|mean - float32(mean)|, ~1e-2 here)."""
    from fastbn.kernels import cpu_numba
    monkeypatch.setattr(cpu_numba, "INFER_F32", True)   # opt-in (off by default)
    C = shape[axis]
    x = (1e6 + rng.standard_normal(shape)).astype(np.float32)
    mean = 1e6 + rng.uniform(-0.5, 0.5, C).astype(mean_dtype)
    var = rng.uniform(0.5, 2, C).astype(mean_dtype)
    scale, offset = rng.uniform(0.5, 2, C).astype(np.float32), rng.uniform(-1, 1, C).astype(np.float32)
    got = fastlane.infer(x, scale, offset, mean, var, axis, 1e-5, None)
    assert got is not None and got.dtype == np.float32
    want = ref.batch_norm_infer(x, scale, offset, mean, var, channel_axis=axis, eps=1e-5)
    ulp = np.spacing(np.float32(np.max(np.abs(want))), dtype=np.float32)
    assert np.max(np.abs(got - want)) <= 4 * ulp


@pytest.mark.skipif(fbn.backends()["cython"] != "available", reason="needs the Cython backend")
@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("shape,axis", [((16, 64, 8, 8), 1), ((2048, 64), -1), ((2, 64, 1023), 1),
                                        ((509, 257), -1)])
def test_cython_fused_training_up_to_its_small(rng, dtype, shape, axis):
    """The Cython backend's fused training kernel up to cpu_cython.SMALL (2^17
    values): the oracle's numbers, the same from the lane and the general path."""
    from fastbn.kernels import cpu_cython
    x, C, vec = _args(rng, shape, axis, dtype)
    assert 1 << 15 < x.size <= cpu_cython.SMALL   # beyond its former SMALL
    scale, offset, rm, rv = vec(0.5, 2), vec(-1, 1), vec(-1, 1), vec(0.5, 2)
    rm2, rv2, rm3, rv3 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
    with fbn.use_backend("cython"):
        got = fastlane.train(x, scale, offset, axis, 1e-3, rm, rv, 0.25, None)
    assert got is not None
    general = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, eps=1e-3, running_mean=rm2,
                                   running_var=rv2, momentum=0.25, backend="cython")
    want = ref.batch_norm_train(x, scale, offset, channel_axis=axis, eps=1e-3, running_mean=rm3,
                                running_var=rv3, momentum=0.25)
    for g, h, w, what in zip(got + (rm, rv), general + (rm2, rv2), want, ("y", "mean", "invstd",
                                                                         "rm", "rv")):
        np.testing.assert_array_equal(g, h)
        ref.assert_close(g, w, what)


def _plain_train(rng):
    x = rng.standard_normal((8, 4, 5)).astype(np.float32)
    v = lambda: np.ones(4, np.float32)  # noqa: E731
    return dict(x=x, scale=v(), offset=v(), channel_axis=1, eps=1e-5, running_mean=v(),
                running_var=v(), momentum=0.1, out=None)


class _Sub(np.ndarray):
    pass


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _declines(**changes):
    def apply(kw):
        for k, f in changes.items():
            kw[k] = f(kw)
        return kw
    return apply


big = np.zeros((8, 4, 5), np.float32)
DECLINED = {
    "x_strided": _declines(x=lambda kw: np.asfortranarray(kw["x"])),
    "x_matrix": _declines(x=lambda kw: np.asmatrix(kw["x"][:, :, 0]), scale=lambda kw: None,
                          offset=lambda kw: None, running_mean=lambda kw: None,
                          running_var=lambda kw: None),
    "x_list": _declines(x=lambda kw: kw["x"].tolist()),
    "x_int": _declines(x=lambda kw: kw["x"].astype(np.int32)),
    "x_empty": _declines(x=lambda kw: kw["x"][:0]),
    "one_per_channel": _declines(x=lambda kw: kw["x"][:1, :, :1].copy()),
    "axis_bool": _declines(channel_axis=lambda kw: True),
    "axis_numpy_int": _declines(channel_axis=lambda kw: np.int64(1)),
    "axis_out_of_range": _declines(channel_axis=lambda kw: 3),
    "eps_int": _declines(eps=lambda kw: 0),
    "eps_nan": _declines(eps=lambda kw: float("nan")),
    "eps_negative": _declines(eps=lambda kw: -1.0),
    "momentum_big": _declines(momentum=lambda kw: 1.5),
    "scale_float64": _declines(scale=lambda kw: kw["scale"].astype(np.float64)),
    "scale_long": _declines(scale=lambda kw: np.ones(5, np.float32)),
    "scale_strided": _declines(scale=lambda kw: np.ones(8, np.float32)[::2]),
    "scale_list": _declines(scale=lambda kw: [1.0] * 4),
    "running_readonly": _declines(running_mean=lambda kw: np.broadcast_to(np.float32(0), (4,))),
    "running_same": _declines(running_var=lambda kw: kw["running_mean"]),
    "running_is_scale": _declines(running_mean=lambda kw: kw["scale"]),
    "running_views_overlap": _declines(running_mean=lambda kw: big.reshape(-1)[:4],
                                       running_var=lambda kw: big.reshape(-1)[2:6]),
    "out_overlaps_x": _declines(out=lambda kw: kw["x"][::-1].copy()[::-1]),
    "out_view_of_x": _declines(x=lambda kw: big, out=lambda kw: big.reshape(8, 4, 5)),
    "out_readonly": _declines(out=lambda kw: np.broadcast_to(np.float32(0), (8, 4, 5))),
    "out_float64": _declines(out=lambda kw: np.empty((8, 4, 5))),
    "out_is_readonly_x": _declines(x=lambda kw: _readonly(kw["x"]), out=lambda kw: kw["x"]),
    "out_fortran": _declines(out=lambda kw: np.asfortranarray(np.empty((8, 4, 5), np.float32))),
    "out_subclass": _declines(out=lambda kw: np.empty_like(kw["x"]).view(_Sub)),
    "x_byteswapped": _declines(x=lambda kw: kw["x"].astype(">f4")),
    "x_0d": _declines(x=lambda kw: np.array(1.0, np.float32), channel_axis=lambda kw: 0),
    "axis_huge": _declines(channel_axis=lambda kw: 2 ** 70),
    "axis_huge_negative": _declines(channel_axis=lambda kw: -2 ** 70),
    "scale_byteswapped": _declines(scale=lambda kw: kw["scale"].astype(">f4")),
    "scale_2d": _declines(scale=lambda kw: kw["scale"].reshape(1, 4)),
    "running_reversed": _declines(running_var=lambda kw: np.arange(4, dtype=np.float32)[::-1]),
    "running_in_x": _declines(x=lambda kw: big, running_mean=lambda kw: big.reshape(-1)[-4:]),
    "momentum_numpy": _declines(momentum=lambda kw: np.float64(0.1)),
}


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")   # np.matrix
@pytest.mark.parametrize("case", sorted(DECLINED))
def test_lane_declines_and_changes_nothing(rng, case):
    kw = DECLINED[case](_plain_train(rng))
    before = {k: np.array(v, copy=True) for k, v in kw.items() if isinstance(v, np.ndarray)}
    got = fastlane.train(kw["x"], kw["scale"], kw["offset"], kw["channel_axis"], kw["eps"],
                         kw["running_mean"], kw["running_var"], kw["momentum"], kw["out"])
    assert got is None, case
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray(kw[k]), v, err_msg=k)


def test_infer_and_backward_decline(rng):
    """Inference and backward calls the fused kernels do not take as they are:
    None, nothing written."""
    x = rng.standard_normal((6, 4, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    v = np.ones(4, np.float32)
    infer = [dict(mean=None), dict(var=np.ones(4, np.int64)), dict(eps=1), dict(eps=float("nan")),
             dict(x=x.astype(">f4")), dict(out=x.astype(np.float64)), dict(out=np.asfortranarray(x)),
             dict(scale=v[::-1]), dict(offset=np.ones(5, np.float32)), dict(out=x[::-1]),
             dict(channel_axis=3), dict(channel_axis=np.int32(1))]
    for change in infer:
        kw = dict(x=x, scale=v, offset=v, mean=v, var=v, channel_axis=1, eps=1e-5, out=None)
        kw.update(change)
        assert fastlane.infer(**kw) is None, change
    backward = [dict(dy=dy.astype(np.float64)), dict(dy=np.asfortranarray(dy)),
                dict(dy=dy[:, :, :4]), dict(dy=dy.tolist()), dict(invstd=None),
                dict(mean=np.ones(4, np.int32)), dict(out=dy.astype(">f4")),
                dict(out=np.empty((6, 4, 5), np.float32)[::-1]), dict(x=x.tolist())]
    for change in backward:
        kw = dict(dy=dy, x=x, scale=v, mean=v, invstd=v, channel_axis=1, out=None)
        kw.update(change)
        before = [a.copy() for a in (x, dy, v)]
        assert fastlane.backward(**kw) is None, change
        for a, b in zip((x, dy, v), before):
            np.testing.assert_array_equal(a, b)
    # the output written in place over the data the vectors are views of
    buf = rng.standard_normal(6 * 4 * 5 + 4).astype(np.float32)
    xs, vs = buf[:-4].reshape(6, 4, 5), buf[-4:]
    assert fastlane.infer(xs, vs, None, v, v, 1, 1e-5, xs) is not None   # apart: fine
    xs, vs = buf[4:].reshape(6, 4, 5), buf[4:8]
    assert fastlane.infer(xs, vs, None, v, v, 1, 1e-5, xs) is None
    assert fastlane.backward(xs.copy(), xs, vs, v, v, 1, xs) is None


def test_disjoint_views_of_one_buffer(rng, checks):
    """Running statistics that are disjoint parts of one buffer: the compiled
    checks compare byte ranges and take the call (the Python ones may decline
    it); either way the numbers are the general path's."""
    x = rng.standard_normal((8, 4, 5)).astype(np.float32)
    buf = np.zeros(8, np.float32)
    buf[4:] = 1.0
    buf2 = buf.copy()
    got = fastlane.train(x, None, None, 1, 1e-5, buf[:4], buf[4:], 0.5, None)
    if checks == "compiled":
        assert got is not None
    want = fbn.batch_norm_train(x, channel_axis=1, running_mean=buf2[:4], running_var=buf2[4:],
                                momentum=0.5, backend="numba")
    if got is not None:
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(buf, buf2)


def test_lane_follows_the_chosen_backend(rng, monkeypatch):
    """use_backend / FASTBN_BACKEND pick the kernels of the lane too; a backend
    without the fused kernels (the NumPy reference) declines it."""
    kw = _plain_train(rng)
    args = [kw[k] for k in ("x", "scale", "offset", "channel_axis", "eps", "running_mean",
                            "running_var", "momentum", "out")]
    with fbn.use_backend("numpy"):
        assert fastlane.train(*args) is None
        assert fastlane.infer(kw["x"], None, None, kw["scale"], kw["offset"], 1, 1e-5,
                              None) is None
    if fbn.backends()["cython"] != "available":
        return
    from fastbn.kernels import cpu_cython, cpu_numba
    ran = []
    for mod in (cpu_cython, cpu_numba):
        for name in ("train_small3", "infer_small3", "backward_small3"):
            kern = getattr(mod, name)
            monkeypatch.setattr(mod, name, lambda *a, _k=kern, _n=(mod.NAME, name):
                                ran.append(_n) or _k(*a))
    with fbn.use_backend("cython"):   # all three fused kernels, Cython's
        assert fastlane.train(*args) is not None
        assert fastlane.infer(kw["x"], None, None, kw["scale"], kw["offset"], 1, 1e-5,
                              None) is not None
        x = kw["x"]
        dy = rng.standard_normal(x.shape).astype(x.dtype)
        assert fastlane.backward(dy, x, kw["scale"], kw["scale"], kw["offset"], 1, None) is not None
    assert ran == [("cython", "train_small3"), ("cython", "infer_small3"),
                   ("cython", "backward_small3")]


def test_public_functions_still_raise_for_declined_calls(rng):
    kw = _plain_train(rng)
    ro = _readonly(kw["x"])
    for call in (lambda: fbn.batch_norm_train(ro, out=ro),
                 lambda: fbn.batch_norm_infer(ro, None, None, kw["scale"], kw["offset"], out=ro),
                 lambda: fbn.batch_norm_backward(ro, ro, None, kw["scale"], kw["offset"],
                                                 out=ro)):
        with pytest.raises(ValueError, match="writeable|read-only"):
            call()
    with pytest.raises(ValueError, match="overlap"):
        fbn.batch_norm_train(kw["x"], running_mean=kw["running_mean"],
                             running_var=kw["running_mean"])
    with pytest.raises(ValueError, match="eps"):
        fbn.batch_norm_infer(kw["x"], None, None, kw["scale"], kw["offset"], eps=-1.0)
    with pytest.raises(TypeError, match="channel_axis"):
        fbn.batch_norm_backward(kw["x"], kw["x"], None, kw["scale"], kw["offset"],
                                channel_axis=1.0)


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("shape,axis,form", [
    ((4, 16, 4, 4), 1, "keepdims"), ((4, 5, 6, 3), 3, "1-D"), ((4, 5, 6, 3), 3, "keepdims"),
    ((50, 3), 1, "1-D"), ((7, 5, 3), 0, "keepdims"), ((4, 16, 4, 4), 1, "channels_last")])
def test_batch_normalization_lane(rng, dtype, shape, axis, form):
    """batch_normalization with per-channel parameters takes the inference lane:
    batch_norm_infer's numbers, bit for bit, and the general path's within
    rounding (its kernel is another: float64 may differ in the last bit where
    LLVM contracted to an FMA)."""
    x, C, vec = _args(rng, shape, axis, dtype)
    if form == "channels_last":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, axis, -1)), -1, axis)
    pshape = (C,) if form == "1-D" else tuple(C if a == axis else 1 for a in range(x.ndim))
    mean, var, offset, scale = (v.reshape(pshape) for v in (vec(25, 35), vec(0.5, 4), vec(-1, 1),
                                                            vec(0.5, 2)))
    assert fastlane.normalization(x, mean, var, offset, scale, 1e-3, None) is not None
    flat = lambda v: None if v is None else v.reshape(-1)  # noqa: E731
    # (channels-last memory takes the primitives on batch_norm_infer's general path)
    same = ref.assert_close if form == "channels_last" else np.testing.assert_array_equal
    for params in [(mean, var, offset, scale), (mean, var, None, scale), (mean, var, None, None)]:
        got = fbn.batch_normalization(x, *params, 1e-3)
        m, v, o, s = map(flat, params)
        same(got, fbn.batch_norm_infer(x, s, o, m, v, channel_axis=axis, eps=1e-3, backend="numba"))
        ref.assert_close(got, fbn.batch_normalization(x, *params, 1e-3, backend="numba"), "y")
        ref.assert_close(got, ref.batch_normalization(x, *params, 1e-3), "y")
    out = np.empty_like(x)
    assert fbn.batch_normalization(x, mean, var, offset, scale, 1e-3, out=out) is out
    np.testing.assert_array_equal(out, fbn.batch_normalization(x, mean, var, offset, scale, 1e-3))


def test_batch_normalization_lane_declines(rng):
    """Parameters that are not per-channel along one axis (numbers, full-size
    arrays, two varying axes, disagreeing axes, lists): the general path."""
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    v = np.ones((1, 3, 1), np.float32)
    declined = [dict(mean=0.5), dict(mean=np.ones(x.shape, np.float32)),
                dict(mean=np.ones((4, 3, 1), np.float32)), dict(scale=np.ones(5, np.float32)),
                dict(variance=[[[1.0]], [[1.0]], [[1.0]]]), dict(offset=np.ones((1, 3), np.float32)),
                dict(mean=np.ones((1, 1, 1), np.float32)), dict(mean=np.ones((1, 6, 1))[:, ::2]),
                dict(variance=None), dict(mean=np.ones((1, 3, 1), np.int32)),
                dict(mean=np.ones((1, 3, 1))), dict(scale=np.ones((1, 3, 1), np.float16)),
                dict(x=x.astype(">f4"))]
    for change in declined:
        kw = dict(x=x, mean=v, variance=v, offset=None, scale=v, eps=1e-3, out=None)
        kw.update(change)
        assert fastlane.normalization(**kw) is None, change


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("shape,axis,memory", [
    ((4, 16, 4, 4), (0, 2, 3), "C"), ((4, 5, 6, 3), (0, 1, 2), "C"), ((4, 5, 6, 3), (2, 0, -3), "C"),
    ((50, 3), 0, "C"), ((50, 3), (-2,), "C"), ((7, 5, 3), (1, 2), "C"), ((5,), (), "C"),
    ((4, 16, 4, 4), (0, 2, 3), "channels_last")])
@pytest.mark.parametrize("keepdims,ddof", [(False, 0), (True, 1), (True, 2.5)])
def test_moments_lane(rng, dtype, shape, axis, memory, keepdims, ddof):
    """moments over every axis but one skips the general path's checks and plan:
    its numbers, bit for bit, shapes and dtypes."""
    x = (rng.standard_normal(shape) * 3 + 100).astype(dtype)
    axes = (axis,) if isinstance(axis, int) else axis
    kept = [a for a in range(x.ndim) if a not in [b % x.ndim for b in axes]][0]
    if memory == "channels_last":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, kept, -1)), -1, kept)
    got = fastlane.moments(x, axis, keepdims, ddof)
    if x.size // x.shape[kept] <= ddof:   # var inf/NaN: the general path's to say
        assert got is None
        return
    assert got is not None
    want = fbn.moments(x, axis, keepdims=keepdims, ddof=ddof, backend="numba")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
        assert g.shape == w.shape and g.dtype == w.dtype
    for g, w in zip(fbn.moments(x, axis, keepdims=keepdims, ddof=ddof), want):
        np.testing.assert_array_equal(g, w)
    emean, evar = ref.moments(x, axes, keepdims=keepdims, ddof=ddof)
    ref.assert_close(got[0], emean, "mean")
    ref.assert_close(got[1], evar, "var")


def test_moments_lane_declines(rng):
    x = rng.standard_normal((6, 4, 5)).astype(np.float32)
    declined = [dict(axis=None), dict(axis=[0, 2]), dict(axis=(0,)), dict(axis=(0, 1, 2)),
                dict(axis=(0, 0)), dict(axis=(0, -3)), dict(axis=(0, 3)), dict(axis=(True, 2)),
                dict(axis=(np.int64(0), 2)), dict(keepdims=1), dict(ddof=30), dict(ddof=np.float64(0)),
                dict(ddof=float("nan")), dict(x=np.asfortranarray(x)), dict(x=x.astype(np.int32)),
                dict(x=x[:0]), dict(x=x.tolist())]
    for change in declined:
        kw = dict(x=x, axis=(0, 2), keepdims=False, ddof=0)
        kw.update(change)
        assert fastlane.moments(**kw) is None, change


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("variant", ["plain", "out", "in_place", "channels_last"])
def test_infer_backward_lane(rng, dtype, shape, axis, variant):
    """batch_norm_infer_backward through the lane (the backward's kernels with the
    frozen statistics' coefficients): the general path's numbers (bit for bit
    where both run the fused kernel) and the oracle's."""
    x, C, vec = _args(rng, shape, axis, dtype)
    if variant == "channels_last":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, axis, -1)), -1, axis)
    dy = np.empty_like(x)
    dy[...] = rng.standard_normal(shape)
    scale, mean, var = vec(0.5, 2), vec(25, 35), vec(0.5, 4)
    out = {"out": np.empty_like(x), "in_place": dy}.get(variant)
    dy2 = dy.copy(order="K")
    got = fastlane.infer_backward(dy, x, scale, mean, var, axis, 1e-3, out)
    assert got is not None
    if out is not None:
        assert got[0] is out
    want = fbn.batch_norm_infer_backward(dy2, x, scale, mean, var, channel_axis=axis, eps=1e-3,
                                         backend="numba")
    same = ref.assert_close if variant == "channels_last" else np.testing.assert_array_equal
    for g, w in zip(got, want):
        same(g, w)
        assert g.dtype == w.dtype and g.shape == w.shape
    inv = 1 / np.sqrt(var.astype(np.float64) + 1e-3)
    axes = ref.reduced_axes(x.ndim, axis)
    xc = ref.f64(x) - ref.along(mean, x.ndim, axis)
    edx = ref.f64(dy2) * ref.along(scale * inv, x.ndim, axis)
    ref.assert_close(got[0], edx, "dx")
    ref.assert_close(got[1], (ref.f64(dy2) * xc).sum(axis=axes) * inv, "dscale",
                     magnitude=ref.abs_reduction(ref.f64(dy2) * xc, axes) * inv)
    ref.assert_close(got[2], ref.f64(dy2).sum(axis=axes), "doffset",
                     magnitude=ref.abs_reduction(dy2, axes))


def test_infer_backward_lane_declines(rng):
    x = rng.standard_normal((6, 4, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    v = np.ones(4, np.float32)
    for change in [dict(eps=1), dict(eps=-1.0), dict(eps=float("nan")), dict(var=None),
                   dict(var=v[::-1]), dict(dy=np.asfortranarray(dy)), dict(out=x.astype(np.float64)),
                   dict(mean=np.ones(4, np.int64)), dict(channel_axis=1.0),
                   dict(var=np.ones(4)), dict(scale=np.ones(4, np.float16))]:
        kw = dict(dy=dy, x=x, scale=v, mean=v, var=v, channel_axis=1, eps=1e-5, out=None)
        kw.update(change)
        before = [a.copy() for a in (x, dy, v)]
        assert fastlane.infer_backward(**kw) is None, change
        for a, b in zip((x, dy, v), before):
            np.testing.assert_array_equal(a, b)

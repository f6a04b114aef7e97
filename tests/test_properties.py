"""Property-based tests (hypothesis): every public function on random inputs, every CPU backend.

Each example draws a shape (0-d to 5-d, sizes 1..97, sometimes an empty axis),
the channel axis (or the reduced axes of ``moments``), a dtype, a memory
layout (C, F, permuted, strided with negative steps, unaligned, read-only, a
zero-stride broadcast view), a family of values (ordinary, large offsets,
variance at the last bits of the mean, subnormals, 1e30-scale, constant
channels, channels of wildly different scales), eps, the parameter dtypes and
an ``out=`` (none, fresh C/F, a strided view, ``x`` itself, ``dy`` itself).
Results are checked against the float64 oracle (``tests/reference.py``).

Tolerances are an error model rather than one number, so a test is as tight
as the arithmetic allows:

* ``ROUND[dtype]``: rounding the float64 result once to the returned dtype;
* ``ARITH``: float64 summation error, relative to the sum of magnitudes
  (e.g. ``ARITH * max|x|`` for a mean).  It bounds fastbn's and the oracle's
  mean error ``delta``; the variance then carries ``(2 delta)**2`` (the
  two-pass identity ``m2(mu + delta) = m2(mu) + n delta**2``) and the
  normalized output ``|q| * 2 delta`` plus the relative error of invstd;
* the smallest subnormal of the returned dtype (results in the subnormal range).

Invariants: the normalized output has mean ~0 and variance ~var/(var+eps) per
channel; ``batch_norm_train == moments + batch_normalization``; the backward
equals central finite differences on small float64 cases; inputs other than
``out`` and the running statistics are never modified.

Aliasing (``test_aliasing``): the array arguments of each function as views of one
buffer with one pair overlapping (every pair, partially or wholly): API.md's forbidden
overlaps raise ValueError naming both before anything is written, the others give the
result of non-overlapping copies.  float64 extremes (``test_float64_extremes*``): channels
near +-1e300 and 1.7e308, subnormal, constant and huge-mean/tiny-spread ones, against the
float64 reference (inf where it gives inf, never NaN where it has none).  Both run on the
small fused path (C-contiguous) and the general path (other layouts).

Profiles (tests/conftest.py): ``ci`` (default, 60 examples per test) and
``pytest tests/test_properties.py --hypothesis-profile=thorough`` (1300 per
test, >= 10k per backend).
"""

import math

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, note, strategies as st  # noqa: E402

import reference as ref  # noqa: E402

import fastbn as fbn  # noqa: E402

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
DTYPES = (F16, F32, F64)
#: Rounding a float64 value once to the dtype (relative); float32 is 16 ulps.
ROUND = {F16: 1e-3, F32: 1e-6, F64: 1e-12}
#: float64 summation error relative to the sum of magnitudes (~4500 ulps: chunked
#: sums of up to 4096 terms in a fixed order, worst case, plus merges).
ARITH = 1e-12
SUB64 = float(np.finfo(F64).smallest_subnormal)

KINDS = ("normal", "offset", "tiny", "subnormal", "huge", "constant", "mixed")
#: Value families for which var + eps > 0 holds robustly, so eps = 0 is drawn only there.
EPS0_KINDS = ("normal", "offset", "huge", "mixed")
MEMORY = ("C", "F", "perm", "strided", "unaligned", "readonly", "broadcast")


def sub(dtype):
    """Absolute rounding floor of a result stored as ``dtype`` (its smallest subnormal)."""
    return float(np.finfo(dtype).smallest_subnormal)


# -- drawing inputs -------------------------------------------------------------------

@st.composite
def shapes(draw, min_dims=0, max_dims=5, empty=True, budget=None):
    """A shape of min_dims..max_dims axes of sizes 1..97 (total capped at ``budget``,
    drawn if None; 2^19 reaches the parallel kernels); with ``empty``, maybe one axis 0."""
    nd = draw(st.integers(min_dims, max_dims))
    if budget is None:
        budget = draw(st.sampled_from([64, 4096, 1 << 16, 1 << 19]))
    dims, total = [], 1
    for _ in range(nd):
        d = draw(st.integers(1, max(1, min(97, budget // total))))
        dims.append(d)
        total *= d
    if empty and nd and draw(st.integers(0, 9)) == 0:
        dims[draw(st.integers(0, nd - 1))] = 0
    return tuple(dims)


def channel_index(shape, kept):
    """(index array broadcast to ``shape``, number of channels): channel id from the kept axes."""
    nd = len(shape)
    idx = np.zeros((1,) * nd, dtype=np.int64)
    mult = 1
    for a in reversed(kept):
        idx = idx + mult * np.arange(shape[a]).reshape([-1 if i == a else 1 for i in range(nd)])
        mult *= shape[a]
    return np.broadcast_to(idx, shape), mult


def make_values(rng, shape, dtype, kind, kept):
    """Values of ``shape`` stored as ``dtype``; channels (kept axes) differ from each other."""
    dt = np.dtype(dtype)
    chan, nchan = channel_index(shape, kept)
    nchan = max(nchan, 1)
    if kind == "normal":
        v = rng.uniform(-3, 3) + rng.uniform(0.1, 3) * rng.standard_normal(shape) + chan % 50
    elif kind == "offset":  # large mean, sd ~ 1: the accuracy bar's case
        big = {F16: 1e3, F32: 1e6, F64: 1e9}[dt]
        per = big * rng.uniform(0.5, 1.0, nchan) * rng.choice([-1.0, 1.0], nchan)
        v = per[chan] + rng.uniform(0.5, 5.0) * rng.standard_normal(shape)
    elif kind == "tiny":  # values a few ulps apart around a large pivot
        top = {F16: 1e3, F32: 1e6, F64: 1e12}[dt]
        pivot = rng.uniform(1.0, top, nchan).astype(dt)
        ulp = np.spacing(pivot).astype(np.float64)
        v = pivot.astype(np.float64)[chan] + rng.integers(-3, 4, shape) * ulp[chan]
    elif kind == "subnormal":
        v = rng.integers(-100, 101, shape) * sub(dt)
    elif kind == "huge":
        big = {F16: 2e4, F32: 1e30, F64: 1e30}[dt]
        v = big * (rng.uniform(-1, 1, nchan)[chan] + rng.standard_normal(shape))
        if dt == F16:
            v = np.clip(v, -6e4, 6e4)
    elif kind == "constant":
        per = rng.standard_normal(nchan) * 10.0 ** rng.integers(-3, 4, nchan)
        v = per[chan] + np.zeros(shape)
    elif kind == "mixed":  # channels of very different scales
        lo, hi = (-3, 3) if dt == F16 else (-15, 15)
        s = 10.0 ** rng.uniform(lo, hi, nchan)
        v = s[chan] * (rng.uniform(-2, 2, nchan)[chan] + rng.standard_normal(shape))
    else:
        raise ValueError(kind)
    with np.errstate(over="ignore", under="ignore"):
        return np.asarray(v, dtype=np.float64).astype(dt)


def lay_out(a, memory, rng, reduced=()):
    """``a``'s values in the memory layout ``memory`` (same shape, maybe a view)."""
    nd = a.ndim
    if nd == 0 and memory in ("strided", "perm", "broadcast"):
        return a.copy()
    if memory == "C":  # (np.ascontiguousarray would make a 0-d array 1-d)
        return np.array(a, order="C")
    if memory == "F":
        return np.array(a, order="F")
    if memory == "perm":
        p = rng.permutation(nd)
        return np.ascontiguousarray(a.transpose(p)).transpose(np.argsort(p))
    if memory == "strided":  # steps of +-1, +-2; the gaps hold NaN, so a stray read shows
        steps = [int(s) for s in rng.choice([1, 2, -1, -2], nd)]
        base = np.full([n * abs(s) for n, s in zip(a.shape, steps)], np.nan, dtype=a.dtype)
        view = base[tuple(slice(None, None, s) for s in steps)]
        view[...] = a
        return view
    if memory == "unaligned":
        buf = np.empty(a.nbytes + 1, np.uint8)
        out = np.ndarray(a.shape, a.dtype, buffer=buf, offset=1)
        out[...] = a
        return out
    if memory == "readonly":
        out = a.copy()
        out.flags.writeable = False
        return out
    if memory == "broadcast":  # a zero stride along one reduced axis (read-only view)
        axes = [ax for ax in reduced if a.shape[ax] > 1]
        if not axes:
            return np.array(a, order="C")
        ax = axes[int(rng.integers(len(axes)))]
        return np.broadcast_to(a.take([0], axis=ax), a.shape)
    raise ValueError(memory)


def writeable(x):
    """Whether ``x`` can be its own ``out`` (a broadcast view is read-only)."""
    return x.flags.writeable


def make_out(kind, x, rng, dy=None):
    """(out argument, guard) for ``out=`` of kind none / C / F / strided / x / dy."""
    if kind == "none":
        return None, None
    if kind == "strided" and x.ndim:
        base = np.full([2 * n + 1 for n in x.shape], np.nan, dtype=x.dtype)
        sl = tuple(slice(1, None, 2) if rng.integers(2) else slice(-2, None, -2) for _ in x.shape)
        return base[sl], (base, sl, base.copy())
    if kind in ("C", "F", "strided"):  # (a 0-d array has no strided view)
        return np.full(x.shape, np.nan, dtype=x.dtype, order="F" if kind == "F" else "C"), None
    if kind == "x":
        return x, None
    if kind == "dy":
        return dy, None
    raise ValueError(kind)


def check_guard(guard):
    """The gaps of a strided ``out`` were not written."""
    if guard is None:
        return
    base, sl, before = guard
    mask = np.ones(base.shape, bool)
    mask[sl] = False
    np.testing.assert_array_equal(base[mask], before[mask])


def snapshot(*arrays):
    return [None if a is None else np.array(a, copy=True) for a in arrays]


def unchanged(arrays, before):
    for a, b in zip(arrays, before):
        if a is not None:
            np.testing.assert_array_equal(a, b, err_msg="an input was modified")


# -- comparing --------------------------------------------------------------------------

def check(got, exp, tol, what):
    """``got`` against the float64 ``exp``: ``|got - exp| <= tol`` where ``exp`` rounded to
    ``got``'s dtype is finite; elsewhere the same non-finite value (NaN, same-signed inf)."""
    got = np.asarray(got)
    exp = np.broadcast_to(np.asarray(exp, dtype=np.float64), got.shape)
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), got.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        cast = exp.astype(got.dtype).astype(np.float64)
        g = got.astype(np.float64)
        fin = np.isfinite(cast)
        ok = np.where(fin, np.abs(g - exp) <= tol, (g == cast) | (np.isnan(g) & np.isnan(cast)))
    if not ok.all():
        i = tuple(np.argwhere(~ok)[0])
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.size} values off "
                             f"(dtype {got.dtype}); first at {i}: got {g[i]!r}, "
                             f"expected {exp[i]!r}, tolerance {tol[i]!r}")


class Stats:
    """Per-channel float64 statistics of ``x`` over ``axes`` (keepdims) and their error budget.

    The oracle runs on ``x`` shifted by one of its values per channel: the
    variance does not change, and the shifted sums are small, so the oracle's
    own rounding stays far below fastbn's budget even for values a few ulps
    apart around 1e12 (where plain float64 two-pass sums lose everything).
    """

    def __init__(self, x, axes, ddof=0):
        x64 = ref.f64(x)
        nd = x64.ndim
        self.n = ref.count(x.shape, axes)
        if self.n:
            pivot = x64[tuple(slice(0, 1) if a in axes else slice(None) for a in range(nd))]
            pivot = np.where(np.isfinite(pivot), pivot, 0.0)
        else:
            pivot = np.zeros([1 if a in axes else x.shape[a] for a in range(nd)])
        with np.errstate(invalid="ignore"):
            mean_d, self.var = ref.moments(x64 - pivot, axes, keepdims=True, ddof=ddof)
            self.mean = pivot + mean_d
            absmax = np.max(np.abs(x64), axis=axes, keepdims=True, initial=0.0)
        #: float64 error of fastbn's mean (unshifted chunked sums); on the subnormal
        #: grid every merge of partial means rounds up to three times (difference,
        #: scaling, sum) by up to an ulp of SUB64, a random walk over the merges (Numba,
        #: channels-first with short rows: 38 ulps at (162, C, 6), 71 at (5000, C, 3)).
        self.delta = ARITH * absmax + (4 + 3 * math.sqrt(self.n)) * SUB64
        dof = self.n - ddof
        #: float64 error of fastbn's variance beyond its rounding: (2 delta)^2 n / dof.
        self.dvar = (2 * self.delta) ** 2 * (self.n / dof if dof > 0 else 1.0)

    def mean_tol(self, pdt):
        return ROUND[pdt] * np.abs(self.mean) + self.delta + sub(pdt)

    def var_tol(self, pdt):
        return ROUND[pdt] * np.abs(self.var) + self.dvar + sub(pdt)

    def invstd(self, eps, rel=ARITH):
        """(expected invstd, lowest and highest invstd allowed by the variance's error
        budget, ``rel`` being its relative part)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            var_lo = np.maximum(self.var - self.dvar - rel * self.var, 0.0)
            var_hi = self.var + self.dvar + rel * self.var
            # var + eps == 0 (a constant channel, e.g. two equal float16 values, with
            # eps = 0): PyTorch's rule, invstd exactly 0 (the kernels' variance of a
            # constant channel is exactly 0), so y is exactly the offset
            rule = self.var + eps == 0
            return (np.where(rule, 0.0, 1 / np.sqrt(self.var + eps)),
                    np.where(rule, 0.0, 1 / np.sqrt(var_hi + eps)),
                    np.where(rule, 0.0, 1 / np.sqrt(var_lo + eps)))


# -- moments ------------------------------------------------------------------------

@st.composite
def axes_for(draw, nd):
    """``axis`` as the API takes it: None, an int, or a tuple (any order, negatives)."""
    form = draw(st.sampled_from(["none", "int", "tuple"] if nd else ["none", "tuple"]))
    if form == "none":
        return None
    if form == "int":
        return draw(st.integers(-nd, nd - 1))
    chosen = draw(st.lists(st.integers(0, nd - 1), unique=True, max_size=nd)) if nd else []
    return tuple(a - nd if draw(st.booleans()) else a for a in chosen)


@given(data=st.data())
def test_moments(backend, data):
    dt = data.draw(st.sampled_from(DTYPES), "dtype")
    shape = data.draw(shapes(), "shape")
    nd = len(shape)
    axis = data.draw(axes_for(nd), "axis")
    keepdims = data.draw(st.booleans(), "keepdims")
    kind = data.draw(st.sampled_from(KINDS), "kind")
    memory = data.draw(st.sampled_from(MEMORY), "memory")
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    axes = tuple(range(nd)) if axis is None else tuple(sorted(
        a % nd for a in ((axis,) if isinstance(axis, int) else axis)))
    n = ref.count(shape, axes)
    ddof = data.draw(st.integers(0, 1 if n >= 1 else 0), "ddof")
    rng = np.random.default_rng(seed)
    kept = tuple(a for a in range(nd) if a not in axes)
    x = lay_out(make_values(rng, shape, dt, kind, kept), memory, rng, axes)
    before = snapshot(x)

    mean, var = fbn.moments(x, axis, keepdims=keepdims, ddof=ddof, backend=backend)

    pdt = ref.param_dtype(dt)
    want_shape = np.sum(np.zeros(shape), axis=axes, keepdims=keepdims).shape
    for got in (mean, var):
        assert isinstance(got, np.ndarray) and got.shape == want_shape and got.dtype == pdt
    s = Stats(x, axes, ddof)
    check(mean.reshape(s.mean.shape), s.mean, s.mean_tol(pdt), "mean")
    check(var.reshape(s.var.shape), s.var, s.var_tol(pdt), "var")
    unchanged([x], before)


# -- batch_normalization ----------------------------------------------------------------

@st.composite
def bn_param(draw, name, x_shape, optional):
    """The form of one tf.nn.batch_normalization parameter: None, a number, or an array
    whose shape broadcasts to x's (some axes full, the rest 1, leading axes maybe dropped)."""
    forms = ["float", "0d", "array"] + (["none"] if optional else [])
    form = draw(st.sampled_from(forms), f"{name} form")
    if form in ("none", "float", "0d"):
        return form, None, None
    nd = len(x_shape)
    full = draw(st.lists(st.booleans(), min_size=nd, max_size=nd), f"{name} full axes")
    shp = tuple(n if f else 1 for n, f in zip(x_shape, full))
    drop = draw(st.integers(0, nd), f"{name} dropped leading axes")
    while drop and shp and shp[0] == 1:  # only leading 1s may be dropped
        shp, drop = shp[1:], drop - 1
    pdt = draw(st.sampled_from(DTYPES), f"{name} dtype")
    return "array", shp, pdt


def _bn_value(form, shp, pdt, rng, x64, name):
    """A value for a parameter, in the range the data calls for; stored (rounded) as drawn."""
    scale = float(np.max(np.abs(x64), initial=1.0)) if x64.size else 1.0
    if form == "none":
        return None

    def draw(size):
        if name == "mean":
            return rng.uniform(-1, 1, size) * scale
        if name == "variance":
            return rng.uniform(0.0, 2.0, size) * scale * scale
        return rng.uniform(-2, 2, size)

    if form == "float":
        return float(draw(None))
    if form == "0d":
        return np.asarray(draw(None), dtype=np.float64)
    with np.errstate(over="ignore"):
        return draw(shp).astype(pdt)


def varying_axes(pshape, nd):
    """Axes of an nd-D x along which a parameter of shape ``pshape`` (None: a number) varies."""
    if pshape is None:
        return ()
    aligned = (1,) * (nd - len(pshape)) + tuple(pshape)
    return tuple(a for a in range(nd) if aligned[a] > 1)


@given(data=st.data())
def test_batch_normalization(backend, data):
    dt = data.draw(st.sampled_from(DTYPES), "dtype")
    shape = data.draw(shapes(), "shape")
    kind = data.draw(st.sampled_from(KINDS), "kind")
    memory = data.draw(st.sampled_from(MEMORY), "memory")
    forms = {name: data.draw(bn_param(name, shape, name in ("offset", "scale")), name)
             for name in ("mean", "variance", "offset", "scale")}
    eps = data.draw(st.sampled_from([0.0, 1e-5, 1e-3, 0.5, 1e3]), "eps")
    out_kind = data.draw(st.sampled_from(["none", "C", "F", "strided", "x"]), "out")
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    rng = np.random.default_rng(seed)
    kept = varying_axes(forms["mean"][1], len(shape))  # the data's channels follow the mean's
    x = lay_out(make_values(rng, shape, dt, kind, kept), memory, rng, tuple(range(len(shape))))
    if out_kind == "x" and not writeable(x):
        out_kind = "C"
    x64 = ref.f64(x)
    p = {name: _bn_value(*forms[name], rng, x64, name) for name in forms}
    note(f"params: { {k: (None if v is None else np.shape(v)) for k, v in p.items()} }")
    with np.errstate(all="ignore"):
        exp = ref.batch_normalization(x64, p["mean"], p["variance"], p["offset"], p["scale"], eps)
    with np.errstate(all="ignore"):
        q = (1.0 if p["scale"] is None else ref.f64(p["scale"])) / np.sqrt(
            ref.f64(p["variance"]) + eps)
        terms = np.abs(q * (x64 - ref.f64(p["mean"]))) + np.abs(
            0.0 if p["offset"] is None else ref.f64(p["offset"]))
    tol = ROUND[dt] * np.abs(exp) + ARITH * terms + sub(dt)
    out, guard = make_out(out_kind, x, rng)
    inputs = [x] + [v for v in p.values() if isinstance(v, np.ndarray)]
    before = snapshot(*inputs)

    y = fbn.batch_normalization(x, p["mean"], p["variance"], p["offset"], p["scale"], eps,
                                out=out, backend=backend)

    assert isinstance(y, np.ndarray) and y.shape == shape and y.dtype == dt
    if out is not None:
        assert y is out
    check(y, exp, tol, "y")
    check_guard(guard)
    if out_kind != "x":
        unchanged(inputs, before)


# -- fused batch norm -------------------------------------------------------------------

@st.composite
def channel_case(draw, min_dims=1, empty=True):
    """(dtype, shape, channel_axis, kind, memory) for the fused functions."""
    dt = draw(st.sampled_from(DTYPES), "dtype")
    shape = draw(shapes(min_dims=min_dims, empty=empty), "shape")
    axis = draw(st.integers(-len(shape), len(shape) - 1), "channel_axis")
    kind = draw(st.sampled_from(KINDS), "kind")
    memory = draw(st.sampled_from(MEMORY), "memory")
    return dt, shape, axis, kind, memory


def vec(rng, C, dtype, low, high):
    return rng.uniform(low, high, C).astype(dtype)


def along(v, nd, axis):
    return ref.along(v, nd, axis)


@given(data=st.data())
def test_batch_norm_train(backend, data):
    dt, shape, axis, kind, memory = data.draw(channel_case(), "case")
    nd = len(shape)
    ax = axis % nd
    C = shape[ax]
    axes = ref.reduced_axes(nd, axis)
    n = ref.count(shape, axes)
    pdt = ref.param_dtype(dt)
    vdt = data.draw(st.sampled_from([pdt, F64, F32]), "scale/offset dtype")
    use_scale, use_offset = data.draw(st.booleans(), "scale"), data.draw(st.booleans(), "offset")
    use_rm = data.draw(st.booleans(), "running_mean")
    use_rv = data.draw(st.booleans(), "running_var")
    momentum = data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]) | st.floats(0.0, 1.0), "momentum")
    eps_choices = [1e-5, 1e-3, 0.1, 10.0] + ([0.0] if kind in EPS0_KINDS else [])
    eps = data.draw(st.sampled_from(eps_choices), "eps")
    out_kind = data.draw(st.sampled_from(["none", "C", "F", "strided", "x"]), "out")
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    rng = np.random.default_rng(seed)
    x = lay_out(make_values(rng, shape, dt, kind, (ax,)), memory, rng, axes)
    if out_kind == "x" and not writeable(x):
        out_kind = "C"
    scale = vec(rng, C, vdt, -2, 2) if use_scale else None
    offset = vec(rng, C, vdt, -2, 2) if use_offset else None
    rm = vec(rng, C, pdt, -1, 1) if use_rm else None
    rv = vec(rng, C, pdt, 0.5, 2) if use_rv else None
    out, guard = make_out(out_kind, x, rng)
    inputs = [x, scale, offset]
    before = snapshot(*inputs)
    stats_before = snapshot(rm, rv)

    if n == 0:  # an empty batch (PyTorch): empty y, NaN statistics, running stats untouched
        y, mean, invstd = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, eps=eps,
                                               running_mean=rm, running_var=rv, momentum=momentum,
                                               out=out, backend=backend)
        assert y.shape == x.shape and np.isnan(mean).all() and np.isnan(invstd).all()
        unchanged(inputs + [rm, rv], before + stats_before)
        return
    if n < 2:  # no variance from one value per channel: refused, nothing written
        out_before = snapshot(out)
        with pytest.raises(ValueError, match="more than 1 value"):
            fbn.batch_norm_train(x, scale, offset, channel_axis=axis, eps=eps, running_mean=rm,
                                 running_var=rv, momentum=momentum, out=out, backend=backend)
        unchanged(inputs + [rm, rv, out], before + stats_before + out_before)
        return

    x64 = ref.f64(x)
    s = Stats(x, axes)
    inv, inv_lo, inv_hi = s.invstd(eps)
    sc = np.ones(C) if scale is None else ref.f64(scale)
    r = np.zeros(C) if offset is None else ref.f64(offset)
    scb, rb = along(sc, nd, axis), along(r, nd, axis)
    with np.errstate(all="ignore"):
        exp_y = (x64 - s.mean) * inv * scb + rb
    y, mean, invstd = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, eps=eps,
                                           running_mean=rm, running_var=rv, momentum=momentum,
                                           out=out, backend=backend)

    assert isinstance(y, np.ndarray) and y.shape == shape and y.dtype == dt
    assert mean.shape == invstd.shape == (C,) and mean.dtype == invstd.dtype == pdt
    if out is not None:
        assert y is out
    mtol = s.mean_tol(pdt).reshape(-1)
    check(mean, s.mean.reshape(-1), mtol, "mean")
    with np.errstate(all="ignore"):
        inv_tol = np.maximum(inv - inv_lo, inv_hi - inv) + ROUND[pdt] * inv + sub(pdt)
        check(invstd, inv.reshape(-1), inv_tol.reshape(-1), "invstd")
        # y - y_exp = (q - q_exp) (x - mean) - q (mean_err): q within the invstd interval
        ytol = (ROUND[dt] * np.abs(exp_y) + np.abs(scb) * (inv_hi - inv_lo) * np.abs(x64 - s.mean)
                + np.abs(scb) * inv_hi * 2 * s.delta
                + ARITH * (np.abs(scb * inv * (x64 - s.mean)) + np.abs(rb)) + sub(dt))
    check(y, exp_y, ytol, "y")
    check_guard(guard)
    if rm is not None:
        exp_rm = (1 - momentum) * ref.f64(stats_before[0]) + momentum * s.mean.reshape(-1)
        check(rm, exp_rm, ROUND[pdt] * np.abs(exp_rm) + momentum * mtol + sub(pdt), "running_mean")
    if rv is not None:
        unbiased = s.var.reshape(-1) * n / (n - 1)
        exp_rv = (1 - momentum) * ref.f64(stats_before[1]) + momentum * unbiased
        vtol = (ROUND[pdt] * np.abs(exp_rv)
                + momentum * (s.dvar.reshape(-1) + ARITH * s.var.reshape(-1)) * n / (n - 1)
                + sub(pdt))
        check(rv, exp_rv, vtol, "running_var")
    if out_kind != "x":
        unchanged(inputs, before)


@given(data=st.data())
def test_batch_norm_infer(backend, data):
    dt, shape, axis, kind, memory = data.draw(channel_case(), "case")
    nd = len(shape)
    ax = axis % nd
    C = shape[ax]
    vdts = [data.draw(st.sampled_from([ref.param_dtype(dt), F64, F32]), f"dtype {k}")
            for k in range(4)]
    use_scale, use_offset = data.draw(st.booleans(), "scale"), data.draw(st.booleans(), "offset")
    eps = data.draw(st.sampled_from([0.0, 1e-5, 1e-3, 1.0]), "eps")
    out_kind = data.draw(st.sampled_from(["none", "C", "F", "strided", "x"]), "out")
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    rng = np.random.default_rng(seed)
    x = lay_out(make_values(rng, shape, dt, kind, (ax,)), memory, rng, ref.reduced_axes(nd, axis))
    if out_kind == "x" and not writeable(x):
        out_kind = "C"
    x64 = ref.f64(x)
    # statistics near the data's own (so the output is O(1)), with some slack
    m = ref.f64(np.mean(x64, axis=ref.reduced_axes(nd, axis))) if x.size else np.zeros(C)
    sd = np.std(x64, axis=ref.reduced_axes(nd, axis)) if x.size else np.ones(C)
    with np.errstate(over="ignore", invalid="ignore"):
        mean = (m + rng.uniform(-1, 1, C) * sd).astype(vdts[0])
        var = ((sd * rng.uniform(0.5, 2.0, C)) ** 2 + rng.uniform(0, 1, C)).astype(vdts[1])
    scale = vec(rng, C, vdts[2], -2, 2) if use_scale else None
    offset = vec(rng, C, vdts[3], -2, 2) if use_offset else None
    exp = ref.batch_norm_infer(x64, scale, offset, mean, var, axis, eps)
    with np.errstate(all="ignore"):
        q = (1.0 if scale is None else ref.f64(scale)) / np.sqrt(ref.f64(var) + eps)
        terms = np.abs(along(q, nd, axis) * (x64 - along(mean, nd, axis))) + (
            0.0 if offset is None else np.abs(along(offset, nd, axis)))
    tol = ROUND[dt] * np.abs(exp) + ARITH * terms + sub(dt)
    out, guard = make_out(out_kind, x, rng)
    inputs = [x, scale, offset, mean, var]
    before = snapshot(*inputs)

    y = fbn.batch_norm_infer(x, scale, offset, mean, var, channel_axis=axis, eps=eps, out=out,
                             backend=backend)

    assert isinstance(y, np.ndarray) and y.shape == shape and y.dtype == dt
    if out is not None:
        assert y is out
    check(y, exp, tol, "y")
    check_guard(guard)
    if out_kind != "x":
        unchanged(inputs, before)


@given(data=st.data())
def test_batch_norm_backward(backend, data):
    dt, shape, axis, kind, memory = data.draw(channel_case(), "case")
    nd = len(shape)
    ax = axis % nd
    C = shape[ax]
    axes = ref.reduced_axes(nd, axis)
    n = ref.count(shape, axes)
    pdt = ref.param_dtype(dt)
    dy_kind = data.draw(st.sampled_from(["normal", kind]), "dy kind")
    dy_memory = data.draw(st.sampled_from(MEMORY), "dy memory")
    use_scale = data.draw(st.booleans(), "scale")
    out_kind = data.draw(st.sampled_from(["none", "C", "F", "strided", "x", "dy"]), "out")
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    rng = np.random.default_rng(seed)
    x = lay_out(make_values(rng, shape, dt, kind, (ax,)), memory, rng, axes)
    dy = lay_out(make_values(rng, shape, dt, dy_kind, (ax,)), dy_memory, rng, axes)
    if (out_kind == "x" and not writeable(x)) or (out_kind == "dy" and not writeable(dy)):
        out_kind = "F"
    x64, dy64 = ref.f64(x), ref.f64(dy)
    # the forward's statistics as batch_norm_train returns them (rounded to pdt)
    if n >= 1:
        _, m, inv, _, _ = ref.batch_norm_train(x64, None, None, axis, 1e-3)
    else:
        m, inv = np.zeros(C), np.ones(C)
    with np.errstate(over="ignore", invalid="ignore"):
        mean, invstd = m.astype(pdt), inv.astype(pdt)
    scale = vec(rng, C, data.draw(st.sampled_from([pdt, F64]), "scale dtype"), -2, 2) \
        if use_scale else None
    with np.errstate(all="ignore"):
        exp_dx, exp_dscale, exp_doffset = ref.batch_norm_backward(dy64, x64, scale, mean, invstd,
                                                                  axis)
        xhat = (x64 - along(mean, nd, axis)) * along(invstd, nd, axis)
        # Rounding budgets of the two sums: relative to the sums of magnitudes, plus
        # n half-subnormals where fastbn's products dy * (x - mean) are subnormal.
        nn = max(n, 1)
        dymax = np.max(np.abs(dy64), axis=axes, initial=0.0)
        e_dy = ARITH * np.sum(np.abs(dy64), axis=axes) + nn * SUB64
        e_ds = (ARITH * np.sum(np.abs(dy64 * xhat), axis=axes)
                + (nn + 1) * SUB64 * np.abs(ref.f64(invstd)) * dymax)
        a = along(ref.f64(invstd) * (1.0 if scale is None else ref.f64(scale)), nd, axis)
        dx_err = np.abs(a) * (ARITH * np.abs(dy64) + along(e_dy, nd, axis) / nn
                              + np.abs(xhat) * along(e_ds, nd, axis) / nn) + 4 * SUB64
    out, guard = make_out(out_kind, x, rng, dy)
    inputs = [x, dy, scale, mean, invstd]
    before = snapshot(*inputs)

    dx, dscale, doffset = fbn.batch_norm_backward(dy, x, scale, mean, invstd, channel_axis=axis,
                                                  out=out, backend=backend)

    assert isinstance(dx, np.ndarray) and dx.shape == shape and dx.dtype == dt
    assert dscale.shape == doffset.shape == (C,) and dscale.dtype == doffset.dtype == pdt
    if out is not None:
        assert dx is out
    check(doffset, exp_doffset, ROUND[pdt] * np.abs(exp_doffset) + e_dy + sub(pdt), "doffset")
    check(dscale, exp_dscale, ROUND[pdt] * np.abs(exp_dscale) + e_ds + sub(pdt), "dscale")
    check(dx, exp_dx, ROUND[dt] * np.abs(exp_dx) + dx_err + sub(dt), "dx")
    check_guard(guard)
    if out_kind not in ("x", "dy"):
        unchanged(inputs, before)


# -- invariants ---------------------------------------------------------------------------

NORMAL_KINDS = ("normal", "offset", "mixed", "huge")


@given(data=st.data())
def test_train_output_is_normalized(backend, data):
    """Per channel, y = batch_norm_train(x) has mean ~0 and variance ~var/(var + eps)."""
    dt, shape, axis, _, memory = data.draw(channel_case(empty=False), "case")
    kind = data.draw(st.sampled_from(NORMAL_KINDS), "kind")
    eps = data.draw(st.sampled_from([0.0, 1e-5, 1e-2]), "eps")
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    nd = len(shape)
    axes = ref.reduced_axes(nd, axis)
    if ref.count(shape, axes) < 2:
        return
    rng = np.random.default_rng(seed)
    x = lay_out(make_values(rng, shape, dt, kind, (axis % nd,)), memory, rng, axes)
    s = Stats(x, axes)
    var = s.var.reshape(-1)

    y, _, _ = fbn.batch_norm_train(x, channel_axis=axis, eps=eps, backend=backend)

    ym, yv = (v.reshape(-1) for v in ref.moments(y, axes, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        want = var / (var + eps)
        # y is rounded to dt (<= ROUND |y|, and mean |y| <= 1) after a shift of
        # (mean error) * invstd
        shift = (2 * s.delta.reshape(-1)) / np.sqrt(var + eps)
    tol = 4 * ROUND[dt] + shift
    live = var > 0
    assert np.all(np.abs(ym[live]) <= tol[live]), f"mean of y {ym[live]}, tolerance {tol[live]}"
    assert np.all(np.abs(yv[live] - want[live]) <= 2 * tol[live] * want[live] + tol[live] ** 2), \
        f"var of y {yv[live]}, expected {want[live]}"
    # A channel of equal values: y ~ 0 (exactly: tests/test_special_values.py); with
    # eps == 0, invstd is 0 (PyTorch's rule), so y is exactly the offset, 0 here.
    if eps > 0:
        assert np.all(np.abs(ym[~live]) <= tol[~live]) and np.all(yv[~live] <= tol[~live] ** 2)
    else:
        assert np.all(ym[~live] == 0) and np.all(yv[~live] == 0)


@given(data=st.data())
def test_train_is_moments_plus_batch_normalization(backend, data):
    """batch_norm_train(x) == batch_normalization(x, *moments(x, keepdims=True)), per value."""
    dt, shape, axis, kind, memory = data.draw(channel_case(empty=False), "case")
    eps = data.draw(st.sampled_from([1e-5, 1e-3, 0.5]), "eps")
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    nd = len(shape)
    axes = ref.reduced_axes(nd, axis)
    if ref.count(shape, axes) < 2:
        return
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = lay_out(make_values(rng, shape, dt, kind, (axis % nd,)), memory, rng, axes)
    pdt = ref.param_dtype(dt)
    scale, offset = vec(rng, C, pdt, -2, 2), vec(rng, C, pdt, -2, 2)
    mean, var = fbn.moments(x, axes, keepdims=True, backend=backend)
    if not np.isfinite(var).all():  # var overflowed pdt (1e30-scale float32): no two-step form
        return
    kd = [1 if a in axes else C for a in range(nd)]
    y1 = fbn.batch_normalization(x, mean, var, offset.reshape(kd), scale.reshape(kd), eps,
                                 backend=backend)
    y2, mean2, invstd2 = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, eps=eps,
                                              backend=backend)
    s = Stats(x, axes)
    x64, y2_64 = ref.f64(x), ref.f64(y2)
    # moments rounds mean and var to pdt before batch_normalization sees them; the
    # fused path keeps float64.  Both invstds lie in the interval of that budget.
    inv, inv_lo, inv_hi = s.invstd(eps, rel=ROUND[pdt] + ARITH)
    sc = ref.f64(scale.reshape(kd))
    with np.errstate(all="ignore"):
        ytol = (np.abs(sc) * (inv_hi - inv_lo) * np.abs(x64 - s.mean)
                + np.abs(sc) * inv_hi * (ROUND[pdt] * np.abs(s.mean) + 2 * s.delta)
                + 2 * ROUND[dt] * np.abs(y2_64)
                + ARITH * (np.abs(sc * inv * (x64 - s.mean)) + np.abs(offset.reshape(kd)))
                + 2 * sub(dt))
    check(mean2, ref.f64(mean).reshape(-1), 2 * s.mean_tol(pdt).reshape(-1),
          "train mean vs moments mean")
    check(y1, y2_64, ytol, "batch_normalization(moments) vs batch_norm_train")


@given(data=st.data())
def test_backward_matches_finite_differences(backend, data):
    """d/d(x, scale, offset) of L = sum(w * y), y from batch_norm_train: small float64 cases."""
    shape = data.draw(shapes(min_dims=1, max_dims=4, empty=False, budget=30), "shape")
    nd = len(shape)
    axis = data.draw(st.integers(-nd, nd - 1), "channel_axis")
    axes = ref.reduced_axes(nd, axis)
    if ref.count(shape, axes) < 2:
        return
    memory = data.draw(st.sampled_from(["C", "F", "perm", "strided"]), "memory")
    eps = data.draw(st.sampled_from([1e-2, 0.1, 1.0]), "eps")
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = lay_out(rng.standard_normal(shape) * rng.uniform(0.5, 3) + rng.uniform(-3, 3), memory, rng)
    scale, offset = rng.uniform(0.5, 2.0, C) * rng.choice([-1, 1], C), rng.uniform(-1, 1, C)
    w = rng.standard_normal(shape)

    def loss():
        return float(np.sum(w * fbn.batch_norm_train(x, scale, offset, channel_axis=axis, eps=eps,
                                                     backend=backend)[0]))

    _, mean, invstd = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, eps=eps,
                                           backend=backend)
    dx, dscale, doffset = fbn.batch_norm_backward(w, x, scale, mean, invstd, channel_axis=axis,
                                                  backend=backend)
    h = 1e-6
    for got, v, what in ((dx, x, "dx"), (dscale, scale, "dscale"), (doffset, offset, "doffset")):
        fd = np.zeros(v.shape)
        for i in np.ndindex(v.shape):
            old = v[i]
            v[i] = old + h
            up = loss()
            v[i] = old - h
            down = loss()
            v[i] = old
            fd[i] = (up - down) / (2 * h)
        # central differences: O(h^2) truncation, O(eps64 |L| / h) rounding
        ref.assert_close(got, fd, what, rtol=1e-5)


# -- aliasing: every pair of array arguments as overlapping views of one buffer -------------

#: The array arguments of each function, in call order.
ALIAS_ARGS = {
    "batch_norm_train": ("x", "scale", "offset", "running_mean", "running_var", "out"),
    "batch_norm_infer": ("x", "scale", "offset", "mean", "var", "out"),
    "batch_norm_backward": ("dy", "x", "scale", "mean", "invstd", "out"),
    "batch_norm_infer_backward": ("dy", "x", "scale", "mean", "var", "out"),
    "batch_normalization": ("x", "mean", "variance", "offset", "scale", "out"),
}
#: Arguments shaped like x (the others are per-channel vectors).
DATA_ARGS = ("x", "dy", "out")
RUNNING_ARGS = ("running_mean", "running_var")
#: Arguments the call writes.
WRITTEN_ARGS = ("out",) + RUNNING_ARGS


def overlap_forbidden(a, b):
    """API.md, Errors: running statistics may overlap nothing; scale/offset may not overlap
    out.  Every other overlap (out with x/dy in any way, read-only inputs with each other,
    out with mean/var/invstd) must give the result of non-overlapping copies."""
    pair = {a, b}
    return bool(pair & set(RUNNING_ARGS)) or ("out" in pair and bool(pair & {"scale", "offset"}))


def _alias_call(fn, args, channels_shape):
    """Call public function ``fn`` with ``args`` (name -> array or None)."""
    kw = dict(out=args["out"], backend=args["backend"])
    if fn == "batch_norm_train":
        return fbn.batch_norm_train(args["x"], args["scale"], args["offset"], eps=1e-3,
                                    running_mean=args["running_mean"],
                                    running_var=args["running_var"], momentum=0.25, **kw)
    if fn == "batch_norm_infer":
        return fbn.batch_norm_infer(args["x"], args["scale"], args["offset"], args["mean"],
                                    args["var"], eps=1e-3, **kw)
    if fn == "batch_norm_backward":
        return fbn.batch_norm_backward(args["dy"], args["x"], args["scale"], args["mean"],
                                       args["invstd"], **kw)
    if fn == "batch_norm_infer_backward":
        return fbn.batch_norm_infer_backward(args["dy"], args["x"], args["scale"], args["mean"],
                                             args["var"], eps=1e-3, **kw)
    p = {k: args[k].reshape(channels_shape) for k in ("mean", "variance", "offset", "scale")}
    return fbn.batch_normalization(args["x"], p["mean"], p["variance"], p["offset"], p["scale"],
                                   1e-3, **kw)


def _place(buf, start, name, shape, general):
    """A view of ``buf`` from element ``start``: a (C,) vector, or an x-shaped array, C-order
    (small path) or channels-last in memory (general path: not C-contiguous)."""
    item = buf.itemsize
    if name not in DATA_ARGS:
        return np.ndarray((shape[1],), buf.dtype, buffer=buf, offset=start * item)
    if not general:
        return np.ndarray(shape, buf.dtype, buffer=buf, offset=start * item)
    N, C, H = shape
    return np.ndarray((N, H, C), buf.dtype, buffer=buf, offset=start * item).transpose(0, 2, 1)


@st.composite
def alias_case(draw, fn, general):
    """(dtype, shape, starts, pair, same_object): where each argument of ``fn`` starts in one
    shared buffer.  ``pair`` (or None) overlaps partially or wholly; the rest are apart."""
    dt = draw(st.sampled_from([F32, F64]), "dtype")
    lo = 2 if general else 1
    shape = (draw(st.integers(2, 5), "N"), draw(st.integers(lo, 6), "C"),
              draw(st.integers(lo, 5), "H"))
    names = ALIAS_ARGS[fn]
    size = {k: (math.prod(shape) if k in DATA_ARGS else shape[1]) for k in names}
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    pair = draw(st.sampled_from(pairs) | st.none(), "overlapping pair")
    starts, pos = {}, 0
    if pair is not None:
        a, b = pair
        # b starts anywhere from len(b) - 1 elements before a to a's last element
        shift = draw(st.integers(-(size[b] - 1), size[a] - 1), "shift of b from a")
        starts[a] = size[b] - 1
        starts[b] = starts[a] + shift
        pos = size[a] + 2 * size[b]
    for k in names:
        if k not in starts:
            pos += draw(st.integers(0, 2), f"gap before {k}")
            starts[k] = pos
            pos += size[k]
    same_object = (pair in (("x", "out"), ("dy", "out")) and starts[pair[0]] == starts[pair[1]]
                   and draw(st.booleans(), "out is the same object"))
    return dt, shape, starts, pos, pair, same_object


def _fresh_like(a):
    """A separate array with ``a``'s values and memory order."""
    c = np.empty_like(a, order="K")
    c[...] = a
    return c


def _named_pair(message):
    import re
    m = re.match(r"(\w+) and (\w+) overlap", message)
    return None if m is None else frozenset(m.groups())


@pytest.mark.parametrize("path", ["small", "general"])
@pytest.mark.parametrize("fn", list(ALIAS_ARGS))
@given(data=st.data())
def test_aliasing(backend, fn, path, data):
    """Arguments as views of one buffer, one pair overlapping (partially, wholly, or ``out``
    being ``x``/``dy`` itself): a forbidden overlap raises ValueError naming both before
    anything is written; any other gives the result of the call on non-overlapping copies,
    and writes nothing but ``out`` and the running statistics."""
    general = path == "general"
    dt, shape, starts, total, pair, same_object = data.draw(alias_case(fn, general), "case")
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    rng = np.random.default_rng(seed)
    names = ALIAS_ARGS[fn]
    buf = rng.uniform(0.5, 2.0, total + 2).astype(dt)   # positive: var, invstd, scales valid
    index = np.arange(buf.size, dtype=np.int64)
    views = {k: _place(buf, starts[k], k, shape, general) for k in names}
    if same_object:
        views["out"] = views[pair[0]]
    cells = {k: _place(index, starts[k], k, shape, general) for k in names}
    if general:
        assert not views["x"].flags.c_contiguous
    channels = (1, shape[1], 1)
    overlapping = [frozenset((a, b)) for i, a in enumerate(names) for b in names[i + 1:]
                   if np.shares_memory(views[a], views[b])]
    bad = [p for p in overlapping if overlap_forbidden(*p)]
    note(f"starts {starts}, overlapping {[tuple(p) for p in overlapping]}")
    before = buf.copy()
    args = dict.fromkeys(("x", "dy", "scale", "offset", "running_mean", "running_var", "mean",
                          "var", "variance", "invstd", "out"))
    args.update(views, backend=backend)

    if bad:
        with pytest.raises(ValueError, match="overlap") as info:
            _alias_call(fn, args, channels)
        assert _named_pair(str(info.value)) in bad, (str(info.value), bad)
        assert buf.tobytes() == before.tobytes(), "written before the overlap was refused"
        return

    copies = {k: _fresh_like(v) for k, v in views.items()}
    want = _alias_call(fn, dict(args, **copies), channels)
    got = _alias_call(fn, args, channels)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    assert got[0] is views["out"]
    tol = ROUND[dt]
    for g, w, what in zip(got, want, ("y/dx", "mean/dscale", "invstd/doffset")):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.max(np.abs(w), initial=1.0),
                                   err_msg=f"{fn} {what}: overlapping arguments")
    for k in RUNNING_ARGS:
        if k in names:
            np.testing.assert_allclose(views[k], copies[k], rtol=tol, atol=tol,
                                       err_msg=f"{k}: overlapping arguments")
    written = np.zeros(buf.size, bool)
    for k in WRITTEN_ARGS:
        if k in names:
            written[cells[k].ravel()] = True
    np.testing.assert_array_equal(buf[~written], before[~written],
                                  err_msg="an input outside out and the running statistics changed")


# -- float64 extremes ------------------------------------------------------------------------

F64MAX = float(np.finfo(F64).max)
#: Per-channel value families at the ends of float64.
EXTREME_KINDS = ("e300", "max_const", "max_ulps", "subnormal", "constant", "hugemean_tiny",
                 "normal")
EXTREME_CONSTANTS = (0.0, 0.1, -3.7, 1e300, -1e300, 1.7e308, -1.7e308, F64MAX, -F64MAX,
                     2.5e-310, -SUB64)


def extreme_channel(rng, kind, m):
    """``m`` float64 values of one channel of family ``kind``."""
    sign = float(rng.choice([-1.0, 1.0]))
    if kind == "e300":            # |x| near 1e300, either sign: the squares overflow (var inf)
        return 1e300 * (rng.uniform(-1.5, 1.5) + rng.standard_normal(m))
    if kind == "max_const":       # a constant channel at the top of the range
        return np.full(m, sign * F64MAX * rng.uniform(0.9, 1.0))
    if kind == "max_ulps":        # a few ulps apart near 1.7e308: mean finite, var inf
        pivot = sign * F64MAX * rng.uniform(0.5, 0.99)
        return pivot + rng.integers(-3, 4, m) * np.spacing(abs(pivot))
    if kind == "subnormal":
        return rng.integers(-100, 101, m) * SUB64
    if kind == "constant":
        return np.full(m, float(rng.choice(EXTREME_CONSTANTS)))
    if kind == "hugemean_tiny":   # mean 1e100..1e305, spread 1e-12 of it (var finite below ~1e166)
        pivot = sign * 10.0 ** rng.uniform(100, 305)
        return pivot * (1 + 1e-12 * rng.standard_normal(m))
    if kind == "normal":
        return rng.uniform(-3, 3) + rng.uniform(0.1, 3) * rng.standard_normal(m)
    raise ValueError(kind)


def extreme_values(rng, shape, ax, pool):
    """float64 data of ``shape``, each channel (axis ``ax``) of a family drawn from ``pool``."""
    C = shape[ax]
    rest = [s for a, s in enumerate(shape) if a != ax]
    m = math.prod(rest)
    with np.errstate(over="ignore"):
        rows = [extreme_channel(rng, str(rng.choice(pool)), m) for _ in range(C)]
    v = np.array(rows, dtype=np.float64).reshape([C] + rest) if C else np.zeros([0] + rest)
    return np.moveaxis(v, 0, ax)


def general_layout(a, rng):
    """``a``'s values in a layout that is not C-contiguous (the general path): F order, or a
    view with step +-2 along an axis longer than 1."""
    if rng.integers(2):
        f = np.asfortranarray(a)
        if not f.flags.c_contiguous:
            return f
    ax = int(rng.choice([i for i, s in enumerate(a.shape) if s > 1]))
    step = int(rng.choice([2, -2]))
    base = np.full([s * (2 if i == ax else 1) for i, s in enumerate(a.shape)], np.nan)
    view = base[tuple(slice(None, None, step) if i == ax else slice(None) for i in range(a.ndim))]
    view[...] = a
    return view


def check_extreme(got, exp, tol, what):
    """float64 ``got`` against the reference ``exp``: finite (and within ``tol``) where
    ``exp`` is finite, the same inf where it is inf; unconstrained where it is NaN."""
    got = np.asarray(got, dtype=np.float64)
    exp = np.broadcast_to(np.asarray(exp, dtype=np.float64), got.shape)
    tol = np.broadcast_to(np.nan_to_num(np.asarray(tol, dtype=np.float64), nan=np.inf),
                          got.shape)
    with np.errstate(invalid="ignore"):
        ok = np.where(np.isfinite(exp), np.isfinite(got) & (np.abs(got - exp) <= tol),
                      np.isnan(exp) | (got == exp))
    if not ok.all():
        i = tuple(np.argwhere(~ok)[0])
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.size} values off; first at "
                             f"{i}: got {got[i]!r}, expected {exp[i]!r}, tolerance {tol[i]!r}")


def _inv_rule(v):
    """1/sqrt(v), with PyTorch's rule 1/sqrt(0) -> 0 (var + eps == 0)."""
    with np.errstate(divide="ignore"):
        return np.where(v == 0, 0.0, 1 / np.sqrt(v))


def _extreme_layout(data):
    """A drawn shape (2-4 dims) and channel axis for the float64-extremes properties:
    ``(shape, ndim, axis, axis % ndim, reduced axes, values per channel)``."""
    shape = data.draw(shapes(min_dims=2, max_dims=4, empty=False,
                             budget=data.draw(st.sampled_from([64, 4096, 1 << 15]), "budget")),
                      "shape")
    nd = len(shape)
    axis = data.draw(st.integers(-nd, nd - 1), "channel_axis")
    axes = ref.reduced_axes(nd, axis)
    return shape, nd, axis, axis % nd, axes, ref.count(shape, axes)


@pytest.mark.parametrize("path", ["small", "general"])
@given(data=st.data())
def test_float64_extremes(backend, path, data):
    """float64 data near +-1e300 and 1.7e308, subnormal, constant and huge-mean/tiny-spread
    channels, mixed per channel: moments and batch_norm_train (y, mean, invstd, running
    statistics) as the float64 NumPy reference gives them: inf where it gives inf (a variance
    whose squares overflow), finite and within the error model where it is finite, never NaN
    where it has none."""
    general = path == "general"
    shape, nd, axis, ax, axes, n = _extreme_layout(data)
    if n < 2 or (general and math.prod(shape) < 2):
        return
    pool = data.draw(st.lists(st.sampled_from(EXTREME_KINDS), min_size=1, max_size=4,
                              unique=True), "kinds")
    eps = data.draw(st.sampled_from([0.0, 1e-5, 1.0]), "eps")
    momentum = data.draw(st.sampled_from([0.0, 0.1, 1.0]), "momentum")
    out_kind = data.draw(st.sampled_from(["none", "fresh", "x"]), "out")
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    rng = np.random.default_rng(seed)
    C = shape[ax]
    x = extreme_values(rng, shape, ax, pool)
    x = general_layout(x, rng) if general else np.ascontiguousarray(x)
    assert x.flags.c_contiguous != general
    scale = rng.uniform(-2, 2, C)
    offset = rng.uniform(-2, 2, C)
    rm = rng.uniform(-1, 1, C) * 10.0 ** rng.integers(-3, 300, C)
    rv = rng.uniform(0.5, 2, C)
    note(f"channel families {pool}")

    with np.errstate(over="ignore", invalid="ignore"):
        s = Stats(x, axes)
    x64 = np.array(x, dtype=np.float64)   # a copy: out may be x
    mean, var = fbn.moments(x, axes, backend=backend)
    check_extreme(mean, s.mean.reshape(-1), s.mean_tol(F64).reshape(-1), "moments mean")
    check_extreme(var, s.var.reshape(-1), s.var_tol(F64).reshape(-1), "moments var")

    with np.errstate(all="ignore"):
        dv = s.dvar + ARITH * s.var
        inv = _inv_rule(s.var + eps)
        inv_lo = np.where(np.isinf(s.var), 0.0, 1 / np.sqrt(s.var + dv + eps))
        inv_hi = np.where(np.isinf(s.var), 0.0, 1 / np.sqrt(np.maximum(s.var - dv, 0) + eps))
        inv_tol = np.maximum(inv - inv_lo, inv_hi - inv) + ROUND[F64] * inv
        scb, rb = along(scale, nd, axis), along(offset, nd, axis)
        d = x64 - s.mean
        exp_y = d * inv * scb + rb
        ytol = (ROUND[F64] * np.abs(exp_y)
                + np.where(d == 0, 0.0, np.abs(scb) * (inv_hi - inv_lo) * np.abs(d))
                + np.abs(scb) * inv_hi * 2 * s.delta
                + ARITH * (np.abs(scb * inv * d) + np.abs(rb)) + SUB64)
        exp_rm = (1 - momentum) * rm + momentum * s.mean.reshape(-1)
        exp_rv = (1 - momentum) * rv + momentum * s.var.reshape(-1) * n / (n - 1)
        rm_tol = ROUND[F64] * np.abs(exp_rm) + momentum * s.mean_tol(F64).reshape(-1)
        rv_tol = (ROUND[F64] * np.abs(exp_rv)
                  + momentum * (s.dvar.reshape(-1) + ARITH * s.var.reshape(-1)) * n / (n - 1))
    out = {"none": None, "fresh": np.empty_like(x, order="C" if not general else "F"),
           "x": x}[out_kind]
    rm_arg, rv_arg = rm.copy(), rv.copy()

    y, bmean, invstd = fbn.batch_norm_train(x, scale, offset, channel_axis=axis, eps=eps,
                                            running_mean=rm_arg, running_var=rv_arg,
                                            momentum=momentum, out=out, backend=backend)

    check_extreme(bmean, s.mean.reshape(-1), s.mean_tol(F64).reshape(-1), "train mean")
    check_extreme(invstd, inv.reshape(-1), inv_tol.reshape(-1), "train invstd")
    check_extreme(y, exp_y, ytol, "train y")
    check_extreme(rm_arg, exp_rm, rm_tol, "running_mean")
    check_extreme(rv_arg, exp_rv, rv_tol, "running_var")
    # A constant channel (any value, 1.7e308 and subnormals included) exactly: mean the
    # constant, variance 0, y the offset (test_special_values, on the kernels).
    const = (np.max(x64, axis=axes) == np.min(x64, axis=axes)).reshape(-1)
    if const.any():
        first = np.moveaxis(x64, ax, 0).reshape(C, -1)[:, 0]
        assert np.array_equal(mean[const], first[const]), "moments mean of a constant channel"
        assert np.all(var[const] == 0), "moments var of a constant channel"
        assert np.array_equal(bmean[const], first[const]), "train mean of a constant channel"
        y_c = np.moveaxis(np.asarray(y), ax, 0)[const]
        assert np.all(y_c == offset[const].reshape((-1,) + (1,) * (nd - 1))), \
            "y of a constant channel is not its offset"


@pytest.mark.parametrize("path", ["small", "general"])
@given(data=st.data())
def test_float64_extremes_infer_and_backward(backend, path, data):
    """The same extreme float64 channels through batch_norm_infer, batch_norm_backward and
    batch_norm_infer_backward, with the channels' exact statistics: as the float64 NumPy
    reference (inf where it gives inf, finite within the error model where it is finite)."""
    general = path == "general"
    shape, nd, axis, ax, axes, n = _extreme_layout(data)
    if n < 2:
        return
    pool = data.draw(st.lists(st.sampled_from(EXTREME_KINDS), min_size=1, max_size=4,
                              unique=True), "kinds")
    eps = data.draw(st.sampled_from([0.0, 1e-5, 1.0]), "eps")
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    rng = np.random.default_rng(seed)
    C = shape[ax]
    x = extreme_values(rng, shape, ax, pool)
    x = general_layout(x, rng) if general else np.ascontiguousarray(x)
    dy = rng.uniform(-2, 2, shape)
    scale = rng.uniform(-2, 2, C)
    offset = rng.uniform(-2, 2, C)
    note(f"channel families {pool}")
    with np.errstate(over="ignore", invalid="ignore"):
        s = Stats(x, axes)
    mean, var = s.mean.reshape(-1), s.var.reshape(-1)
    invstd = _inv_rule(var + eps)
    x64 = np.array(x, dtype=np.float64)
    with np.errstate(all="ignore"):
        m_b, sc_b, of_b = along(mean, nd, axis), along(scale, nd, axis), along(offset, nd, axis)
        d = x64 - m_b
        q = sc_b / np.sqrt(along(var, nd, axis) + eps)
        exp_y = ref.batch_norm_infer(x64, scale, offset, mean, var, axis, eps)
        y_tol = ROUND[F64] * np.abs(exp_y) + ARITH * (np.abs(q * d) + np.abs(of_b)) + SUB64
        exp_dx, exp_dscale, exp_doffset = ref.batch_norm_backward(dy, x64, scale, mean, invstd,
                                                                  axis)
        xhat = d * along(invstd, nd, axis)
        e_dy = ARITH * np.sum(np.abs(dy), axis=axes) + n * SUB64
        e_ds = ARITH * np.sum(np.abs(dy * xhat), axis=axes) + (n + 1) * SUB64 * np.abs(invstd) * 2
        a = along(invstd * scale, nd, axis)
        dx_tol = (ROUND[F64] * np.abs(exp_dx)
                  + np.abs(a) * (ARITH * np.abs(dy) + along(e_dy, nd, axis) / n
                                 + np.abs(xhat) * along(e_ds, nd, axis) / n) + 4 * SUB64)
        qi = 1 / np.sqrt(var + eps)
        exp_idx = dy * q
        exp_ids = np.sum(dy * d, axis=axes) * qi
        ids_tol = ROUND[F64] * np.abs(exp_ids) + ARITH * np.sum(np.abs(dy * d), axis=axes) * qi
    before = snapshot(x)

    y = fbn.batch_norm_infer(x, scale, offset, mean, var, channel_axis=axis, eps=eps,
                             backend=backend)
    dx, dscale, doffset = fbn.batch_norm_backward(dy, x, scale, mean, invstd, channel_axis=axis,
                                                  backend=backend)
    idx, idscale, idoffset = fbn.batch_norm_infer_backward(dy, x, scale, mean, var,
                                                           channel_axis=axis, eps=eps,
                                                           backend=backend)

    check_extreme(y, exp_y, y_tol, "infer y")
    check_extreme(doffset, exp_doffset, ROUND[F64] * np.abs(exp_doffset) + e_dy, "doffset")
    check_extreme(dscale, exp_dscale, ROUND[F64] * np.abs(exp_dscale) + e_ds, "dscale")
    check_extreme(dx, exp_dx, dx_tol, "dx")
    check_extreme(idoffset, exp_doffset, ROUND[F64] * np.abs(exp_doffset) + e_dy,
                  "infer_backward doffset")
    check_extreme(idscale, exp_ids, ids_tol, "infer_backward dscale")
    check_extreme(idx, exp_idx, ROUND[F64] * np.abs(exp_idx) + SUB64, "infer_backward dx")
    unchanged([x], before)


def test_variance_near_overflow(backend):
    """A float64 channel whose m2 = n*var is 0.3 of the float64 maximum, its first value 3
    standard deviations below the mean: the variance is finite (NumPy's), not inf (the
    Numba sums shifted by the first value overflowed here; they now fall back to m2
    about the mean).  Channels-first and channels-last, moments and training."""
    rng = np.random.default_rng(0)
    # (values, shape): channels-last (n, 1) and channels-first (4, 1, n/4), each small
    # (the fused training kernel) and large (moments kernels, parallel)
    for n, shape in ((2000, (2000, 1)), (2000, (4, 1, 500)),
                     (300_000, (300_000, 1)), (300_000, (4, 1, 75_000))):
        z = rng.standard_normal(n)
        z = (z - z.mean()) / z.std()
        z[0] = -3.0
        x = (1e165 + math.sqrt(0.3 * float(np.finfo(F64).max) / n) * z).reshape(shape)
        axes = tuple(a for a in range(x.ndim) if a != 1)
        s = Stats(x, axes)
        mean, var = fbn.moments(x, axes, backend=backend)
        assert np.isfinite(s.var).all() and np.isfinite(var).all(), (shape, var)
        # the data is quantized to ~sd/20 at 1e165: the error model's budget, not 1e-9
        tol = s.var_tol(F64).reshape(-1)
        check_extreme(var, s.var.reshape(-1), tol, f"moments var {shape}")
        rv = np.ones(1)
        y, _, invstd = fbn.batch_norm_train(x, channel_axis=1, eps=0.0, running_var=rv,
                                            momentum=1.0, backend=backend)
        assert np.isfinite(y).all() and (invstd > 0).all(), (shape, invstd)
        check_extreme(rv, s.var.reshape(-1) * n / (n - 1), (tol + ROUND[F64] * s.var.reshape(-1))
                      * n / (n - 1), f"running_var {shape}")

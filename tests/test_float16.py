"""float16 in the CPU kernels: no float32 copy, float64 arithmetic, one rounding.

Both compiled backends take float16 arrays as their uint16 bits (a view) and
convert each element in the loop (Numba: kernels/_stream.py ``ld``/``cast``,
vectorised vcvtph2pd / vcvtpd2ph or F16C; Cython: C helpers).  The contract,
checked against the float64 reference on the kernels' primitives:

* ``affine3`` output == the float64 value rounded ONCE to float16
  (``np.float64(...).astype(np.float16)``), bit for bit -- a float32
  intermediate rounds ~3% of values 1 ulp off;
* ``moments3`` / ``dy_sums3`` as float64 sums of the float16 values, at small
  and large means (2000 + randn: the float16 ulp there is 1, the spread ~1);
* every loop nest (long and short runs, channels-last with and without the
  register kernels, C = 16..64), C/F order and strided views, in-place output.
"""

import numpy as np
import pytest

from fastbn.kernels import cpu_cython

try:
    from fastbn.kernels import _stream, cpu_numba
except ImportError:
    cpu_numba = _stream = None

BACKENDS = [
    pytest.param(cpu_numba, id="numba", marks=pytest.mark.skipif(cpu_numba is None,
                                                                 reason="no Numba")),
    pytest.param(cpu_cython, id="cython", marks=pytest.mark.skipif(
        cpu_cython.unavailable_reason() is not None, reason="Cython extension not built")),
]
backends = pytest.mark.parametrize("bk", BACKENDS)
#: (O, C, I): short runs, long runs over several chunks, channels-last rows of
#: C = 3, 16, 30, 64 (16..64: Numba's register kernels), a parallel-size one.
SHAPES3 = [(5, 3, 7), (4, 6, 300), (2, 3, 9000), (40, 64, 1), (300, 16, 1), (50, 30, 1),
           (8, 37, 1000), (20000, 16, 1)]
shapes = pytest.mark.parametrize("shape3", SHAPES3, ids=str)
layouts = pytest.mark.parametrize("layout", ["C", "F", "strided"])


def _lay(a, layout):
    if layout == "C":
        return a
    if layout == "F":
        return np.asfortranarray(a)
    big = np.zeros(a.shape[:2] + (2 * a.shape[2],), a.dtype)
    big[:, :, ::2] = a
    return big[:, :, ::2]


def _data(rng, shape3, level):
    return (rng.standard_normal(shape3) * 3 + level).astype(np.float16)


@backends
@shapes
@layouts
@pytest.mark.parametrize("with_u", [False, True], ids=["plain", "with_u"])
def test_affine_rounds_once(bk, rng, shape3, layout, with_u):
    C = shape3[1]
    x = _lay(_data(rng, shape3, 0.5), layout)
    u = _lay(_data(rng, shape3, -1.0), layout) if with_u else None
    m, q, r, p = (rng.standard_normal(C) * s for s in (3.0, 1.0, 1.0, 0.7))
    want = q[None, :, None] * (x.astype(np.float64) - m[None, :, None]) + r[None, :, None]
    if with_u:
        want = want + p[None, :, None] * u.astype(np.float64)
    want = want.astype(np.float16)
    out = _lay(np.empty(shape3, np.float16), layout)
    bk.affine3(x, m, q, r, out, u, p if with_u else None)
    np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))
    bk.affine3(x, m, q, r, x, u, p if with_u else None)   # in place
    np.testing.assert_array_equal(x.view(np.uint16), want.view(np.uint16))


def _hard_cases():
    """float64 values next to float16 rounding boundaries (where float64 -> float32
    -> float16 rounds twice), overflow to inf, subnormals, zeros of both signs,
    inf and NaN, and NumPy's direct cast of them (the correctly rounded float16)."""
    rng = np.random.default_rng(17)
    h = rng.integers(0, 0x7C00, 4096, dtype=np.uint16).view(np.float16)
    nxt = np.nextafter(h, np.float16(np.inf)).astype(np.float64)
    mid = (h.astype(np.float64) + nxt) / 2                       # exact ties
    d = np.concatenate([mid, mid * (1 + 2.0 ** -30), mid * (1 - 2.0 ** -30), -mid,
                        [65504.0, 65519.99, 65520.0, 1e300, 2.0 ** -25, 2.0 ** -25 * 1.0001,
                         1e-300, -1e-300, -0.0, 0.0, np.inf, -np.inf, np.nan]])
    with np.errstate(over="ignore"):
        return d, d.astype(np.float16)


def _assert_same_half(got, want):
    nan = np.isnan(want)
    assert np.isnan(got[nan]).all()
    np.testing.assert_array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))


@pytest.mark.skipif(cpu_numba is None, reason="no Numba")
@pytest.mark.parametrize("direct", [False, True], ids=["via_round_to_odd", "direct"])
def test_numba_cast_rounds_hard_cases_once(monkeypatch, direct):
    """_stream.cast (float64 -> float16 bits) on values next to float16 rounding
    boundaries (where float64 -> float32 -> float16 rounds twice), overflow to
    inf, subnormals, zeros of both signs, inf and NaN: as NumPy's direct cast."""
    import numba
    if direct and not _stream.DIRECT_HALF:
        pytest.skip("no AVX-512 FP16 here")
    monkeypatch.setattr(_stream, "DIRECT_HALF", direct)   # read when conv compiles

    @numba.njit
    def conv(d, out):
        for i in range(d.size):
            out[i] = _stream.cast(d[i], out)

    d, want = _hard_cases()
    out = np.empty(d.size, np.uint16)
    conv(d, out)
    _assert_same_half(out.view(np.float16), want)


@backends
@pytest.mark.parametrize("inner", [1, 24, "strided"])
def test_affine_rounds_hard_cases_once(bk, inner):
    """affine3's float64 -> float16 rounding on the hard cases, through each loop
    nest: channels-last rows, contiguous runs (the vector loops and their scalar
    tails: 24 = 16 + 8) and strided runs (the blocked loops).  y = 1*(0 - 0) + r
    is exactly r (but +0 for r = -0), so the output is r rounded once."""
    d, _ = _hard_cases()
    with np.errstate(over="ignore"):
        want = (0.0 + d).astype(np.float16)
    I = 1 if inner == "strided" else inner
    x = np.zeros((1, d.size, I), np.float16)
    out = np.empty_like(x)
    if inner == "strided":
        x = np.zeros((1, d.size, 6), np.float16)[:, :, ::3]
        out = np.empty((1, d.size, 6), np.float16)[:, :, ::3]
    zero, one = np.zeros(d.size), np.ones(d.size)
    with np.errstate(invalid="ignore", over="ignore"):
        bk.affine3(x, zero, one, d, out)
    for k in range(out.shape[2]):
        _assert_same_half(out[0, :, k], want)


@backends
@shapes
@layouts
@pytest.mark.parametrize("level", [0.5, 2000.0], ids=["mean0.5", "mean2000"])
def test_moments_and_dy_sums(bk, rng, shape3, layout, level):
    x = _lay(_data(rng, shape3, level), layout)
    g = _lay(_data(rng, shape3, 0.0), layout)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    n = shape3[0] * shape3[2]
    mean, m2 = bk.moments3(x)
    # atol: a channel mean near 0 (40 values of sd 3) has no relative precision
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2)), rtol=1e-12, atol=1e-13 * (level + 3))
    np.testing.assert_allclose(m2 / n, x64.var(axis=(0, 2)), rtol=1e-9)
    m = mean + rng.standard_normal(shape3[1])
    s1, s2 = bk.dy_sums3(g, x, m)
    np.testing.assert_allclose(s1, g64.sum(axis=(0, 2)), rtol=1e-10, atol=1e-9 * n)
    np.testing.assert_allclose(s2, (g64 * (x64 - m[None, :, None])).sum(axis=(0, 2)),
                               rtol=1e-9, atol=1e-9 * n)


@pytest.mark.skipif(cpu_numba is None, reason="no Numba")
def test_numba_takes_float16_without_a_copy():
    """The Numba wrappers hand the kernels a uint16 view of the caller's memory."""
    x = np.ones((4, 3, 5), np.float16)
    b = cpu_numba._bits(x)
    assert b.dtype == np.uint16 and np.shares_memory(b, x)
    f = np.asfortranarray(x)
    assert np.shares_memory(cpu_numba._bits(f), f)

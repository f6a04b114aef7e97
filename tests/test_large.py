"""More than 2^31 elements: index and count arithmetic is 64-bit.

The default run reads > 2^31 elements without the memory for them: an
overlapping-window view ``x[a, c, i] = b[2a + c + i]`` (strides 8, 4, 4 bytes)
of a 4 MB float32 vector ``b`` with a trend along it.  Every element of ``b``
carries a different weight (how many windows cover it), so a kernel that
wrapped an index or a count at 2^31, or stopped early, would get a different
mean; the expected statistics are computed exactly from ``b`` and the weights.

The slow test (``-m slow`` or ``FASTBN_TEST_LARGE=1``; it needs ~9 GB of free
memory) writes a real float32 array of 2^31 + 18 elements in place through
``batch_norm_train`` and ``batch_norm_infer`` and checks values on both sides of
element 2^31.

The NumPy backend is left out: it works on a float64 copy (17+ GB here).  The
Numba backend is given a view of 2^31 + 2^13 elements (2^30 + 2^12 per channel)
rather than 2^32: it runs non-contiguous views without vectorising (~2 ns per
value read), where the Cython backend checks for unit strides at run time.
"""

import os

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

import fastbn as fbn

#: (windows A, window length B) per backend; C = 2 channels.  Per channel A * B
#: values, the view holds 2 * A * B > 2^31.
SIZES = {"numba": (2**18 + 1, 4096), "cython": (2**19 + 1, 4096)}


def _window_view(A, B, C=2):
    """(x, b): x[a, c, i] = b[2a + c + i], shape (A, C, B), and b (float32)."""
    L = 2 * (A - 1) + (C - 1) + B
    j = np.arange(L, dtype=np.float64)
    b = (np.sin(j * 1e-3) * 3 + 10 * j / L
         + 0.01 * np.random.default_rng(0).standard_normal(L)).astype(np.float32)
    x = as_strided(b, shape=(A, C, B), strides=(2 * b.itemsize, b.itemsize, b.itemsize),
                   writeable=False)
    return x, b


def _window_stats(b, A, B, c):
    """Exact mean and variance of channel c of the window view: b[j] weighted by the
    number of (a, i) with 2a + c + i == j."""
    j = np.arange(b.size)
    lo = np.maximum(0, -((c + B - 1 - j) // 2))  # ceil((j - c - B + 1) / 2), at least 0
    hi = np.minimum(A - 1, (j - c) // 2)
    w = np.where(j >= c, np.maximum(0, hi - lo + 1), 0).astype(np.float64)
    assert w.sum() == A * B
    v = b.astype(np.float64)
    mean = (w * v).sum() / (A * B)
    return mean, (w * (v - mean) ** 2).sum() / (A * B)


@pytest.mark.parametrize("backend_name", list(SIZES))
def test_moments_beyond_2_31_elements(backend_name):
    if fbn.backends()[backend_name] != "available":
        pytest.skip(f"backend {backend_name!r} is not available")
    A, B = SIZES[backend_name]
    x, b = _window_view(A, B)
    assert x.size > 2**31 and b.nbytes < 2**23
    mean, var = fbn.moments(x, (0, 2), backend=backend_name)
    ulp = 2.0**-23  # float32 results: statistics in float64, rounded once
    for c in range(2):
        emean, evar = _window_stats(b, A, B, c)
        assert abs(mean[c] - emean) <= ulp * abs(emean), (c, mean[c], emean)
        assert abs(var[c] - evar) <= ulp * evar, (c, var[c], evar)
    # a count wrapped to 32 bits, or one window of 2^12 values dropped, moves them more
    emean, evar = _window_stats(b, A - 1, B, 0)
    assert abs(emean - mean[0]) > 4 * ulp * abs(emean) or abs(evar - var[0]) > 4 * ulp * evar


def _available_memory():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["numba", "cython"])
def test_in_place_passes_over_2_31_elements(request, backend_name):
    """float32 x of 2^31 + 18 elements (8.6 GB), written in place: statistics and y on
    both sides of element 2^31."""
    if "slow" not in (request.config.getoption("markexpr") or "") and \
            os.environ.get("FASTBN_TEST_LARGE", "") in ("", "0"):
        pytest.skip("8.6 GB and a minute: run with -m slow or FASTBN_TEST_LARGE=1")
    if fbn.backends()[backend_name] != "available":
        pytest.skip(f"backend {backend_name!r} is not available")
    N = 2**30 + 9
    if _available_memory() < 2 * N * 4 * 1.2:
        pytest.skip("needs ~10 GB of available memory")
    x = np.empty((2, 1, N), np.float32)
    flat = x.reshape(-1)
    period = 1000

    def pattern(start, stop):  # x[k] = (k % 1000) / 8 - 60, exact in float32
        return ((np.arange(start, stop) % period) / 8.0 - 60.0).astype(np.float32)

    step = 1 << 26
    for s in range(0, flat.size, step):
        flat[s:s + step] = pattern(s, min(s + step, flat.size))
    total = flat.size
    counts = np.full(period, total // period, dtype=np.float64)
    counts[: total % period] += 1
    values = np.arange(period) / 8.0 - 60.0
    emean = (counts * values).sum() / total
    evar = (counts * (values - emean) ** 2).sum() / total

    mean, var = fbn.moments(x, (0, 2), backend=backend_name)
    assert abs(mean[0] - emean) <= 1e-6 * abs(emean) and abs(var[0] - evar) <= 1e-6 * evar

    eps = 1e-3
    y, m, inv = fbn.batch_norm_train(x, channel_axis=1, eps=eps, out=x, backend=backend_name)
    assert y is x
    einv = 1 / np.sqrt(evar + eps)
    assert abs(inv[0] - einv) <= 1e-6 * einv
    probes = np.r_[0:5, 2**31 - 5:2**31 + 5, total - 5:total]
    want = (np.array([(k % period) / 8.0 - 60.0 for k in probes]) - emean) * einv
    np.testing.assert_allclose(flat[probes], want, rtol=1e-5, atol=1e-5)

    # and back: batch_norm_infer with the inverse affine map restores x (in place)
    y = fbn.batch_norm_infer(x, np.array([1 / einv], np.float32), np.array([emean], np.float32),
                             np.zeros(1, np.float32), np.array([1.0 - eps], np.float32),
                             channel_axis=1, eps=eps, out=x, backend=backend_name)
    want = np.array([(k % period) / 8.0 - 60.0 for k in probes])
    np.testing.assert_allclose(flat[probes], want, rtol=1e-4, atol=1e-3)

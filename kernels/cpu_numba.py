"""Parallel Numba CPU backend ("numba").

The canonical view ``(outer, C, inner)`` comes in two shapes that need their
own loop nests to vectorise:

* channels-first (``inner > 1``, NCHW): work units are ``(o, c, chunk of
  inner)`` runs of contiguous values; the innermost loop walks ``inner``.
* channels-last (``inner == 1``, NHWC and (N, C)): work units are blocks of
  rows of the ``(outer, C)`` matrix; the innermost loop walks ``C``.

Both split the data into many units rather than one per channel, so C = 1 or
C = 3 still keeps every core busy.  Statistics are one pass per unit in
float64, shifted by one of the unit's own values (see the moments section), and
the units' partial ``(count, mean, m2)`` are merged exactly (_merge_partials):
no E[x^2] - E[x]^2 cancellation, and no shared accumulator is ever written by
two threads.  Elementwise passes evaluate ``q*(x - m) + r`` in float64 and
round once to the output dtype; big float32 outputs are written with streaming
stores (_stream.py), which skip the read of the destination.
"""

import functools
import math

import numba
import numpy as np
from numba import prange

from . import _rowsums, _stream, reference
from ._jit import helper, kernel, run
from ._stream import cast, ld, ldw

NAME = "numba"
FAMILIES = ("numpy",)

# -- tuning constants: all of this backend's, here.  cpu_cython keeps its own; a
# value that differs between the two says why on its "vs cpu_cython" line. -----

#: Values per channels-first work unit (16 KiB of float32): enough units for
#: both cores even at C = 1, few enough partials to merge.  Same as cpu_cython.
CHUNK = 4096
#: Target values per channels-last tile (rows x C).  Statistics are one pass,
#: so tiles need not fit L1; each tile ends in a Chan merge of C values, so
#: larger tiles mean fewer merges (NHWC 103 MB moments: 4.9 ms at 16K, 4.3 ms at 64K).
#: vs cpu_cython (16K): its statistics are two-pass, so a tile must stay in L2.
TILE = 65536
#: Inputs of at least this many values run the parallel kernels, per (op,
#: channels-first?); smaller ones run serially, where a parallel region's thread
#: hand-off costs more than the work.  Measured (float32, C = 64, 2 threads, min
#: of 60 calls of each primitive with SERIAL_BELOW forced to 0 and to 2^62): the
#: smallest power of two where the parallel kernel was >= 1.2x the serial one.  Channels-first
#: (I = 256): moments 2^16 (19 vs 14 us), affine 2^17 (22 vs 15), dy_sums 2^17
#: (37 vs 30); channels-last (N, 64): moments 2^18 (33 vs 25), affine 2^17
#: (31 vs 18), dy_sums 2^18 (63 vs 48).
#: vs cpu_cython (one SERIAL_BELOW = 2^16 for every op): not measured per op there.
#: The fused inference kernel (_infer_small; coefficients in the kernel, no
#: per-call work around it) gains from 2^16 (float32, C = 64, min of 400 calls,
#: serial vs parallel, us): channels-first (I = 64) 2^15 11.9 vs 13.8, 2^16 24.5
#: vs 18.1, 2^17 48.6 vs 33.2; channels-last 2^15 9.3 vs 10.6, 2^16 18.1 vs 14.7.
PARALLEL_FROM = {("moments", True): 1 << 16, ("affine", True): 1 << 17,
                 ("dy_sums", True): 1 << 17, ("moments", False): 1 << 18,
                 ("affine", False): 1 << 17, ("dy_sums", False): 1 << 18,
                 ("infer", True): 1 << 16, ("infer", False): 1 << 16}
#: Set to a number to override PARALLEL_FROM for every op (tests, benchmarks).
SERIAL_BELOW = None
#: Outputs of at least this many bytes are written with streaming stores; smaller
#: ones may still be in cache when they are read next, and streaming would send
#: them to memory.  Measured here (inference, float32, ms, streaming vs ordinary):
#: channels-first 26 MB 0.97 vs 0.67, 51 MB 2.09 vs 1.56, 103 MB 4.4 vs 5.5;
#: channels-last 8 MB 0.36 vs 0.27, 16 MB 0.52 vs 0.65, 26 MB (train) 1.22 vs 1.50.
#: Same values in cpu_cython: the same stores, taken from these measurements.
STREAM_FROM = 64 << 20
STREAM_FROM_CL = 16 << 20
#: Channels-first units per sfence.
STREAM_GROUP = 16
#: Largest input (values) that the fused one-call kernels (:func:`train_small3`,
#: :func:`infer_small3`, :func:`backward_small3`) take.  Below this the work is a
#: few microseconds and the per-call overhead of separate kernels (allocations,
#: dispatch, NumPy on length-C vectors) would dominate.
#: vs cpu_cython (2^15): the channels-last kernel here walks k rows as one wide
#: row (_widen), which kept it fast up to 2^17 values; Cython's does not.
SMALL = 1 << 17
#: Largest C-contiguous input (values) that the fused inference kernel
#: (:func:`infer_small3`, parallel beyond SMALL) takes from the small-call fast
#: lane: it skips ~40 us of per-call Python work (checks, float64 vectors,
#: coefficients in NumPy; measured at (16,64,16,16) float32, 1 MiB, where the
#: kernel is ~50 us).  Below the streaming-store sizes, which stay with affine3.
INFER_MAX = (16 << 20) // 8
#: Largest C-contiguous input (values) that the fast lane hands to the fused
#: entry points (train_small3, backward_small3, infer_small3): they take any size.
FUSED_MAX = 1 << 62
#: Channels-first inputs beyond SMALL run the fused kernels (_train_small,
#: _backward_small) channel by channel in parallel when one channel's slab of the
#: arrays they touch (x, y; x, dy, dx) fits this many bytes: the passes after the
#: first read it from L2 (1 MiB per core here), so memory sees one read of x (and
#: dy) instead of two.  The primitives (moments3, dy_sums3, affine3) read x again.
CHANNEL_SLAB = 512 << 10
#: ... with at least this many channels (fewer would leave threads idle) and
#: this many values per (outer, channel) row (shorter rows vectorise poorly).
CHANNEL_MIN_C = 8
CHANNEL_MIN_I = 16
#: Channel-blocked inputs (see _channel_blocked) of at least this many values
#: run the fused channel-by-channel training and backward kernels in parallel
#: (below SMALL too).  Serial vs parallel, float32, us (train, backward): 2^14
#: (16,16,64) 10.1 vs 10.4, 16.1 vs 13.9; 2^15 (16,32,64) 18.7 vs 14.6, 29.9 vs
#: 20.5; 2^16 (16,64,64) 29 vs 19, 47 vs 28, (4,64,256) 22 vs 17, 42 vs 28; 2^17
#: (32,64,64) 57 vs 40, 99 vs 67.
FUSED_PARALLEL_FROM = 1 << 15
#: Up to SMALL, channels-first inputs with fewer values than this per (outer,
#: channel) run as rows of C*I values (the row form, as channels-last; see
#: _train_rows) if they have at least 2*I rows (O): the row form costs a few
#: per-column tables, which O rows must repay.  Serial, float32, channel by
#: channel vs rows, us (train, backward): (64, 16, 4) 9.2 vs 3.8, 13.5 vs 4.7;
#: (128, 32, 16) 55 vs 33, 73 vs 43; (32, 16, 16) even; (8, 32, 16) 5.2 vs 10.2,
#: 5.6 vs 11.3; (16, 64, 32) 19 vs 40; (64, 32, 64) 57 vs 93, 94 vs 125.
ROW_FORM_I = 32
#: Row-form inputs (see _train_rows) of at least this many values run each pass in
#: ROWS_BLOCKS_PER_THREAD blocks of wide rows per thread, in parallel (see
#: _row_blocks), blocks of at least ROWS_MIN_BLOCK wide rows.  Two blocks per
#: thread: a thread that wakes late is made up for by its partner (2 threads,
#: float32, train / moments, us, serial vs 1, 2, 4 blocks per thread: (8192, 16)
#: 42 / 19 vs 45 / 20, 34 / 15, 27 / 13; (1000, 64) 23 / 10 vs 25 / 11, 21 / 12,
#: 17 / 8.5; (2500, 30) 24 / 10 vs 27 / 11, 21 / 13, 21 / 12; (256, 128) 12.5 / 5.6
#: vs 15 / 7.1, -, 14 / 7.5).  Public calls, serial vs 2 blocks per thread, min /
#: median of 1000, interleaved: the backward gains from 2^16 values ((1024, 64)
#: 34.0/38.7 vs 26.5/32.9, (256, 256) 31.8/35.3 vs 27.8/32.3; (700, 33, 2) even);
#: the training forward only in min time there ((1024, 64) 24.4/26.1 vs
#: 21.3/25.8, (256, 256) 24.8/26.3 vs 24.1/28.0), clearly at 2^17 ((8192, 16)
#: 42.1/50.9 vs 31.8/39.6).
ROWS_PARALLEL_FROM = {"train": 96 << 10, "backward": 48 << 10}
ROWS_BLOCKS_PER_THREAD = 2
ROWS_MIN_BLOCK = 8
ROWS_MIN_VALUES = 8 << 10
#: train_small3 writes mean_out/invstd_out of any float dtype, float64 included
#: (the float64 values it computed; fastbn.layer.train_forward_f64).
F64_STATS = True
#: float32 inference (the fused kernel, infer_small3, up to INFER_MAX) in float32
#: arithmetic: y = fma(q, x - m, r) with q, r rounded from core's float64 values
#: and the mean's own rounding folded into r.  x - m is exact where x is within
#: 2x of m (Sterbenz) and rounded once otherwise, so y is within ~2 float32 ulps
#: of |q*(x - m)| + |r| of the float64 result, accurate at large means (PyTorch's
#: x*q + (r - m*q) is not).  The float64 form (rounded once) converts every
#: value both ways.  Measured (public call, out= given, 2 threads, min of 400,
#: float64 vs float32 arithmetic, interleaved): NCHW (16,64,8,8) 46.2 vs 43.1 us,
#: (32,128,16,16) 206 vs 158 us; NHWC (32,16,16,128) 251 vs 169 us; (512,512)
#: 85 vs 71 us.  Off by default: where y is small against q*(x - m) and r
#: (cancellation with the offset) the error, a few ulps of those terms, exceeds
#: the ~1 ulp of y that the property suite holds inference to (found by
#: tests/test_properties.py: 3.7e-8 off at y = 0.00996).  True: the fused
#: kernel computes float32 data in float32 (tests/test_fastlane.py checks it).
INFER_F32 = False
#: dtypes of x that the fused small kernels take (float16 as its bits, see _bits).
SMALL_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _parallel(op, x3):
    """Run ``op`` on x3 (O, C, I) with the parallel kernels?"""
    limit = SERIAL_BELOW if SERIAL_BELOW is not None else PARALLEL_FROM[op, x3.shape[2] > 1]
    return x3.size >= limit


# -- moments ------------------------------------------------------------------
# Each chunk is summed in one pass as d = x - x0, shifted by one of its own
# values x0, in float64: m2 = sum(d^2) - sum(d)^2/n.  As x0 is a sample,
# |x0 - mean| <= std*sqrt(n - 1) (Samuelson), so the cancellation costs at most
# ~n ulps of m2 -- 4e-13 relative for 4096-value chunks, whatever the offset --
# and a constant chunk gives exactly mean = x0, m2 = 0.  One pass with two
# independent accumulators instead of two dependent passes.

@helper
def _shift(v):
    """The chunk's shift: its first value, or 0 if that is inf/NaN (inf - inf
    would turn an infinite mean into NaN; NaN propagates through the sums anyway)."""
    v = ld(v)
    return v if np.isfinite(v) else 0.0


@helper
def _shifted_moments(x0, s, q, n):
    """(mean, m2) of n values from the shifted sums s = sum(x - x0), q = sum((x - x0)^2).

    q = inf with a finite s is finite data whose squares overflow (values near
    1e300): m2 = inf, as NumPy's var, not inf - inf."""
    m2 = q - s * (s / n)
    if np.isfinite(q):
        m2 = max(m2, 0.0)
    elif np.isfinite(s):
        m2 = q
    return x0 + s / n, m2


@helper
def _invstd(var, eps):
    """1/sqrt(var + eps), and 0 where var + eps == 0 (a constant channel with
    eps = 0: PyTorch's rule, so y = offset, not NaN)."""
    v = var + eps
    return 0.0 if v == 0.0 else 1.0 / np.sqrt(v)


@helper
def _unit(t, nk, C, I, chunk):
    """Work unit t of a channels-first pass, in memory order: (o, c, i0, i1)
    for the run x[o, c, i0:i1]; nk = chunks per (o, c) run of length I."""
    k = t % nk
    oc = t // nk
    i0 = k * chunk
    return oc // C, oc % C, i0, min(i0 + chunk, I)


@kernel
def _moments_cf(x, chunk, pmean, pm2):
    """x (O, C, I): one-pass shifted moments of each chunk -> pmean/pm2[o*nk + k, c]."""
    O, C, I = x.shape
    nk = (I + chunk - 1) // chunk
    for t in prange(O * C * nk):
        o, c, i0, i1 = _unit(t, nk, C, I, chunk)
        xs = x[o, c, i0:i1]  # 1-D runs vectorise; 3-D indexing here did not (4x slower)
        x0 = _shift(xs[0])
        s = 0.0
        q = 0.0
        for i in range(xs.size):
            d = ld(xs[i]) - x0
            s += d
            q += d * d
        pmean[o * nk + t % nk, c], pm2[o * nk + t % nk, c] = _shifted_moments(x0, s, q, xs.size)


@helper
def _shifted_row_sums(x, r0, r1, shift, s, q):
    """s[j] += sum(x[r, j] - shift[j]), q[j] += sum((x[r, j] - shift[j])^2) over rows
    r0 <= r < r1 of a 2-D x.  Four rows per sweep: the float64 accumulators live
    in memory (a row may be any length), so each sweep's loads and stores of s
    and q are shared by four rows of data (L2-resident (n, 64..1024) blocks: 2x)."""
    W = x.shape[1]
    r = r0
    while r + 4 <= r1:
        x0 = x[r]
        x1 = x[r + 1]
        x2 = x[r + 2]
        x3 = x[r + 3]
        for j in range(W):
            sh = shift[j]
            d0 = ld(x0[j]) - sh
            d1 = ld(x1[j]) - sh
            d2 = ld(x2[j]) - sh
            d3 = ld(x3[j]) - sh
            s[j] += (d0 + d1) + (d2 + d3)
            q[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += 4
    for r in range(r, r1):
        xr = x[r]
        for j in range(W):
            d = ld(xr[j]) - shift[j]
            s[j] += d
            q[j] += d * d


@kernel
def _moments_cl(x, rows, tpu, pmean, pm2, scratch, groups):
    """x (R, C): unit u merges row tiles [u*tpu, (u+1)*tpu) -> pmean/pm2[u, :].

    groups: _rowsums.groups(C, x) -- 1..4 sums each tile with the register
    kernel for that row width, 0 with _shifted_row_sums.

    scratch (U, 3, C) holds each unit's current tile mean, m2 and shift.
    """
    R, C = x.shape
    U = pmean.shape[0]
    ntiles = (R + rows - 1) // rows
    for u in prange(U):
        tm = scratch[u, 0]
        tq = scratch[u, 1]
        ts = scratch[u, 2]
        for c in range(C):
            pmean[u, c] = 0.0
            pm2[u, c] = 0.0
        n_acc = 0.0
        for t in range(u * tpu, min((u + 1) * tpu, ntiles)):
            r0 = t * rows
            r1 = min(r0 + rows, R)
            nb = np.float64(r1 - r0)
            x0 = x[r0]
            for c in range(C):
                ts[c] = _shift(x0[c])
                tm[c] = 0.0
                tq[c] = 0.0
            if groups == 4:
                _rowsums.row_sums4(x, r0, r1, ts, tm, tq)
            elif groups == 3:
                _rowsums.row_sums3(x, r0, r1, ts, tm, tq)
            elif groups == 2:
                _rowsums.row_sums2(x, r0, r1, ts, tm, tq)
            elif groups == 1:
                _rowsums.row_sums1(x, r0, r1, ts, tm, tq)
            else:
                _shifted_row_sums(x, r0, r1, ts, tm, tq)
            for c in range(C):
                tm[c], tq[c] = _shifted_moments(ts[c], tm[c], tq[c], nb)
            n = n_acc + nb
            frac = nb / n
            um = pmean[u]
            uq = pm2[u]
            if n_acc == 0.0:  # the first tile: delta^2 * 0 is NaN for means near 1e308
                for c in range(C):
                    um[c] = tm[c]
                    uq[c] = tq[c]
                n_acc = nb
                continue
            for c in range(C):
                delta = tm[c] - um[c]
                uq[c] += tq[c] + delta * delta * n_acc * frac
                if np.isfinite(delta):
                    um[c] += delta * frac
                else:  # an inf mean: inf - inf would give NaN where NumPy gives inf
                    um[c] = um[c] * (1.0 - frac) + tm[c] * frac
            n_acc = n


@kernel
def _merge_partials(pmean, pm2, counts, mean, m2):
    """_merge for a kernel's partials (see _merge)."""
    _merge(pmean, pm2, counts, mean, m2)


@helper
def _unit_rows(u, tpu, rows, R):
    """(r0, r1): the rows of an (R, C) matrix that unit u covers in the channels-last
    kernels, tpu tiles of ``rows`` rows each (see _cl_units)."""
    return u * tpu * rows, min((u + 1) * tpu * rows, R)


@kernel
def _merge_cl(pmean, pm2, rows, tpu, R, mean, m2):
    """_merge for _moments_cl's partials: unit u covers rows [u*tpu*rows,
    min((u+1)*tpu*rows, R)).  The counts computed here, not in NumPy: four small
    array operations right after the parallel kernel cost ~15 us of a 1 MB call."""
    U = pmean.shape[0]
    counts = np.empty(U)
    for u in range(U):
        r0, r1 = _unit_rows(u, tpu, rows, R)
        counts[u] = r1 - r0
    _merge(pmean, pm2, counts, mean, m2)


@helper
def _merge(pmean, pm2, counts, mean, m2):
    """Merge partials pmean/pm2 (U, C) with counts (U,) -> mean, m2 (C,).

    Two vectorised sweeps over units instead of U-1 Chan merges per channel
    (each with a division; (4096, 1024): 0.2 of 0.6 ms): mean = s + sum(w_u *
    (mean_u - s)), w_u = n_u / n, shifted by the first unit's mean s so that a
    constant channel stays exact; then m2 = sum(m2_u + n_u*(mean_u - mean)^2).
    An inf unit mean gives an inf mean (NaN for +inf and -inf) and a NaN m2, as NumPy."""
    U, C = pmean.shape
    n = 0.0
    for u in range(U):
        n += counts[u]
    s = np.empty(C)
    for c in range(C):
        s[c] = _shift(pmean[0, c])
        mean[c] = 0.0
        m2[c] = 0.0
    for u in range(U):
        w = counts[u] / n
        pu = pmean[u]
        for c in range(C):
            mean[c] += w * (pu[c] - s[c])
    for c in range(C):
        mean[c] += s[c]
    for u in range(U):
        nu = counts[u]
        pu = pmean[u]
        qu = pm2[u]
        for c in range(C):
            d = pu[c] - mean[c]
            m2[c] += qu[c] + nu * d * d


def _cf_units(shape3):
    O, C, I = shape3
    nk = (I + CHUNK - 1) // CHUNK
    counts = np.full(nk, float(CHUNK))
    counts[-1] = I - (nk - 1) * CHUNK
    return nk, np.tile(counts, O)


def _cl_units(R, C, parallel):
    """(rows per tile, tiles per unit, number of units) for an (R, C) matrix."""
    # >= 64 rows: each tile ends in a Chan merge of C values, so wide C needs
    # tall tiles ((4096, 1024): 16-row tiles 3.4 ms, 64-row tiles 1.2 ms).
    rows = max(1, min(R, max(64, TILE // max(C, 1))))
    ntiles = (R + rows - 1) // rows
    units = min(ntiles, 64) if parallel else 1
    tpu = (ntiles + units - 1) // units
    return rows, tpu, (ntiles + tpu - 1) // tpu


def _bits(a):
    """Numba has no CPU float16 type: float16 arrays go in as their uint16 bits (a
    view, no copy), converted per element by _stream.ld / _stream.cast."""
    return a.view(np.uint16) if a is not None and a.dtype == np.float16 else a


def moments3(x3):
    """(outer, C, inner) -> per-channel (mean, m2), float64."""
    x3 = _bits(x3)
    O, C, I = x3.shape
    par = _parallel("moments", x3)
    if I > 1:
        nk, counts = _cf_units(x3.shape)
        pmean = np.empty((O * nk, C))
        pm2 = np.empty((O * nk, C))
        run(_moments_cf, par, x3, CHUNK, pmean, pm2)
    else:
        x2 = x3[:, :, 0]
        rows, tpu, units = _cl_units(O, C, par)
        pmean = np.empty((units, C))
        pm2 = np.empty((units, C))
        run(_moments_cl, par, x2, rows, tpu, pmean, pm2, np.empty((units, 3, C)),
            _rowsums.groups(C, x2))
    mean = np.empty(C)
    m2 = np.empty(C)
    if I > 1:
        _merge_partials.serial(pmean, pm2, counts, mean, m2)
    else:
        _merge_cl.serial(pmean, pm2, rows, tpu, O, mean, m2)
    if x3.dtype == np.float64:
        _m2_about_mean(x3, mean, m2)
    return mean, m2


def _m2_about_mean(x3, mean, m2):
    """Where the shifted sums overflowed (float64 data within ~30x of the largest
    float: ``sum((x - x0)**2)`` exceeds it while ``m2 = sum((x - mean)**2)`` need
    not), recompute m2 in two passes about the mean.  Rare: a cheap test per
    call, a second read of those channels only."""
    bad = ~np.isfinite(m2) & np.isfinite(mean)
    if bad.any():   # two passes, shifted by a value of the channel (the reference's way)
        with np.errstate(over="ignore"):
            m2[bad] = reference.moments3(x3[:, bad, :])[1]


# -- elementwise: out = q*(x - m) + r (+ p*u) ---------------------------------

@kernel
def _affine_cf(x, m, q, r, out, u, p, chunk):
    O, C, I = x.shape
    nk = (I + chunk - 1) // chunk
    for t in prange(O * C * nk):
        o, c, i0, i1 = _unit(t, nk, C, I, chunk)
        mc = m[c]
        qc = q[c]
        rc = r[c]
        xs = x[o, c, i0:i1]
        ys = out[o, c, i0:i1]
        if u is None:
            for i in range(xs.size):
                ys[i] = cast(qc * (ld(xs[i]) - mc) + rc, ys)
        else:
            pc = p[c]
            us = u[o, c, i0:i1]
            for i in range(xs.size):
                ys[i] = cast(qc * (ld(xs[i]) - mc) + rc + pc * ld(us[i]), ys)


@kernel
def _affine_cl(x, m, q, r, out, u, p):
    R, C = x.shape
    for row in prange(R):
        xr = x[row]
        yr = out[row]
        if u is None:
            for c in range(C):
                yr[c] = cast(q[c] * (ld(xr[c]) - m[c]) + r[c], yr)
        else:
            ur = u[row]
            for c in range(C):
                yr[c] = cast(q[c] * (ld(xr[c]) - m[c]) + r[c] + p[c] * ld(ur[c]), yr)


# Streaming-store variants (see _stream): float32 output.

@helper
def _stream_run(x, y, u, mt, qt, rt, pt, P, f0, f1):
    """y[f] = qt[k]*(x[f] - mt[k]) + rt[k] (+ pt[k]*u[f]), k = f % P, for f0 <= f < f1 of
    flat contiguous float32 arrays: ordinary stores up to y's next line, streaming
    stores for whole lines, ordinary stores for the rest."""
    a = f0 + min(_stream.lead(y, f0), f1 - f0)
    nv = (f1 - a) // _stream.V
    k = f0 % P
    for f in range(f0, a):
        y[f] = (qt[k] * (np.float64(x[f]) - mt[k]) + rt[k]
                + (0.0 if u is None else pt[k] * np.float64(u[f])))
        k = k + 1 if k + 1 < P else 0
    _stream.stream_fma(x, y, u, mt, qt, rt, pt, P, a, nv, k)
    k = (k + nv * _stream.V) % P
    for f in range(a + nv * _stream.V, f1):
        y[f] = (qt[k] * (np.float64(x[f]) - mt[k]) + rt[k]
                + (0.0 if u is None else pt[k] * np.float64(u[f])))
        k = k + 1 if k + 1 < P else 0


@kernel
def _affine_cf_stream(x, out, u, mt, qt, rt, pt, chunk, group):
    """Channels-first runs; mt/qt/rt/pt (C, 2V): per channel, period V."""
    O, C, I = x.shape
    nk = (I + chunk - 1) // chunk
    units = O * C * nk
    for g in prange((units + group - 1) // group):  # one fence per group of units
        for t in range(g * group, min(units, (g + 1) * group)):
            o, c, i0, i1 = _unit(t, nk, C, I, chunk)
            if u is None:
                _stream_run(x[o, c], out[o, c], None, mt[c], qt[c], rt[c], pt[c], _stream.V, i0, i1)
            else:
                _stream_run(x[o, c], out[o, c], u[o, c], mt[c], qt[c], rt[c], pt[c], _stream.V,
                            i0, i1)
        _stream.fence()


@kernel
def _affine_flat_stream(x, out, u, mt, qt, rt, pt, P, block):
    """A C-contiguous (R, C) matrix as flat arrays, in blocks of ``block`` values."""
    n = x.size
    for b in prange((n + block - 1) // block):
        _stream_run(x, out, u, mt, qt, rt, pt, P, b * block, min(n, (b + 1) * block))
        _stream.fence()


#: Public name of the flat streaming kernel (a Kernel: ``.serial``/``.parallel``), for
#: benchmarks that time the streaming store alone.  Arguments as _affine_flat_stream.
affine_flat_stream = _affine_flat_stream


def _streamable(out3, *arrays):
    """Streaming stores apply: float32, big, x86, and unit stride along the runs."""
    big = out3.nbytes >= (STREAM_FROM if out3.shape[2] > 1 else STREAM_FROM_CL)
    if out3.dtype != np.float32 or not big or not _stream.AVAILABLE:
        return False
    if out3.shape[2] > 1:
        return all(a is None or a.strides[2] == 4 for a in (out3,) + arrays)
    return all(a is None or a[:, :, 0].flags.c_contiguous for a in (out3,) + arrays)


def _affine_stream(x3, m, q, r, out3, u3, p, par):
    """affine3 with streaming stores (float32 out3, see _streamable)."""
    C = x3.shape[1]
    p = q if p is None else p  # unused when u3 is None; the kernel wants an array
    if x3.shape[2] > 1:
        mt, qt, rt, pt = (np.repeat(v[:, None], 2 * _stream.V, axis=1) for v in (m, q, r, p))
        run(_affine_cf_stream, par, x3, out3, u3, mt, qt, rt, pt, CHUNK, STREAM_GROUP)
    else:
        P = _stream.period(C)
        mt, qt, rt, pt = _stream.tables([m, q, r, p], P)
        flat = lambda a: None if a is None else a.reshape(-1)  # noqa: E731  (views: C-contiguous)
        run(_affine_flat_stream, par, flat(x3), flat(out3), flat(u3), mt, qt, rt, pt, P, TILE)


def affine3(x3, m, q, r, out3, u3=None, p=None):
    """out3 = q*(x3 - m) + r (+ p*u3) per channel, in float64; out3 may be x3."""
    dst = _bits(out3)
    x3, u3 = _bits(x3), _bits(u3)
    par = _parallel("affine", x3)
    if _streamable(dst, x3, u3):
        _affine_stream(x3, m, q, r, dst, u3, p, par)
    elif x3.shape[2] > 1:
        run(_affine_cf, par, x3, m, q, r, dst, u3, p, CHUNK)
    else:
        run(_affine_cl, par, x3[:, :, 0], m, q, r, dst[:, :, 0],
            None if u3 is None else u3[:, :, 0], p)
    return out3


# -- backward sums: sum(dy), sum(dy*(x - m)) ----------------------------------

@kernel
def _dy_sums_cf(dy, x, m, chunk, p1, p2):
    O, C, I = x.shape
    nk = (I + chunk - 1) // chunk
    for t in prange(O * C * nk):
        o, c, i0, i1 = _unit(t, nk, C, I, chunk)
        mc = m[c]
        gs = dy[o, c, i0:i1]
        xs = x[o, c, i0:i1]
        s1 = 0.0
        s2 = 0.0
        for i in range(xs.size):
            g = ld(gs[i])
            s1 += g
            s2 += g * (ld(xs[i]) - mc)
        p1[c, o * nk + t % nk] = s1
        p2[c, o * nk + t % nk] = s2


@helper
def _dy_row_sums(dy, x, m, r0, r1, s1, s2):
    """s1[j] += sum(dy[r, j]), s2[j] += sum(dy[r, j] * (x[r, j] - m[j])) over rows
    r0 <= r < r1; four rows per sweep, as in _shifted_row_sums."""
    W = x.shape[1]
    r = r0
    while r + 4 <= r1:
        g0 = dy[r]
        g1 = dy[r + 1]
        g2 = dy[r + 2]
        g3 = dy[r + 3]
        x0 = x[r]
        x1 = x[r + 1]
        x2 = x[r + 2]
        x3 = x[r + 3]
        for j in range(W):
            mj = m[j]
            a0 = ld(g0[j])
            a1 = ld(g1[j])
            a2 = ld(g2[j])
            a3 = ld(g3[j])
            s1[j] += (a0 + a1) + (a2 + a3)
            s2[j] += ((a0 * (ld(x0[j]) - mj) + a1 * (ld(x1[j]) - mj))
                      + (a2 * (ld(x2[j]) - mj) + a3 * (ld(x3[j]) - mj)))
        r += 4
    for r in range(r, r1):
        gr = dy[r]
        xr = x[r]
        for j in range(W):
            g = ld(gr[j])
            s1[j] += g
            s2[j] += g * (ld(xr[j]) - m[j])


@kernel
def _dy_sums_cl(dy, x, m, tpu, rows, p1, p2, s1, s2):
    """Unit u's sums into p1/p2[u] (U, C), then their totals into s1/s2 (C,), units in
    order (here, not in NumPy: two reductions after the parallel loop cost ~10 us
    of a 1 MB call)."""
    R, C = x.shape
    U = p1.shape[0]
    for u in prange(U):
        for c in range(C):
            p1[u, c] = 0.0
            p2[u, c] = 0.0
        r0, r1 = _unit_rows(u, tpu, rows, R)
        _dy_row_sums(dy, x, m, r0, r1, p1[u], p2[u])
    for c in range(C):
        s1[c] = 0.0
        s2[c] = 0.0
    for u in range(U):
        for c in range(C):
            s1[c] += p1[u, c]
            s2[c] += p2[u, c]


def dy_sums3(dy3, x3, m):
    """Per-channel (sum(dy), sum(dy*(x - m))), float64."""
    dy3, x3 = _bits(dy3), _bits(x3)
    O, C, I = x3.shape
    par = _parallel("dy_sums", x3)
    if I > 1:
        nk = (I + CHUNK - 1) // CHUNK   # chunks per run (the counts are not needed here)
        p1 = np.empty((C, O * nk))
        p2 = np.empty((C, O * nk))
        run(_dy_sums_cf, par, dy3, x3, m, CHUNK, p1, p2)
        return p1.sum(axis=1), p2.sum(axis=1)
    rows, tpu, units = _cl_units(O, C, par)
    p1 = np.empty((units, C))
    p2 = np.empty((units, C))
    s1 = np.empty(C)
    s2 = np.empty(C)
    run(_dy_sums_cl, par, dy3[:, :, 0], x3[:, :, 0], m, tpu, rows, p1, p2, s1, s2)
    return s1, s2


# -- per-channel formulas of fastbn.core, compiled once for every fused path -----

@helper
def _train_channel(c, mu, m2, n, eps, scale, offset, mean_out, invstd_out):
    """core.train_coefficients for channel c (mean mu, m2 over n values): writes the
    returned mean/invstd, gives (q, r) of y = q*(x - mu) + r."""
    inv = _invstd(m2 / n, eps)
    mean_out[c] = mu
    invstd_out[c] = inv
    return (inv if scale is None else np.float64(scale[c]) * inv,
            0.0 if offset is None else np.float64(offset[c]))


@helper
def _running_channel(c, mu, m2, n, momentum, rm, rv):
    """core.running_update for channel c, in place, rounded once (unbiased variance)."""
    if rm is not None:
        rm[c] = (1.0 - momentum) * np.float64(rm[c]) + momentum * mu
    if rv is not None:
        rv[c] = (1.0 - momentum) * np.float64(rv[c]) + momentum * (m2 / (n - 1.0))


@helper
def _infer_coefficients(scale, offset, mean, var, eps, m, q, r):
    """core.infer_coefficients into q, r (and the mean as float64 into m)."""
    for c in range(m.size):
        inv = 1.0 / np.sqrt(np.float64(var[c]) + eps)
        q[c] = inv if scale is None else np.float64(scale[c]) * inv
        r[c] = 0.0 if offset is None else np.float64(offset[c])
        m[c] = mean[c]


@helper
def _backward_channel(c, s1, s2, n, scale, invstd, frozen, eps, dscale_out, doffset_out):
    """core.gradient_sums + core.backward_coefficients for channel c (sums s1 of dy,
    s2 of dy*(x - mean), n > 0): writes dscale/doffset, gives (a, b, cc) of
    dx = b*(x - m) + cc + a*dy.  ``frozen``: the eval-mode backward instead
    (core.infer_backward_coefficients): ``invstd`` holds the running variance,
    inv = 1/sqrt(var + eps), and dx = a*dy (b = cc = 0).  A runtime flag, not a
    kernel of its own: both share one compiled kernel per signature."""
    inv = 1.0 / np.sqrt(np.float64(invstd[c]) + eps) if frozen else np.float64(invstd[c])
    dscale = s2 * inv
    a = inv if scale is None else np.float64(scale[c]) * inv
    dscale_out[c] = dscale
    doffset_out[c] = s1
    if frozen:
        return a, 0.0, 0.0
    return a, -a * inv * dscale / n, -a * s1 / n


@helper
def _backward_coefficients(s1, s2, n, scale, invstd, frozen, eps, a, b, cc, dscale_out,
                           doffset_out):
    """_backward_channel for every channel, into a, b, cc."""
    for c in range(s1.size):
        a[c], b[c], cc[c] = _backward_channel(c, s1[c], s2[c], n, scale, invstd, frozen, eps,
                                              dscale_out, doffset_out)


# -- small inputs: the whole training forward in one serial call --------------

@helper
def _channel_moments(x, c):
    """(mean, m2) of channel c of x (O, C, I): one pass shifted by one of the
    channel's values (see _shift: a constant channel gets its mean exactly), and a
    second about the mean where the shifted sum overflowed (see _m2_about_mean)."""
    O, C, I = x.shape
    n = O * I
    x0 = _shift(x[0, c, 0])
    s = 0.0
    q = 0.0
    for o in range(O):
        xs = x[o, c]
        for i in range(I):
            d = ld(xs[i]) - x0
            s += d
            q += d * d
    mu, m2 = _shifted_moments(x0, s, q, n)
    if not np.isfinite(m2) and np.isfinite(mu):
        # deviations from the shift (mu is rounded at |x0|)
        md = s / n
        m2 = 0.0
        for o in range(O):
            xs = x[o, c]
            for i in range(I):
                d = (ld(xs[i]) - x0) - md
                m2 += d * d
    return mu, m2


@kernel
def _moments_small(x, ddof, mean_out, var_out):
    """Per-channel mean and variance m2 / (n - ddof) (into arrays of any float
    dtype, rounded once), channel by channel (see _channel_moments)."""
    n = x.shape[0] * x.shape[2]
    for c in prange(x.shape[1]):
        mu, m2 = _channel_moments(x, c)
        mean_out[c] = mu
        var_out[c] = m2 / (n - ddof)


@kernel
def _train_small(x, scale, offset, eps, momentum, rm, rv, out, mean_out, invstd_out):
    """Channels-first training forward, channel by channel: statistics in one pass
    shifted by one of the channel's values (see _shift: a constant channel gets
    its mean exactly), then the output; the second pass finds the channel's slab
    in L2 (see CHANNEL_SLAB)."""
    O, C, I = x.shape
    n = O * I
    for c in prange(C):
        mu, m2 = _channel_moments(x, c)
        a, b = _train_channel(c, mu, m2, n, eps, scale, offset, mean_out, invstd_out)
        for o in range(O):
            xs = x[o, c]
            ys = out[o, c]
            for i in range(I):
                ys[i] = cast(a * (ld(xs[i]) - mu) + b, ys)
        _running_channel(c, mu, m2, n, momentum, rm, rv)


@helper
def _row_block(x2, k, nb, t, part):
    """(v, r0, r1): the rows r0 <= r < r1 of the 2-D view v that part ``part`` of
    task t of nb covers in the row form of x2 (R, C*I), k rows per wide row (see
    _train_rows).  Part 0: block t of the wide rows (v: x2 seen as R // k rows of
    k*C*I values, so the inner loops are long and a multiple of the vector width
    even for C*I = 4, see _widen).  Part 1, of the last task only (see
    _row_parts): the rows left over (v: x2 itself; such a row reads the first
    C*I entries of a wide row's tables, the same channels).  Kernels loop over
    tasks and parts with one call of each row loop: every loop inlined once
    (two call sites doubled the compile time)."""
    R, CI = x2.shape
    nw = R // k
    if part == 0:
        return x2[:nw * k].reshape(nw, k * CI), t * nw // nb, (t + 1) * nw // nb
    return x2, nw * k, R


@helper
def _row_parts(t, nb):
    """Parts of task t of nb (see _row_block): the last task also takes the rows
    left over (a task of their own would share a thread with a block)."""
    return 2 if t == nb - 1 else 1


@helper
def _row_shift(x2, C, I):
    """(C,) float64: each channel's shift (see _shift), its value in x2's first row."""
    shift = np.empty(C)
    for c in range(C):
        shift[c] = _shift(x2[0, c * I])
    return shift


@helper
def _zero(a):
    """a[:] = 0 for a 1-D a, as a loop (an array expression is a parallel region of
    its own in a parallel kernel)."""
    for j in range(a.size):
        a[j] = 0.0


@helper
def _task_sums(nb, W):
    """(2, nb, >= W) float64: two sums per column for each of nb tasks, each task's
    rows 64 bytes apart, so that no cache line holds two tasks' sums (the
    accumulators are in memory, see _shifted_row_sums: a shared line cost the
    parallel form its gain, (8192, 16) 2 blocks 26 us vs 1 block 21)."""
    return np.empty((2, nb, W + (-W) % 8 + 8))


@helper
def _summed(p, C, I):
    """(C,) float64 per-channel totals of the tasks' per-column sums p (nb, W),
    tasks in order (see _row_block, _folded)."""
    for t in range(1, p.shape[0]):
        for j in range(p.shape[1]):
            p[0, j] += p[t, j]
    return _folded(p[0], C, I)


@helper
def _tile_into(v, I, t):
    """t[j] = v[(j // I) % C] for the (C,) vector v: its values along a row of the row
    form (see _train_rows), whose column j is channel (j // I) % C.  Counters, not
    that division (~30 cycles a value)."""
    C = v.size
    c = 0
    i = 0
    for j in range(t.size):
        t[j] = v[c]
        i += 1
        if i == I:
            i = 0
            c = c + 1 if c + 1 < C else 0
    return t


@helper
def _tiled(v, W, I):
    """(W,) float64: _tile_into a new array."""
    return _tile_into(v, I, np.empty(W))


@helper
def _folded(w, C, I):
    """(C,) float64 per-channel sums of a row's per-column sums w (see _tile_into)."""
    v = np.zeros(C)
    c = 0
    i = 0
    for j in range(w.size):
        v[c] += w[j]
        i += 1
        if i == I:
            i = 0
            c = c + 1 if c + 1 < C else 0
    return v


@helper
def _affine_rows(x, m, a, b, out):
    """out[r, j] = a[j] * (x[r, j] - m[j]) + b[j] over a 2-D x (float64, rounded once)."""
    for r in range(x.shape[0]):
        xr = x[r]
        yr = out[r]
        for j in range(x.shape[1]):
            yr[j] = cast(a[j] * (ld(xr[j]) - m[j]) + b[j], yr)


@helper
def _dx_rows(dy, x, m, a, b, cc, out):
    """out[r, j] = b[j] * (x[r, j] - m[j]) + cc[j] + a[j] * dy[r, j] over a 2-D x: the
    backward's dx (float64, rounded once)."""
    for r in range(x.shape[0]):
        xr = x[r]
        dr = dy[r]
        yr = out[r]
        for j in range(x.shape[1]):
            yr[j] = cast(b[j] * (ld(xr[j]) - m[j]) + cc[j] + a[j] * ld(dr[j]), yr)


@helper
def _rows_moments(x2, I, shift, sw, qw, mu, m2):
    """Per-channel mean and m2 (into the (C,) mu, m2) of x2 (R, C*I) in the row form
    from the tasks' sums sw/qw (nb, W) of x - shift and its square (see
    _row_block; shift: each channel's value in the first row, see _row_shift), and
    a second pass about the mean for a channel whose shifted sum overflowed (see
    _m2_about_mean).  Every task is shifted by the same values, so their sums
    simply add."""
    R = x2.shape[0]
    C = mu.size
    n = R * I
    s, q = _summed(sw, C, I), _summed(qw, C, I)
    for c in range(C):
        mu[c], m2[c] = _shifted_moments(shift[c], s[c], q[c], n)
        if not np.isfinite(m2[c]) and np.isfinite(mu[c]):
            # deviations from the shift (the mean itself is rounded at |x0|)
            md = s[c] / n
            t = 0.0
            for r in range(R):
                for i in range(c * I, (c + 1) * I):
                    d = (ld(x2[r, i]) - shift[c]) - md
                    t += d * d
            m2[c] = t


@kernel
def _moments_rows(x3, k, ddof, mean_out, var_out):
    """_moments_small for a C-contiguous x3 (R, C, I) in the row form (see
    _train_rows, _row_form): its statistics pass, as one block (run serially:
    blocks gained nothing for one pass below SMALL, (8192, 16) 19 vs 13 us,
    (2500, 30) 10 vs 12, (1000, 64) even)."""
    R, C, I = x3.shape
    x2 = x3.reshape(R, C * I)
    W = k * C * I
    shift = _row_shift(x2, C, I)
    sh = _tiled(shift, W, I)
    sq = np.zeros((2, 1, W))
    for part in range(2):
        v, r0, r1 = _row_block(x2, k, 1, 0, part)
        _shifted_row_sums(v, r0, r1, sh, sq[0, 0], sq[1, 0])
    mu = np.empty(C)
    m2 = np.empty(C)
    _rows_moments(x2, I, shift, sq[0], sq[1], mu, m2)
    for c in range(C):
        mean_out[c] = mu[c]
        var_out[c] = m2[c] / (R * I - ddof)


@kernel
def _train_rows(x3, k, nb, scale, offset, eps, momentum, rm, rv, out3, mean_out, invstd_out):
    """The training forward in the row form: x3/out3 (R, C, I), C-contiguous, as R rows
    of C*I values, k rows per wide row (see _row_block, _widen) -- reshaped here,
    where it is free, not in Python (~1 us of a 6 us call).  For channels-last
    (I = 1) and channels-first with short I (see ROW_FORM_I), whose
    channel-by-channel loops (_train_small) would be a few values long.  Both
    passes in nb blocks of wide rows (parallel in .parallel, see _row_blocks).

    Statistics in one pass, shifted by a value of each channel in the first row
    (see _shift): the second read of a 300 KB MLP batch cost as much as the rest."""
    R, C, I = x3.shape
    CI = C * I
    W = k * CI
    n = R * I
    x2 = x3.reshape(R, CI)
    y2 = out3.reshape(R, CI)
    shift = _row_shift(x2, C, I)
    t4 = np.empty((4, W))   # shift, then mean, a, b along a wide row (one allocation)
    _tile_into(shift, I, t4[0])
    sq = _task_sums(nb, W)
    for t in prange(nb):
        _zero(sq[0, t])
        _zero(sq[1, t])
        for part in range(_row_parts(t, nb)):
            v, r0, r1 = _row_block(x2, k, nb, t, part)
            _shifted_row_sums(v, r0, r1, t4[0], sq[0, t], sq[1, t])
    abm = np.empty((4, C))
    _rows_moments(x2, I, shift, sq[0, :, :W], sq[1, :, :W], abm[2], abm[3])
    for c in range(C):
        abm[0, c], abm[1, c] = _train_channel(c, abm[2, c], abm[3, c], n, eps, scale, offset,
                                              mean_out, invstd_out)
        _running_channel(c, abm[2, c], abm[3, c], n, momentum, rm, rv)
    _tile_into(abm[2], I, t4[1])
    _tile_into(abm[0], I, t4[2])
    _tile_into(abm[1], I, t4[3])
    for t in prange(nb):
        for part in range(_row_parts(t, nb)):
            v, r0, r1 = _row_block(x2, k, nb, t, part)
            u, _, _ = _row_block(y2, k, nb, t, part)
            _affine_rows(v[r0:r1], t4[1], t4[2], t4[3], u[r0:r1])


def _row_form(x3):
    """k for the row form of the small fused kernels (see _train_rows): channels-last,
    and channels-first with I < ROW_FORM_I and O >= 2*I; 0 (channel by channel)
    otherwise."""
    O, C, I = x3.shape
    return _widen(C * I) if I == 1 or (I < ROW_FORM_I and O >= 2 * I) else 0


def _row_blocks(op, x3, k):
    """Blocks of wide rows for the row-form kernel of ``op`` ("train", "backward") on
    x3: ROWS_BLOCKS_PER_THREAD per thread from ROWS_PARALLEL_FROM[op] values (each
    of at least ROWS_MIN_BLOCK wide rows and ROWS_MIN_VALUES values: a few us of
    work, so that many threads are not woken for a small input), else 1 (serial;
    also with one thread)."""
    limit = SERIAL_BELOW if SERIAL_BELOW is not None else ROWS_PARALLEL_FROM[op]
    threads = numba.get_num_threads() if x3.size >= limit else 1
    if threads < 2:   # (numba.set_num_threads(1) in this thread, NUMBA_NUM_THREADS=1)
        return 1
    return max(1, min(ROWS_BLOCKS_PER_THREAD * threads, x3.shape[0] // k // ROWS_MIN_BLOCK,
                      x3.size // ROWS_MIN_VALUES))


@functools.lru_cache(maxsize=1024)   # ~0.7 us a call otherwise, in ~3 us calls
def _widen(C):
    """Rows per wide row for channels-last small inputs: k*C >= 64 and a multiple of
    16, a whole number of AVX-512 float32 vectors ((2500, 30): 3 rows per wide row
    left 2 of every 90 values to a scalar remainder; 8 rows: 20.1 vs 21.2 us; 32: 24 us)."""
    k = 16 // math.gcd(C, 16) if 0 < C <= 256 else 1
    while k * C < 64:
        k *= 2
    return k


# -- beyond SMALL: the primitives, with fastbn.core's per-channel formulas compiled -
# The NumPy form of these (fastbn.core on length-C vectors: ~10 ufunc calls, each
# run on caches the kernel has just flushed) cost 20-40 us a call here.

@kernel
def _train_coefficients(mean, m2, n, eps, scale, offset, q, r, mean_out, invstd_out):
    """_train_channel for every channel: q, r (float64) and the returned mean/invstd."""
    for c in range(mean.size):
        q[c], r[c] = _train_channel(c, mean[c], m2[c], n, eps, scale, offset, mean_out,
                                    invstd_out)


@kernel
def _running_update(mean, m2, n, momentum, rm, rv):
    """_running_channel for every channel."""
    for c in range(mean.size):
        _running_channel(c, mean[c], m2[c], n, momentum, rm, rv)


def _train_large(x3, scale, offset, eps, momentum, rm, rv, out3, mean_out, invstd_out):
    """train_small3 beyond SMALL: moments3, the coefficients, the output (up to
    INFER_MAX the inference kernel -- with INFER_F32, float32 arithmetic for
    float32 data: NHWC (32,16,16,128) 263-306 -> 227-231 us, (1024,1024) 315 ->
    269-279 us; beyond, affine3 and its streaming stores), then the running
    statistics (last: a failure before leaves them untouched)."""
    C = x3.shape[1]
    n = float(x3.shape[0] * x3.shape[2])
    mean, m2 = moments3(x3)
    mqr = np.empty((3, C))
    mqr[0] = mean
    _train_coefficients.serial(mean, m2, n, float(eps), scale, offset, mqr[1], mqr[2], mean_out,
                               invstd_out)
    if x3.size <= INFER_MAX:   # the inference kernel (float32 arithmetic with INFER_F32)
        xb = _bits(x3)
        run(_infer_small, _parallel("infer", xb), xb, None, None, mqr[0], mqr[0], 0.0,
            _bits(out3), CHUNK, _work(xb), mqr)
    else:
        affine3(x3, mean, mqr[1], mqr[2], out3)
    if rm is not None or rv is not None:
        _running_update.serial(mean, m2, n, float(momentum), rm, rv)


def _channel_blocked(x3, arrays):
    """Run the fused kernel channel by channel in parallel (channels-first x3 of at
    least CHANNEL_MIN_C channels, whose per-channel slabs of ``arrays`` arrays of
    x3's size fit CHANNEL_SLAB)?"""
    O, C, I = x3.shape
    return (I >= CHANNEL_MIN_I and C >= CHANNEL_MIN_C
            and O * I * x3.itemsize * arrays <= CHANNEL_SLAB)


def moments_small3(x3, ddof, mean_out, var_out):
    """Per-channel mean and variance ``m2 / (n - ddof)`` (computed in float64,
    rounded once into ``mean_out``/``var_out``, (C,) arrays of any float dtype;
    n > ddof) of a C-contiguous (outer, C, inner) x3 in one fused pass: the
    training forward's statistics (the row form or channel by channel, see
    train_small3) up to SMALL values; moments3 beyond (or for other strides)."""
    if not 0 < x3.size <= SMALL or not x3.flags.c_contiguous:
        mean, m2 = moments3(x3)
        mean_out[:] = mean
        var_out[:] = m2 / (x3.shape[0] * x3.shape[2] - ddof)
        return
    x3 = _bits(x3)
    k = _row_form(x3)
    if k:
        _moments_rows.serial(x3, k, float(ddof), mean_out, var_out)
    else:
        run(_moments_small, x3.size >= FUSED_PARALLEL_FROM and _channel_blocked(x3, 1), x3,
            float(ddof), mean_out, var_out)


def train_small3(x3, scale, offset, eps, momentum, rm, rv, out3, mean_out, invstd_out):
    """Fused training forward (statistics in one pass shifted by a value of each
    channel, see _shift): one kernel, serial in the row form (_train_rows; see
    _row_form) or channel by channel (_train_small, in parallel from
    FUSED_PARALLEL_FROM values where _channel_blocked) for inputs of at most
    SMALL values; beyond, channels-first inputs whose channel slabs fit
    CHANNEL_SLAB run _train_small in parallel, the rest the parallel primitives
    with the per-channel math in one compiled call (_train_large).

    x3/out3 (outer, C, inner) float16/32/64 (out3 may be x3); scale/offset/rm/rv
    None or (C,) arrays of the per-channel dtype (float32 for float16 x3, else
    x3's); mean_out/invstd_out (C,) of that dtype receive the batch mean and
    1/sqrt(var + eps).  Running statistics are updated in place.
    """
    if x3.size > SMALL and not _channel_blocked(x3, 2):
        _train_large(x3, scale, offset, eps, momentum, rm, rv, out3, mean_out, invstd_out)
        return
    x3, out3 = _bits(x3), _bits(out3)
    k = 0 if x3.size > SMALL else _row_form(x3)
    if k:
        nb = _row_blocks("train", x3, k)
        run(_train_rows, nb > 1, x3, k, nb, scale, offset, eps, momentum, rm, rv, out3,
            mean_out, invstd_out)
    else:
        run(_train_small, x3.size >= FUSED_PARALLEL_FROM and _channel_blocked(x3, 2), x3, scale,
            offset, eps, momentum, rm, rv, out3, mean_out, invstd_out)


# -- small inputs: inference and backward in one serial call -------------------
# What the general path does in several calls (per-channel coefficients in NumPy,
# then the elementwise kernel; for the backward, the sums kernel first), fused:
# for a few KB the calls cost far more than the arithmetic.  The same float64
# formulas as fastbn.core, tested against it through the public functions.

@kernel
def _infer_small(x, scale, offset, mean, var, eps, out, chunk, work, given):
    """``out = q*(x - m) + r`` with core's inference coefficients, or with the
    float64 ``given`` = (m, q, r) rows (3, C) (the training forward, _train_large;
    the inference arguments are then unused), in the arithmetic of ``work``'s
    dtype (see _work): float64, rounded once; or float32 for float32 data, one
    FMA on the float32 ``x - m`` (see INFER_F32).  ``given`` is (0, C) for
    inference: an array either way, as Numba types both branches."""
    O, C, I = x.shape
    if given.shape[0] == 0:
        q = np.empty(C)
        r = np.empty(C)
        m = np.empty(C)
        _infer_coefficients(scale, offset, mean, var, eps, m, q, r)
    else:
        m = given[0]
        q = given[1]
        r = given[2]
    qw = np.empty(C, work.dtype)
    rw = np.empty(C, work.dtype)
    mw = np.empty(C, work.dtype)
    for c in range(C):
        mw[c] = m[c]
        qw[c] = q[c]
        d = m[c] - mw[c]   # the mean's rounding to work's dtype, folded into r
        rw[c] = r[c] - q[c] * d if d != 0.0 and np.isfinite(d) else r[c]
    if I == 1:   # channels-last: along rows, vectorised over the channels (rows of k*C
        # values, as in the backward, were no faster: (2500, 30) 17 -> 15 us, (64, 16) 4.6 -> 5.3)
        x2 = x.reshape(O, C)   # (a reshape keeps Numba's contiguous layout: vectorised)
        y2 = out.reshape(O, C)
        for o in prange(O):
            xr = x2[o]
            yr = y2[o]
            for c in range(C):
                yr[c] = cast(qw[c] * (ldw(xr[c], qw[c]) - mw[c]) + rw[c], yr)
        return
    if I <= chunk:   # whole (o, c) rows: no per-unit index math or ranged slices
        # (serial, float32 (16, 64, 64): 22 -> 14 us; (16, 16, 16) 4.2 -> 2.0)
        x2 = x.reshape(O * C, I)
        y2 = out.reshape(O * C, I)
        for t in prange(O * C):
            c = t % C
            qc, mc, rc = qw[c], mw[c], rw[c]
            xs = x2[t]
            ys = y2[t]
            for i in range(I):
                ys[i] = cast(qc * (ldw(xs[i], qc) - mc) + rc, ys)
        return
    nk = (I + chunk - 1) // chunk
    for t in prange(O * C * nk):
        o, c, i0, i1 = _unit(t, nk, C, I, chunk)
        qc, mc, rc = qw[c], mw[c], rw[c]
        xs = x[o, c, i0:i1]
        ys = out[o, c, i0:i1]
        for i in range(xs.size):
            ys[i] = cast(qc * (ldw(xs[i], qc) - mc) + rc, ys)


@kernel
def _backward_small(dy, x, scale, mean, invstd, frozen, eps, out, dscale_out, doffset_out):
    """Training backward, channels-first, channel by channel: both passes on one
    channel's slab of x and dy, in L2 after the first (see CHANNEL_SLAB)."""
    O, C, I = x.shape
    n = O * I
    for c in prange(C):
        mc = np.float64(mean[c])
        t1 = 0.0
        t2 = 0.0
        for o in range(O):
            xs = x[o, c]
            ds = dy[o, c]
            for i in range(xs.size):
                d = ld(ds[i])
                t1 += d
                t2 += d * (ld(xs[i]) - mc)
        ac, bc, ccc = _backward_channel(c, t1, t2, n, scale, invstd, frozen, eps, dscale_out,
                                        doffset_out)
        for o in range(O):
            xs = x[o, c]
            ds = dy[o, c]
            ys = out[o, c]
            for i in range(xs.size):
                ys[i] = cast(bc * (ld(xs[i]) - mc) + ccc + ac * ld(ds[i]), ys)


@kernel
def _backward_rows(dy, x, k, nb, scale, mean, invstd, frozen, eps, out, dscale_out,
                   doffset_out):
    """Training backward in the row form, k rows per wide row, both passes in nb
    blocks of wide rows (see _train_rows, _row_form, _row_block): (4096, 16, 1)
    52 -> 40 us, (2500, 30, 1) 71 -> 44, (64, 16, 1) 2.0 -> 2.6; (64, 32, 16) 34
    -> 20, (64, 16, 4) 13.5 -> 4.3 against the channel-by-channel kernels.  A
    kernel of its own: one holding both forms took twice as long to compile
    (8.6 vs 4.5 s a signature)."""
    O, C, I = x.shape
    n = O * I
    CI = C * I
    W = k * CI
    x2 = x.reshape(O, CI)
    d2 = dy.reshape(O, CI)
    y2 = out.reshape(O, CI)
    t = np.empty((4, W))   # mean, a, b, cc along a wide row (one allocation)
    _tile_into(mean, I, t[0])
    s = _task_sums(nb, W)
    for j in prange(nb):
        _zero(s[0, j])
        _zero(s[1, j])
        for part in range(_row_parts(j, nb)):
            v, r0, r1 = _row_block(x2, k, nb, j, part)
            g, _, _ = _row_block(d2, k, nb, j, part)
            _dy_row_sums(g, v, t[0], r0, r1, s[0, j], s[1, j])
    abc = np.empty((3, C))
    _backward_coefficients(_summed(s[0, :, :W], C, I), _summed(s[1, :, :W], C, I), n, scale,
                           invstd, frozen, eps, abc[0], abc[1], abc[2], dscale_out, doffset_out)
    _tile_into(abc[0], I, t[1])
    _tile_into(abc[1], I, t[2])
    _tile_into(abc[2], I, t[3])
    for j in prange(nb):
        for part in range(_row_parts(j, nb)):
            v, r0, r1 = _row_block(x2, k, nb, j, part)
            g, _, _ = _row_block(d2, k, nb, j, part)
            u, _, _ = _row_block(y2, k, nb, j, part)
            _dx_rows(g[r0:r1], v[r0:r1], t[0], t[1], t[2], t[3], u[r0:r1])


def infer_small3(x3, scale, offset, mean, var, eps, out3):
    """Fused inference forward: one kernel up to INFER_MAX values (parallel from
    PARALLEL_FROM's "infer" sizes); beyond, affine3 with the
    coefficients from one compiled call.

    x3/out3 (outer, C, inner) float16/32/64 (out3 may be x3); scale/offset None or
    (C,); mean/var (C,), any float dtype.  ``out3 = (x3 - mean) * scale /
    sqrt(var + eps) + offset``, in float64, rounded once.
    """
    if x3.size > INFER_MAX:   # big enough for affine3's streaming stores
        C = x3.shape[1]
        m, q, r = np.empty(C), np.empty(C), np.empty(C)
        _infer_coefficients(scale, offset, mean, var, eps, m, q, r)
        affine3(x3, m, q, r, out3)
        return
    x3 = _bits(x3)
    run(_infer_small, _parallel("infer", x3), x3, scale, offset, mean, var, eps, _bits(out3),
        CHUNK, _work(x3), _NOT_GIVEN)


def _work(x3):
    """An empty array of the dtype _infer_small computes in for x3's dtype."""
    return _WORK_F32 if INFER_F32 and x3.dtype == np.float32 else _WORK_F64


_WORK_F32, _WORK_F64 = np.empty(0, np.float32), np.empty(0, np.float64)
_NOT_GIVEN = np.empty((0, 0))


def backward_small3(dy3, x3, scale, mean, invstd, out3, dscale_out, doffset_out):
    """Fused training backward: one kernel (two reads; in the row form or channel
    by channel, as train_small3) for inputs of at most SMALL values; beyond,
    channels-first inputs whose channel slabs fit CHANNEL_SLAB run it channel by
    channel in parallel, the rest dy_sums3 and affine3 with the coefficients
    from one compiled call.

    dy3/x3/out3 (outer, C, inner) float16/32/64 (out3 may be dy3 or x3); scale None
    or (C,); mean/invstd (C,), any float dtype.  Writes ``dx`` to out3 and the
    per-channel ``dscale``, ``doffset`` to the (C,) outputs.
    """
    _backward(dy3, x3, scale, mean, invstd, False, 0.0, out3, dscale_out, doffset_out)


def infer_backward_small3(dy3, x3, scale, mean, var, eps, out3, dscale_out, doffset_out):
    """Fused eval-mode backward (fixed statistics; batch_norm_infer_backward): the
    training backward's kernels with core.infer_backward_coefficients, so
    ``dx = scale/sqrt(var + eps) * dy`` (plus 0*(x - mean), as the general path's
    affine pass: NaN where x is), ``dscale = sum(dy*(x - mean))/sqrt(var + eps)``,
    ``doffset = sum(dy)``.  Arguments as backward_small3's, ``var`` for ``invstd``."""
    _backward(dy3, x3, scale, mean, var, True, eps, out3, dscale_out, doffset_out)


def _backward(dy3, x3, scale, mean, invstd, frozen, eps, out3, dscale_out, doffset_out):
    """backward_small3 / infer_backward_small3 (see _backward_channel's ``frozen``)."""
    if x3.size > SMALL and not _channel_blocked(x3, 3):
        C = x3.shape[1]
        m = np.ascontiguousarray(mean, np.float64)
        s1, s2 = dy_sums3(dy3, x3, m)
        a, b, c = np.empty(C), np.empty(C), np.empty(C)
        _backward_coefficients(s1, s2, float(x3.shape[0] * x3.shape[2]), scale, invstd, frozen,
                               eps, a, b, c, dscale_out, doffset_out)
        affine3(x3, m, b, c, out3, dy3, a)
        return
    dy3, x3, out3 = _bits(dy3), _bits(x3), _bits(out3)
    k = 0 if x3.size > SMALL else _row_form(x3)
    if k:
        nb = _row_blocks("backward", x3, k)
        run(_backward_rows, nb > 1, dy3, x3, k, nb, scale, mean, invstd, frozen, eps, out3,
            dscale_out, doffset_out)
    else:
        run(_backward_small, x3.size >= FUSED_PARALLEL_FROM and _channel_blocked(x3, 3), dy3, x3,
            scale, mean, invstd, frozen, eps, out3, dscale_out, doffset_out)

"""The numba.cuda backend ("cuda") for GPU arrays: CuPy, Numba device arrays and
anything with ``__cuda_array_interface__`` (see ``fastbn.families.cuda``).

The three primitives of ``kernels/__init__.py`` on a canonical view
``x3[outer, C, inner]`` in device memory; per-channel results are float64
vectors in the working namespace of ``fastbn.kernels.cuda_runtime`` (CuPy arrays when CuPy
is installed, otherwise host NumPy arrays).

Two ways of mapping threads to data, chosen by ``inner``:

* **columns** (``inner < ROWS_MIN_INNER``: channels-last, (N, C), small
  spatial extents).  A *column* is one ``(c, i)`` pair, ``j = c*inner + i``;
  consecutive threads (``threadIdx.x``) take consecutive columns, so a warp
  reads consecutive addresses of one row (coalesced along C), and
  ``threadIdx.y`` / ``blockIdx.y`` split the rows ``o``.  A thread's channel
  is fixed, so its division ``j // inner`` and its per-channel parameters are
  loaded once.  The elementwise kernels use this mapping for every layout.
* **rows** (``inner >= ROWS_MIN_INNER``: NCHW-like).  One block per
  ``(split, channel)``; its threads walk the channel's ``outer*inner`` values
  with stride ``blockDim.x`` (``(o, i)`` advanced incrementally, no division
  per element), so one block yields one partial per channel.

Reductions are two-stage and deterministic (no float atomics): each thread
accumulates shifted sums ``sum(v - K)``, ``sum((v - K)**2)`` about its own
first value ``K`` (float32 accumulators for float16 data, float64 otherwise),
turns them into ``(n, mean, m2)``, the block merges those in shared memory
with Chan's formula in float64 (a tree over ``threadIdx.y``/the block; the
simulator has no warp shuffles, so shared memory is the only path), and a
second kernel merges each channel's block partials in a fixed order.

Knobs (module attributes, read at every call, so tests can shrink them):
``TPB`` threads per block (``FASTBN_CUDA_TPB``, default 256), ``TARGET_BLOCKS``
(None: 2 waves of resident blocks on the current device), ``MIN_PER_THREAD``
(values a thread handles at least before more blocks are used) and
``ROWS_MIN_INNER``.
"""

import math
import os
import warnings

import numba
import numpy as np
from numba.core.errors import NumbaPerformanceWarning

from . import cache_enabled
from . import cuda_runtime as rt

NAME = "cuda"
FAMILIES = ("cuda",)


def _env_tpb():
    raw = os.environ.get("FASTBN_CUDA_TPB", "256")
    try:
        tpb = int(raw)
    except ValueError:
        raise ValueError(f"FASTBN_CUDA_TPB must be an integer in [1, 1024], got {raw!r}") from None
    if not 1 <= tpb <= 1024:
        raise ValueError(f"FASTBN_CUDA_TPB must be in [1, 1024], got {tpb}")
    return tpb


TPB = _env_tpb()
TARGET_BLOCKS = None
MIN_PER_THREAD = 16
ROWS_MIN_INNER = 32

_MAX_GRID_Y = 65535

try:
    from numba import cuda
except ImportError as _exc:  # numba without the numba-cuda package
    cuda = None
    _IMPORT_ERROR = f"numba-cuda not installed ({_exc})"
else:
    _IMPORT_ERROR = None


def unavailable_reason():
    """None when kernels can run here (a GPU, or the CUDA simulator), else why not."""
    if cuda is None:
        return _IMPORT_ERROR
    if rt.simulator():
        return None
    try:
        if not cuda.is_available():
            return "no CUDA driver or GPU (numba.cuda.is_available() is False)"
    except Exception as exc:  # noqa: BLE001 - a broken driver install
        return f"no usable CUDA driver ({type(exc).__name__}: {exc})"
    return None


if cuda is not None:
    # Numba's own on-disk cache (next to this file) saves recompiling every
    # kernel in every process; FASTBN_CACHE=0 turns it off as for the CPU kernels.
    _CACHE = not rt.simulator() and cache_enabled()
    _f64 = numba.float64

    def _kernel(func):
        if _CACHE:
            try:
                return cuda.jit(cache=True)(func)
            except Exception:  # noqa: BLE001 - no usable cache location
                pass
        return cuda.jit(func)

    _dev = cuda.jit(device=True)

    # -- device helpers --------------------------------------------------------

    @_dev
    def _step(o, i, dq, dr, inner):
        """(o, i) advanced by dq*inner + dr flat positions, 0 <= dr < inner."""
        i += dr
        o += dq
        if i >= inner:
            i -= inner
            o += 1
        return o, i

    @_dev
    def _chan(na, ma, qa, nb, mb, qb):
        """Chan et al.: merge (count, mean, m2) partials a and b."""
        if nb == 0:
            return na, ma, qa
        if na == 0:
            return nb, mb, qb
        n = na + nb
        d = mb - ma
        f = nb / n
        m = ma + d * f
        if not math.isfinite(d):  # an inf mean: inf - inf would give NaN where NumPy gives inf
            m = ma * (1.0 - f) + mb * f
        return n, m, qa + qb + d * d * na * f

    @_dev
    def _partial(cnt, k, s1, s2):
        """(n, mean, m2) in float64 from sums of v - k and (v - k)**2 over cnt values."""
        if cnt == 0:
            return 0.0, 0.0, 0.0
        a = float(s1)
        mean = float(k) + a / cnt
        m2 = float(s2) - a * a / cnt
        if m2 < 0.0:  # rounding; NaN stays NaN
            m2 = 0.0
        return float(cnt), mean, m2

    @_dev
    def _tree_chan(sh, nt, lane, count, base, stride):
        """Merge ``count`` (n, mean, m2) entries sh[base + lane*stride] (+nt, +2nt) into lane 0.

        Every thread of the block calls this with the same ``count`` (it syncs).
        """
        s = 1
        while s < count:
            if lane % (2 * s) == 0 and lane + s < count:
                a = base + lane * stride
                b = a + s * stride
                n, m, q = _chan(sh[a], sh[nt + a], sh[2 * nt + a], sh[b], sh[nt + b], sh[2 * nt + b])
                sh[a] = n
                sh[nt + a] = m
                sh[2 * nt + a] = q
            cuda.syncthreads()
            s *= 2

    @_dev
    def _tree_add(sh, nt, lane, count, base, stride):
        """Sum ``count`` pairs sh[base + lane*stride] (+nt) into lane 0 (pairwise, fixed order)."""
        s = 1
        while s < count:
            if lane % (2 * s) == 0 and lane + s < count:
                a = base + lane * stride
                b = a + s * stride
                sh[a] += sh[b]
                sh[nt + a] += sh[nt + b]
            cuda.syncthreads()
            s *= 2

    # -- moments -----------------------------------------------------------------

    @_kernel
    def _moments_cols(x, zero, rows_per, nsplit, part):
        """Column mapping: partial (n, mean, m2) of column j over split s -> part[:, j*nsplit + s]."""
        sh = cuda.shared.array(0, dtype=_f64)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        TX = cuda.blockDim.x
        TY = cuda.blockDim.y
        nt = TX * TY
        t = ty * TX + tx
        outer = x.shape[0]
        inner = x.shape[2]
        ncols = x.shape[1] * inner
        j = cuda.blockIdx.x * TX + tx
        s = cuda.blockIdx.y
        o = s * rows_per + ty
        o1 = min(outer, s * rows_per + rows_per)
        cnt = 0
        n = 0.0
        mean = 0.0
        m2 = 0.0
        if j < ncols and o < o1:
            c = j // inner
            i = j - c * inner
            cnt = (o1 - o + TY - 1) // TY
            k = zero + x[o, c, i]
            if not math.isfinite(k):  # an inf pivot would turn every value into NaN
                k = zero
            s1 = zero
            s2 = zero
            while o + 3 * TY < o1:
                d0 = (zero + x[o, c, i]) - k
                d1 = (zero + x[o + TY, c, i]) - k
                d2 = (zero + x[o + 2 * TY, c, i]) - k
                d3 = (zero + x[o + 3 * TY, c, i]) - k
                s1 += (d0 + d1) + (d2 + d3)
                s2 += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                o += 4 * TY
            while o < o1:
                d0 = (zero + x[o, c, i]) - k
                s1 += d0
                s2 += d0 * d0
                o += TY
            n, mean, m2 = _partial(cnt, k, s1, s2)
        sh[t] = n
        sh[nt + t] = mean
        sh[2 * nt + t] = m2
        cuda.syncthreads()
        _tree_chan(sh, nt, ty, TY, tx, TX)
        if ty == 0 and j < ncols:
            p = j * nsplit + s
            part[0, p] = sh[tx]
            part[1, p] = sh[nt + tx]
            part[2, p] = sh[2 * nt + tx]

    @_kernel
    def _moments_rows(x, zero, chunk, nsplit, part):
        """Row mapping: block (s, c) reduces flat values [s*chunk, (s+1)*chunk) of channel c."""
        sh = cuda.shared.array(0, dtype=_f64)
        t = cuda.threadIdx.x
        nt = cuda.blockDim.x
        outer = x.shape[0]
        C = x.shape[1]
        inner = x.shape[2]
        s = cuda.blockIdx.x
        end = min(outer * inner, s * chunk + chunk)
        dq = nt // inner
        dr = nt - dq * inner
        for c in range(cuda.blockIdx.y, C, cuda.gridDim.y):
            kk = s * chunk + t
            n = 0.0
            mean = 0.0
            m2 = 0.0
            if kk < end:
                cnt = (end - kk + nt - 1) // nt
                o = kk // inner
                i = kk - o * inner
                k = zero + x[o, c, i]
                if not math.isfinite(k):  # an inf pivot would turn every value into NaN
                    k = zero
                s1 = zero
                s2 = zero
                while kk + 3 * nt < end:
                    o1, i1 = _step(o, i, dq, dr, inner)
                    o2, i2 = _step(o1, i1, dq, dr, inner)
                    o3, i3 = _step(o2, i2, dq, dr, inner)
                    d0 = (zero + x[o, c, i]) - k
                    d1 = (zero + x[o1, c, i1]) - k
                    d2 = (zero + x[o2, c, i2]) - k
                    d3 = (zero + x[o3, c, i3]) - k
                    s1 += (d0 + d1) + (d2 + d3)
                    s2 += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                    o, i = _step(o3, i3, dq, dr, inner)
                    kk += 4 * nt
                while kk < end:
                    d0 = (zero + x[o, c, i]) - k
                    s1 += d0
                    s2 += d0 * d0
                    o, i = _step(o, i, dq, dr, inner)
                    kk += nt
                n, mean, m2 = _partial(cnt, k, s1, s2)
            sh[t] = n
            sh[nt + t] = mean
            sh[2 * nt + t] = m2
            cuda.syncthreads()
            _tree_chan(sh, nt, t, nt, 0, 1)
            if t == 0:
                p = c * nsplit + s
                part[0, p] = sh[0]
                part[1, p] = sh[nt]
                part[2, p] = sh[2 * nt]
            cuda.syncthreads()  # sh is reused for the next channel

    @_kernel
    def _merge_chan(part, P, res):
        """Channel c's P partials part[:, c*P:(c+1)*P] -> res[0, c] = mean, res[1, c] = m2,
        merged in a fixed order."""
        sh = cuda.shared.array(0, dtype=_f64)
        t = cuda.threadIdx.x
        nt = cuda.blockDim.x
        for c in range(cuda.blockIdx.x, res.shape[1], cuda.gridDim.x):
            n = 0.0
            m = 0.0
            q = 0.0
            for p in range(c * P + t, c * P + P, nt):
                n, m, q = _chan(n, m, q, part[0, p], part[1, p], part[2, p])
            sh[t] = n
            sh[nt + t] = m
            sh[2 * nt + t] = q
            cuda.syncthreads()
            _tree_chan(sh, nt, t, nt, 0, 1)
            if t == 0:
                res[0, c] = sh[nt]
                res[1, c] = sh[2 * nt]
            cuda.syncthreads()

    # -- sums of the backward pass ----------------------------------------------------

    @_kernel
    def _dysums_cols(dy, x, m, zero, rows_per, nsplit, part):
        """Column mapping: partial (sum dy, sum dy*(x - m)) of column j over split s."""
        sh = cuda.shared.array(0, dtype=_f64)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        TX = cuda.blockDim.x
        TY = cuda.blockDim.y
        nt = TX * TY
        t = ty * TX + tx
        outer = x.shape[0]
        inner = x.shape[2]
        ncols = x.shape[1] * inner
        j = cuda.blockIdx.x * TX + tx
        s = cuda.blockIdx.y
        o = s * rows_per + ty
        o1 = min(outer, s * rows_per + rows_per)
        a = 0.0
        b = 0.0
        if j < ncols and o < o1:
            c = j // inner
            i = j - c * inner
            mc = m[0, c]
            sa = zero
            sb = zero
            while o + 3 * TY < o1:
                g0 = zero + dy[o, c, i]
                g1 = zero + dy[o + TY, c, i]
                g2 = zero + dy[o + 2 * TY, c, i]
                g3 = zero + dy[o + 3 * TY, c, i]
                e0 = (zero + x[o, c, i]) - mc
                e1 = (zero + x[o + TY, c, i]) - mc
                e2 = (zero + x[o + 2 * TY, c, i]) - mc
                e3 = (zero + x[o + 3 * TY, c, i]) - mc
                sa += (g0 + g1) + (g2 + g3)
                sb += (g0 * e0 + g1 * e1) + (g2 * e2 + g3 * e3)
                o += 4 * TY
            while o < o1:
                g0 = zero + dy[o, c, i]
                sa += g0
                sb += g0 * ((zero + x[o, c, i]) - mc)
                o += TY
            a = float(sa)
            b = float(sb)
        sh[t] = a
        sh[nt + t] = b
        cuda.syncthreads()
        _tree_add(sh, nt, ty, TY, tx, TX)
        if ty == 0 and j < ncols:
            p = j * nsplit + s
            part[0, p] = sh[tx]
            part[1, p] = sh[nt + tx]

    @_kernel
    def _dysums_rows(dy, x, m, zero, chunk, nsplit, part):
        """Row mapping of the backward sums (see _moments_rows)."""
        sh = cuda.shared.array(0, dtype=_f64)
        t = cuda.threadIdx.x
        nt = cuda.blockDim.x
        outer = x.shape[0]
        C = x.shape[1]
        inner = x.shape[2]
        s = cuda.blockIdx.x
        end = min(outer * inner, s * chunk + chunk)
        dq = nt // inner
        dr = nt - dq * inner
        for c in range(cuda.blockIdx.y, C, cuda.gridDim.y):
            kk = s * chunk + t
            a = 0.0
            b = 0.0
            if kk < end:
                mc = m[0, c]
                o = kk // inner
                i = kk - o * inner
                sa = zero
                sb = zero
                while kk + 3 * nt < end:
                    o1, i1 = _step(o, i, dq, dr, inner)
                    o2, i2 = _step(o1, i1, dq, dr, inner)
                    o3, i3 = _step(o2, i2, dq, dr, inner)
                    g0 = zero + dy[o, c, i]
                    g1 = zero + dy[o1, c, i1]
                    g2 = zero + dy[o2, c, i2]
                    g3 = zero + dy[o3, c, i3]
                    e0 = (zero + x[o, c, i]) - mc
                    e1 = (zero + x[o1, c, i1]) - mc
                    e2 = (zero + x[o2, c, i2]) - mc
                    e3 = (zero + x[o3, c, i3]) - mc
                    sa += (g0 + g1) + (g2 + g3)
                    sb += (g0 * e0 + g1 * e1) + (g2 * e2 + g3 * e3)
                    o, i = _step(o3, i3, dq, dr, inner)
                    kk += 4 * nt
                while kk < end:
                    g0 = zero + dy[o, c, i]
                    sa += g0
                    sb += g0 * ((zero + x[o, c, i]) - mc)
                    o, i = _step(o, i, dq, dr, inner)
                    kk += nt
                a = float(sa)
                b = float(sb)
            sh[t] = a
            sh[nt + t] = b
            cuda.syncthreads()
            _tree_add(sh, nt, t, nt, 0, 1)
            if t == 0:
                p = c * nsplit + s
                part[0, p] = sh[0]
                part[1, p] = sh[nt]
            cuda.syncthreads()

    @_kernel
    def _merge_add(part, P, res):
        """res[:, c] = sums of channel c's P partials part[:, c*P:(c+1)*P], in a fixed order."""
        sh = cuda.shared.array(0, dtype=_f64)
        t = cuda.threadIdx.x
        nt = cuda.blockDim.x
        for c in range(cuda.blockIdx.x, res.shape[1], cuda.gridDim.x):
            u = 0.0
            v = 0.0
            for p in range(c * P + t, c * P + P, nt):
                u += part[0, p]
                v += part[1, p]
            sh[t] = u
            sh[nt + t] = v
            cuda.syncthreads()
            _tree_add(sh, nt, t, nt, 0, 1)
            if t == 0:
                res[0, c] = sh[0]
                res[1, c] = sh[nt]
            cuda.syncthreads()

    # -- elementwise ---------------------------------------------------------------------

    @_kernel
    def _affine_cols(x, prm, out, rows_per):
        """out = q*(x - m) + r per channel, prm = [m, q, r] (C columns) in the compute dtype
        (float32 for float16 data, else float64)."""
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        TX = cuda.blockDim.x
        TY = cuda.blockDim.y
        outer = x.shape[0]
        inner = x.shape[2]
        j = cuda.blockIdx.x * TX + tx
        if j >= x.shape[1] * inner:
            return
        c = j // inner
        i = j - c * inner
        mc = prm[0, c]
        qc = prm[1, c]
        rc = prm[2, c]
        o = cuda.blockIdx.y * rows_per + ty
        o1 = min(outer, cuda.blockIdx.y * rows_per + rows_per)
        while o + 3 * TY < o1:
            # Four loads before the stores: more bytes in flight, and out may be x.
            v0 = x[o, c, i]
            v1 = x[o + TY, c, i]
            v2 = x[o + 2 * TY, c, i]
            v3 = x[o + 3 * TY, c, i]
            out[o, c, i] = qc * (v0 - mc) + rc
            out[o + TY, c, i] = qc * (v1 - mc) + rc
            out[o + 2 * TY, c, i] = qc * (v2 - mc) + rc
            out[o + 3 * TY, c, i] = qc * (v3 - mc) + rc
            o += 4 * TY
        while o < o1:
            out[o, c, i] = qc * (x[o, c, i] - mc) + rc
            o += TY

    @_kernel
    def _affine_u_cols(x, prm, out, u, rows_per):
        """out = q*(x - m) + r + p*u per channel, prm = [m, q, r, p] (the backward's dx)."""
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        TX = cuda.blockDim.x
        TY = cuda.blockDim.y
        outer = x.shape[0]
        inner = x.shape[2]
        j = cuda.blockIdx.x * TX + tx
        if j >= x.shape[1] * inner:
            return
        c = j // inner
        i = j - c * inner
        mc = prm[0, c]
        qc = prm[1, c]
        rc = prm[2, c]
        pc = prm[3, c]
        o = cuda.blockIdx.y * rows_per + ty
        o1 = min(outer, cuda.blockIdx.y * rows_per + rows_per)
        while o + 1 * TY < o1:
            v0 = x[o, c, i]
            v1 = x[o + TY, c, i]
            w0 = u[o, c, i]
            w1 = u[o + TY, c, i]
            out[o, c, i] = qc * (v0 - mc) + rc + pc * w0
            out[o + TY, c, i] = qc * (v1 - mc) + rc + pc * w1
            o += 2 * TY
        while o < o1:
            out[o, c, i] = qc * (x[o, c, i] - mc) + rc + pc * u[o, c, i]
            o += TY

    @_kernel
    def _copy3(src, dst, rows_per):
        """dst = src, two (outer, C, inner) arrays of one shape and dtype (column mapping)."""
        tx = cuda.threadIdx.x
        TX = cuda.blockDim.x
        TY = cuda.blockDim.y
        inner = src.shape[2]
        j = cuda.blockIdx.x * TX + tx
        if j >= src.shape[1] * inner:
            return
        c = j // inner
        i = j - c * inner
        o1 = min(src.shape[0], cuda.blockIdx.y * rows_per + rows_per)
        for o in range(cuda.blockIdx.y * rows_per + cuda.threadIdx.y, o1, TY):
            dst[o, c, i] = src[o, c, i]

    @_kernel
    def _copy_nd(src, soff, sstr, dst, doff, dstr, shape, n):
        """dst[doff + idx.dstr] = src[soff + idx.sstr] for every index idx of ``shape``.

        ``src``/``dst`` are flat element views of two arrays' memory (see
        ``fastbn.rt.flat``); strides in elements.  Rare path: layouts the
        canonical view cannot express, on Numba arrays without CuPy.
        """
        start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        step = cuda.gridDim.x * cuda.blockDim.x
        for e in range(start, n, step):
            rem = e
            a = soff
            b = doff
            for d in range(len(shape) - 1, -1, -1):
                idx = rem % shape[d]
                rem //= shape[d]
                a += idx * sstr[d]
                b += idx * dstr[d]
            dst[b] = src[a]


# -- launch configuration --------------------------------------------------------------

def _launch(kern, grid, block, shmem, *args):
    """``kern[grid, block, stream, shmem](*args)`` on fastbn's stream.

    Numba warns about grids under 128 blocks; small inputs here legitimately
    launch few blocks, so that warning is silenced for our small launches only.
    """
    grid = grid if isinstance(grid, tuple) else (grid,)
    if math.prod(grid) >= 128:
        return kern[grid, block, rt.stream(), shmem](*args)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Grid size", category=NumbaPerformanceWarning)
        return kern[grid, block, rt.stream(), shmem](*args)


def _tpb():
    tpb = int(TPB)
    if not 1 <= tpb <= 1024:
        raise ValueError(f"cuda_numba.TPB must be in [1, 1024], got {tpb}")
    return tpb


def _target_blocks(tpb):
    if TARGET_BLOCKS is not None:
        return max(1, int(TARGET_BLOCKS))
    return 2 * rt.sm_count() * max(1, 2048 // tpb)


def _cols_config(ncols, rows, tpb):
    """(grid, block, rows_per, nsplit) for the column mapping over ncols x rows."""
    tx = min(ncols, tpb)
    ty = max(1, tpb // tx)
    gx = -(-ncols // tx)
    want = max(1, _target_blocks(tpb) // gx)
    need = max(1, -(-rows // (ty * max(1, MIN_PER_THREAD))))
    nsplit = max(1, min(want, need, _MAX_GRID_Y))
    rows_per = -(-rows // nsplit)
    nsplit = -(-rows // rows_per)
    return (gx, nsplit), (tx, ty), rows_per, nsplit


def _rows_config(n, C, tpb):
    """(grid, chunk, nsplit) for the row mapping: nsplit blocks per channel, chunk values each."""
    want = max(1, _target_blocks(tpb) // min(C, _MAX_GRID_Y))
    need = max(1, -(-n // (tpb * max(1, MIN_PER_THREAD))))
    nsplit = max(1, min(want, need, 2**31 - 1))
    chunk = -(-n // nsplit)
    nsplit = -(-n // chunk)
    return (nsplit, min(C, _MAX_GRID_Y)), chunk, nsplit


def _acc(dtype):
    """Accumulator / parameter dtype of the kernels: float32 for float16 data, else float64."""
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(np.float64)


def _use_rows(inner):
    return inner >= ROWS_MIN_INNER


# -- the primitives ----------------------------------------------------------------------------

def _reduce(x, fields, rows_kernel, cols_kernel, merge_kernel, lead):
    """Two-stage per-channel reduction of ``x`` (outer, C, inner): block partials
    ``part[fields, C*P]``, then ``merge_kernel`` -> ``res[2, C]`` -> two working vectors."""
    outer, C, inner = (int(s) for s in x.shape)
    tpb = _tpb()
    f64 = np.float64
    if _use_rows(inner):
        grid, chunk, nsplit = _rows_config(outer * inner, C, tpb)
        part_o, part = rt.empty((fields, C * nsplit), f64)
        _launch(rows_kernel, grid, tpb, 8 * fields * tpb, *lead, chunk, nsplit, part)
        P = nsplit
    else:
        grid, block, rows_per, nsplit = _cols_config(C * inner, outer, tpb)
        part_o, part = rt.empty((fields, C * inner * nsplit), f64)
        _launch(cols_kernel, grid, block, 8 * fields * block[0] * block[1], *lead, rows_per, nsplit, part)
        P = inner * nsplit
    res_o, res = rt.empty((2, C), f64)
    _launch(merge_kernel, min(C, _MAX_GRID_Y), tpb, 8 * fields * tpb, part, P, res)
    del part_o  # CuPy's pool reuses it in stream order: no sync
    return rt.vector_pair(res_o, res)


def moments3(x3):
    """(outer, C, inner) device array -> per-channel (mean, m2), float64 working vectors."""
    x = rt.to_numba(x3)
    outer, C, inner = (int(s) for s in x.shape)
    if C == 0 or outer * inner == 0:
        return rt.vector_pair(*rt.full((2, C), np.nan, np.float64))
    zero = _acc(x.dtype).type(0)
    return _reduce(x, 3, _moments_rows, _moments_cols, _merge_chan, (x, zero))


def dy_sums3(dy3, x3, m):
    """Per-channel (sum(dy), sum(dy*(x - m))) of two (outer, C, inner) device arrays, float64."""
    x = rt.to_numba(x3)
    dy = rt.to_numba(dy3)
    outer, C, inner = (int(s) for s in x.shape)
    if C == 0 or outer * inner == 0:
        return rt.vector_pair(*rt.full((2, C), 0.0, np.float64))
    acc = _acc(x.dtype)
    m_o, md = rt.param_stack((m,), acc)
    return _reduce(x, 2, _dysums_rows, _dysums_cols, _merge_add, (dy, x, md, acc.type(0)))


def affine3(x3, m, q, r, out3, u3=None, p=None):
    """out3 = q*(x3 - m) + r (+ p*u3) per channel; out3 may be x3 itself.

    Evaluated in float64 (float32 for float16 data) and rounded once to
    out3's dtype.  Returns out3.
    """
    x = rt.to_numba(x3)
    out = rt.to_numba(out3)
    outer, C, inner = (int(s) for s in x.shape)
    if outer * C * inner == 0:
        return out3
    prm_o, prm = rt.param_stack((m, q, r) if u3 is None else (m, q, r, p), _acc(x.dtype))
    grid, block, rows_per, _ = _cols_config(C * inner, outer, _tpb())
    if u3 is None:
        _launch(_affine_cols, grid, block, 0, x, prm, out, rows_per)
    else:
        _launch(_affine_u_cols, grid, block, 0, x, prm, out, rt.to_numba(u3), rows_per)
    del prm_o
    return out3


def copy3(src3, dst3):
    """dst3[...] = src3 for two canonical device views of one shape and dtype."""
    src = rt.to_numba(src3)
    dst = rt.to_numba(dst3)
    outer, C, inner = (int(s) for s in src.shape)
    if outer * C * inner == 0:
        return dst3
    grid, block, rows_per, _ = _cols_config(C * inner, outer, _tpb())
    _launch(_copy3, grid, block, 0, src, dst, rows_per)
    return dst3


def copy_nd(src_flat, soff, sstr, dst_flat, doff, dstr, shape):
    """Strided N-d copy between flat element views (``fastbn.rt.flat``)."""
    n = math.prod(shape)
    if n == 0:
        return
    tpb = _tpb()
    blocks = max(1, min(-(-n // tpb), _target_blocks(tpb)))
    _launch(_copy_nd, blocks, tpb, 0, src_flat, int(soff), tuple(int(s) for s in sstr), dst_flat,
            int(doff), tuple(int(s) for s in dstr), tuple(int(s) for s in shape), int(n))

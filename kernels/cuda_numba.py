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
  loaded once; its rows are a 1-D view of each array whose data pointer
  advances by ``blockDim.y`` rows (one 64-bit add, no index products).  The elementwise kernels use this mapping for every layout.
* **rows** (``inner >= ROWS_MIN_INNER``: NCHW-like).  One block per
  ``(split, channel)``; its threads walk the channel's ``outer*inner`` values
  with stride ``blockDim.x`` (a byte offset into a flat view of the data and
  the in-row index advanced by adds, no division or multiplication per
  element), so one block yields one partial per channel.

Reductions are two-stage and deterministic (no float atomics): each thread
accumulates shifted sums ``sum(v - K)``, ``sum((v - K)**2)`` about its own
first value ``K`` (float32 accumulators for float16 data, float64 otherwise),
turns them into ``(n, mean, m2)``, the block merges those in shared memory
with Chan's formula in float64 (a tree over ``threadIdx.y``/the block; the
simulator has no warp shuffles, so shared memory is the only path), and the
last block to finish a channel (an integer arrival counter, ``_arrive``)
merges that channel's block partials in a fixed order and finishes it: the
statistics, and for the fused paths (``train3``, ``backward3``,
``infer_backward3``) fastbn.core's per-channel formulas, the running
statistics and the next pass's coefficients.  So a training forward is two
launches, inference one (``infer3``: each thread computes its channel's
coefficients), a backward two.

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


_why_not = None   # unavailable_reason's answer, asked once ("" = available)


def unavailable_reason():
    """None when kernels can run here (a GPU, or the CUDA simulator), else why not.

    A driver is not enough: numba-cuda without its compilers (NVVM, NVRTC:
    ``pip install "numba-cuda[cu13]"``, the ``cuda`` extra) finds the GPU and
    fails at the first call, so a tiny kernel with a float16 load (the part
    that needs NVRTC) is compiled for the device once and the answer kept.
    """
    global _why_not
    if _why_not is None:
        _why_not = _probe() or ""
    return _why_not or None


def _probe():
    if cuda is None:
        return _IMPORT_ERROR
    if rt.simulator():
        return None
    try:
        if not cuda.is_available():
            return "no CUDA driver or GPU (numba.cuda.is_available() is False)"
    except Exception as exc:  # noqa: BLE001 - a broken driver install
        return f"no usable CUDA driver ({type(exc).__name__}: {exc})"
    try:
        cc = cuda.get_current_device().compute_capability
        f16 = numba.from_dtype(np.dtype(np.float16))
        cuda.compile_ptx(_probe_kernel, (numba.float32[:], f16[:]), cc=cc)
    except Exception as exc:  # noqa: BLE001 - missing NVVM/NVRTC libraries, an unsupported device
        return (f"a CUDA GPU is present but numba-cuda cannot compile kernels ({type(exc).__name__}: "
                f"{str(exc).strip()[:200]}); install the compilers: pip install 'fastbn[cuda]' "
                "(numba-cuda[cu13])")
    return None


def _probe_kernel(out, a):
    i = cuda.grid(1)
    if i < a.shape[0]:
        out[i] = a[i]


if cuda is not None:
    # Numba's own on-disk cache (next to this file) saves recompiling every
    # kernel in every process; FASTBN_CACHE=0 turns it off as for the CPU kernels.
    _CACHE = not rt.simulator() and cache_enabled()
    _f64 = numba.float64
    # Every FASTBN_CUDA_TPB up to 1024 must launch: launch bounds of 1024
    # threads make the compiler keep each kernel within 64 registers per
    # thread (1024 x 64 = one SM's register file), spilling rather than
    # failing with CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES.  The simulator's jit
    # has no such option.
    MAX_TPB = 1024
    _JIT_KW = {} if rt.simulator() else {"launch_bounds": (MAX_TPB,)}

    def _kernel(func):
        if _CACHE:
            try:
                return cuda.jit(cache=True, **_JIT_KW)(func)
            except Exception:  # noqa: BLE001 - no usable cache location
                pass
        return cuda.jit(**_JIT_KW)(func)

    _dev = cuda.jit(device=True)
    # Inlined into the Numba IR of the caller: a device function may only
    # return arrays it was passed, and _flat returns a new view.
    _dev_inline = cuda.jit(device=True, inline="always")
    # A derived array of given shape and byte strides over the same memory,
    # created inline; the simulator's kernels are Python on NumPy arrays.
    if rt.simulator():
        _as_strided = np.lib.stride_tricks.as_strided
    else:
        try:
            from numba.cuda.np.arrayobj import reshape_unchecked as _as_strided
        except ImportError:  # numba-cuda before its own copy of Numba's array lowering
            from numba.np.arrayobj import reshape_unchecked as _as_strided
    # Indices of the flat views are non-negative byte offsets: as unsigned
    # values Numba emits no negative-index wraparound for them.
    _U = numba.uint64

    def _cvt(zero, v):
        """``v`` converted to the type of ``zero`` (the accumulator dtype); the
        simulator's NumPy scalars promote the same way."""
        return zero + v

    if not rt.simulator():
        try:
            from numba.cuda.extending import overload as _overload
        except ImportError:  # numba-cuda before its own extending module
            from numba.core.extending import overload as _overload

        @_overload(_cvt, target="cuda")
        def _cvt_cuda(zero, v):
            # A plain conversion: ``zero + v`` is one more float add per element
            # (x + 0.0 is not x for x = -0.0, so the compiler keeps it).
            acc = zero
            return lambda zero, v: acc(v)

    # Bits of the ``flags`` argument of the fused kernels: what the last
    # block computes per channel and which optional vectors were given.
    F_TRAIN, F_SCALE, F_OFFSET, F_RMEAN, F_RVAR, F_BACKWARD, F_INFER_BACKWARD, F_MEAN, F_VAR = (
        1, 2, 4, 8, 16, 32, 64, 128, 256)

    # -- device helpers --------------------------------------------------------

    @_dev_inline
    def _flat(x):
        """(f, base): ``f`` a 1-D view of the memory of the 3-D array ``x`` from
        its lowest address, indexed by byte offset (stride 1 byte), and
        ``base`` the byte offset of ``x[0, 0, 0]`` in it, so that
        ``x[o, c, i] == f[base + o*s0 + c*s1 + i*s2]`` (``x.strides``), every
        offset non-negative.  One 64-bit offset per thread, advanced by adds,
        replaces three signed indices multiplied out per element."""
        s0, s1, s2 = x.strides
        b0 = x.shape[0] - 1 if s0 < 0 else 0
        b1 = x.shape[1] - 1 if s1 < 0 else 0
        b2 = x.shape[2] - 1 if s2 < 0 else 0
        span = (x.itemsize + abs(s0) * (x.shape[0] - 1) + abs(s1) * (x.shape[1] - 1)
                + abs(s2) * (x.shape[2] - 1))
        return _as_strided(x[b0:, b1:, b2:], (span,), (1,)), -(b0 * s0 + b1 * s1 + b2 * s2)

    @_dev_inline
    def _col(x, o, c, i, TY, n):
        """``x[o : o + n*TY : TY, c, i]``, one thread's column of the column
        mapping (rows o, o + TY, ... of the 3-D array ``x``), as a 1-D view of
        ``n`` values with byte stride ``TY * x.strides[0]`` (any sign).
        Read at unsigned constant indices and advanced by _fwd, it compiles to
        one 64-bit pointer per array and thread stepped by that stride: no
        per-element index products, no wraparound checks, 64-bit offsets."""
        # Integer indices (unsigned: no wraparound) move the data pointer
        # without the clamping of slices.
        s0, _, s2 = x.strides
        return _as_strided(x[_U(o), _U(c)], (x.shape[2], n), (s2, TY * s0))[_U(i)]

    @_dev_inline
    def _fwd(v, k):
        """``v[k:]`` of a 1-D view ``v``, 0 <= k <= len(v): its data pointer moved
        by ``k`` strides, one 64-bit add (an integer index into a 2-D view
        whose rows are ``k`` strides apart: no slice clamping).  Loops advance
        their views by this rather than index them by a growing row number,
        which the compiler turned back into a 64-bit product per element."""
        n = v.shape[0]
        st = v.strides[0]
        return _as_strided(v, (2, n - k), (k * st, st))[_U(1)]

    @_dev
    def _adv(off, i, dr, back, d, dw, iz):
        """Byte offset ``off`` of in-row index ``i`` (0 <= i < inner) advanced by
        one block stride: ``dr`` (< inner) more in the row and byte step ``d``,
        or, when that passes the row's end (i >= back = inner - dr), ``i - back``
        on the next row and byte step ``dw`` (see _moments_rows), in the integer
        type of ``iz``: int32 where the host found every offset below 2**31
        (see _index_zero), else int64.  Neither leaves its range (offsets stay
        in [0, span), ``i`` in [0, inner)), so nothing can overflow."""
        if i >= back:
            return _cvt(iz, off + dw), _cvt(iz, i - back)
        return _cvt(iz, off + d), _cvt(iz, i + dr)

    @_dev
    def _adv2(off, off2, i, dr, back, d, dw, d2, dw2, iz):
        """_adv for two arrays of one shape (own strides) walked together."""
        if i >= back:
            return _cvt(iz, off + dw), _cvt(iz, off2 + dw2), _cvt(iz, i - back)
        return _cvt(iz, off + d), _cvt(iz, off2 + d2), _cvt(iz, i + dr)

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

    @_dev
    def _arrive(sh, t, cnt, idx, expected):
        """True in the block that finishes last among the ``expected`` blocks counted
        at ``cnt[idx]`` (every thread of the block calls this; it syncs).

        The fence makes this block's partials visible before its arrival is
        counted, so the last block reads every partial: the merge that needed
        a second kernel runs in the same launch.  sh[0] carries the answer.
        """
        cuda.threadfence()
        cuda.syncthreads()
        if t == 0:
            old = cuda.atomic.add(cnt, idx, 1)
            sh[0] = 1.0 if old == expected - 1 else 0.0
        cuda.syncthreads()
        last = sh[0] != 0.0
        cuda.syncthreads()
        return last

    @_dev
    def _rsqrt(s):
        """1/sqrt(s) as NumPy gives it: inf at 0, NaN below 0 or for NaN."""
        if s > 0.0:
            return 1.0 / math.sqrt(s)
        if s == 0.0:
            return math.inf
        return math.nan

    @_dev
    def _fin_moments(c, n, mean, m2, stat, prm, mout, iout, scale, offset, rm, rv, eps, mom, flags):
        """Channel c's merged moments -> stat; for training also fastbn.core's
        train_coefficients and running_update in float64: the affine pass's
        [m, q, r] (prm), the batch mean and invstd, the running statistics.
        F_VAR (``moments``): the mean and core.variance ``m2 / (n - ddof)``
        (``eps`` carries ddof) into mout and iout."""
        stat[0, c] = mean
        stat[1, c] = m2
        if flags & F_VAR:
            mout[c] = mean
            den = n - eps
            if den > 0.0:
                iout[c] = m2 / den
            elif m2 > 0.0:  # NumPy's x / 0: inf, and NaN for 0 / 0 or NaN
                iout[c] = math.inf
            else:
                iout[c] = math.nan
        if flags & F_TRAIN:
            s = m2 / n + eps
            inv = 0.0  # PyTorch's var + eps == 0 rule; NaN stays NaN
            if s != 0.0:
                inv = 1.0 / math.sqrt(s)
            q = float(scale[c]) * inv if flags & F_SCALE else inv
            prm[0, c] = mean
            prm[1, c] = q
            prm[2, c] = float(offset[c]) if flags & F_OFFSET else 0.0
            mout[c] = mean
            iout[c] = inv
            if flags & F_RMEAN:
                rm[c] = (1.0 - mom) * float(rm[c]) + mom * mean
            if flags & F_RVAR:
                rv[c] = (1.0 - mom) * float(rv[c]) + mom * (m2 / (n - 1.0))

    @_dev
    def _fin_sums(c, n, sdy, sdyx, stat, prm, dsout, doout, mean, scale, w, eps, flags):
        """Channel c's (sum dy, sum dy*(x - mean)) -> stat; for a backward also
        fastbn.core's gradient sums and coefficients in float64.

        F_BACKWARD (w = invstd): dscale, doffset and the dx pass's [m, b, c, a]
        (backward_coefficients) in prm.  F_INFER_BACKWARD (w = var): dscale and
        doffset of infer_backward_coefficients (its dx needs no sums).
        """
        stat[0, c] = sdy
        stat[1, c] = sdyx
        if flags & F_BACKWARD:
            inv = float(w[c])
            dscale = sdyx * inv
            a = float(scale[c]) * inv if flags & F_SCALE else inv
            nn = max(n, 1.0)
            prm[0, c] = mean[c]
            prm[1, c] = -a * inv * dscale / nn
            prm[2, c] = -a * sdy / nn
            prm[3, c] = a
            dsout[c] = dscale
            doout[c] = sdy
        elif flags & F_INFER_BACKWARD:
            dsout[c] = sdyx * _rsqrt(float(w[c]) + eps)
            doout[c] = sdy

    @_dev
    def _block_chan(sh, t, nt, part, base, P):
        """Merge part[:, base:base+P] with the whole block (fixed order) into sh[0], sh[nt], sh[2nt]."""
        n = 0.0
        m = 0.0
        q = 0.0
        for p in range(base + t, base + P, nt):
            n, m, q = _chan(n, m, q, part[0, p], part[1, p], part[2, p])
        sh[t] = n
        sh[nt + t] = m
        sh[2 * nt + t] = q
        cuda.syncthreads()
        _tree_chan(sh, nt, t, nt, 0, 1)

    @_dev
    def _block_add(sh, t, nt, part, base, P):
        """Sum part[:, base:base+P] with the whole block (fixed order) into sh[0], sh[nt]."""
        u = 0.0
        v = 0.0
        for p in range(base + t, base + P, nt):
            u += part[0, p]
            v += part[1, p]
        sh[t] = u
        sh[nt + t] = v
        cuda.syncthreads()
        _tree_add(sh, nt, t, nt, 0, 1)

    # -- reductions with their per-channel finish ------------------------------------
    #
    # Two-stage and deterministic (no float atomics): each block writes its
    # partials, then the last block to arrive (_arrive; an integer counter per
    # channel or column block, reset by that block) merges them in a fixed
    # order and runs the per-channel finish.  One launch per reduction.

    @_kernel
    def _moments_cols(x, zero, rows_per, part, cnt, stat, prm, mout, iout, scale, offset, rm, rv,
                      eps, mom, flags):
        """Column mapping; blocks hold whole channels (blockDim.x is a multiple of inner)."""
        sh = cuda.shared.array(0, dtype=_f64)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        TX = cuda.blockDim.x
        TY = cuda.blockDim.y
        nt = TX * TY
        t = ty * TX + tx
        outer = x.shape[0]
        C = x.shape[1]
        inner = x.shape[2]
        ncols = C * inner
        nsplit = cuda.gridDim.y
        j = cuda.blockIdx.x * TX + tx
        s = cuda.blockIdx.y
        o = s * rows_per + ty
        o1 = min(outer, s * rows_per + rows_per)
        n = 0.0
        mean = 0.0
        m2 = 0.0
        if j < ncols and o < o1:
            c = j // inner
            i = j - c * inner
            cnt_ = (o1 - o + TY - 1) // TY
            xc = _col(x, o, c, i, TY, cnt_)
            k = _cvt(zero, xc[_U(0)])
            if not math.isfinite(k):  # an inf pivot would turn every value into NaN
                k = zero
            s1 = zero
            s2 = zero
            m = cnt_
            while m >= 4:
                d0 = xc[_U(0)] - k  # in k's (the accumulator's) dtype
                d1 = xc[_U(1)] - k
                d2 = xc[_U(2)] - k
                d3 = xc[_U(3)] - k
                s1 += (d0 + d1) + (d2 + d3)
                s2 += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                xc = _fwd(xc, 4)
                m -= 4
            while m > 0:
                d0 = xc[_U(0)] - k
                s1 += d0
                s2 += d0 * d0
                xc = _fwd(xc, 1)
                m -= 1
            n, mean, m2 = _partial(cnt_, k, s1, s2)
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
        if _arrive(sh, t, cnt, cuda.blockIdx.x, nsplit):
            # This block's columns over every split, then its channels over their columns.
            n = 0.0
            mean = 0.0
            m2 = 0.0
            if j < ncols:
                for p in range(j * nsplit + ty, j * nsplit + nsplit, TY):
                    n, mean, m2 = _chan(n, mean, m2, part[0, p], part[1, p], part[2, p])
            sh[t] = n
            sh[nt + t] = mean
            sh[2 * nt + t] = m2
            cuda.syncthreads()
            _tree_chan(sh, nt, ty, TY, tx, TX)
            c0 = (cuda.blockIdx.x * TX) // inner
            if t < min(TX // inner, C - c0):
                n = 0.0
                mean = 0.0
                m2 = 0.0
                for a in range(t * inner, t * inner + inner):
                    n, mean, m2 = _chan(n, mean, m2, sh[a], sh[nt + a], sh[2 * nt + a])
                _fin_moments(c0 + t, n, mean, m2, stat, prm, mout, iout, scale, offset, rm, rv,
                             eps, mom, flags)
            if t == 0:
                cnt[cuda.blockIdx.x] = 0

    @_kernel
    def _moments_rows(x, zero, iz, chunk, part, cnt, stat, prm, mout, iout, scale, offset, rm,
                      rv, eps, mom, flags):
        """Row mapping: block (s, c) reduces flat values [s*chunk, (s+1)*chunk) of channel c;
        the walk's offsets and in-row index in ``iz``'s integer type (see _adv)."""
        sh = cuda.shared.array(0, dtype=_f64)
        t = cuda.threadIdx.x
        nt = cuda.blockDim.x
        outer = x.shape[0]
        C = x.shape[1]
        inner = x.shape[2]
        s = cuda.blockIdx.x
        nsplit = cuda.gridDim.x
        end = min(outer * inner, s * chunk + chunk)
        xf, base = _flat(x)
        st0, st1, st2 = x.strides
        dq = nt // inner
        dr = _cvt(iz, nt - dq * inner)
        back = _cvt(iz, inner - dr)
        d = _cvt(iz, dq * st0 + dr * st2)  # bytes from one value of a thread to its next
        dw = _cvt(iz, d + (st0 - inner * st2))  # ... when that next value is on a later row
        for c in range(cuda.blockIdx.y, C, cuda.gridDim.y):
            kk = s * chunk + t
            n = 0.0
            mean = 0.0
            m2 = 0.0
            if kk < end:
                cnt_ = (end - kk + nt - 1) // nt
                o = kk // inner
                i = _cvt(iz, kk - o * inner)
                a0 = _cvt(iz, base + o * st0 + c * st1 + i * st2)
                k = _cvt(zero, xf[_U(a0)])
                if not math.isfinite(k):  # an inf pivot would turn every value into NaN
                    k = zero
                s1 = zero
                s2 = zero
                m = cnt_
                while m >= 4:
                    a1, i = _adv(a0, i, dr, back, d, dw, iz)
                    a2, i = _adv(a1, i, dr, back, d, dw, iz)
                    a3, i = _adv(a2, i, dr, back, d, dw, iz)
                    d0 = xf[_U(a0)] - k  # in k's (the accumulator's) dtype
                    d1 = xf[_U(a1)] - k
                    d2 = xf[_U(a2)] - k
                    d3 = xf[_U(a3)] - k
                    s1 += (d0 + d1) + (d2 + d3)
                    s2 += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                    a0, i = _adv(a3, i, dr, back, d, dw, iz)
                    m -= 4
                while m > 0:
                    d0 = xf[_U(a0)] - k
                    s1 += d0
                    s2 += d0 * d0
                    a0, i = _adv(a0, i, dr, back, d, dw, iz)
                    m -= 1
                n, mean, m2 = _partial(cnt_, k, s1, s2)
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
            if _arrive(sh, t, cnt, c, nsplit):
                _block_chan(sh, t, nt, part, c * nsplit, nsplit)
                if t == 0:
                    _fin_moments(c, sh[0], sh[nt], sh[2 * nt], stat, prm, mout, iout, scale, offset,
                                 rm, rv, eps, mom, flags)
                    cnt[c] = 0
            cuda.syncthreads()  # sh is reused for the next channel

    @_kernel
    def _dysums_cols(dy, x, m, zero, rows_per, part, cnt, stat, prm, dsout, doout, scale, w,
                     eps, nval, flags):
        """Column mapping of the backward sums (see _moments_cols); m: the mean vector."""
        sh = cuda.shared.array(0, dtype=_f64)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        TX = cuda.blockDim.x
        TY = cuda.blockDim.y
        nt = TX * TY
        t = ty * TX + tx
        outer = x.shape[0]
        C = x.shape[1]
        inner = x.shape[2]
        ncols = C * inner
        nsplit = cuda.gridDim.y
        j = cuda.blockIdx.x * TX + tx
        s = cuda.blockIdx.y
        o = s * rows_per + ty
        o1 = min(outer, s * rows_per + rows_per)
        a = 0.0
        b = 0.0
        if j < ncols and o < o1:
            c = j // inner
            i = j - c * inner
            mc = _cvt(zero, m[c])
            n = (o1 - o + TY - 1) // TY
            xc = _col(x, o, c, i, TY, n)
            gc = _col(dy, o, c, i, TY, n)
            sa = zero
            sb = zero
            while n >= 4:
                g0 = _cvt(zero, gc[_U(0)])
                g1 = _cvt(zero, gc[_U(1)])
                g2 = _cvt(zero, gc[_U(2)])
                g3 = _cvt(zero, gc[_U(3)])
                e0 = xc[_U(0)] - mc  # in mc's (the accumulator's) dtype
                e1 = xc[_U(1)] - mc
                e2 = xc[_U(2)] - mc
                e3 = xc[_U(3)] - mc
                sa += (g0 + g1) + (g2 + g3)
                sb += (g0 * e0 + g1 * e1) + (g2 * e2 + g3 * e3)
                xc = _fwd(xc, 4)
                gc = _fwd(gc, 4)
                n -= 4
            while n > 0:
                g0 = _cvt(zero, gc[_U(0)])
                sa += g0
                sb += g0 * (xc[_U(0)] - mc)
                xc = _fwd(xc, 1)
                gc = _fwd(gc, 1)
                n -= 1
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
        if _arrive(sh, t, cnt, cuda.blockIdx.x, nsplit):
            a = 0.0
            b = 0.0
            if j < ncols:
                for p in range(j * nsplit + ty, j * nsplit + nsplit, TY):
                    a += part[0, p]
                    b += part[1, p]
            sh[t] = a
            sh[nt + t] = b
            cuda.syncthreads()
            _tree_add(sh, nt, ty, TY, tx, TX)
            c0 = (cuda.blockIdx.x * TX) // inner
            if t < min(TX // inner, C - c0):
                a = 0.0
                b = 0.0
                for k in range(t * inner, t * inner + inner):
                    a += sh[k]
                    b += sh[nt + k]
                _fin_sums(c0 + t, nval, a, b, stat, prm, dsout, doout, m, scale, w, eps, flags)
            if t == 0:
                cnt[cuda.blockIdx.x] = 0

    @_kernel
    def _dysums_rows(dy, x, m, zero, iz, chunk, part, cnt, stat, prm, dsout, doout, scale, w,
                     eps, nval, flags):
        """Row mapping of the backward sums (see _moments_rows); m: the mean vector."""
        sh = cuda.shared.array(0, dtype=_f64)
        t = cuda.threadIdx.x
        nt = cuda.blockDim.x
        outer = x.shape[0]
        C = x.shape[1]
        inner = x.shape[2]
        s = cuda.blockIdx.x
        nsplit = cuda.gridDim.x
        end = min(outer * inner, s * chunk + chunk)
        xf, xbase = _flat(x)
        gf, gbase = _flat(dy)
        st0, st1, st2 = x.strides
        gt0, gt1, gt2 = dy.strides
        dq = nt // inner
        dr = _cvt(iz, nt - dq * inner)
        back = _cvt(iz, inner - dr)
        d = _cvt(iz, dq * st0 + dr * st2)  # byte steps as in _moments_rows, x's and dy's
        dw = _cvt(iz, d + (st0 - inner * st2))
        gd = _cvt(iz, dq * gt0 + dr * gt2)
        gdw = _cvt(iz, gd + (gt0 - inner * gt2))
        for c in range(cuda.blockIdx.y, C, cuda.gridDim.y):
            kk = s * chunk + t
            a = 0.0
            b = 0.0
            if kk < end:
                mc = _cvt(zero, m[c])
                o = kk // inner
                i = _cvt(iz, kk - o * inner)
                a0 = _cvt(iz, xbase + o * st0 + c * st1 + i * st2)
                b0 = _cvt(iz, gbase + o * gt0 + c * gt1 + i * gt2)
                sa = zero
                sb = zero
                n = (end - kk + nt - 1) // nt
                while n >= 4:
                    a1, b1, i = _adv2(a0, b0, i, dr, back, d, dw, gd, gdw, iz)
                    a2, b2, i = _adv2(a1, b1, i, dr, back, d, dw, gd, gdw, iz)
                    a3, b3, i = _adv2(a2, b2, i, dr, back, d, dw, gd, gdw, iz)
                    g0 = _cvt(zero, gf[_U(b0)])
                    g1 = _cvt(zero, gf[_U(b1)])
                    g2 = _cvt(zero, gf[_U(b2)])
                    g3 = _cvt(zero, gf[_U(b3)])
                    e0 = xf[_U(a0)] - mc  # in mc's (the accumulator's) dtype
                    e1 = xf[_U(a1)] - mc
                    e2 = xf[_U(a2)] - mc
                    e3 = xf[_U(a3)] - mc
                    sa += (g0 + g1) + (g2 + g3)
                    sb += (g0 * e0 + g1 * e1) + (g2 * e2 + g3 * e3)
                    a0, b0, i = _adv2(a3, b3, i, dr, back, d, dw, gd, gdw, iz)
                    n -= 4
                while n > 0:
                    g0 = _cvt(zero, gf[_U(b0)])
                    sa += g0
                    sb += g0 * (xf[_U(a0)] - mc)
                    a0, b0, i = _adv2(a0, b0, i, dr, back, d, dw, gd, gdw, iz)
                    n -= 1
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
            if _arrive(sh, t, cnt, c, nsplit):
                _block_add(sh, t, nt, part, c * nsplit, nsplit)
                if t == 0:
                    _fin_sums(c, nval, sh[0], sh[nt], stat, prm, dsout, doout, m, scale, w, eps,
                              flags)
                    cnt[c] = 0
            cuda.syncthreads()

    # -- elementwise ---------------------------------------------------------------------

    @_dev_inline
    def _affine_col(x, out, c, i, o, o1, TY, mc, qc, rc):
        """out[o', c, i] = qc*(x[o', c, i] - mc) + rc for o' = o, o + TY, ... < o1 (x, out:
        (outer, C, inner)): one thread's column of the columns-mapped elementwise
        kernels, walked as 1-D views (_col).  Inlined: _col returns new views."""
        n = (o1 - o + TY - 1) // TY
        if n <= 0:
            return
        xc = _col(x, o, c, i, TY, n)
        oc = _col(out, o, c, i, TY, n)
        while n >= 4:
            # Four loads before the stores: more bytes in flight, and out may be x.
            v0 = xc[_U(0)]
            v1 = xc[_U(1)]
            v2 = xc[_U(2)]
            v3 = xc[_U(3)]
            oc[_U(0)] = qc * (v0 - mc) + rc
            oc[_U(1)] = qc * (v1 - mc) + rc
            oc[_U(2)] = qc * (v2 - mc) + rc
            oc[_U(3)] = qc * (v3 - mc) + rc
            xc = _fwd(xc, 4)
            oc = _fwd(oc, 4)
            n -= 4
        while n > 0:
            oc[_U(0)] = qc * (xc[_U(0)] - mc) + rc
            xc = _fwd(xc, 1)
            oc = _fwd(oc, 1)
            n -= 1

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
        _affine_col(x, out, c, i, o, min(outer, cuda.blockIdx.y * rows_per + rows_per), TY,
                    mc, qc, rc)

    @_kernel
    def _infer_cols(x, scale, offset, mean, var, eps, flags, out, rows_per):
        """out = q*(x - m) + r per channel with fastbn.core's infer_coefficients
        (q = scale/sqrt(var + eps), r = offset) computed by each thread for its
        channel: inference in one launch.  Without F_MEAN/F_OFFSET m/r are 0
        (x = dy, offset None: the inference backward's dx = dy*scale/sqrt(var + eps))."""
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
        q = _rsqrt(float(var[c]) + eps)
        if flags & F_SCALE:
            q = float(scale[c]) * q
        # float64 per element (one rounding to out's dtype): a kernel cannot
        # name the compute dtype of its data to round the coefficients to.
        qc = q
        mc = 0.0
        rc = 0.0
        if flags & F_MEAN:
            mc = float(mean[c])
        if flags & F_OFFSET:
            rc = float(offset[c])
        o = cuda.blockIdx.y * rows_per + ty
        _affine_col(x, out, c, i, o, min(outer, cuda.blockIdx.y * rows_per + rows_per), TY,
                    mc, qc, rc)

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
        n = (min(outer, cuda.blockIdx.y * rows_per + rows_per) - o + TY - 1) // TY
        if n <= 0:
            return
        xc = _col(x, o, c, i, TY, n)
        uc = _col(u, o, c, i, TY, n)
        oc = _col(out, o, c, i, TY, n)
        while n >= 2:
            # Loads before the stores: out may be x or u.
            v0 = xc[_U(0)]
            v1 = xc[_U(1)]
            w0 = uc[_U(0)]
            w1 = uc[_U(1)]
            oc[_U(0)] = qc * (v0 - mc) + rc + pc * w0
            oc[_U(1)] = qc * (v1 - mc) + rc + pc * w1
            xc = _fwd(xc, 2)
            uc = _fwd(uc, 2)
            oc = _fwd(oc, 2)
            n -= 2
        if n > 0:
            oc[_U(0)] = qc * (xc[_U(0)] - mc) + rc + pc * uc[_U(0)]

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

def _launch(kern, grid, block, shmem, stream, *args):
    """``kern[grid, block, stream, shmem](*args)``; ``stream`` None: CuPy's current
    stream (:func:`fastbn.kernels.cuda_runtime.stream`).  Every kernel launch of
    this module goes through here (the tests count launches by patching it).

    Numba warns about grids under 128 blocks; small inputs here legitimately
    launch few blocks, so that warning is silenced for our small launches only.
    """
    if stream is None:
        stream = rt.stream()
    grid = grid if isinstance(grid, tuple) else (grid,)
    if math.prod(grid) >= 128:
        return kern[grid, block, stream, shmem](*args)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Grid size", category=NumbaPerformanceWarning)
        return kern[grid, block, stream, shmem](*args)


def _tpb():
    tpb = int(TPB)
    if not 1 <= tpb <= 1024:
        raise ValueError(f"cuda_numba.TPB must be in [1, 1024], got {tpb}")
    return tpb


def _target_blocks(tpb):
    if TARGET_BLOCKS is not None:
        return max(1, int(TARGET_BLOCKS))
    return 2 * rt.sm_count() * max(1, 2048 // tpb)


def _cols_config(ncols, rows, tpb, inner=1):
    """(grid, block, rows_per, nsplit) for the column mapping over ncols x rows.

    ``inner``: blocks must hold whole channels (the reductions' last block
    finishes the channels of its columns), so blockDim.x is a multiple of it.
    """
    tx = min(ncols, tpb)
    tx -= tx % inner
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


def _use_rows(inner, tpb):
    # The column mapping needs a whole channel (inner columns) in one block.
    return inner >= ROWS_MIN_INNER or inner > tpb


# -- the primitives ----------------------------------------------------------------------------

_KERNELS = {"moments": ("_moments_rows", "_moments_cols", 3), "sums": ("_dysums_rows", "_dysums_cols", 2)}


def _reduce(kind, x, lead, tail, stream):
    """One launch: per-channel reduction ``kind`` of ``x`` (outer, C, inner) with
    the kernel arguments ``lead`` before and ``tail`` after the launch geometry,
    block partials and arrival counters (scratch of ``stream``)."""
    rows_name, cols_name, fields = _KERNELS[kind]
    outer, C, inner = (int(s) for s in x.shape)
    tpb = _tpb()
    f64 = np.float64
    if _use_rows(inner, tpb):
        grid, chunk, nsplit = _rows_config(outer * inner, C, tpb)
        part = rt.scratch(stream, "part", (fields, C * nsplit), f64)
        cnt = rt.counters(stream, C)
        _launch(globals()[rows_name], grid, tpb, 8 * fields * tpb, stream, *lead,
                _index_zero(a for a in lead if getattr(a, "ndim", 0) == 3), chunk, part, cnt, *tail)
    else:
        grid, block, rows_per, nsplit = _cols_config(C * inner, outer, tpb, inner)
        part = rt.scratch(stream, "part", (fields, C * inner * nsplit), f64)
        cnt = rt.counters(stream, grid[0])
        _launch(globals()[cols_name], grid, block, 8 * fields * block[0] * block[1], stream, *lead,
                rows_per, part, cnt, *tail)


def _index_zero(arrays):
    """The zero of the row kernels' walk (see _adv): int32 where every byte offset
    into each array's memory (its span, as _flat views it) is below 2**31, so the
    in-loop offsets and in-row index are 32-bit (3-4 fewer instructions per value),
    else int64."""
    for a in arrays:
        span = a.dtype.itemsize + sum(abs(int(st)) * (int(n) - 1)
                                      for st, n in zip(a.strides, a.shape))
        if span >= 2**31:
            return np.int64(0)
    return np.int32(0)


def _flags(**given):
    bits = {"scale": F_SCALE, "offset": F_OFFSET, "rm": F_RMEAN, "rv": F_RVAR, "mean": F_MEAN}
    return sum(bits[k] for k, v in given.items() if v is not None)


def moments3(x3):
    """(outer, C, inner) device array -> per-channel (mean, m2), float64 working vectors."""
    x = rt.to_numba(x3)
    outer, C, inner = (int(s) for s in x.shape)
    if C == 0 or outer * inner == 0:
        return rt.vector_pair(*rt.full((2, C), np.nan, np.float64))
    res_o, res = rt.empty((2, C), np.float64)
    d = rt.scratch(None, "dummy", (1,), np.float64)
    _reduce("moments", x, (x, _acc(x.dtype).type(0)), (res, res, d, d, d, d, d, d, 0.0, 0.0, 0), None)
    return rt.vector_pair(res_o, res)


def moments_var3(x, mean_out, var_out, ddof, stream):
    """``moments`` on a Numba view in one launch (n > 0, C > 0): the reduction's
    last blocks write each channel's mean and variance ``m2 / (n - ddof)``
    (computed in float64, rounded once) into ``mean_out``/``var_out`` ((C,), any
    float dtype), on ``stream``."""
    C = int(x.shape[1])
    stat = rt.scratch(stream, "stat", (2, C), np.float64)
    d = mean_out  # stands in for the training vectors: F_VAR never touches them
    _reduce("moments", x, (x, _acc(x.dtype).type(0)),
            (stat, stat, mean_out, var_out, d, d, d, d, float(ddof), 0.0, F_VAR), stream)


def dy_sums3(dy3, x3, m):
    """Per-channel (sum(dy), sum(dy*(x - m))) of two (outer, C, inner) device arrays, float64."""
    x = rt.to_numba(x3)
    dy = rt.to_numba(dy3)
    outer, C, inner = (int(s) for s in x.shape)
    if C == 0 or outer * inner == 0:
        return rt.vector_pair(*rt.full((2, C), 0.0, np.float64))
    res_o, res = rt.empty((2, C), np.float64)
    d = rt.scratch(None, "dummy", (1,), np.float64)
    md = rt.to_numba(m)
    _reduce("sums", x, (dy, x, md, _acc(x.dtype).type(0)), (res, res, d, d, d, d, 0.0, 0.0, 0), None)
    return rt.vector_pair(res_o, res)


def train3(x, y, mean_out, inv_out, scale, offset, rm, rv, eps, momentum, stream):
    """The training forward on Numba views in two launches (n > 0, C > 0).

    The reduction's last blocks compute fastbn.core's train_coefficients and
    running_update per channel (writing ``mean_out``, ``inv_out`` and the
    running statistics ``rm``/``rv`` in place, None: not tracked); the second
    launch writes ``y = q*(x - mean) + r``.  ``y`` may be ``x``.  Vectors may be
    of any float dtype and stride.
    """
    outer, C, inner = (int(s) for s in x.shape)
    acc = _acc(x.dtype)
    prm = rt.scratch(stream, "prm", (3, C), acc)
    stat = rt.scratch(stream, "stat", (2, C), np.float64)
    flags = F_TRAIN | _flags(scale=scale, offset=offset, rm=rm, rv=rv)
    d = mean_out  # stands in for an absent vector: the flags say it is never touched
    _reduce("moments", x, (x, acc.type(0)),
            (stat, prm, mean_out, inv_out, d if scale is None else scale, d if offset is None else offset,
             d if rm is None else rm, d if rv is None else rv, float(eps), float(momentum), flags), stream)
    grid, block, rows_per, _ = _cols_config(C * inner, outer, _tpb())
    _launch(_affine_cols, grid, block, 0, stream, x, prm, y, rows_per)
    return y


def infer3(x, y, scale, offset, mean, var, eps, stream):
    """The inference forward on Numba views in one launch (coefficients per thread)."""
    outer, C, inner = (int(s) for s in x.shape)
    d = var
    grid, block, rows_per, _ = _cols_config(C * inner, outer, _tpb())
    _launch(_infer_cols, grid, block, 0, stream, x, d if scale is None else scale,
            d if offset is None else offset, mean, var, float(eps),
            _flags(scale=scale, offset=offset, mean=mean), y, rows_per)
    return y


def backward3(dy, x, dx, dscale_out, doffset_out, scale, mean, invstd, stream):
    """The training backward on Numba views in two launches (n > 0, C > 0): the
    sums' last blocks compute dscale, doffset and backward_coefficients; the
    second launch writes ``dx``.  ``dx`` may be ``dy`` or ``x``."""
    outer, C, inner = (int(s) for s in x.shape)
    acc = _acc(x.dtype)
    prm = rt.scratch(stream, "prm", (4, C), acc)
    stat = rt.scratch(stream, "stat", (2, C), np.float64)
    flags = F_BACKWARD | _flags(scale=scale)
    _reduce("sums", x, (dy, x, mean, acc.type(0)),
            (stat, prm, dscale_out, doffset_out, invstd if scale is None else scale, invstd, 0.0,
             float(outer * inner), flags), stream)
    grid, block, rows_per, _ = _cols_config(C * inner, outer, _tpb())
    _launch(_affine_u_cols, grid, block, 0, stream, x, prm, dx, dy, rows_per)
    return dx


def infer_backward3(dy, x, dx, dscale_out, doffset_out, scale, mean, var, eps, stream):
    """The inference backward on Numba views in two launches: the sums (with
    dscale, doffset finished in their last blocks), then ``dx = dy*scale/sqrt(var + eps)``."""
    outer, C, inner = (int(s) for s in x.shape)
    acc = _acc(x.dtype)
    stat = rt.scratch(stream, "stat", (2, C), np.float64)
    _reduce("sums", x, (dy, x, mean, acc.type(0)),
            (stat, stat, dscale_out, doffset_out, var, var, float(eps), float(outer * inner),
             F_INFER_BACKWARD), stream)
    grid, block, rows_per, _ = _cols_config(C * inner, outer, _tpb())
    _launch(_infer_cols, grid, block, 0, stream, dy, var if scale is None else scale, var, var, var,
            float(eps), _flags(scale=scale), dx, rows_per)
    return dx


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
        _launch(_affine_cols, grid, block, 0, None, x, prm, out, rows_per)
    else:
        _launch(_affine_u_cols, grid, block, 0, None, x, prm, out, rt.to_numba(u3), rows_per)
    del prm_o
    return out3


def copy3(src3, dst3, stream=None):
    """dst3[...] = src3 for two canonical device views of one shape and dtype."""
    src = rt.to_numba(src3)
    dst = rt.to_numba(dst3)
    outer, C, inner = (int(s) for s in src.shape)
    if outer * C * inner == 0:
        return dst3
    grid, block, rows_per, _ = _cols_config(C * inner, outer, _tpb())
    _launch(_copy3, grid, block, 0, stream, src, dst, rows_per)
    return dst3


def copy_nd(src_flat, soff, sstr, dst_flat, doff, dstr, shape, stream=None):
    """Strided N-d copy between flat element views (``fastbn.rt.flat``)."""
    n = math.prod(shape)
    if n == 0:
        return
    tpb = _tpb()
    blocks = max(1, min(-(-n // tpb), _target_blocks(tpb)))
    _launch(_copy_nd, blocks, tpb, 0, stream, src_flat, int(soff), tuple(int(s) for s in sstr), dst_flat,
            int(doff), tuple(int(s) for s in dstr), tuple(int(s) for s in shape), int(n))


# -- compiling without a GPU -------------------------------------------------------------------

def _signatures(dtype):
    """Kernel name -> argument types of the fused path for data of ``dtype`` (per-channel
    vectors of the per-channel dtype, strided views)."""
    from numba import types
    d = numba.from_dtype(np.dtype(dtype))
    acc = numba.from_dtype(_acc(dtype))
    pv = numba.from_dtype(np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(dtype))
    x3 = types.Array(d, 3, "A")
    v = types.Array(pv, 1, "A")
    m2 = types.Array(types.float64, 2, "C")
    p2 = types.Array(acc, 2, "C")
    cnt = types.Array(types.int32, 1, "C")
    i32, i64, f64 = types.int32, types.int64, types.float64
    mom_tail = (m2, p2, v, v, v, v, v, v, f64, f64, i64)
    sums_tail = (m2, p2, v, v, v, v, f64, f64, i64)
    return {   # the row kernels' walk in int32, as arrays below 2 GiB run it (_index_zero)
        "_moments_rows": (x3, acc, i32, i64, m2, cnt) + mom_tail,
        "_moments_cols": (x3, acc, i64, m2, cnt) + mom_tail,
        "_dysums_rows": (x3, x3, v, acc, i32, i64, m2, cnt) + sums_tail,
        "_dysums_cols": (x3, x3, v, acc, i64, m2, cnt) + sums_tail,
        "_affine_cols": (x3, p2, x3, i64),
        "_affine_u_cols": (x3, p2, x3, x3, i64),
        "_infer_cols": (x3, v, v, v, v, f64, i64, x3, i64),
    }


def compile_report(cc=(9, 0), dtypes=(np.float16, np.float32, np.float64), cubins=None):
    """Compile every kernel of the fused paths for compute capability ``cc``
    without a GPU (NVVM, then nvJitLink to a cubin) and return rows
    ``(kernel, dtype, registers, spill_stores, spill_loads)``.

    ``cubins``: a dict to receive each cubin's bytes under ``(kernel, dtype)``
    (``fastbn.tools.cuda_registers --loops`` disassembles them).

    Needs numba-cuda's compilers (``pip install "fastbn[cuda]"``); under the
    launch bounds of MAX_TPB threads every kernel must stay within 64 registers.
    """
    import types as pytypes

    from cuda.core import Linker, LinkerOptions, ObjectCode
    from numba.cuda import dispatcher
    rows = []
    arch = f"sm_{cc[0]}{cc[1]}"
    # Device functions compile for the current device's capability: without a
    # GPU (no driver) that question is answered with ``cc`` for the duration.
    saved = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=tuple(cc))
    try:
        _compile_rows(rows, cc, arch, dtypes, Linker, LinkerOptions, ObjectCode, cubins)
    finally:
        dispatcher.get_current_device = saved
    return rows


def _compile_rows(rows, cc, arch, dtypes, Linker, LinkerOptions, ObjectCode, cubins=None):
    import re
    for dtype in dtypes:
        for name, sig in _signatures(dtype).items():
            ptx, _ = cuda.compile_ptx(globals()[name].py_func, sig, cc=cc, launch_bounds=(MAX_TPB,))
            linker = Linker(ObjectCode.from_ptx(ptx.encode() if isinstance(ptx, str) else ptx),
                            options=LinkerOptions(arch=arch, verbose=True))
            cubin = linker.link("cubin")
            if cubins is not None:
                cubins[name, np.dtype(dtype).name] = bytes(cubin.code)
            log = linker.get_info_log() or ""
            regs = re.findall(r"Used (\d+) registers", log)
            spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
            rows.append((name, np.dtype(dtype).name, int(regs[-1]) if regs else None,
                         int(spill[-1][0]) if spill else 0, int(spill[-1][1]) if spill else 0))

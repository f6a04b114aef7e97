"""Compiled Cython CPU backend ("cython"): the fallback when Numba is absent.

Same primitives and algorithms as ``cpu_numba`` (see ``kernels/__init__.py``),
ahead-of-time compiled in ``_cython_kernels.pyx`` (OpenMP ``prange``, no GIL,
no JIT latency).  This module only prepares arguments: it picks the loop nest
for the canonical ``(O, C, I)`` view, sizes the parallel work split, passes
float16 as its uint16 bit pattern (converted in C), and copies the rare arrays
whose strides a typed memoryview cannot take (unaligned, or not a multiple of
the item size).

Work split (all of it a function of the shape only, so results are the same
for any thread count):

* ``I > 1`` (NCHW): ``I`` is cut in ``CHUNK``-long runs, and the threads
  share the ``O * C * ceil(I / CHUNK)`` runs in memory order (so C = 1 still
  fills every core and each thread streams through one part of memory); each
  run's summary is kept and merged per channel.
* ``I == 1`` (NHWC, (N, C)): tiles of ``TILE // C`` rows (a tile is re-read
  from L2 for the second statistics pass), grouped into row groups, times
  blocks of ``CBLOCK`` channels.
* ``1 < I <= FOLD_MAX`` (e.g. NCHW with 7x7 images): viewed as
  ``(O, C*I, 1)`` and run channels-last, then the ``I`` sub-columns of each
  channel are merged (Chan) here.  Short runs would cost more in per-run
  summaries than in data; where the ``(C, I)`` block is not evenly strided,
  the reductions fold a contiguous copy.

Inputs of at most ``SMALL`` values skip all of that: the training forward,
inference forward and training backward each run as one serial call
(``train_small3``, ``infer_small3``, ``backward_small3``, which
``fastbn.fastlane`` calls directly), per-channel coefficients computed inside;
inference runs so up to ``INFER_MAX`` values, in parallel from ``SERIAL_BELOW``.
"""

import math

import numpy as np

from . import _fork

try:
    from ._isa import cython_kernels as _ck  # the build for this CPU's instruction set
    _IMPORT_ERROR = None
except ImportError as exc:  # not compiled (no compiler at install time)
    _ck = None
    _IMPORT_ERROR = exc

NAME = "cython"
FAMILIES = ("numpy",)

# -- tuning constants: all of this backend's, here.  cpu_numba keeps its own; a
# value that differs between the two says why on its "vs cpu_numba" line. ------

#: Values per channels-first run: 16 KiB of float32, re-read from L1.  Same as cpu_numba.
CHUNK = 4096
#: Values per channels-last tile (rows x channels); 64 KiB of float32 fits L2.
#: vs cpu_numba (64K): statistics here are two-pass, re-reading each tile from L2.
TILE = 16384
#: Channels per channels-last block (bounds the per-task scratch).
CBLOCK = 2048
#: Target values per channels-last reduction task.
TASK = 1 << 16
#: At least this many reduction tasks when the data allows (C = 1 too).
MIN_TASKS = 8
#: At most this many row groups (partials are groups x C float64 values) ...
MAX_GROUPS = 256
#: ... and at most this many partial values in all.
MAX_PARTIALS = 1 << 22
#: Channels-first inputs with I up to this are folded to channels-last.
FOLD_MAX = 64
#: Inputs smaller than this many values run on one thread: a parallel
#: region's thread hand-off costs more than the work.
#: vs cpu_numba (PARALLEL_FROM, 2^16 to 2^18 per op, measured): one value for every op.
SERIAL_BELOW = 1 << 16
#: Streaming stores for float32 outputs of at least this many bytes:
#: channels-first, channels-last.  Same values as cpu_numba (same stores, its measurements).
STREAM_FROM = 64 << 20
STREAM_FROM_CL = 16 << 20
#: Largest input (values) that the fused kernels (:func:`train_small3`,
#: :func:`infer_small3`, :func:`backward_small3`) take: below it the serial fused
#: kernel beats the parallel primitives and the per-call Python work of separate
#: kernels.  Measured (float32, C = 64/256, fused serial vs the general path, min
#: of 300 calls, us): training 2^15 32 vs 48 (NCHW), 24 vs 39 (NHWC); 2^16 62 vs
#: 211, 45 vs 111; 2^17 106-123 vs 139-267, 83 vs 133-140; 2^18 164-178 vs
#: 175-193 (even).  Inference / backward at 2^17 (C = 64, the public functions,
#: min of 20 x 50 calls, two runs): 54-55 vs 98-103 / 111-122 vs 224-232 (NCHW),
#: 63-64 vs 70-76 / 128-137 vs 147-160 (NHWC).  Same value as cpu_numba.
SMALL = 1 << 17
#: Largest C-contiguous input (values) that the fast lane hands to the fused entry
#: points (train_small3, infer_small3, backward_small3, infer_backward_small3):
#: any size.  Beyond SMALL they run the parallel primitives with the per-channel
#: math here in a few NumPy operations on (C,) vectors (as cpu_numba's
#: _train_large), not the general path's checks and conversions (25-100 us a
#: call).  Measured (float32, public calls, min of 200, us, general path -> lane;
#: train / infer / backward): NCHW (16,64,16,16) 239 -> 161 / 87 -> 72 / 196 ->
#: 173; NHWC (16,16,16,64) 272 -> 171 / 100 -> 84 / 208 -> 179; (512,512) 232 ->
#: 204 / 129 -> 105 / 226 -> 201.  Same value as cpu_numba.
FUSED_MAX = 1 << 62
#: Largest input (values) that the fused inference kernel (:func:`infer_small3`,
#: parallel from SERIAL_BELOW) takes: below the streaming-store sizes, where
#: affine3 takes over.  The fused kernel skips the coefficients in NumPy and
#: affine3's set-up; from SERIAL_BELOW to SMALL it was serial.  float32,
#: infer_small3, min / median of 1000 interleaved with the old path, us, before
#: -> after: (16,64,256) 30.9/38.1 -> 22.1/23.3; (512,512) 44.1/53.9 ->
#: 31.5/37.2; (16384,16) 45.9/55.5 -> 30.2/32.6; (256,512) 28.9/30.0 ->
#: 18.3/19.7; (16,64,64) 12.5/13.0 -> 9.8/10.5; (1024,1024) 161/173 -> 144/149.
#: Same value as cpu_numba.
INFER_MAX = (16 << 20) // 8
#: Channels-first inputs with runs of at most this many values (and at least 4
#: rows) go through the fused inference and backward kernels as rows of C*I
#: values, like channels-last ones: a run's set-up costs more than its values.
#: Measured (float32, serial, runs vs rows, min of 21 x 100 calls, us, infer /
#: backward): (1024,16,4) 76/163 vs 27/57; (64,64,9) 21/49 vs 15/35; (64,64,12)
#: 29/66 vs 21/48; I = 16 even ((128,16,16) 15/34 vs 14/32, (8,256,16) 16/48 vs
#: 21/52); (16,64,64) 24/52 vs 32/90 (the spread vectors no longer fit L1).
FUSED_FOLD = 12
#: dtypes of x that the fused small kernel takes (float16 as its bits, see _kview).
SMALL_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def unavailable_reason():
    """None if the compiled extension loaded, else why not."""
    if _ck is None:
        return f"compiled extension fastbn.kernels._cython_kernels not built ({_IMPORT_ERROR})"
    return None


# -- argument preparation -------------------------------------------------------

def _needs_copy(a):
    """True if a typed memoryview cannot take ``a``'s memory as it is."""
    return not a.flags.aligned or any(s % a.itemsize for s in a.strides)


def _kview(a):
    """``a`` as the typed memoryviews take it: float16 as uint16 bits; an
    unaligned array or one with strides that are not whole items copied."""
    if a.dtype == np.float16:
        a = a.view(np.uint16)
    if _needs_copy(a):
        a = np.ascontiguousarray(a)
    return a


def _vec(v):
    return None if v is None else np.ascontiguousarray(v, dtype=np.float64)


def _threads(size):
    """OpenMP threads for a kernel on ``size`` values: 1 for small inputs and in a
    child forked from a multithreaded process (see _fork)."""
    if size < SERIAL_BELOW or _fork.serial_only():
        return 1
    _fork.note_parallel()
    return _ck.max_threads()


def _fold(*arrays, copy=False):
    """(O, C, I) arrays as (O, C*I, 1) views, or None if any cannot be viewed
    so; with ``copy``, such an array is folded from a contiguous copy instead."""
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        O, C, I = a.shape
        try:
            out.append(a.reshape((O, C * I, 1), copy=False))
        except ValueError:
            if not copy:
                return None
            out.append(np.ascontiguousarray(a).reshape((O, C * I, 1)))
    return out


def _foldable(x3):
    return 1 < x3.shape[2] <= FOLD_MAX


def _cl_split(O, C):
    """(rows per tile, channels per block, row groups) for the channels-last nests."""
    cb = max(1, min(C, CBLOCK))
    rows = max(1, TILE // cb)
    ntiles = (O + rows - 1) // rows
    ncb = (C + cb - 1) // cb
    want = max(math.ceil(O * C / TASK), math.ceil(MIN_TASKS / ncb))
    groups = min(ntiles, MAX_GROUPS, max(1, MAX_PARTIALS // C), want)
    return rows, cb, max(1, groups)


# -- primitives -----------------------------------------------------------------

def _moments_kernel(x3):
    O, C, I = x3.shape
    mean = np.empty(C)
    m2 = np.empty(C)
    xk = _kview(x3)
    nt = _threads(x3.size)
    if I > 1:
        _ck.moments_cf(xk, mean, m2, CHUNK, nt)
    else:
        rows, cb, groups = _cl_split(O, C)
        _ck.moments_cl(xk, mean, m2, rows, cb, groups, nt)
    return mean, m2


def moments3(x3):
    """(outer, C, inner) -> per-channel (mean, m2), float64."""
    O, C, I = x3.shape
    if O * I == 0:
        return np.full(C, np.nan), np.zeros(C)
    if C == 0:
        return np.empty(0), np.empty(0)
    folded = _fold(x3, copy=True) if _foldable(x3) else None
    if folded is None:
        return _moments_kernel(x3)
    # Per-(c, i) column statistics over O rows each, then Chan's merge of I
    # equal-count summaries: m2 = sum m2_i + O * sum (mean_i - mean)^2.
    mean_ci, m2_ci = _moments_kernel(folded[0])
    mean_ci = mean_ci.reshape(C, I)
    # Shifted by each channel's first column mean: a constant channel stays exact
    # (its mean, m2 = 0) and a mean near 1.7e308 does not overflow the sum.
    s = mean_ci[:, 0].copy()
    s[~np.isfinite(s)] = 0.0
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN data: NaN, as the kernels
        mean = s + (mean_ci - s[:, None]).mean(axis=1)
        dev = mean_ci - mean[:, None]
        dev[dev == 0.0] = 0.0   # inf - inf of a column equal to an inf mean: no deviation
        m2 = m2_ci.reshape(C, I).sum(axis=1) + O * (dev ** 2).sum(axis=1)
    return mean, m2


def _streamable(out, channels_first):
    """Write ``out`` (the kernel's view) with streaming stores?  The kernels
    also require unit stride along each run, else they store normally."""
    return (out.dtype == np.float32 and _ck.has_stream()
            and out.nbytes >= (STREAM_FROM if channels_first else STREAM_FROM_CL))


def affine3(x3, m, q, r, out3, u3=None, p=None):
    """out3 = q*(x3 - m) + r (+ p*u3) per channel, in float64, rounded once;
    ``out3`` may be ``x3`` itself."""
    if x3.size == 0:
        return out3
    O, C, I = x3.shape
    m, q, r, p = _vec(m), _vec(q), _vec(r), _vec(p)
    if u3 is not None and p is None:
        raise ValueError("affine3: p is required with u3")
    x, out, u = x3, out3, u3
    if _foldable(x3):
        folded = _fold(x3, out3, u3)
        if folded is not None:
            x, out, u = folded
            m, q, r = np.repeat(m, I), np.repeat(q, I), np.repeat(r, I)
            p = None if p is None else np.repeat(p, I)
    xk = _kview(x)
    uk = None if u is None else _kview(u)
    copied = _needs_copy(out)
    # An out the memoryviews cannot take is written through a temporary.
    ok = _kview(np.empty(out.shape, dtype=out.dtype) if copied else out)
    nt = _threads(x.size)
    stream = int(_streamable(ok, x.shape[2] > 1))
    if x.shape[2] > 1:
        _ck.affine_cf(xk, ok, uk, m, q, r, p, CHUNK, nt, stream)
    else:
        cb = min(x.shape[1], CBLOCK)
        _ck.affine_cl(xk, ok, uk, m, q, r, p, max(1, TILE // cb), cb, nt, stream)
    if copied:
        out[...] = ok.view(out.dtype)
    return out3


def _dy_sums_kernel(dy3, x3, m):
    O, C, I = x3.shape
    s1 = np.empty(C)
    s2 = np.empty(C)
    gk, xk = _kview(dy3), _kview(x3)
    if gk.dtype != xk.dtype:
        raise TypeError(f"dy_sums3: dy {dy3.dtype} and x {x3.dtype} differ")
    nt = _threads(x3.size)
    if I > 1:
        _ck.dy_sums_cf(gk, xk, m, s1, s2, CHUNK, nt)
    else:
        rows, cb, groups = _cl_split(O, C)
        _ck.dy_sums_cl(gk, xk, m, s1, s2, rows, cb, groups, nt)
    return s1, s2


def dy_sums3(dy3, x3, m):
    """Per-channel (sum(dy), sum(dy*(x - m))), float64."""
    O, C, I = x3.shape
    m = _vec(m)
    if x3.size == 0:
        return np.zeros(C), np.zeros(C)
    folded = _fold(dy3, x3, copy=True) if _foldable(x3) else None
    if folded is None:
        return _dy_sums_kernel(dy3, x3, m)
    s1, s2 = _dy_sums_kernel(folded[0], folded[1], np.repeat(m, I))
    return s1.reshape(C, I).sum(axis=1), s2.reshape(C, I).sum(axis=1)


# -- small inputs: the whole training forward in one serial call ----------------

#: NumPy dtype char -> the name of the Cython type in the fused signatures.
_C_TYPE = {"f": "float", "d": "double", "H": "half_t"}


def train_small3(x3, scale, offset, eps, momentum, rm, rv, out3, mean_out, invstd_out):
    """Fused training forward for inputs of at most SMALL values (serial).

    Same contract as ``cpu_numba.train_small3``: x3/out3 (outer, C, inner)
    float16/32/64 (out3 may be x3); scale/offset/rm/rv None or (C,) contiguous
    arrays of the per-channel dtype (float32 for float16 x3, else x3's);
    mean_out/invstd_out (C,) of that dtype receive the batch mean and
    1/sqrt(var + eps); running statistics are updated in place.
    """
    C = x3.shape[1]
    if x3.size > SMALL:
        _train_large(x3, scale, offset, eps, momentum, rm, rv, out3, mean_out, invstd_out)
        return
    if x3.dtype == np.float16:   # as its bits (views: the arrays are C-contiguous)
        x3, out3 = x3.view(np.uint16), out3.view(np.uint16)
    # The specialisation named: Cython's fused dispatch cannot tell the vectors'
    # type from None scale/offset and took float for float64 running statistics.
    kern = _ck.train_small.__signatures__[f"{_C_TYPE[x3.dtype.char]}|{_C_TYPE[mean_out.dtype.char]}"]
    kern(x3, scale, offset, float(eps), float(momentum), rm, rv, out3, mean_out, invstd_out,
         CHUNK, max(1, TILE // max(C, 1)))


def _train_large(x3, scale, offset, eps, momentum, rm, rv, out3, mean_out, invstd_out):
    """train_small3 beyond SMALL: moments3, train_small's per-channel formulas on
    (C,) float64 vectors (the same operations, so the same numbers), affine3,
    then the running statistics (last: a failure before leaves them untouched)."""
    O, C, I = x3.shape
    n = float(O * I)
    mean, m2 = moments3(x3)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        v = m2 / n + eps
        # var + eps == 0 (constant channel, eps = 0): invstd 0, y = offset
        inv = np.divide(1.0, np.sqrt(v), out=np.zeros(C), where=v != 0.0)
        q = inv if scale is None else inv * _vec(scale)
        r = np.zeros(C) if offset is None else _vec(offset)
        affine3(x3, mean, q, r, out3)
        mean_out[:] = mean
        invstd_out[:] = inv
        if rm is not None:
            rm[:] = (1.0 - momentum) * _vec(rm) + momentum * mean
        if rv is not None:
            rv[:] = (1.0 - momentum) * _vec(rv) + momentum * (m2 / (n - 1.0))


# -- small inputs: inference and backward in one serial call -------------------

#: NumPy dtype char of a per-channel vector -> its type in the fused signatures.
_VEC_TYPE = {"f": "float", "d": "double"}


def _vectors(a, b=None):
    """Per-channel vectors ``a``, ``b`` (None or (C,) contiguous float16/32/64) in
    one dtype of a fused vector type, and that type's name: as they are when they
    share float32 or float64, else both as float64 (exact)."""
    ca = None if a is None else a.dtype.char
    cb = None if b is None else b.dtype.char
    c = cb if ca is None else ca
    if c is None:
        return a, b, "double"
    if (cb is None or cb == c) and c in _VEC_TYPE:
        return a, b, _VEC_TYPE[c]
    return _vec(a), _vec(b), "double"


def infer_small3(x3, scale, offset, mean, var, eps, out3):
    """Fused inference forward: one kernel up to INFER_MAX values (in parallel from
    SERIAL_BELOW); beyond, the coefficients here and affine3.

    Same contract as ``cpu_numba.infer_small3``: x3/out3 (outer, C, inner)
    C-contiguous float16/32/64 (out3 may be x3); scale/offset None or (C,)
    contiguous, mean/var (C,) contiguous, each of any float dtype.  ``out3 =
    (x3 - mean) * scale / sqrt(var + eps) + offset``, in float64, rounded once.
    """
    if x3.size > INFER_MAX:   # infer_small's coefficients, then affine3's streaming stores
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # var + eps == 0 gives q = inf, as core.infer_coefficients
            inv = 1.0 / np.sqrt(_vec(var) + eps)
            q = inv if scale is None else _vec(scale) * inv
            affine3(x3, mean, q, np.zeros(x3.shape[1]) if offset is None else offset, out3)
        return
    if x3.dtype == np.float16:   # as its bits (views: the arrays are C-contiguous)
        x3, out3 = x3.view(np.uint16), out3.view(np.uint16)
    scale, offset, pt = _vectors(scale, offset)
    mean, var, st = _vectors(mean, var)
    # Named, not dispatched: Cython's fused dispatch cannot type a None scale/offset.
    _ck.infer_small.__signatures__[f"{_C_TYPE[x3.dtype.char]}|{pt}|{st}"](
        x3, scale, offset, mean, var, float(eps), out3, FUSED_FOLD, _threads(x3.size))


def backward_small3(dy3, x3, scale, mean, invstd, out3, dscale_out, doffset_out):
    """Fused training backward for inputs of at most SMALL values (serial).

    Same contract as ``cpu_numba.backward_small3``: dy3/x3/out3 (outer, C, inner)
    C-contiguous float16/32/64 of one dtype (out3 may be dy3 or x3); scale None
    or (C,) contiguous, mean/invstd (C,) contiguous, each of any float dtype.
    Writes ``dx`` to out3 and the per-channel ``dscale``, ``doffset`` to the (C,)
    outputs of the per-channel dtype (float32 for float16 x3, else x3's).
    """
    _backward_small(dy3, x3, scale, mean, invstd, out3, dscale_out, doffset_out, False, 0.0)


def infer_backward_small3(dy3, x3, scale, mean, var, eps, out3, dscale_out, doffset_out):
    """Fused eval-mode backward (batch_norm_infer_backward) for inputs of at most
    SMALL values (serial): ``backward_small3`` with core.infer_backward_coefficients
    (``var`` for ``invstd``; dx = scale/sqrt(var + eps)*dy), as
    ``cpu_numba.infer_backward_small3``."""
    _backward_small(dy3, x3, scale, mean, var, out3, dscale_out, doffset_out, True, float(eps))


def _backward_small(dy3, x3, scale, mean, invstd, out3, dscale_out, doffset_out, frozen, eps):
    if x3.size > SMALL:
        _backward_large(dy3, x3, scale, mean, invstd, out3, dscale_out, doffset_out, frozen, eps)
        return
    if x3.dtype == np.float16:
        dy3, x3, out3 = dy3.view(np.uint16), x3.view(np.uint16), out3.view(np.uint16)
    scale, _, pt = _vectors(scale)
    mean, invstd, st = _vectors(mean, invstd)
    _ck.backward_small.__signatures__[
        f"{_C_TYPE[x3.dtype.char]}|{pt}|{st}|{_VEC_TYPE[dscale_out.dtype.char]}"](
        dy3, x3, scale, mean, invstd, out3, dscale_out, doffset_out, FUSED_FOLD, frozen, eps)


def _backward_large(dy3, x3, scale, mean, invstd, out3, dscale_out, doffset_out, frozen, eps):
    """_backward_small beyond SMALL: dy_sums3, backward_channel's formulas on (C,)
    float64 vectors (the same operations), then affine3's ``dx = b*(x - mean) +
    cc + a*dy``."""
    O, C, I = x3.shape
    n = float(O * I)
    m = _vec(mean)
    s1, s2 = dy_sums3(dy3, x3, m)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = 1.0 / np.sqrt(_vec(invstd) + eps) if frozen else _vec(invstd)
        ds = s2 * inv
        a = inv if scale is None else _vec(scale) * inv
        if frozen:
            b = cc = np.zeros(C)
        else:
            b = -a * inv * ds / n
            cc = -a * s1 / n
        affine3(x3, m, b, cc, out3, dy3, a)
    dscale_out[:] = ds
    doffset_out[:] = s1

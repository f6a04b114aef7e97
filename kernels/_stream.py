"""Streaming (non-temporal) stores for the elementwise pass, as Numba intrinsics.

An ordinary store first reads the destination cache line (write-allocate), so
``y = q*(x - m) + r`` over a 103 MB array moves 3B bytes, not 2B.  A non-temporal
store writes whole lines straight to memory.  Measured here in C (2 threads,
103 MB float32): ordinary stores 5.5 ms, streaming stores 3.6-3.9 ms.

LLVM will not vectorise a loop whose scalar stores carry ``!nontemporal``
unless it can prove vector alignment, so :func:`stream_fma` emits the vector
loop itself: ``V`` values per step (one 64-byte line), loads unaligned, stores
64-byte aligned.  :func:`lead` tells the caller how many values to write with
ordinary code before the destination reaches a line boundary.

``y = q*(x - m) + r (+ p*u)`` in float64, rounded once, as in the ordinary
kernels.  The per-value parameters come from *periodic tables*: ``m[k]``, ``q[k]``,
``r[k]`` (and ``p[k]``), float64, where ``k`` runs through ``0..P-1`` and wraps, and each
table has ``P + V`` entries (``t[j] = t[j % P]``) so that a vector read at any
``k < P`` stays in bounds.  A channels-first run (one channel) is ``P = V``
copies of one value; a channels-last row block of C channels is ``P`` = a
multiple of C that is >= V.  See :func:`period`.

Only float32 data (float16 is computed through a float32 buffer); float64
outputs use ordinary stores.
"""

import platform

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

#: The intrinsics emit x86 instructions (sfence); elsewhere the ordinary kernels run.
AVAILABLE = platform.machine().lower() in ("x86_64", "amd64")
#: Bytes per streaming store: one cache line, one AVX-512 register.
LINE = 64
#: float32 values per line.
V = LINE // 4


def period(C):
    """Smallest multiple of C that is >= V: the table period for C channels per row."""
    return C * -(-V // C)


def tables(vecs, P):
    """(C,) float64 vectors -> periodic tables of period P (a multiple of C), P + V entries each."""
    C = vecs[0].shape[0]
    idx = np.arange(P + V) % P % C
    return [np.ascontiguousarray(v[idx]) for v in vecs]


@intrinsic
def lead(typingctx, y, f0):
    """Values from flat index f0 of the float32 array y to its next 64-byte boundary
    (0..V-1); a huge number if y's data is not 4-byte aligned (no streaming then)."""
    sig = types.intp(y, types.intp)

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        i64 = ir.IntType(64)
        addr = builder.add(builder.ptrtoint(arr.data, i64), builder.mul(args[1], ir.Constant(i64, 4)))
        mis = builder.and_(addr, ir.Constant(i64, LINE - 1))
        to_line = builder.and_(builder.sub(ir.Constant(i64, LINE), mis), ir.Constant(i64, LINE - 1))
        unaligned = builder.icmp_unsigned("!=", builder.and_(addr, ir.Constant(i64, 3)), ir.Constant(i64, 0))
        return builder.select(unaligned, ir.Constant(i64, 1 << 62), builder.lshr(to_line, ir.Constant(i64, 2)))

    return sig, codegen


@intrinsic
def stream_fma(typingctx, x, y, u, m, q, r, p, P, f0, nvec, k0):
    """y[f] = q[k]*(x[f] - m[k]) + r[k] (+ p[k]*u[f]) for f in f0 .. f0 + nvec*V - 1, k = (k0 + f - f0) % P,
    in float64, rounded to float32, with streaming stores.

    x, y, u: flat contiguous float32 arrays (u may be None, then p is ignored);
    &y[f0] must be 64-byte aligned (see :func:`lead`).  m, q, r, p: float64
    tables of P + V entries (see module doc); P >= V.  Call :func:`fence`
    after the last one.
    """
    with_u = not isinstance(u, types.NoneType)
    sig = types.void(x, y, u, m, q, r, p, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        Pv, f0v, nv, k0v = args[7:]
        xp, yp, up, mp, qp, rp, pp = [
            context.make_array(t)(context, builder, a).data if isinstance(t, types.Array) else None
            for t, a in zip(signature.args[:7], args[:7])]
        f32, f64, i64 = ir.FloatType(), ir.DoubleType(), ir.IntType(64)
        vf, vd = ir.VectorType(f32, V), ir.VectorType(f64, V)
        fma = fma_f64(builder, V)
        nt = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])

        k_ptr = cgutils.alloca_once_value(builder, k0v)
        with cgutils.for_range(builder, nv) as loop:
            f = builder.add(f0v, builder.mul(loop.index, ir.Constant(i64, V)))
            k = builder.load(k_ptr)
            xc = builder.fsub(builder.fpext(vector_load(builder, xp, f, vf, 4), vd),
                              vector_load(builder, mp, k, vd, 8))
            acc = builder.call(fma, [xc, vector_load(builder, qp, k, vd, 8),
                                     vector_load(builder, rp, k, vd, 8)])
            if with_u:
                uv = builder.fpext(vector_load(builder, up, f, vf, 4), vd)
                acc = builder.call(fma, [uv, vector_load(builder, pp, k, vd, 8), acc])
            yv = builder.fptrunc(acc, vf)
            st = builder.store(yv, builder.bitcast(builder.gep(yp, [f]), vf.as_pointer()), align=LINE)
            st.set_metadata("nontemporal", nt)
            k1 = builder.add(k, ir.Constant(i64, V))
            wrap = builder.icmp_signed(">=", k1, Pv)
            builder.store(builder.select(wrap, builder.sub(k1, Pv), k1), k_ptr)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def fence(typingctx):
    """sfence: streaming stores are weakly ordered; each thread fences after its
    last one, before the parallel region's end lets anyone read the output."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        sfence = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse.sfence")
        builder.call(sfence, [])
        return context.get_dummy_value()

    return sig, codegen


def vector_load(builder, ptr, idx, vty, align):
    """IR helper (also used by _rowsums): a load of vector type vty from ptr + idx
    elements, promising only ``align`` bytes of alignment."""
    return builder.load(builder.bitcast(builder.gep(ptr, [idx]), vty.as_pointer()), align=align)


def fma_f64(builder, lanes):
    """IR helper (also used by _rowsums): the ``llvm.fma`` intrinsic on <lanes x double>."""
    vd = ir.VectorType(ir.DoubleType(), lanes)
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vd, [vd, vd, vd]),
                                          f"llvm.fma.v{lanes}f64")


# -- element conversions: float16 as its uint16 bits ----------------------------
# Numba has no CPU float16 type, so float16 arrays reach the kernels as uint16
# views and these two intrinsics convert each element in LLVM IR, where the loop
# vectoriser turns them into vcvtph2ps / vcvtps2ph (F16C, AVX-512) -- no
# full-size float32 copy of the data.  float32/float64 pass through, so one
# kernel body serves every dtype.

_CONVERTIBLE = (types.uint16, types.float32, types.float64)


def _direct_half():
    """True if the code Numba generates may use AVX-512 FP16 (vcvtpd2ph: float64 ->
    float16 in one correctly rounded instruction): Numba compiles for the host CPU
    unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say otherwise."""
    from numba.core import config
    try:
        import llvmlite.binding as ll
        if config.CPU_FEATURES is not None:
            return "+avx512fp16" in config.CPU_FEATURES.split(",")
        if config.CPU_NAME not in (None, "host"):
            return False
        return bool(ll.get_host_cpu_features().get("avx512fp16"))
    except Exception:  # noqa: BLE001 - unknown: the portable conversion
        return False


#: float64 -> float16 in one instruction (else through float32 rounded to odd).
DIRECT_HALF = _direct_half()


def _to_f64(builder, a, t):
    """LLVM: the element ``a`` of Numba type ``t`` as a double, exactly."""
    if t == types.uint16:
        return builder.fpext(builder.fpext(builder.bitcast(a, ir.HalfType()), ir.FloatType()),
                             ir.DoubleType())
    if t == types.float32:
        return builder.fpext(a, ir.DoubleType())
    return a


@intrinsic
def ld(typingctx, v):
    """An element as float64: float16 bits (uint16) exactly, float32 widened, float64 as is."""
    if v not in _CONVERTIBLE:
        return None
    return types.float64(v), lambda context, builder, sig, args: _to_f64(builder, args[0],
                                                                         sig.args[0])


@intrinsic
def ldw(typingctx, v, w):
    """An element in the arithmetic of the scalar ``w``'s type: a float32 element
    as is where ``w`` is float32 (float32 inference), else as :func:`ld`."""
    if v not in _CONVERTIBLE:
        return None
    if v == types.float32 and w == types.float32:
        return types.float32(v, w), lambda context, builder, sig, args: args[0]
    return types.float64(v, w), lambda context, builder, sig, args: _to_f64(builder, args[0],
                                                                            sig.args[0])


@intrinsic
def cast(typingctx, v, like):
    """The float64 ``v`` rounded once to the element type of the array ``like``
    (float16 as its uint16 bits, float32, float64).

    float64 -> float16 goes through float32 rounded to odd (truncate, then set
    the last bit if inexact): float32 has 13 more bits than float16, so the
    final round-to-nearest-even (vcvtps2ph) is then a single correct rounding
    of v, and every step vectorises (LLVM's direct double -> half is a libcall
    per value unless the CPU has AVX-512 FP16; where it has, :data:`DIRECT_HALF`,
    the direct conversion is one instruction, vcvtpd2ph).
    """
    if not isinstance(like, types.Array) or like.dtype not in _CONVERTIBLE:
        return None
    sig = like.dtype(types.float64, like)

    def codegen(context, builder, signature, args):
        d = args[0]
        dt = signature.return_type
        f32, f64 = ir.FloatType(), ir.DoubleType()
        if dt == types.float64:
            return d
        if dt == types.uint16 and DIRECT_HALF:
            return builder.bitcast(builder.fptrunc(d, ir.HalfType()), ir.IntType(16))
        if dt == types.float32:
            return builder.fptrunc(d, f32)
        # Round to odd in d's own bits: clear the 29 low significand bits that
        # float32 drops and set the lowest kept one if any was set.  The float32
        # conversion is then exact, and the integer ops stay in d's 64-bit lanes
        # (comparing back in float64 needed mask narrowing shuffles: 4.7
        # instructions per value vs ~3 here).  Below float32's normal range the
        # conversion rounds again, but such values are 0 in float16 either way;
        # inf keeps its zero significand, NaN stays NaN (bit 29 set if needed).
        i64 = ir.IntType(64)
        low = ir.Constant(i64, (1 << 29) - 1)
        bits = builder.bitcast(d, i64)
        # (bits & low) + low has bit 29 set iff a low bit was; it stays below bit 30.
        odd = builder.and_(builder.or_(bits, builder.add(builder.and_(bits, low), low)),
                           ir.Constant(i64, ~((1 << 29) - 1)))
        f = builder.fptrunc(builder.bitcast(odd, f64), f32)
        h = builder.fptrunc(f, ir.HalfType())
        return builder.bitcast(h, ir.IntType(16))

    return sig, codegen

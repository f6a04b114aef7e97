"""Channels-last statistics with the accumulators in registers, as Numba intrinsics.

For an (R, C) matrix with narrow rows (NHWC, C = 64), Numba's loop over a
row keeps the per-channel float64 sums in memory and pays the loop's set-up
once per 64 values: the statistics pass ran ~30% slower than a plain read of
the same array (NHWC 103 MB: 3.5 vs 2.7 ms).  :func:`row_sums` emits the row
loop in LLVM IR with one ``<16 x double>`` sum and sum of squares per 16
channels held in registers across all rows, for C = 16, 32, 48 or 64
(:data:`GROUPS`).
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._stream import fma_f64, vector_load

#: Channels per vector.
LANES = 16
#: Row widths (in vectors of LANES channels) with a register kernel.
GROUPS = (1, 2, 3, 4)


def groups(C, x):
    """How many LANES-channel vectors cover a row of x (R, C), or 0 if no register
    kernel applies (C not 16..64 in steps of 16, or channels not unit-stride)."""
    g, rem = divmod(C, LANES)
    # uint16: float16 data as its bits (see _stream.ld)
    ok = (rem == 0 and g in GROUPS and x.strides[1] == x.itemsize
          and (x.dtype.kind == "f" or x.dtype == np.uint16))
    return g if ok else 0


def _make(G):
    @intrinsic
    def row_sums(typingctx, x, r0, r1, shift, s, q):
        """s[j] += sum(x[r, j] - shift[j]), q[j] += sum((x[r, j] - shift[j])^2) for rows
        r0 <= r < r1 and j < 16*G (the whole row); float64 sums in registers.
        x: float32/float64, or float16 as uint16 bits."""
        sig = types.void(x, types.intp, types.intp, shift, s, q)

        def codegen(context, builder, signature, args):
            xt = signature.args[0]
            xa = context.make_array(xt)(context, builder, args[0])
            r0v, r1v = args[1], args[2]
            sp, spp, qp = (context.make_array(t)(context, builder, a).data
                           for t, a in zip(signature.args[3:], args[3:]))
            row_bytes = cgutils.unpack_tuple(builder, xa.strides)[0]
            elt = context.get_data_type(xt.dtype)
            f64 = ir.DoubleType()
            vx, vd = ir.VectorType(elt, LANES), ir.VectorType(f64, LANES)
            fma = fma_f64(builder, LANES)
            i8p = ir.IntType(8).as_pointer()
            esize = context.get_abi_sizeof(elt)

            idx = [ir.Constant(ir.IntType(64), LANES * g) for g in range(G)]
            sh = [vector_load(builder, sp, idx[g], vd, 8) for g in range(G)]
            acc_s = [cgutils.alloca_once_value(builder, ir.Constant(vd, None)) for _ in range(G)]
            acc_q = [cgutils.alloca_once_value(builder, ir.Constant(vd, None)) for _ in range(G)]
            with cgutils.for_range(builder, builder.sub(r1v, r0v)) as loop:
                r = builder.add(r0v, loop.index)
                row = builder.bitcast(builder.gep(builder.bitcast(xa.data, i8p),
                                                  [builder.mul(r, row_bytes)]), elt.as_pointer())
                for g in range(G):
                    v = vector_load(builder, row, idx[g], vx, esize)
                    if isinstance(elt, ir.IntType):  # float16 bits
                        v = builder.bitcast(v, ir.VectorType(ir.HalfType(), LANES))
                    d = builder.fsub(v if elt == f64 else builder.fpext(v, vd), sh[g])
                    builder.store(builder.fadd(builder.load(acc_s[g]), d), acc_s[g])
                    builder.store(builder.call(fma, [d, d, builder.load(acc_q[g])]), acc_q[g])
            for g in range(G):
                for ptr, acc in ((spp, acc_s[g]), (qp, acc_q[g])):
                    p = builder.bitcast(builder.gep(ptr, [idx[g]]), vd.as_pointer())
                    builder.store(builder.fadd(builder.load(p, align=8), builder.load(acc)), p, align=8)
            return context.get_dummy_value()

        return sig, codegen
    return row_sums


row_sums1, row_sums2, row_sums3, row_sums4 = (_make(g) for g in GROUPS)

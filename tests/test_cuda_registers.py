"""fastbn.tools.cuda_registers' SASS reading (``--loops``), on disassembly text in
nvdisasm's format: no GPU, compiler or nvdisasm needed."""

import pytest

from fastbn.tools import cuda_registers as cr

# Two functions; _moments_rows has a block merge loop (BAR), a main loop of 6
# instructions with two 4-byte loads and one 8-byte load, and an outer loop
# around both (it contains the BAR, so it is not the main loop either).
SASS = """
.text.__cuda_sm20_div_rn_f64_full:
        /*0000*/                   LD.E R2, desc[UR4][R4.64] ;
.L_x_0:
        /*0010*/                   FADD R3, R3, R2 ;
        /*0020*/               @P0 BRA `(.L_x_0) ;
.text._ZN6fastbn7kernels10cuda_numba13_moments_rowsB2v1E5ArrayIfLi3E:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_7:
        /*0010*/                   IADD3 R4, P0, R4, R8, RZ ;
.L_x_8:
        /*0020*/                   LD.E R10, desc[UR4][R20.64] ;
        /*0030*/                   LD.E R11, desc[UR4][R22.64] ;
        /*0040*/                   LD.E.64 R12, desc[UR4][R24.64] ;
        /*0050*/                   FADD R3, R10, -R2 ;
        /*0060*/                   FFMA R5, R3, R3, R5 ;
        /*0070*/              @!P1 BRA `(.L_x_8) ;
.L_x_9:
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0090*/                   LD.E R14, desc[UR4][R26.64] ;
        /*00a0*/               @P2 BRA `(.L_x_9) ;
        /*00b0*/               @P3 BRA `(.L_x_7) ;
        /*00c0*/                   EXIT ;
"""


def test_main_loop_is_the_largest_loading_loop_without_barriers():
    # 6 instructions; 4 + 4 + 8 bytes loaded at 4 bytes per element: 4 elements
    assert cr.main_loop(SASS, "_moments_rows", 4) == (6, 4.0)
    # two arrays read per element (the backward sums): 8 bytes per element
    assert cr.main_loop(SASS, "_moments_rows", 8) == (6, 2.0)


def test_other_functions_and_missing_loops():
    # the helper function's loop loads before its label: no load inside, no main loop
    assert cr.main_loop(SASS, "__cuda_sm20_div_rn_f64_full", 4) is None
    assert cr.main_loop(SASS, "_dysums_rows", 4) is None


@pytest.mark.parametrize("text,nbytes", [
    ("LD.E R10, desc[UR4][R20.64]", 4),
    ("@!P0 LDG.E.128 R8, desc[UR4][R2.64]", 16),
    ("LD.E.U16 R3, desc[UR4][R6.64]", 2),
    ("LDC R1, c[0x0][0x28]", 0),
    ("STG.E [R2.64], R5", 0),
])
def test_load_bytes(text, nbytes):
    assert cr._load_bytes(text) == nbytes


def test_cell_without_nvdisasm_says_why():
    assert cr.loop_cell(None, b"", "_moments_rows", "float32").startswith("n/a (nvdisasm not found")

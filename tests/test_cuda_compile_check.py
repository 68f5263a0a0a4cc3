"""The SASS reading of bench/cuda_compile_check.py (runs anywhere: no toolkit needed)."""
import importlib.util
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "cuda_compile_check", os.path.join(ROOT, "bench", "cuda_compile_check.py"))
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDS.128 R4, [R2] ;
        /*0020*/                   LDS.128 R8, [R3] ;
.L_x_1:
        /*0030*/                   LDS R12, [R3+0x10] ;
        /*0040*/                   FFMA R20, R4, R8, R20 ;
        /*0050*/                   FFMA R21, R5, R8, R21 ;
        /*0060*/              @!P0 BRA `(.L_x_1) ;
        /*0070*/                   FFMA R22, R6, R8, R22 ;
        /*0080*/                   LDL R30, [R1+0x8] ;
        /*0090*/                   LDG.E R31, desc[UR4][R10.64] ;
        /*00a0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00b0*/               @P1 BRA `(.L_x_0) ;
        /*00c0*/                   EXIT ;
.L_x_2:
        /*00d0*/                   BRA `(.L_x_2);
"""


def test_loops_are_backward_branches_innermost_first_with_their_counts():
    inner, outer = check.sass_loops(SASS)  # the trap self-loop after EXIT is no loop
    assert inner["inner"] and not outer["inner"]
    assert (inner["depth"], outer["depth"]) == (1, 0)
    assert (inner["ffma"], inner["lds32"], inner["lds128"], inner["instructions"]) == (2, 1, 0, 4)
    assert inner["ffma_per_lds"] == 2.0
    assert (outer["ffma"], outer["lds32"], outer["lds128"], outer["ldg"], outer["bar"],
            outer["local"]) == (3, 1, 2, 1, 1, 1)
    assert outer["ffma_per_lds"] == 1.0


def test_no_loop_no_loads():
    (loop,) = check.sass_loops("""
.L_x_0:
        /*0000*/                   FFMA R1, R2, R3, R1 ;
        /*0010*/                   BRA `(.L_x_0) ;
""")
    assert loop["ffma"] == 1 and loop["ffma_per_lds"] == math.inf


def test_occupancy_on_sm90():
    assert check.occupancy(256, 128, 33408) == (2, 16)   # registers bound
    assert check.occupancy(128, 124, 35328) == (4, 16)
    assert check.occupancy(128, 64, 44000) == (5, 20)    # shared memory bound
    assert check.occupancy(1024, 32, 0) == (2, 64)       # threads bound

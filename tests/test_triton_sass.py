"""What the decode kernel compiles to for an H100, checked without one: Triton's wheel carries
ptxas and cuobjdump (benchmarks/decode_kernel_sass.py). The interpreter tests prove the kernel
right; these hold the loop to the shape its speed depends on, compiled as the JIT compiles it:
one fused multiply-add per code, no int-to-float instruction, no shared-memory round trip (a
barrier) and no register spill. A layout change once put 16 barriers in every K tile
(RESULTS.md, session 9) and no other test could see it."""

from __future__ import annotations

import re

import pytest

from benchmarks.decode_kernel_sass import GEMV_POINTERS, arguments, compile_for, loop_opcodes, sass_of, specialize

THREADS = 4 * 32  # num_warps 4


@pytest.mark.parametrize("rows,bits,has_zero", [(1, 4, False), (1, 4, True), (1, 8, False), (4, 4, False)])
def test_the_decode_loop_is_fused_multiply_adds_in_registers(rows, bits, has_zero):
    from compressor.kernels import triton_gemv

    values = arguments(rows, 14336, 4096)
    constants = dict(BITS=bits, GROUP_SIZE=128, HAS_ZERO=has_zero, BLOCK_M=values["M_BUCKET"], BLOCK_K=128, BLOCK_N=64,
                     SPLIT_K=1, PREFETCH=False)
    sass = sass_of(compile_for(specialize(triton_gemv._gemv_kernel, GEMV_POINTERS, values, constants), 90, 4, 3))
    loop = loop_opcodes(sass)
    codes_per_thread = 64 * 128 // THREADS
    assert loop["FFMA"] >= rows * codes_per_thread  # a product per code and row, fused with its sum
    assert loop["FMUL"] + loop["FADD"] < rows * codes_per_thread  # not a separate multiply and add per product
    assert loop["I2F"] == 0 and loop["BAR"] == 0
    assert not re.search(r"\b(LDL|STL)\b", sass)  # no spills

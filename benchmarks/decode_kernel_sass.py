#!/usr/bin/env python
"""What the Triton decode kernel compiles to on an H100, without an H100.

    python benchmarks/decode_kernel_sass.py [--arch 90] [--shape N K] [--rows 1 2 4 8]
        [--other-decode earlier/triton_gemv.py] [--old-kernel path/to/triton_wxa16.py] [--tiles]

Triton's wheel carries ptxas and cuobjdump, so a CUDA kernel can be compiled for sm_90 on a
CPU-only machine. This compiles the one-row decode kernel (``triton_gemv``) for a few configs
and counts, in the SASS of its K loop (the longest backward branch), the instructions per
weight code each thread executes, by opcode, with the registers a thread holds and the
barriers in the loop. Each kernel is specialized as the JIT would for a layer of ``--shape``
(alignment and divisibility hints, arguments equal to 1 made constants): without that, the
compiler picks other layouts than at run time. ``--other-decode`` counts another copy of
``triton_gemv.py`` alike (an earlier version). With ``--old-kernel`` it does the same for an
earlier ``triton_wxa16.py`` (its one-row path: the broadcast multiply and per-tile sum), so the
two can be set side by side. With ``--tiles``, the tile kernel of rows 9 and up, per tile shape,
reshaping its unpacked tile or running one dot per code position. There "per code" counts each
code once per thread-iteration, whatever the number of rows.

The counts are static: they say how many instructions the loop issues per code, which bounds
the speed a kernel can reach when issue-bound (an H100 issues about 33 x 10^12 thread
instructions per second over its 132 multiprocessors); they say nothing of memory stalls.
Timings still need a GPU (benchmarks/gpu_kernels.py).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from compressor.kernels.triton_parts import LAUNCH_OPTIONS

WARP_SIZE = 32
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"  # ptxas, cuobjdump


def cuobjdump(kernel, option: str) -> str:
    """cuobjdump's `option` output (-sass, -res-usage) for a compiled kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(kernel.asm["cubin"])
    try:
        return subprocess.run([str(TOOLS / "cuobjdump"), option, handle.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)


def sass_of(kernel) -> str:
    return cuobjdump(kernel, "-sass")


def loop_opcodes(sass: str) -> collections.Counter:
    """Opcodes between the target and the source of the longest backward branch: the K loop."""
    address = re.compile(r"/\*([0-9a-f]{4,})\*/")
    lines = [line for line in sass.splitlines() if address.search(line)]
    where = [int(address.search(line).group(1), 16) for line in lines]
    loop = None
    for line, at in zip(lines, where):
        branch = re.search(r"BRA (?:`\(\.L_x_\d+\) )?(0x[0-9a-f]+)", line)
        if branch and int(branch.group(1), 16) < at:
            span = (int(branch.group(1), 16), at)
            loop = span if loop is None or span[1] - span[0] > loop[1] - loop[0] else loop
    if loop is None:
        raise SystemExit("no loop found in the SASS")
    opcodes = collections.Counter()
    for line, at in zip(lines, where):
        if loop[0] <= at <= loop[1]:
            match = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
            if match:
                opcodes[match.group(1)] += 1
    return opcodes


def specialize(kernel, pointers: dict[str, str], values: dict[str, int], constants: dict) -> ASTSource:
    """The kernel as Triton's JIT would compile it for these arguments: pointers (torch
    allocations are 16-byte aligned) and integers that are multiples of 16 carry the
    divisibility hint, integers equal to 1 become constants, the constexpr parameters are
    `constants`. Without the hints the compiler cannot vectorize loads, and picks other layouts
    than it does at run time: the counts would not be those of the kernel that runs."""
    signature, attrs, constexprs = {}, {}, dict(constants)
    for index, name in enumerate(kernel.arg_names):
        if kernel.params[index].is_constexpr:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name], attrs[(index,)] = pointers[name], [["tt.divisibility", 16]]
        elif values[name] == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def arguments(rows: int, n: int, k: int) -> dict[str, int]:
    """The integer arguments both kernels take, for x [rows, k] and a weight [n, k] in groups of 128."""
    return dict(M=rows, N=n, K=k, GROUPS=k // 128, stride_xm=k, stride_om=n, M_BUCKET=1 << max(rows - 1, 0).bit_length(),
                float_one_bits=0x3F800000)


def compile_for(source: ASTSource, arch: int, warps: int, stages: int):
    return triton.compile(source, target=GPUTarget("cuda", arch, WARP_SIZE), options={"num_warps": warps, "num_stages": stages, **LAUNCH_OPTIONS})


def registers(kernel) -> int:
    return int(re.search(r"REG:(\d+)", cuobjdump(kernel, "-res-usage")).group(1))


def report(label: str, kernel, codes_per_iteration: int, threads: int) -> None:
    sass = sass_of(kernel)
    opcodes = loop_opcodes(sass)
    total = sum(opcodes.values())
    per_code = total * threads / codes_per_iteration
    # ptxas's register spills are local-memory loads and stores in the SASS; barriers in the loop
    # are layout conversions through shared memory
    spills = "spills" if re.search(r"\b(LDL|STL)\b", sass) else "no spills"
    top = ", ".join(f"{op} {count}" for op, count in opcodes.most_common(6))
    print(f"{label:<58} {per_code:6.2f} per code; {registers(kernel):3d} registers, {opcodes.get('BAR', 0):2d} barriers "
          f"in the loop, {spills}; {top}", flush=True)


GEMV_POINTERS = {"x_ptr": "*bf16", "packed_ptr": "*i32", "scale_ptr": "*bf16", "zero_ptr": "*i32", "out_ptr": "*bf16",
                 "workspace_ptr": "*fp32", "counter_ptr": "*i32"}


def decode_kernel(kernel, name: str, arch: int, rows: list[int], shape: tuple[int, int]) -> None:
    """The decode kernel (``triton_gemv._gemv_kernel`` or an earlier copy) for a few configs."""
    variants = ((4, 64, 1, False, 4, False), (4, 64, 1, True, 4, False), (4, 32, 4, True, 4, False),
                (4, 128, 1, True, 8, False), (4, 64, 1, True, 4, True), (8, 64, 1, True, 4, False))
    for m in rows:
        for bits, block_n, split, prefetch, warps, has_zero in variants if m == 1 else variants[:4]:
            values = arguments(m, *shape)
            constants = dict(BITS=bits, GROUP_SIZE=128, HAS_ZERO=has_zero, BLOCK_M=values["M_BUCKET"], BLOCK_K=128,
                             BLOCK_N=block_n, SPLIT_K=split, PREFETCH=prefetch)
            kernel_ = compile_for(specialize(kernel, GEMV_POINTERS, values, constants), arch, warps, 3)
            label = (f"{name} M={m} W{bits} {'asym' if has_zero else 'sym'} N-tile {block_n} split {split} "
                     f"prefetch {int(prefetch)} warps {warps}")
            report(label, kernel_, block_n * 128, warps * WARP_SIZE)


def load_copy(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # triton's compiler looks the function's module up
    spec.loader.exec_module(module)
    return module


def old_kernel(path: Path, arch: int, shape: tuple[int, int]) -> None:
    """Session 7's one-row path of ``triton_wxa16`` (ef6d8c0): the broadcast multiply and per-tile sum."""
    module = load_copy(path, "old_triton_wxa16")
    for block_n, warps in ((64, 4), (128, 4), (256, 8)):
        constants = dict(BITS=4, GROUP_SIZE=128, HAS_ZERO=False, USE_DOT=False, COMPUTE_F32=False, BLOCK_M=1,
                         BLOCK_N=block_n, BLOCK_K=module.block_k(128))
        # its launch at one row on this layer: one K slice (its _split_k gave 1 on an H100), a [1, 1, N] output
        values = {**arguments(1, *shape), "SPLIT_K": 1, "stride_os": shape[0]}
        source = specialize(module._wxa16_kernel, GEMV_POINTERS, values, constants)
        report(f"old one-row path W4 g128 sym N-tile {block_n} warps {warps}", compile_for(source, arch, warps, 3),
               block_n * 128, warps * WARP_SIZE)


def tile_kernel(arch: int, shape: tuple[int, int]) -> None:
    """The 16-row and GEMM tile kernel (rows 9 and up), reshaping its tile or one dot per code position."""
    from compressor.kernels import triton_wxa16

    for per_position in (False, True):
        for block_m, block_n, warps, split in ((16, 64, 4, 4), (16, 128, 4, 4), (64, 64, 4, 1), (64, 128, 4, 1), (128, 128, 8, 1)):
            constants = dict(SPLIT_K=split, BITS=4, GROUP_SIZE=128, HAS_ZERO=False, COMPUTE_F32=False, BLOCK_M=block_m,
                             BLOCK_N=block_n, BLOCK_K=128, PER_POSITION=per_position)
            source = specialize(triton_wxa16._wxa16_kernel, GEMV_POINTERS, arguments(block_m, *shape), constants)
            label = f"tile W4 g128 {'per position' if per_position else 'reshape'} {block_m} x {block_n} split {split} warps {warps}"
            report(label, compile_for(source, arch, warps, 3), block_n * 128, warps * WARP_SIZE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as one number (90: H100)")
    parser.add_argument("--shape", type=int, nargs=2, default=(14336, 4096), metavar=("N", "K"),
                        help="the layer the kernels are specialized for, as the JIT would (default 14336 4096)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1], help="decode kernel rows (1-8; default 1)")
    parser.add_argument("--other-decode", type=Path, help="another triton_gemv.py (an earlier version) to count alike")
    parser.add_argument("--old-kernel", type=Path, help="session 7's kernels/triton_wxa16.py, for its one-row path")
    parser.add_argument("--tiles", action="store_true", help="also the tile kernel (rows 9 and up), both unpackings")
    args = parser.parse_args()
    shape = tuple(args.shape)
    print(f"triton {triton.__version__}, sm_{args.arch}, specialized for N {shape[0]}, K {shape[1]}; "
          "'per code' is per weight code, once per thread-iteration whatever the rows")
    from compressor.kernels import triton_gemv

    decode_kernel(triton_gemv._gemv_kernel, "decode", args.arch, args.rows, shape)
    if args.other_decode:
        decode_kernel(load_copy(args.other_decode, "other_triton_gemv")._gemv_kernel, "other", args.arch, args.rows, shape)
    if args.old_kernel:
        old_kernel(args.old_kernel, args.arch, shape)
    if args.tiles:
        tile_kernel(args.arch, shape)


if __name__ == "__main__":
    main()

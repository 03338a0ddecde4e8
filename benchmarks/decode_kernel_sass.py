#!/usr/bin/env python
"""What the Triton decode kernel compiles to on an H100, without an H100.

    python benchmarks/decode_kernel_sass.py [--arch 90] [--old-kernel path/to/triton_wxa16.py] [--tiles]

Triton's wheel carries ptxas and cuobjdump, so a CUDA kernel can be compiled for sm_90 on a
CPU-only machine. This compiles the one-row decode kernel (``triton_gemv``) for a few configs
and counts, in the SASS of its K loop (the longest backward branch), the instructions per
weight code each thread executes, by opcode. With ``--old-kernel`` it does the same for an
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


def sass_of(kernel) -> str:
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(kernel.asm["cubin"])
    try:
        return subprocess.run([str(tools / "cuobjdump"), "-sass", handle.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)


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


def signature_of(kernel, pointers: dict[str, str]) -> dict[str, str]:
    """Triton's signature for `kernel`: the given pointer types, other pointers int32, the
    constexpr parameters as such, everything else a 32-bit integer."""
    signature = {}
    for name in kernel.arg_names:
        if name in pointers:
            signature[name] = pointers[name]
        elif kernel.params[kernel.arg_names.index(name)].is_constexpr:
            signature[name] = "constexpr"
        else:
            signature[name] = "*i32" if name.endswith("_ptr") else "i32"
    return signature


def compile_for(fn, signature: dict, constants: dict, arch: int, warps: int, stages: int):
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, WARP_SIZE), options={"num_warps": warps, "num_stages": stages, **LAUNCH_OPTIONS})


def report(label: str, kernel, codes_per_iteration: int, threads: int) -> None:
    sass = sass_of(kernel)
    opcodes = loop_opcodes(sass)
    total = sum(opcodes.values())
    per_code = total * threads / codes_per_iteration
    # ptxas's register spills are local-memory loads and stores in the SASS
    spills = "spills" if re.search(r"\b(LDL|STL)\b", sass) else "no spills"
    top = ", ".join(f"{op} {count}" for op, count in opcodes.most_common(7))
    print(f"{label:<52} {total:5d} per thread-iteration, {per_code:5.2f} per code; shared mem {kernel.metadata.shared} B, {spills}; {top}")


def new_kernel(arch: int) -> None:
    from compressor.kernels import triton_gemv, triton_parts

    signature = signature_of(triton_gemv._gemv_kernel, {"x_ptr": "*bf16", "scale_ptr": "*bf16", "out_ptr": "*bf16", "workspace_ptr": "*fp32"})
    for bits, block_n, split, prefetch, warps, has_zero in ((4, 64, 1, True, 4, False), (4, 64, 1, False, 4, False),
                                                            (4, 32, 4, True, 4, False), (4, 128, 1, True, 8, False),
                                                            (4, 64, 1, True, 4, True), (8, 64, 1, True, 4, False)):
        block_k = triton_parts.block_k(128)
        constants = dict(BITS=bits, GROUP_SIZE=128, HAS_ZERO=has_zero, BLOCK_M=1, BLOCK_K=block_k, BLOCK_N=block_n,
                         SPLIT_K=split, PREFETCH=prefetch)
        kernel = compile_for(triton_gemv._gemv_kernel, signature, constants, arch, warps, 3)
        label = f"decode W{bits} g128 {'asym' if has_zero else 'sym'} N-tile {block_n} split {split} prefetch {int(prefetch)} warps {warps}"
        report(label, kernel, block_n * block_k, warps * WARP_SIZE)


def old_kernel(path: Path, arch: int) -> None:
    spec = importlib.util.spec_from_file_location("old_triton_wxa16", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # triton's compiler looks the function's module up
    spec.loader.exec_module(module)
    signature = signature_of(module._wxa16_kernel, {"x_ptr": "*bf16", "scale_ptr": "*bf16", "out_ptr": "*bf16"})
    for block_n, warps in ((64, 4), (128, 4), (256, 8)):
        block_k = module.block_k(128)
        constants = dict(BITS=4, GROUP_SIZE=128, HAS_ZERO=False, USE_DOT=False, COMPUTE_F32=False, BLOCK_M=1,
                         BLOCK_N=block_n, BLOCK_K=block_k)
        kernel = compile_for(module._wxa16_kernel, signature, constants, arch, warps, 3)
        report(f"old one-row path W4 g128 sym N-tile {block_n} warps {warps}", kernel, block_n * block_k, warps * WARP_SIZE)


def tile_kernel(arch: int) -> None:
    """The 16-row and GEMM tile kernel (rows 9 and up), reshaping its tile or one dot per code position."""
    from compressor.kernels import triton_wxa16

    signature = signature_of(triton_wxa16._wxa16_kernel, {"x_ptr": "*bf16", "scale_ptr": "*bf16", "out_ptr": "*bf16", "workspace_ptr": "*fp32"})
    for per_position in (False, True):
        for block_m, block_n, warps, split in ((16, 64, 4, 4), (16, 128, 4, 4), (64, 64, 4, 1), (64, 128, 4, 1), (128, 128, 8, 1)):
            constants = dict(SPLIT_K=split, BITS=4, GROUP_SIZE=128, HAS_ZERO=False, COMPUTE_F32=False, BLOCK_M=block_m,
                             BLOCK_N=block_n, BLOCK_K=128, PER_POSITION=per_position)
            kernel = compile_for(triton_wxa16._wxa16_kernel, signature, constants, arch, warps, 3)
            label = f"tile W4 g128 {'per position' if per_position else 'reshape'} {block_m} x {block_n} split {split} warps {warps}"
            report(label, kernel, block_n * 128, warps * WARP_SIZE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as one number (90: H100)")
    parser.add_argument("--old-kernel", type=Path, help="an earlier kernels/triton_wxa16.py to compare")
    parser.add_argument("--tiles", action="store_true", help="also the tile kernel (rows 9 and up), both unpackings")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, sm_{args.arch}; counts are per thread and loop iteration, 'per code' is per weight code")
    new_kernel(args.arch)
    if args.old_kernel:
        old_kernel(args.old_kernel, args.arch)
    if args.tiles:
        tile_kernel(args.arch)


if __name__ == "__main__":
    main()

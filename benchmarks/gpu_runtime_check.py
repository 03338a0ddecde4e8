#!/usr/bin/env python
"""GPU checks of the runtime paths CI cannot reach (needs CUDA): which kernel each module picks
on this GPU, its error against float64, and QuantLinear under torch.compile with CUDA graphs.

    python benchmarks/gpu_runtime_check.py

Odd small shapes (as the CPU interpreter tests use) for the Triton W4A16/W8A16 op, sym and asym,
decode kernel (M <= 8), split-K tiles (M <= 16) and GEMM (M = 17) paths; the decode kernel's
split-K run 50 times per split (identical bits, counters reset); a W8A8 FP8 layer (`fp8-scaled-mm` wants compute capability 8.9 or later);
and a QuantLinear compiled with mode="reduce-overhead" (CUDA graphs) against eager.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.kernel_fixtures


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check runs on a GPU")
    from tests.kernel_fixtures import TOLERANCE, float64_reference, random_quant_linear, relative_error

    print(f"{torch.cuda.get_device_name()} | capability {torch.cuda.get_device_capability()} | torch {torch.__version__} | "
          f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC")
    failures = 0
    for bits, n, k, group, symmetric, dtype, rows in [(4, 40, 96, 32, True, torch.bfloat16, (1, 3, 8, 17)),
                                                     (4, 19, 192, 64, False, torch.float16, (1, 9, 17)),
                                                     (8, 33, 160, None, False, torch.bfloat16, (1, 5, 17))]:
        layer = random_quant_linear(n, k, bits=bits, group_size=group, symmetric=symmetric, dtype=dtype, bias=True).cuda()
        for m in rows:
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            with torch.no_grad():
                error = relative_error(layer(x), float64_reference(layer, x))
            ok = error <= TOLERANCE[dtype] and layer.kernel_report["kernel"] == "triton-wxa16"
            failures += not ok
            print(f"QuantLinear w{bits} {n}x{k} g{group} {'sym' if symmetric else 'asym'} {dtype} M={m}: "
                  f"{layer.kernel_report['kernel']} rel.err {error:.1e} {'ok' if ok else 'FAIL'}")
    failures += split_k_is_deterministic(random_quant_linear, float64_reference, relative_error)
    failures += compiled_with_cuda_graphs(random_quant_linear, float64_reference, relative_error)
    failures += fp8_layer(relative_error)
    print("all ok" if not failures else f"{failures} FAILED")


def split_k_is_deterministic(random_quant_linear, float64_reference, relative_error) -> int:
    """Both split-K kernels let the last-arriving K slice sum the others' partials: run each many
    times on a wide layer (many programs in flight at once) and demand identical bits every time,
    the float64 result and the counters back at zero, so a slice read before it was written
    would show."""
    from compressor.kernels.triton_gemv import wxa16_gemv
    from compressor.kernels.triton_parts import split_k_counters
    from compressor.kernels.triton_wxa16 import _split_k, wxa16_matmul

    layer = random_quant_linear(4096, 2048, bits=4, group_size=128, symmetric=False, dtype=torch.bfloat16).cuda()
    weights = (layer.weight_packed, layer.weight_scale, layer.weight_zero_point, 4, 128)

    def repeated(label: str, rows: int, call) -> int:
        x = torch.randn(rows, 2048, dtype=torch.bfloat16, device="cuda")
        counters = split_k_counters(4096, x.device)
        runs = [call(x, counters) for _ in range(50)]
        same = all(torch.equal(run, runs[0]) for run in runs)
        error = relative_error(runs[0], float64_reference(layer, x))
        ok = same and error <= 1e-2 and not counters.any()
        print(f"{label}, 50 runs: identical {same}, counters back to zero {not counters.any()}, rel.err {error:.1e} "
              f"{'ok' if ok else 'FAIL'}")
        return int(not ok)

    def decode(split: int):
        def call(x, counters):
            out = torch.empty(x.shape[0], 4096, dtype=torch.bfloat16, device="cuda")
            return wxa16_gemv(x, *weights, out, counters=counters, config={"BLOCK_N": 32, "SPLIT_K": split})
        return call

    failures = sum(repeated(f"decode kernel split-K {split}", 2, decode(split)) for split in (2, 3, 8))
    # the 16-row tile kernel (9-16 rows) finishes its split-K the same way
    failures += repeated(f"16-row tile kernel split-K {_split_k(4096, 2048, torch.device('cuda'))}", 12,
                         lambda x, counters: wxa16_matmul(x, *weights, counters=counters))
    return failures


def compiled_with_cuda_graphs(random_quant_linear, float64_reference, relative_error) -> int:
    layer = random_quant_linear(256, 512, bits=4, group_size=128, symmetric=True, dtype=torch.bfloat16).cuda()
    x = torch.randn(4, 512, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        eager = layer(x)
        layer(x)  # autotuning runs on the first calls, before any graph is captured
        compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # record, then replay
            out = compiled(x).clone()
    # Compiled and eager may autotune to different tiles (another summation order), so both are
    # held to the float64 result, not to each other.
    errors = relative_error(out, float64_reference(layer, x)), relative_error(eager, float64_reference(layer, x))
    ok = max(errors) <= 1e-2
    print(f"torch.compile(mode='reduce-overhead', fullgraph=True) QuantLinear: rel.err compiled {errors[0]:.1e}, "
          f"eager {errors[1]:.1e} {'ok' if ok else 'FAIL'}")
    return int(not ok)


def fp8_layer(relative_error) -> int:
    from compressor.kernels.w8a8_linear import ActivationScheme, W8A8Linear

    codes = (torch.randn(256, 512) * 150).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(256, 1) * 0.01 + 1e-3
    layer = W8A8Linear.from_codes(codes, scale, weight_type="float", activations=ActivationScheme("float", True),
                                  input_scale=None, bias=None, dtype=torch.bfloat16).cuda()
    x = torch.randn(32, 512, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        out = layer(x)
        x_codes, x_scale = layer.quantize_input(x)
    expected = (x_codes.double() * x_scale.double()) @ (layer.weight.double() * layer.weight_scale.double()).t()
    error = relative_error(out, expected)
    ok = error <= 1e-2 and layer.kernel_report["kernel"] == "fp8-scaled-mm"
    print(f"W8A8Linear fp8 256x512 M=32: {layer.kernel_report['kernel']} rel.err vs its own codes in float64 {error:.1e} "
          f"{'ok' if ok else 'FAIL'}")
    return int(not ok)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""What one decode-sized QuantLinear call costs around our AVX512 kernel, at 1 and 2 threads.

    python benchmarks/layer_call_overhead.py [--calls 3000]

SmolLM2-sized W4 g64 layers (in x out), one bf16 row, warm caches; median microseconds of:
the module call as decoding runs it (bound kernel), the module call forced through the full
dispatch every time (the bound call dropped before each call, as before session 7), and the
kernel alone through ctypes with a preallocated output (no Python around it).
"""

from __future__ import annotations

import argparse
import json

import torch

from bench_timing import median_seconds  # a sibling script: benchmarks/ is on sys.path


def median_us(function, calls: int) -> float:
    return median_seconds(function, calls, warmup=100) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()

    import compressor.kernels.cpu_int4_avx512 as avx512
    from compressor.kernels.quant_linear import QuantLinear

    if avx512.kernel_unavailable():
        raise SystemExit(f"our AVX512 kernel cannot run here: {avx512.kernel_unavailable()}")
    generator = torch.Generator().manual_seed(0)
    matmul, _ = avx512._kernel()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for k, n in ((576, 576), (576, 192), (576, 1536), (1536, 576)):
            codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=generator)
            scale = torch.rand(n, k // 64, generator=generator) * 0.01
            layer = QuantLinear.from_codes(codes, scale, None, bits=4, group_size=64, bias=None, dtype=torch.bfloat16)
            x = torch.randn(1, 1, k, generator=generator).to(torch.bfloat16)
            with torch.no_grad():
                layer(x)
                state = layer.prepared_state(avx512.CpuAvx512W4Backend(), x.device)

                def full_dispatch():
                    layer._bound = None
                    layer(x)

                out = torch.empty(1, 1, state.padded_out, dtype=torch.bfloat16)
                row = {"threads": threads, "in_x_out": f"{k}x{n}",
                       "module_bound_us": round(median_us(lambda: layer(x), args.calls), 1),
                       "module_full_dispatch_us": round(median_us(full_dispatch, args.calls), 1),
                       "kernel_alone_us": round(median_us(lambda: matmul(x.data_ptr(), *state.pointers, 1, state.padded_out, k, 64,
                                                                         out.data_ptr(), threads), args.calls), 1)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

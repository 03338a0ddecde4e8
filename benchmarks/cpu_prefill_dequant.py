"""CPU prefill of a compressed model: the reference path's dequantization in the output dtype
against the fp32 formula it replaced, and both against the dense bf16 model.

    OMP_NUM_THREADS=2 python benchmarks/cpu_prefill_dequant.py [--model-dir DIR] [--windows 4] [--repeats 5]

Above 16 rows (prefill, perplexity) QuantLinear takes the reference path on the CPU: dequantize
the packed weight, then a bf16 matmul (faster there than PyTorch's int4 operator, see
kernels/cpu_int4.py). This times, interleaved, with the L3 cache flushed before each call:
  1. dequantization alone at SmolLM2-135M's layer shapes (bf16 scales and output), the current
     `dequantize_packed` against the fp32 formula (products in fp32, then one cast);
  2. a forward over `--windows` windows of 256 tokens, batch 1, of SmolLM2-135M-Instruct W4 g64
     (RTN, symmetric, made by our pipeline as in cpu_kernels.py) loaded with `compressor.load`, with
     each formula swapped in, and of its dense bf16 twin (`decode_speed.densified`).
Values are the same either way (tests/test_quant_math.py checks them bit for bit).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_kernels import ensure_model, interleaved_timings  # noqa: E402

SMOLLM2_SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
                  "down 576x1536": (576, 1536)}


def fp32_formula(packed, scale, zero_packed, bits, in_features, dtype=None):
    from compressor.kernels.packing import unpack_codes
    from compressor.kernels.reference import unpack_zero_points

    out_features, groups = scale.shape
    codes = unpack_codes(packed, bits, (out_features, in_features), dim=1).float().reshape(out_features, groups, -1)
    if zero_packed is not None:
        codes = codes - unpack_zero_points(zero_packed, bits, out_features, groups).float().unsqueeze(-1)
    weight = codes * scale.float().unsqueeze(-1)
    return weight.reshape(out_features, in_features).to(dtype or scale.dtype)


@torch.no_grad()
def dequantization_benchmark(repeats: int) -> None:
    from compressor.kernels.quant_linear import QuantLinear
    from compressor.kernels.reference import dequantize_packed

    print(f"dequantization, W4 g64 symmetric, bf16 scales and output, threads {torch.get_num_threads()}")
    print("| layer (out x in) | fp32 formula ms | output dtype ms | ratio |\n|---|---|---|---|")
    for name, (n, k) in SMOLLM2_SHAPES.items():
        layer = QuantLinear.from_codes(torch.randint(-8, 8, (n, k), dtype=torch.int8), torch.rand(n, k // 64) * 0.01,
                                       None, bits=4, group_size=64, bias=None, dtype=torch.bfloat16)
        args = (layer.weight_packed, layer.weight_scale, None, 4, k, torch.bfloat16)
        timings = interleaved_timings({"fp32": lambda: fp32_formula(*args), "out": lambda: dequantize_packed(*args)}, repeats)
        print(f"| {name} | {timings['fp32'][1]:.3f} | {timings['out'][1]:.3f} | {timings['fp32'][1] / timings['out'][1]:.2f} |")


@torch.no_grad()
def prefill_benchmark(model_dir: Path | None, windows: int, repeats: int) -> None:
    import compressor
    import compressor.kernels.quant_linear as quant_linear
    from compressor.decode_speed import densified

    compressed = compressor.load(ensure_model(model_dir), dtype=torch.bfloat16)
    dense = densified(compressed)
    tokens = torch.randint(3, compressed.config.vocab_size, (windows, 1, 256), generator=torch.Generator().manual_seed(0))
    current = quant_linear.dequantize_packed

    def forward(model, formula=None):
        def run():
            quant_linear.dequantize_packed = formula or current
            try:
                for window in tokens:
                    model(input_ids=window, use_cache=False)
            finally:
                quant_linear.dequantize_packed = current
        return run

    timings = interleaved_timings({"W4 g64, fp32 formula": forward(compressed, fp32_formula),
                                   "W4 g64, output dtype": forward(compressed), "bf16 dense": forward(dense)}, repeats)
    dense_ms = timings["bf16 dense"][1]
    print(f"\nprefill, {windows} windows x 256 tokens, batch 1, threads {torch.get_num_threads()}")
    print("| model | min ms | median ms | median / bf16 |\n|---|---|---|---|")
    for name, (low, median) in timings.items():
        print(f"| {name} | {low:.0f} | {median:.0f} | {median / dense_ms:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a W4 g64 output to reuse (made once otherwise)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dequantization_benchmark(max(args.repeats, 20))
    prefill_benchmark(args.model_dir, args.windows, args.repeats)


if __name__ == "__main__":
    main()

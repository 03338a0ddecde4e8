"""CPU benchmark of W8A8Linear: the int8 (`torch._int_mm`) and FP8 (`torch._scaled_mm`) fast paths
against the reference path (dequantize, then matmul) and a bf16 `F.linear`, per layer.

    .venv/bin/python benchmarks/cpu_w8a8_kernels.py [--repeats 3] [--threads 1 2]

Layers in 4096 × out 4096 and in 4096 × out 14336, bf16 activations quantized dynamically per
token, batch 1 and 16, at each thread count (torch.set_num_threads, same process). Within one
(layer, batch, threads) group the calls are interleaved, the L3 flushed before each, and the
min and median reported (see `cpu_kernels.interleaved_timings`). Ratios are within one group.

The FP8 fast path is called through its backend (`Fp8ScaledMmBackend(on_cpu=True)`): the default
dispatch leaves FP8 layers on CPU to the reference path because of what this script measures.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cpu_kernels import interleaved_timings  # benchmarks/ is the script's directory

from compressor.kernels.w8a8_backends import Fp8ScaledMmBackend
from compressor.kernels.w8a8_linear import ActivationScheme, W8A8Linear

SHAPES = ((4096, 4096), (4096, 14336))  # (in, out)
BATCHES = (1, 16)
FAST = {"int": "int8-int-mm", "float": "fp8-scaled-mm"}


def make_layer(in_features: int, out_features: int, kind: str, dense: torch.Tensor) -> W8A8Linear:
    """Per-channel 8-bit codes of `dense` (what RTN / fp8 quantization would store)."""
    top = 127.0 if kind == "int" else 448.0
    scale = dense.float().abs().amax(dim=1, keepdim=True) / top
    scaled = dense.float() / scale
    codes = scaled.round().clamp(-128, 127).to(torch.int8) if kind == "int" else scaled.to(torch.float8_e4m3fn)
    return W8A8Linear.from_codes(codes, scale, weight_type=kind, activations=ActivationScheme(kind, True),
                                 input_scale=None, bias=None, dtype=torch.bfloat16)


@torch.no_grad()
def run_group(in_features: int, out_features: int, batch: int, repeats: int, layers: dict, dense: torch.Tensor) -> None:
    x = torch.randn(batch, in_features, dtype=torch.bfloat16)
    calls = {"bf16 F.linear": lambda: F.linear(x, dense)}
    fp8_backend = Fp8ScaledMmBackend(on_cpu=True)
    fp8_state = layers["float"].prepared_state(fp8_backend, x.device)
    calls["int8 W8A8 int8-int-mm"] = lambda: layers["int"](x)
    calls["int8 W8A8 reference"] = lambda: layers["int"].reference_forward(x)
    calls["fp8 W8A8 fp8-scaled-mm"] = lambda: fp8_backend.run(fp8_state, x)
    calls["fp8 W8A8 reference"] = lambda: layers["float"].reference_forward(x)
    timings = interleaved_timings(calls, repeats)
    assert layers["int"].kernel_report["kernel"] == FAST["int"], layers["int"].kernel_report
    fast_fp8 = fp8_backend.run(fp8_state, x).float()
    reference_fp8 = layers["float"].reference_forward(x).float()
    assert (fast_fp8 - reference_fp8).norm() <= 1e-2 * reference_fp8.norm()
    base_min, base_median = timings["bf16 F.linear"]
    print(f"layer {in_features}x{out_features} (in x out), batch {batch}, threads {torch.get_num_threads()}, "
          f"{repeats} interleaved calls each")
    print(f"  {'':<30} {'min ms':>9} {'median ms':>10}  (x bf16 by min / by median)")
    for name, (low, mid) in timings.items():
        print(f"  {name:<30} {low:9.2f} {mid:10.2f}  ({base_min / low:5.2f}x / {base_median / mid:5.2f}x)")
    for kind in layers:
        label = "int8 W8A8" if kind == "int" else "fp8 W8A8"
        fast, ref = timings[f"{label} {FAST[kind]}"], timings[f"{label} reference"]
        print(f"  {label}: reference / fast = {ref[0] / fast[0]:.2f} by min, {ref[1] / fast[1]:.2f} by median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    torch.manual_seed(0)
    for in_features, out_features in SHAPES:
        dense = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
        layers = {kind: make_layer(in_features, out_features, kind, dense) for kind in ("int", "float")}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in BATCHES:
                run_group(in_features, out_features, batch, args.repeats, layers, dense)
        del dense, layers


if __name__ == "__main__":
    main()

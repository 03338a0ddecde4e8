"""CPU kernel benchmark: per-layer matmul at 4096x14336 and SmolLM2-135M W4 g64 decode speed.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/cpu_kernels.py [--model-dir DIR] [--skip-model]

Part 1, one Linear (in 4096, out 14336, batch 1): torch bf16 F.linear, PyTorch's int4 operator
alone on pre-packed weights, our AVX512-BF16 W4A16 kernel alone (where the CPU has it), and
QuantLinear (dispatch + the kernel it picks); also the int8 operator and QuantLinear int8. Runs are interleaved and the median is reported.
Part 2: SmolLM2-135M-Instruct quantized W4 g64 (RTN, symmetric) by our pipeline, loaded with
`compressor.load`, decode tokens/s at batch 1 against its dense bf16 twin in the same process.
Issue targets: QuantLinear within 1.2x of the kernel it runs, alone; decode >= 2.0x bf16.
COMPRESSOR_NATIVE_KERNELS=0 switches our kernel off (QuantLinear then runs PyTorch's operator).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
RECIPE = """\
name: w4g64-rtn
description: 4-bit group-64 symmetric RTN (kernel benchmark)
stages:
  - quantize: {method: rtn, weights: {bits: 4, group_size: 64, symmetric: true}, ignore: [lm_head]}
"""


def interleaved_timings(calls: dict[str, callable], repeats: int) -> dict[str, tuple[float, float]]:
    """(min, median) milliseconds per call; the calls take turns, in alternating order.

    The 32 MiB L3 of this machine holds a whole int4 4096x14336 weight (29 MiB), so the cache is
    flushed (a 64 MiB write) before every timed call: each call reads its weight from memory.
    On a shared machine the scheduler preempts in ~4 ms slices, so the minimum is the best
    estimate of a call's own cost and the median shows the contention.
    """
    flush = torch.empty(64 << 20, dtype=torch.uint8)
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    items = list(calls.items())
    for index in range(repeats):
        for name, call in items if index % 2 == 0 else items[::-1]:
            flush.fill_(1)
            started = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - started) * 1e3)
    return {name: (min(values), statistics.median(values)) for name, values in times.items()}


@torch.no_grad()
def layer_benchmark(repeats: int) -> None:
    from compressor.kernels.cpu_int4 import CpuInt4PackBackend
    from compressor.kernels.cpu_int4_avx512 import CpuAvx512W4Backend, kernel_unavailable, run_avx512
    from compressor.kernels.cpu_int8 import CpuInt8PackBackend
    from compressor.kernels.quant_linear import QuantLinear

    n, k = 14336, 4096
    x = torch.randn(1, k, dtype=torch.bfloat16)
    dense = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
    print(f"layer {k}x{n} (in x out), batch 1, bf16 activations, threads {torch.get_num_threads()}")
    layers = {}
    for bits, group in ((4, 128), (4, 64), (8, None)):
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        codes = torch.randint(qmin, qmax + 1, (n, k), dtype=torch.int8)
        groups = 1 if group is None else k // group
        scale = torch.rand(n, groups) * 0.01 + 0.001
        layers[(bits, group)] = QuantLinear.from_codes(codes, scale, None, bits=bits, group_size=group, bias=None, dtype=torch.bfloat16)
        del codes
    calls = {"bf16 F.linear": lambda: F.linear(x, dense)}
    for (bits, group), layer in layers.items():
        label = f"int{bits} {'g' + str(group) if group else 'per-channel'}"
        # "op alone" runs on the layer's own packed state, so both read the same memory
        if bits == 4:
            state = layer.prepared_state(CpuInt4PackBackend(), x.device)
            table = state.scales_and_zeros(torch.bfloat16)
            calls[f"{label} torch op alone"] = (
                lambda s=state, t=table: torch.ops.aten._weight_int4pack_mm_for_cpu(x, s.packed, s.group_size, t)
            )
            if kernel_unavailable() is None:
                ours = layer.prepared_state(CpuAvx512W4Backend(), x.device)
                calls[f"{label} ours alone"] = lambda s=ours: run_avx512(s, x)
        else:
            state = layer.prepared_state(CpuInt8PackBackend(), x.device)
            scale = state.scale(torch.bfloat16)
            calls[f"{label} torch op alone"] = lambda s=state, sc=scale: torch.ops.aten._weight_int8pack_mm(x, s.codes, sc)
        calls[f"{label} QuantLinear"] = lambda m=layer: m(x)
    timings = interleaved_timings(calls, repeats)
    alone = {"cpu-int4pack": "torch op alone", "cpu-int8pack": "torch op alone", CpuAvx512W4Backend.name: "ours alone"}
    for (bits, group), layer in layers.items():
        assert layer.kernel_report["kernel"] in alone, layer.kernel_report
    bf16_min, bf16_median = timings["bf16 F.linear"]
    print(f"  {'':<34} {'min ms':>8} {'median ms':>10}  (x bf16 by min / by median)")
    for name, (low, mid) in timings.items():
        print(f"  {name:<34} {low:8.3f} {mid:10.3f}  ({bf16_min / low:4.2f}x / {bf16_median / mid:4.2f}x)")
    for (bits, group), layer in layers.items():
        label = f"int{bits} {'g' + str(group) if group else 'per-channel'}"
        kernel = layer.kernel_report["kernel"]
        module, op = timings[f"{label} QuantLinear"], timings[f"{label} {alone[kernel]}"]
        print(f"  {label}: QuantLinear ({kernel}) / {alone[kernel]} = {module[0] / op[0]:.3f} by min,"
              f" {module[1] / op[1]:.3f} by median (target <= 1.2)")


def ensure_model(model_dir: Path | None) -> Path:
    if model_dir is not None and (model_dir / "config.json").is_file():
        return model_dir
    folder = Path(tempfile.mkdtemp(prefix="cpu-kernels-"))
    recipe = folder / "w4g64-rtn.yaml"
    recipe.write_text(RECIPE)
    out = model_dir or folder / "smol-w4g64"
    subprocess.run(
        [sys.executable, "-m", "compressor.cli", "builtin:smollm2-135m-instruct", "--recipe", str(recipe),
         "-o", str(out), "-q", "--no-perplexity", "--overwrite"],
        check=True, cwd=ROOT,
    )
    return out


def model_benchmark(model_dir: Path | None, tokens: int, repeats: int) -> None:
    import compressor
    from compressor.decode_speed import densified, time_decode
    from compressor.runtime import kernel_summary

    folder = ensure_model(model_dir)
    compressed = compressor.load(folder, dtype=torch.bfloat16)
    dense = densified(compressed)
    prompt = torch.randint(3, compressed.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    timings = time_decode({"W4 g64 compressor.load": compressed, "bf16 dense": dense}, prompt, tokens, repeats)
    print(f"SmolLM2-135M-Instruct decode, batch 1, {tokens} tokens after a 16-token prompt, median of {repeats}")
    for name, timing in timings.items():
        runs = ", ".join(f"{tokens / s:.1f}" for s in timing.seconds)
        print(f"  {name:<24} {timing.tokens_per_second:8.2f} tokens/s  (runs: {runs})")
    ratio = timings["W4 g64 compressor.load"].tokens_per_second / timings["bf16 dense"].tokens_per_second
    kernels = sorted({r["kernel"] for r in kernel_summary(compressed).values()})
    print(f"  speed-up {ratio:.2f}x (target >= 2.0); kernels used: {kernels}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a W4 g64 SmolLM2 output (made if missing)")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--skip-layer", action="store_true")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if not args.skip_layer:
        layer_benchmark(max(args.repeats * 8, 20))
    if not args.skip_model:
        model_benchmark(args.model_dir, args.tokens, args.repeats)


if __name__ == "__main__":
    main()

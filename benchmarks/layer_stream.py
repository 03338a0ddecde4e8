#!/usr/bin/env python
"""How fast the quantized layers stream their weights from memory at one bf16 row, at 1 and 2 threads.

    python benchmarks/layer_stream.py [--model-dir DIR] [--repeats 30]

Two measurements in one process:
- SmolLM2 W4 g64 (the model folder is made as in benchmarks/cpu_kernels.py when absent): every
  block's q, k, v, o and gated MLP called once, in model order, with one bf16 row, as a decode
  token does without the rest of the model. The 56 MB of packed weights exceed the L3 cache, so
  each layer comes from memory. Per layer kind: µs a call and GB/s of its weight buffers.
- One large random W4 g64 layer (98304 x 576, three of them in turn so none stays cached): the
  same kernel over one long stream, and `Tensor.sum` over 256 MB for the machine's bandwidth.
Medians over `--repeats` passes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cpu_kernels import ensure_model  # noqa: E402  (a sibling script: benchmarks/ is on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.kernel_fixtures

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp")


def buffer_bytes(module: torch.nn.Module) -> int:
    return sum(buffer.numel() * buffer.element_size() for buffer in module.buffers())


def model_stream(model_dir: Path | None, repeats: int) -> None:
    import compressor

    model = compressor.load(ensure_model(model_dir), dtype=torch.bfloat16)
    calls = []  # (kind, module, input)
    for block in model.model.layers:
        for kind in KINDS:
            module = block.mlp if kind == "mlp" else getattr(block.self_attn, kind)
            width = module.gate_proj.in_features if kind == "mlp" else module.in_features
            calls.append((kind, module, torch.randn(1, 1, width, dtype=torch.bfloat16)))
    blocks = len(model.model.layers)
    kind_bytes = {kind: sum(buffer_bytes(m) for k, m, _ in calls if k == kind) for kind in KINDS}
    with torch.no_grad():
        for _, module, x in calls:  # bind every layer's kernel first
            module(x)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            spent = {kind: [] for kind in KINDS}
            totals = []
            for _ in range(repeats):
                seconds = dict.fromkeys(KINDS, 0.0)
                for kind, module, x in calls:
                    started = time.perf_counter()
                    module(x)
                    seconds[kind] += time.perf_counter() - started
                for kind in KINDS:
                    spent[kind].append(seconds[kind])
                totals.append(sum(seconds.values()))
            row = {"threads": threads, "all_layers_ms": round(statistics.median(totals) * 1e3, 2),
                   "all_layers_GBps": round(sum(kind_bytes.values()) / statistics.median(totals) / 1e9, 1)}
            for kind in KINDS:
                median = statistics.median(spent[kind])
                row[f"{kind}_us_per_call"] = round(median / blocks * 1e6, 1)
                row[f"{kind}_GBps"] = round(kind_bytes[kind] / median / 1e9, 1)
            print(json.dumps(row), flush=True)


def large_layer_stream(repeats: int) -> None:
    from tests.kernel_fixtures import random_quant_linear

    layers = [random_quant_linear(98304, 576, bits=4, group_size=64, symmetric=True, dtype=torch.bfloat16) for _ in range(3)]
    x = torch.randn(1, 576, dtype=torch.bfloat16)
    big = torch.randn(64 * 1024 * 1024)
    with torch.no_grad():
        for layer in layers:
            layer(x)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times = []
            for _ in range(repeats):
                for layer in layers:
                    started = time.perf_counter()
                    layer(x)
                    times.append(time.perf_counter() - started)
            sums = []
            for _ in range(repeats):
                started = time.perf_counter()
                big.sum()
                sums.append(time.perf_counter() - started)
            print(json.dumps({"threads": threads, "kernel": layers[0].kernel_report["kernel"],
                              "large_layer_GBps": round(buffer_bytes(layers[0]) / statistics.median(times) / 1e9, 1),
                              "tensor_sum_GBps": round(big.numel() * 4 / statistics.median(sums) / 1e9, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    model_stream(args.model_dir, args.repeats)
    large_layer_stream(args.repeats)


if __name__ == "__main__":
    main()

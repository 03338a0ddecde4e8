#!/usr/bin/env python
"""Where a SmolLM2 W4 g64 decode token's time goes, at 1 and 2 torch threads.

    python benchmarks/decode_profile.py [--model-dir DIR] [--tokens 32]

For each thread count, in one process: the whole decode token (median of 3 decodes); the part
spent inside our kernels' calls (timers around the bound calls QuantLinear and the fused gated
MLP make for one-row inputs: the C call, its output tensors and argument passing); the token
again with every quantized layer and fused MLP answering a one-row input with a ready zero
tensor (everything they do not own: attention, norms, the bf16 lm_head, transformers' Python);
and the tied bf16 lm_head alone on one token (median of 50 calls). The model folder is made as in
benchmarks/cpu_kernels.py when absent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench_timing import median_seconds  # noqa: E402  (a sibling: benchmarks/ is on sys.path)
from cpu_kernels import ensure_model  # noqa: E402


def median_ms(function, calls: int) -> float:
    return median_seconds(function, calls, warmup=5) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    import compressor
    import compressor.kernels.cpu_int4_avx512 as avx512
    import compressor.kernels.gated_mlp as gated_mlp
    from compressor.decode_speed import _decode_once
    from compressor.kernels.quant_linear import QuantLinear

    model = compressor.load(ensure_model(args.model_dir), dtype=torch.bfloat16)
    prompt = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    mlps = [m.forward for m in model.modules() if isinstance(m.__dict__.get("forward"), gated_mlp.FusedGatedMlpForward)]
    kernel_seconds = [0.0]
    bind, bind_mlp = avx512.CpuAvx512W4Backend.bind, gated_mlp.bind_gated_mlp

    def timer(run):
        def timed(x):
            if x.numel() != x.shape[-1]:
                return run(x)  # the prompt's rows: not a decode token
            started = time.perf_counter()
            try:
                return run(x)
            finally:
                kernel_seconds[0] += time.perf_counter() - started

        return timed

    def timed_bind(self, state):
        return timer(bind(self, state))

    def timed_bind_mlp(*states):
        return timer(bind_mlp(*states))

    real_forward, real_mlp_call = QuantLinear.forward, gated_mlp.FusedGatedMlpForward.__call__
    zeros: dict[int, torch.Tensor] = {}

    def zero_forward(self, x):
        if x.numel() != self.in_features:
            return real_forward(self, x)  # the prompt's rows
        if self.out_features not in zeros:
            zeros[self.out_features] = torch.zeros(1, 1, self.out_features, dtype=torch.bfloat16)
        return zeros[self.out_features]

    def zero_mlp(self, x):
        if x.numel() != x.shape[-1]:
            return real_mlp_call(self, x)
        if x.shape[-1] not in zeros:
            zeros[x.shape[-1]] = torch.zeros(1, 1, x.shape[-1], dtype=torch.bfloat16)
        return zeros[x.shape[-1]]

    def token_ms() -> float:
        _decode_once(model, prompt, 4)
        return statistics.median(_decode_once(model, prompt, args.tokens) for _ in range(3)) * 1e3 / args.tokens

    hidden = torch.randn(1, 1, model.config.hidden_size, dtype=torch.bfloat16)
    avx512.CpuAvx512W4Backend.bind, gated_mlp.bind_gated_mlp = timed_bind, timed_bind_mlp
    for layer in layers:
        layer._bound = None  # bind again, through the timers
    for mlp in mlps:
        mlp.bound = None
    for threads in (1, 2):
        torch.set_num_threads(threads)
        kernel_seconds[0] = 0.0
        row = {"threads": threads, "token_ms": round(token_ms(), 2)}
        row["kernel_calls_ms_per_token"] = round(kernel_seconds[0] * 1e3 / (3 * args.tokens + 4), 2)
        QuantLinear.forward, gated_mlp.FusedGatedMlpForward.__call__ = zero_forward, zero_mlp
        row["token_without_quantized_layers_ms"] = round(token_ms(), 2)
        QuantLinear.forward, gated_mlp.FusedGatedMlpForward.__call__ = real_forward, real_mlp_call
        row["lm_head_ms"] = round(median_ms(lambda: model.lm_head(hidden), 50), 2)
        print(json.dumps(row), flush=True)
    avx512.CpuAvx512W4Backend.bind, gated_mlp.bind_gated_mlp = bind, bind_mlp


if __name__ == "__main__":
    main()

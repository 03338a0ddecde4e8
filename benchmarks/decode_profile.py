#!/usr/bin/env python
"""Where a SmolLM2 W4 g64 decode token's time goes, at 1 and 2 torch threads.

    python benchmarks/decode_profile.py [--model-dir DIR] [--tokens 32]

For each thread count, in one process: the whole decode token (median of 3 decodes), the part
spent in QuantLinear's kernel calls (timers around the backend's `run` for one-row inputs), and the tied bf16
lm_head alone on one token (median of 50 calls). Then the decode again with our AVX512 kernel
held to one thread while torch uses two, to see whether the kernel's own threads matter. The
model folder is made as in benchmarks/cpu_kernels.py when absent.
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

from cpu_kernels import ensure_model  # noqa: E402  (a sibling script: benchmarks/ is on sys.path)


def median_ms(function, calls: int) -> float:
    for _ in range(5):
        function()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    import compressor
    import compressor.kernels.cpu_int4_avx512 as avx512
    from compressor.decode_speed import _decode_once

    model = compressor.load(ensure_model(args.model_dir), dtype=torch.bfloat16)
    prompt = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    kernel_seconds = [0.0]
    original_run = avx512.run_avx512

    def timed_run(state, x):
        if x.numel() != x.shape[-1]:
            return original_run(state, x)  # the prompt's rows: not a decode token
        started = time.perf_counter()
        try:
            return original_run(state, x)
        finally:
            kernel_seconds[0] += time.perf_counter() - started

    def one_thread_run(state, x):
        # Same call as run_avx512 with the kernel's OpenMP team held to one thread.
        matmul, _ = avx512._kernel()
        x = x.contiguous()
        out = torch.empty((*x.shape[:-1], state.padded_out), dtype=torch.bfloat16)
        matmul(x.data_ptr(), *state.pointers, x.numel() // x.shape[-1], state.padded_out, x.shape[-1],
               state.group_size, out.data_ptr(), 1)
        return out if state.padded_out == state.out_features else out[..., : state.out_features]

    hidden = torch.randn(1, 1, model.config.hidden_size, dtype=torch.bfloat16)
    rows = []
    for threads, kernel in ((1, "timed"), (2, "timed"), (2, "one-thread kernel")):
        torch.set_num_threads(threads)
        avx512.run_avx512 = timed_run if kernel == "timed" else one_thread_run
        _decode_once(model, prompt, 4)
        kernel_seconds[0] = 0.0
        token_ms = statistics.median(_decode_once(model, prompt, args.tokens) for _ in range(3)) * 1e3 / args.tokens
        row = {"threads": threads, "kernel": kernel, "token_ms": round(token_ms, 2)}
        if kernel == "timed":
            row["kernel_calls_ms_per_token"] = round(kernel_seconds[0] * 1e3 / (3 * args.tokens), 2)
            row["lm_head_ms"] = round(median_ms(lambda: model.lm_head(hidden), 50), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    avx512.run_avx512 = original_run


if __name__ == "__main__":
    main()

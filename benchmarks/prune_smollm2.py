#!/usr/bin/env python
"""Pruning on SmolLM2-135M-Instruct: held-out perplexity, size on disk and wall time (as a ratio
to one bf16 forward pass over the calibration set) for each method, optionally with
llm-compressor's SparseGPT 2:4 side by side on the same token windows.

    python benchmarks/prune_smollm2.py [--samples 128 --seq-len 512]
        [--runs sparsegpt:2:4 sparsegpt:0.5 wanda:0.5 magnitude:0.5 sparsegpt:2:4+gptq]
        [--eval-windows N] [--with-llmcompressor] [--json out.json]

Each run starts from the same bf16 weights, runs the `prune` stage (and, for `+gptq`, a W4 g64
GPTQ `quantize` stage after it), measures held-out perplexity on the evaluation slice in
windows of --seq-len, and saves the checkpoint the way `compress` does (sparse-bitmask layers)
to measure its bytes on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from compressor.algorithms.masks import measured_sparsity  # noqa: E402
from compressor.cache import cache_root  # noqa: E402
from compressor.calibration.batches import build_calibration  # noqa: E402
from compressor.evaluation.perplexity import evaluation_windows, perplexity_on  # noqa: E402
from compressor.formats import write_quantization_config  # noqa: E402
from compressor.model_io import load_model, weights_bytes  # noqa: E402
from compressor.recipe import CalibrationSpec, parse_recipe_text  # noqa: E402
from compressor.registry import stage_registry  # noqa: E402
from compressor.sparse_format import pack_sparse_layers, write_sparsity_config  # noqa: E402
from compressor.stages.base import StageContext  # noqa: E402

MODEL = "builtin:smollm2-135m-instruct"
LLMC_DRIVER = Path("/work/main/benchmarks/llmcompressor_gptq.py")
LLMC_PYTHON = Path("/work/main/benchmarks/.venv-llmcompressor/bin/python")


@torch.no_grad()
def time_forward(model, tokens: torch.Tensor) -> float:
    started = time.perf_counter()
    for row in tokens:
        model(input_ids=row.unsqueeze(0), use_cache=False)
    return time.perf_counter() - started


def recipe_for(run: str) -> str:
    prune, _, then = run.partition("+")
    method, _, sparsity = prune.partition(":")
    value = f'"{sparsity}"' if ":" in sparsity else sparsity
    text = f"name: bench\nstages:\n  - prune: {{method: {method}, sparsity: {value}}}\n"
    if then == "gptq":
        text += "  - quantize: {method: gptq, weights: {bits: 4, group_size: 64}}\n"
    return text


def run_one(run: str, model, tokenizer, tokens, windows, forward_s: float) -> dict:
    recipe = parse_recipe_text(recipe_for(run))
    ctx = StageContext(tokenizer=tokenizer, calibration=lambda: tokens, device=torch.device("cpu"), show_progress=False)
    started = time.perf_counter()
    for index, spec in enumerate(recipe.stages):
        stage = stage_registry().get(spec.kind).implementation
        plan = stage.plan(model, spec.config, lambda *k: {"where": "bench", "key": spec.kind})
        stage.run(model, spec.config, ctx, plan)
    seconds = time.perf_counter() - started
    pruned = {n: r["sparsity"] for n, r in ctx.records.items() if r.get("stage") == "prune" and "sparsity" in r}
    ppl = perplexity_on(model, windows).perplexity
    with tempfile.TemporaryDirectory() as tmp:
        pack_sparse_layers(model)
        model.save_pretrained(tmp)
        write_quantization_config(model, Path(tmp))
        write_sparsity_config(model, Path(tmp))
        size = weights_bytes(Path(tmp))
    return {
        "run": run,
        "seconds": round(seconds, 2),
        "ratio_to_forward": round(seconds / forward_s, 3),
        "ppl": round(ppl, 3),
        "bytes_on_disk": size,
        "mean_layer_sparsity": round(sum(pruned.values()) / max(len(pruned), 1), 4) if pruned else None,
    }


def run_llmcompressor(folder: Path, tokens: torch.Tensor, windows) -> dict:
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "calib.safetensors"
        save_file({"input_ids": tokens.contiguous()}, str(token_file))
        out_dir = Path(tmp) / "llmc-out"
        result = subprocess.run(
            [str(LLMC_PYTHON), str(LLMC_DRIVER), "--model", str(folder), "--tokens", str(token_file),
             "--out", str(out_dir), "--sparsegpt-24"],
            capture_output=True, text=True, check=True,
        )
        line = next(l for l in reversed(result.stdout.splitlines()) if l.startswith("RESULT "))
        theirs = json.loads(line[len("RESULT "):])
        model = AutoModelForCausalLM.from_pretrained(str(out_dir))
        weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        return {
            "run": "llm-compressor sparsegpt 2:4",
            "version": theirs.get("llmcompressor_version"),
            "bf16_forward_s": theirs.get("forward_s"),
            "seconds": theirs.get("oneshot_s"),
            "ratio_to_forward": theirs.get("ratio"),
            "ppl": round(perplexity_on(model, windows).perplexity, 3),
            "bytes_on_disk": weights_bytes(out_dir),
            "mean_layer_sparsity": round(sum(measured_sparsity(w) for w in weights) / len(weights), 4),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--runs", nargs="*", default=["sparsegpt:2:4", "sparsegpt:0.5", "wanda:0.5", "magnitude:0.5"])
    parser.add_argument("--eval-windows", type=int, default=None, help="use only the first N held-out windows")
    parser.add_argument("--with-llmcompressor", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--bf16-from", type=Path,
                        help="reuse the bf16 forward time, perplexity and size from this earlier --json of the same settings")
    args = parser.parse_args()

    loaded = load_model(MODEL)
    model, tokenizer = loaded.model, loaded.tokenizer
    tokens = build_calibration(CalibrationSpec(samples=args.samples, seq_len=args.seq_len), tokenizer, cache_root() / "calibration")
    windows = evaluation_windows(tokenizer, args.seq_len)
    if args.eval_windows is not None:
        windows = windows[: args.eval_windows]
    result = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores (shared), torch threads {torch.get_num_threads()}",
        "calibration": f"{args.samples}x{args.seq_len} builtin:abstracts",
        "eval_tokens": int(windows[:, 1:].numel()),
    }
    if args.bf16_from:
        earlier = json.loads(args.bf16_from.read_text())
        if (earlier["calibration"], earlier["eval_tokens"]) != (result["calibration"], result["eval_tokens"]):
            parser.error(f"{args.bf16_from} was measured with other calibration/evaluation settings")
        result.update({k: earlier[k] for k in ("bf16_forward_s", "ppl_bf16", "bytes_bf16")}, bf16_from=str(args.bf16_from))
    else:
        result.update(
            bf16_forward_s=round(time_forward(model, tokens), 2),
            ppl_bf16=round(perplexity_on(model, windows).perplexity, 3),
            bytes_bf16=weights_bytes(loaded.folder),
        )
    result["runs"] = []
    forward_s = result["bf16_forward_s"]
    print(json.dumps(result), flush=True)
    del model
    def record(entry: dict) -> None:
        result["runs"].append(entry)
        print(json.dumps(entry), flush=True)
        if args.json:  # after every run, so a stopped benchmark keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    for index, run in enumerate(args.runs):
        record(run_one(run, load_model(MODEL).model, tokenizer, tokens, windows, forward_s))  # fresh bf16 weights
        if index == 0 and args.with_llmcompressor:
            # Right after our first run (SparseGPT 2:4 by default), so the side by side lands early.
            record(run_llmcompressor(loaded.folder, tokens, windows))
    if not args.runs and args.with_llmcompressor:
        record(run_llmcompressor(loaded.folder, tokens, windows))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

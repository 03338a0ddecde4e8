#!/usr/bin/env python
"""GPTQ on SmolLM2-135M-Instruct: wall time against one bf16 forward pass, peak RSS, held-out
perplexity; optionally llm-compressor side by side on the same token windows.

    python benchmarks/gptq_smollm2.py [--samples 128 --seq-len 512 --bits 4 --group-size 64]
                                      [--with-llmcompressor] [--json out.json]

In one process: build the calibration windows with compressor's own calibration code, time one
bf16 forward pass over them (one window per call), run the GPTQ quantize stage on the same
windows and time it, then measure held-out perplexity of the original and the compressed model
(evaluation slice, windows of --seq-len). Peak RSS is the process's maximum resident set.

With --with-llmcompressor, the same windows are written to a file and
benchmarks/llmcompressor_gptq.py runs in benchmarks/.venv-llmcompressor (made by
benchmarks/setup_llmcompressor_venv.sh); its checkpoint's held-out perplexity is measured here
with plain transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from compressor.cache import cache_root  # noqa: E402
from compressor.calibration.batches import build_calibration  # noqa: E402
from compressor.evaluation.perplexity import evaluation_windows, perplexity_on  # noqa: E402
from compressor.model_io import load_model  # noqa: E402
from compressor.recipe import CalibrationSpec, parse_recipe_text  # noqa: E402
from compressor.stages.base import StageContext  # noqa: E402
from compressor.stages.quantize import QuantizeStage  # noqa: E402

ROOT = Path(__file__).resolve().parent
MODEL = "builtin:smollm2-135m-instruct"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@torch.no_grad()
def time_forward(model, tokens: torch.Tensor) -> float:
    started = time.perf_counter()
    for row in tokens:
        model(input_ids=row.unsqueeze(0), use_cache=False)
    return time.perf_counter() - started


def run_llmcompressor(folder: Path, tokens: torch.Tensor, args, workdir: Path) -> dict:
    python = ROOT / ".venv-llmcompressor" / "bin" / "python"
    if not python.exists():
        subprocess.run(["bash", str(ROOT / "setup_llmcompressor_venv.sh")], check=True)
    token_file = workdir / "calib.safetensors"
    save_file({"input_ids": tokens.contiguous()}, str(token_file))
    out_dir = workdir / "llmcompressor-out"
    result = subprocess.run(
        [str(python), str(ROOT / "llmcompressor_gptq.py"), "--model", str(folder), "--tokens", str(token_file),
         "--out", str(out_dir), "--bits", str(args.bits), "--group-size", str(args.group_size)],
        capture_output=True, text=True, check=True,
    )
    line = next(l for l in reversed(result.stdout.splitlines()) if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--no-act-order", action="store_true")
    parser.add_argument("--observer", choices=["minmax", "mse"], default="minmax", help="how group scales are chosen")
    parser.add_argument("--with-llmcompressor", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    loaded = load_model(MODEL)
    model, tokenizer = loaded.model, loaded.tokenizer
    spec = CalibrationSpec(samples=args.samples, seq_len=args.seq_len)
    tokens = build_calibration(spec, tokenizer, cache_root() / "calibration")
    windows = evaluation_windows(tokenizer, args.seq_len)

    forward_s = time_forward(model, tokens)
    base_ppl = perplexity_on(model, windows).perplexity

    recipe = parse_recipe_text(
        f"name: bench\nstages:\n  - quantize: {{method: gptq, weights: {{bits: {args.bits}, group_size: {args.group_size},"
        f" observer: {args.observer}}},"
        f" act_order: {str(not args.no_act_order).lower()}}}\n"
    )
    config = recipe.stages[0].config
    stage = QuantizeStage()
    plan = stage.plan(model, config, lambda *k: {"where": "bench", "key": "quantize"})
    ctx = StageContext(tokenizer=tokenizer, calibration=lambda: tokens, device=torch.device("cpu"), show_progress=False)
    started = time.perf_counter()
    stage.run(model, config, ctx, plan)
    gptq_s = time.perf_counter() - started
    rss = peak_rss_mb()
    ppl = perplexity_on(model, windows).perplexity

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "scheme": f"W{args.bits} g{args.group_size} sym, act_order={not args.no_act_order}, observer={args.observer}",
        "calibration": f"{args.samples}x{args.seq_len} builtin:abstracts",
        "bf16_forward_s": round(forward_s, 2),
        "gptq_s": round(gptq_s, 2),
        "ratio_to_forward": round(gptq_s / forward_s, 3),
        "peak_rss_mb": round(rss, 1),
        "ppl_bf16": round(base_ppl, 3),
        "ppl_gptq": round(ppl, 3),
        "ppl_increase_pct": round((ppl / base_ppl - 1) * 100, 2),
    }
    if args.with_llmcompressor:
        del model
        with tempfile.TemporaryDirectory() as tmp:
            theirs = run_llmcompressor(loaded.folder, tokens, args, Path(tmp))
            from transformers import AutoModelForCausalLM

            their_model = AutoModelForCausalLM.from_pretrained(theirs["out_dir"])
            their_ppl = perplexity_on(their_model, windows).perplexity
        result["llmcompressor"] = {
            "version": theirs["llmcompressor_version"],
            "bf16_forward_s": theirs["forward_s"],
            "oneshot_s": theirs["oneshot_s"],
            "ratio_to_forward": theirs["ratio"],
            "peak_rss_mb": theirs["peak_rss_mb"],
            "ppl": round(their_ppl, 3),
            "ppl_increase_pct": round((their_ppl / base_ppl - 1) * 100, 2),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

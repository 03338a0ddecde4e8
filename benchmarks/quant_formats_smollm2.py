#!/usr/bin/env python
"""W8A8 SmoothQuant, FP8 and NF4 on SmolLM2-135M-Instruct: held-out perplexity against bf16, size on
disk, bits per weight of the quantized layers, and wall time as a ratio to one bf16 forward pass
over the calibration set; optionally llm-compressor side by side (W8A8 SmoothQuant, FP8 dynamic).

    python benchmarks/quant_formats_smollm2.py [--samples 128 --seq-len 512]
        [--methods w8a8-smoothquant,w8a8-smoothquant-gptq,fp8-dynamic,fp8-static,nf4,
                   w4a16-g64-gptq,w4a16-awq-gptq,w4a16-mixed,fp8-dynamic-smoothquant]
        [--eval-windows N] [--with-llmcompressor] [--json out.json]

In one process: the calibration windows come from compressor's own calibration code; one bf16
forward over them is timed (one window per call); then, for each method, a fresh copy of the bf16
model goes through the built-in recipe's quantize stage (timed), its held-out perplexity is
measured on the evaluation slice in --seq-len windows with our in-memory modules (W8A8Linear,
bitsandbytes Linear4bit), and it is saved through the pipeline's own writer to measure its size.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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
from compressor.formats import write_quantization_config  # noqa: E402
from compressor.model_io import load_model, weights_bytes  # noqa: E402
from compressor.recipe import CalibrationSpec, load_recipe  # noqa: E402
from compressor.stages.base import StageContext  # noqa: E402
from compressor.stages.quantize import QuantizeStage  # noqa: E402

ROOT = Path(__file__).resolve().parent
MODEL = "builtin:smollm2-135m-instruct"
RECIPES = {
    "w8a8-smoothquant": "w8a8-smoothquant",
    "w8a8-smoothquant-gptq": "w8a8-smoothquant-gptq",
    "fp8-dynamic": "fp8-dynamic",
    "fp8-static": "fp8-static",
    "nf4": "nf4",
    # int4 weight-only rows of the method table, so every row shares one bf16 forward
    "w4a16-g64-gptq": "w4a16-g64-gptq",
    "w4a16-awq-gptq": "w4a16-awq-gptq",
    "w4a16-mixed": "w4a16-mixed",
    # SmoothQuant migration (α 0.5) folded into the norms, then FP8 weights x FP8 dynamic per token
    "fp8-dynamic-smoothquant": "fp8-dynamic-smoothquant",
}
LLMCOMPRESSOR_SCHEMES = ("w8a8-smoothquant", "fp8-dynamic")


@torch.no_grad()
def time_forward(model, tokens: torch.Tensor) -> float:
    started = time.perf_counter()
    for row in tokens:
        model(input_ids=row.unsqueeze(0), use_cache=False)
    return time.perf_counter() - started


def run_ours(name: str, base_model, tokenizer, tokens, windows, workdir: Path) -> dict:
    recipe = load_recipe(RECIPES[name])
    model = copy.deepcopy(base_model)
    stage = QuantizeStage()
    config = recipe.stages[0].config
    plan = stage.plan(model, config, lambda *k: {"where": "bench", "key": "quantize"})
    ctx = StageContext(tokenizer=tokenizer, calibration=lambda: tokens, device=torch.device("cpu"), show_progress=False)
    started = time.perf_counter()
    stage.run(model, config, ctx, plan)
    seconds = time.perf_counter() - started
    ppl = perplexity_on(model, windows).perplexity
    folder = workdir / name
    model.save_pretrained(str(folder), safe_serialization=True)
    write_quantization_config(model, folder)
    numel = sum(base_model.get_submodule(m).weight.numel() for m in plan.selected)
    from safetensors import safe_open

    layer_bits = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if any(key.startswith(m + ".weight") or key == m + ".input_scale" for m in plan.selected):
                t = f.get_tensor(key)
                layer_bits += t.numel() * t.element_size() * 8
    return {"seconds": seconds, "ppl": ppl, "size_bytes": weights_bytes(folder), "bits_per_weight": layer_bits / numel,
            "modules": len(plan.selected), "description": recipe.description}


def run_llmcompressor(scheme: str, folder: Path, tokens: torch.Tensor, windows, workdir: Path) -> dict:
    python = ROOT / ".venv-llmcompressor" / "bin" / "python"
    if not python.exists():
        python = Path("/work/main/benchmarks/.venv-llmcompressor/bin/python")
    token_file = workdir / "calib.safetensors"
    save_file({"input_ids": tokens.contiguous()}, str(token_file))
    out_dir = workdir / f"llmcompressor-{scheme}"
    result = subprocess.run(
        [str(python), str(ROOT / "llmcompressor_quant_formats.py"), "--model", str(folder), "--tokens", str(token_file),
         "--out", str(out_dir), "--scheme", scheme],
        capture_output=True, text=True,
    )
    lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    theirs = json.loads(lines[-1][len("RESULT "):])
    from transformers import AutoModelForCausalLM

    their_model = AutoModelForCausalLM.from_pretrained(theirs["out_dir"])
    theirs["ppl"] = perplexity_on(their_model, windows).perplexity
    return theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=None, help="use only the first N held-out windows")
    parser.add_argument("--methods", default=",".join(RECIPES))
    parser.add_argument("--with-llmcompressor", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown methods {unknown} (known: {', '.join(RECIPES)})")

    loaded = load_model(MODEL)
    model, tokenizer = loaded.model, loaded.tokenizer
    tokens = build_calibration(CalibrationSpec(samples=args.samples, seq_len=args.seq_len), tokenizer, cache_root() / "calibration")
    windows = evaluation_windows(tokenizer, args.seq_len)[: args.eval_windows]
    forward_s = time_forward(model, tokens)
    base_ppl = perplexity_on(model, windows).perplexity
    result: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores (shared), torch threads {torch.get_num_threads()}",
        "calibration": f"{args.samples}x{args.seq_len} builtin:abstracts",
        "bf16_forward_s": round(forward_s, 2),
        "ppl_bf16": round(base_ppl, 3),
        "eval_tokens": int(windows[:, 1:].numel()),
        "bf16_size_bytes": weights_bytes(loaded.folder),
        "methods": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in names:
            ours = run_ours(name, model, tokenizer, tokens, windows, workdir)
            entry = {
                "description": ours["description"],
                "ppl": round(ours["ppl"], 3),
                "ppl_increase_pct": round((ours["ppl"] / base_ppl - 1) * 100, 2),
                "size_bytes": ours["size_bytes"],
                "bits_per_weight": round(ours["bits_per_weight"], 3),
                "stage_s": round(ours["seconds"], 2),
                "ratio_to_forward": round(ours["seconds"] / forward_s, 3),
            }
            print(name, json.dumps(entry), f"(bf16 forward {forward_s:.1f} s, ppl {base_ppl:.3f})", flush=True)
            result["methods"][name] = entry
            if args.with_llmcompressor and name in LLMCOMPRESSOR_SCHEMES:
                theirs = run_llmcompressor(name, loaded.folder, tokens, windows, workdir)
                if "ppl" in theirs:
                    theirs["ppl_increase_pct"] = round((theirs["ppl"] / base_ppl - 1) * 100, 2)
                    theirs["ppl"] = round(theirs["ppl"], 3)
                    theirs["ratio_to_forward"] = round(theirs["oneshot_s"] / forward_s, 3)
                entry["llmcompressor"] = theirs
                print(name, "llm-compressor", json.dumps(theirs), flush=True)
            if args.json:  # after every method, so a stopped run keeps what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=2) + "\n")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

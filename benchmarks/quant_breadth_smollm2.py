#!/usr/bin/env python
"""Quantization breadth on SmolLM2-135M-Instruct: AWQ, HQQ, RTN and a mixed-precision recipe.

    python benchmarks/quant_breadth_smollm2.py [--samples 128 --seq-len 512]
        [--variants rtn,hqq-sym,awq,gptq,awq-gptq,mixed] [--eval-windows N] [--with-llmcompressor] [--json out.json]

In one process: build the calibration windows with compressor's calibration code, time one
bf16 forward pass over them (one window per call), then for each variant load the bf16 model
afresh, run the quantize stage on the same windows (timed), measure held-out perplexity
(evaluation slice, windows of --seq-len), save it as compressed-tensors and measure the
weight files on disk and the bits per weight of the decoder blocks' Linear layers (packed
codes + scales + zero points; a layer left in bf16 counts 16 bits). Results are written to
--json after every variant.

With --with-llmcompressor, benchmarks/llmcompressor_awq.py runs llm-compressor's AWQModifier
on the same windows in benchmarks/.venv-llmcompressor and its outcome is recorded as is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from compressor.cache import cache_root  # noqa: E402
from compressor.calibration.batches import build_calibration  # noqa: E402
from compressor.evaluation.perplexity import evaluation_windows, perplexity_on  # noqa: E402
from compressor.formats import write_quantization_config  # noqa: E402
from compressor.kernels.quant_linear import QuantLinear  # noqa: E402
from compressor.layerwise import find_decoder_blocks  # noqa: E402
from compressor.model_io import load_model, weights_bytes  # noqa: E402
from compressor.recipe import CalibrationSpec, parse_recipe_text  # noqa: E402
from compressor.stages.base import StageContext  # noqa: E402
from compressor.stages.quantize import QuantizeStage  # noqa: E402

ROOT = Path(__file__).resolve().parent
MODEL = "builtin:smollm2-135m-instruct"
W4G64 = "weights: {bits: 4, group_size: 64, symmetric: true}"
W4G64_ASYM = "weights: {bits: 4, group_size: 64, symmetric: false}"
MIXED_RULES = (
    'overrides: [{targets: ["re:model\\\\.layers\\\\.[1-9][0-9]*\\\\.mlp\\\\.down_proj"], weights: {bits: 8}},'
    ' {targets: ["re:model\\\\.layers\\\\.0\\\\..*"], skip: true}]'
)
VARIANTS = {
    "rtn": f"{{method: rtn, {W4G64}}}",
    "rtn-asym": f"{{method: rtn, {W4G64_ASYM}}}",
    "hqq": f"{{method: hqq, {W4G64_ASYM}}}",
    "hqq-sym": f"{{method: hqq, {W4G64}}}",
    "awq": f"{{method: awq, {W4G64}, awq: {{then: rtn}}}}",
    "awq-gptq": f"{{method: awq, {W4G64}, awq: {{then: gptq}}}}",
    "gptq": f"{{method: gptq, {W4G64}, act_order: true}}",
    "mixed": f"{{method: awq, {W4G64}, awq: {{then: rtn}}, {MIXED_RULES}}}",
}


@torch.no_grad()
def time_forward(model, tokens: torch.Tensor) -> float:
    started = time.perf_counter()
    for row in tokens:
        model(input_ids=row.unsqueeze(0), use_cache=False)
    return time.perf_counter() - started


def block_bits_per_weight(model: nn.Module) -> float:
    """Stored bits per weight over the Linear layers of the decoder blocks."""
    blocks_name, _ = find_decoder_blocks(model)
    bits = weights = 0
    for name, module in model.named_modules():
        if not name.startswith(blocks_name + "."):
            continue
        if isinstance(module, QuantLinear):
            weights += module.in_features * module.out_features
            for buffer in (module.weight_packed, module.weight_scale, module.weight_zero_point):
                if buffer is not None:
                    bits += buffer.numel() * buffer.element_size() * 8
        elif isinstance(module, nn.Linear):
            weights += module.weight.numel()
            bits += module.weight.numel() * module.weight.element_size() * 8
    return bits / weights


def run_variant(name: str, tokens: torch.Tensor, windows: torch.Tensor, workdir: Path) -> dict:
    loaded = load_model(MODEL)
    model = loaded.model
    recipe = parse_recipe_text(f"name: bench-{name}\nstages:\n  - quantize: {VARIANTS[name]}\n", source=f"<{name}>")
    config = recipe.stages[0].config
    stage = QuantizeStage()
    plan = stage.plan(model, config, lambda *k: recipe.where(("stages", 0, "quantize", *k)))
    ctx = StageContext(tokenizer=loaded.tokenizer, calibration=lambda: tokens, device=torch.device("cpu"),
                       show_progress=False)
    started = time.perf_counter()
    stage.run(model, config, ctx, plan)
    seconds = time.perf_counter() - started
    ppl = perplexity_on(model, windows).perplexity
    folder = workdir / name
    model.save_pretrained(str(folder), safe_serialization=True)
    write_quantization_config(model, folder)
    return {"recipe": VARIANTS[name], "stage_s": round(seconds, 2), "ppl": round(ppl, 3),
            "bytes_on_disk": weights_bytes(folder), "block_bits_per_weight": round(block_bits_per_weight(model), 3),
            "modules": len(plan.selected), "skipped": len(plan.skipped)}


def run_llmcompressor(folder: Path, tokens: torch.Tensor, workdir: Path, windows: torch.Tensor) -> dict:
    python = ROOT / ".venv-llmcompressor" / "bin" / "python"
    if not python.exists():
        python = Path("/work/main/benchmarks/.venv-llmcompressor/bin/python")
    token_file = workdir / "calib.safetensors"
    save_file({"input_ids": tokens.contiguous()}, str(token_file))
    result = subprocess.run(
        [str(python), str(ROOT / "llmcompressor_awq.py"), "--model", str(folder), "--tokens", str(token_file),
         "--out", str(workdir / "llmcompressor-awq")],
        capture_output=True, text=True,
    )
    line = next((l for l in reversed(result.stdout.splitlines()) if l.startswith("RESULT ")), None)
    outcome = json.loads(line[len("RESULT "):]) if line else {"ok": False, "error": result.stderr[-2000:]}
    if outcome.get("ok"):
        from transformers import AutoModelForCausalLM

        outcome["ppl"] = round(perplexity_on(AutoModelForCausalLM.from_pretrained(outcome["out_dir"]), windows).perplexity, 3)
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--variants", default="rtn,hqq-sym,awq,gptq,awq-gptq,mixed")
    parser.add_argument("--eval-windows", type=int, default=None, help="first N held-out windows only (default: all)")
    parser.add_argument("--with-llmcompressor", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")

    loaded = load_model(MODEL)
    tokens = build_calibration(CalibrationSpec(samples=args.samples, seq_len=args.seq_len), loaded.tokenizer,
                               cache_root() / "calibration")
    windows = evaluation_windows(loaded.tokenizer, args.seq_len)
    if args.eval_windows is not None:
        windows = windows[: args.eval_windows]
    result: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "calibration": f"{args.samples}x{args.seq_len} builtin:abstracts",
        "eval_tokens": int(windows[:, 1:].numel()),
        "bf16_forward_s": round(time_forward(loaded.model, tokens), 2),
        "ppl_bf16": round(perplexity_on(loaded.model, windows).perplexity, 3),
        "variants": {},
    }
    model_folder = loaded.folder
    del loaded

    def dump() -> None:
        text = json.dumps(result, indent=2)
        print(text, flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text + "\n")

    dump()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = run_variant(name, tokens, windows, Path(tmp))
            row["ratio_to_forward"] = round(row["stage_s"] / result["bf16_forward_s"], 3)
            result["variants"][name] = row
            dump()
        if args.with_llmcompressor:
            result["llmcompressor_awq"] = run_llmcompressor(model_folder, tokens, Path(tmp), windows)
            dump()


if __name__ == "__main__":
    main()

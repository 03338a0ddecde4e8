#!/usr/bin/env python
"""FP8 (e4m3) on SmolLM2-135M-Instruct: where the perplexity cost comes from, and how noisy it is.

    python benchmarks/fp8_smollm2.py [--eval-windows N] [--variants a,b,...] [--with-llmcompressor] [--json out.json]

No calibration data is involved (dynamic activations, weights by casting). For bf16 and each variant
the held-out loss is measured per evaluation window (--seq-len tokens each), so besides perplexity
the script reports the change against bf16 with a 95 % interval from the spread of the per-window
log-perplexity differences (windows are the unit of sampling; the same windows for every row).

Variants: FP8 weights per channel with dynamic per-token FP8 activations (the `fp8-dynamic` recipe)
or weight-only (W8A16), each with the min-max scale or `observer: mse`. With --with-llmcompressor,
llm-compressor 0.14's FP8_DYNAMIC preset (its venv, benchmarks/llmcompressor_quant_formats.py) is
run on 4 calibration windows (FP8_DYNAMIC calibrates nothing) and its checkpoint is evaluated with
`compressor.load`, i.e. its codes and scales under our W8A8Linear (the same per-token activations).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from compressor.cache import cache_root  # noqa: E402
from compressor.calibration.batches import build_calibration  # noqa: E402
from compressor.evaluation.perplexity import evaluation_windows  # noqa: E402
from compressor.model_io import load_model  # noqa: E402
from compressor.recipe import CalibrationSpec, parse_recipe_text  # noqa: E402
from compressor.stages.base import StageContext  # noqa: E402
from compressor.stages.quantize import QuantizeStage  # noqa: E402

ROOT = Path(__file__).resolve().parent
MODEL = "builtin:smollm2-135m-instruct"
DYNAMIC = "activations: {bits: 8, type: float, dynamic: true, strategy: token}"
VARIANTS = {
    "fp8-dynamic": f"{{method: fp8, weights: {{type: float}}, {DYNAMIC}}}",
    "fp8-dynamic-mse": f"{{method: fp8, weights: {{type: float, observer: mse}}, {DYNAMIC}}}",
    "fp8-w8a16": "{method: fp8, weights: {type: float}, activations: null}",  # method fp8 defaults to dynamic activations
    "fp8-w8a16-mse": "{method: fp8, weights: {type: float, observer: mse}, activations: null}",
}


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Mean next-token loss of each window, float64 [windows]."""
    losses = []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        losses.append(nll.double().mean(dim=1))
    return torch.cat(losses)


def against(reference: torch.Tensor, losses: torch.Tensor) -> dict:
    """Perplexity and its change against the reference, with a 95 % interval over windows."""
    diff = losses - reference
    mean = diff.mean().item()
    half = 1.96 * diff.std(unbiased=True).item() / math.sqrt(len(diff))
    pct = lambda v: round(100 * math.expm1(v), 3)  # noqa: E731
    return {"ppl": round(math.exp(losses.mean().item()), 3), "delta_pct": pct(mean),
            "delta_pct_95": [pct(mean - half), pct(mean + half)]}


def quantized(base, tokenizer, body: str):
    model = copy.deepcopy(base)
    recipe = parse_recipe_text(f"name: fp8-bench\nstages:\n  - quantize: {body}\n")
    config = recipe.stages[0].config
    stage = QuantizeStage()
    plan = stage.plan(model, config, lambda *k: recipe.where(("stages", 0, "quantize", *k)))

    def no_calibration():
        raise RuntimeError("these variants read no calibration data")

    ctx = StageContext(tokenizer=tokenizer, calibration=no_calibration, device=torch.device("cpu"), show_progress=False)
    started = time.perf_counter()
    stage.run(model, config, ctx, plan)
    return model, time.perf_counter() - started


def llmcompressor_losses(folder: Path, tokenizer, windows: torch.Tensor, workdir: Path) -> tuple[dict, torch.Tensor, torch.nn.Module]:
    from compressor.runtime import load as compressed_load

    python = ROOT / ".venv-llmcompressor" / "bin" / "python"
    if not python.exists():
        python = Path("/work/main/benchmarks/.venv-llmcompressor/bin/python")
    tokens = build_calibration(CalibrationSpec(samples=4, seq_len=windows.shape[1]), tokenizer, cache_root() / "calibration")
    token_file = workdir / "calib.safetensors"
    save_file({"input_ids": tokens.contiguous()}, str(token_file))
    out_dir = workdir / "llmcompressor-fp8"
    result = subprocess.run(
        [str(python), str(ROOT / "llmcompressor_quant_formats.py"), "--model", str(folder), "--tokens", str(token_file),
         "--out", str(out_dir), "--scheme", "fp8-dynamic"],
        capture_output=True, text=True, check=True,
    )
    line = next(l for l in reversed(result.stdout.splitlines()) if l.startswith("RESULT "))
    theirs = json.loads(line[len("RESULT "):])
    model = compressed_load(out_dir, prepare_kernels=False)
    return theirs, window_losses(model, windows), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=None, help="first N held-out windows only (default: all)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--with-llmcompressor", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")

    loaded = load_model(MODEL)
    base, tokenizer = loaded.model, loaded.tokenizer
    windows = evaluation_windows(tokenizer, args.seq_len)
    if args.eval_windows is not None:
        windows = windows[: args.eval_windows]
    reference = window_losses(base, windows)
    result: dict = {
        "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores (shared), torch threads {torch.get_num_threads()}",
        "windows": int(windows.shape[0]), "eval_tokens": int(windows[:, 1:].numel()),
        "ppl_bf16": round(math.exp(reference.mean().item()), 3), "variants": {},
    }

    def dump() -> None:
        text = json.dumps(result, indent=2)
        print(text, flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text + "\n")

    dump()
    ours_minmax_codes = None
    for name in names:
        model, seconds = quantized(base, tokenizer, VARIANTS[name])
        result["variants"][name] = {"recipe": VARIANTS[name], "stage_s": round(seconds, 2),
                                    **against(reference, window_losses(model, windows))}
        if name == "fp8-dynamic":
            ours_minmax_codes = {n: m.weight for n, m in model.named_modules() if hasattr(m, "weight_scale")}
        dump()
    if args.with_llmcompressor:
        with tempfile.TemporaryDirectory() as tmp:
            theirs, losses, model = llmcompressor_losses(loaded.folder, tokenizer, windows, Path(tmp))
            row = {"version": theirs.get("llmcompressor_version"), "oneshot_s": theirs.get("oneshot_s"),
                   "size_bytes": theirs.get("size_bytes"), **against(reference, losses)}
            if ours_minmax_codes:
                same = total = 0
                for n, m in model.named_modules():
                    if n in ours_minmax_codes and hasattr(m, "weight_scale"):
                        same += int((m.weight.float() == ours_minmax_codes[n].float()).sum())
                        total += m.weight.numel()
                row["codes_equal_to_ours_minmax"] = round(same / max(total, 1), 5)
            result["llmcompressor_fp8_dynamic"] = row
            dump()


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""llm-compressor side of the W8A8 SmoothQuant / FP8 benchmark (benchmarks/quant_formats_smollm2.py).

Run with the separate venv made by benchmarks/setup_llmcompressor_venv.sh:

    benchmarks/.venv-llmcompressor/bin/python benchmarks/llmcompressor_quant_formats.py \
        --model MODEL_DIR --tokens CALIB.safetensors --out OUT_DIR --scheme w8a8-smoothquant|fp8-dynamic

w8a8-smoothquant: SmoothQuantModifier (smoothing_strength 0.5, llm-compressor's own mappings) then
QuantizationModifier with the W8A8 preset (int8 weights per channel, int8 activations dynamic per
token), lm_head ignored. fp8-dynamic: QuantizationModifier with the FP8_DYNAMIC preset. Calibrated on
exactly the [N, L] windows of CALIB.safetensors. Prints ``RESULT {json}`` with the oneshot time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def build_recipe(scheme: str):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if scheme == "fp8-dynamic":
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])]
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    return [
        SmoothQuantModifier(smoothing_strength=0.5),
        QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scheme", choices=["w8a8-smoothquant", "fp8-dynamic"], required=True)
    args = parser.parse_args()

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    input_ids = load_file(args.tokens)["input_ids"].to(torch.int64)
    n, seq_len = input_ids.shape
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map=None).to("cpu")
    ds = Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": torch.ones_like(input_ids).tolist()})
    started = time.perf_counter()
    model = oneshot(
        model=model, tokenizer=tokenizer, dataset=ds, recipe=build_recipe(args.scheme),
        num_calibration_samples=n, max_seq_length=seq_len, shuffle_calibration_samples=False,
    )
    oneshot_s = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print("RESULT " + json.dumps({
        "llmcompressor_version": llmcompressor.__version__, "scheme": args.scheme,
        "oneshot_s": round(oneshot_s, 2), "out_dir": str(out), "size_bytes": size,
    }), flush=True)


if __name__ == "__main__":
    main()

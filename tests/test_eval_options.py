"""`compress eval` as an lm-eval user drives it: sizes of the sparse and NF4 layouts;
the Pareto frontier with a metric lm-eval could not compute.

lm-eval runs on tiny random models with a handful of documents.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors import safe_open

from compressor.cli import main
from compressor.evaluation.plot import Point, pareto_frontier
from compressor.evaluation.size import measure_checkpoint
from tests.tiny_models import build_tiny_checkpoint


def _compress(source: Path, folder: Path, body: str) -> Path:
    recipe = folder / "r.yaml"
    recipe.write_text(f"name: t\ncalibration: {{samples: 4, seq_len: 64}}\nstages:\n  {body}\n")
    out = folder / "out"
    assert main([str(source), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]) == 0
    return out


# ---------------------------------------------------------------- size of other layouts

def test_sparse_bitmask_size_counts_values_and_bitmask(tiny_llama, tmp_path):
    base = measure_checkpoint(tiny_llama)
    sparse = measure_checkpoint(_compress(tiny_llama, tmp_path, '- prune: {method: magnitude, sparsity: "2:4", ignore: [lm_head]}'))
    assert sparse.compressed_layers == 14 and sparse.parameters == base.parameters
    assert sparse.bits_per_weight == pytest.approx(16 / 2 + 1)  # half the weights in bf16, one mask bit each


def test_nf4_size_counts_the_packed_codes_and_block_state(tiny_tokenizer_dir, tmp_path):
    source = build_tiny_checkpoint(tmp_path / "qwen3", "qwen3", tiny_tokenizer_dir)  # every Linear in whole NF4 blocks
    base = measure_checkpoint(source)
    out = _compress(source, tmp_path, "- quantize: {method: nf4, double_quant: true, ignore: [lm_head]}")
    nf4 = measure_checkpoint(out)
    assert nf4.compressed_layers == 14 and nf4.parameters == base.parameters
    stored = weights = 0
    with safe_open(str(source / "model.safetensors"), "pt") as dense, safe_open(str(out / "model.safetensors"), "pt") as packed:
        layers = [k.removesuffix(".weight") for k in dense.keys() if ".layers." in k and k.endswith("proj.weight")]
        for layer in layers:
            weights += dense.get_slice(f"{layer}.weight").get_shape()[0] * dense.get_slice(f"{layer}.weight").get_shape()[1]
            for key in packed.keys():
                if key == f"{layer}.weight" or key.startswith(f"{layer}.weight."):
                    tensor = packed.get_tensor(key)
                    stored += 8 * tensor.numel() * tensor.element_size()
    assert len(layers) == 14
    assert nf4.bits_per_weight == pytest.approx(stored / weights)
    assert 4 < nf4.bits_per_weight < 8  # 4-bit codes plus block state; it was 8.0 (the uint8 storage width)


# ---------------------------------------------------------------- the frontier

def test_a_metric_lm_eval_could_not_compute_is_not_on_the_frontier():
    points = [Point("broken", 10, math.nan), Point("a", 20, 8.0), Point("b", 30, 7.0), Point("c", 30, 9.0)]
    assert [p.label for p in pareto_frontier(points, higher_is_better=False)] == ["a", "b"]
    assert [p.label for p in pareto_frontier(points, higher_is_better=True)] == ["a", "c"]

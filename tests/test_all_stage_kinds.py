"""All five stage kinds in one recipe (DESIGN.md's example with a merge in front), on tiny models:
merge (ties) → prune (SparseGPT 2:4) → quantize (GPTQ int4) → distill (from the merged model) →
lowrank (EoRA), then the recipe's evaluate block. Each later stage must keep what the earlier ones
made, and the output must load in plain transformers and in `compressor.load`."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

import compressor
from compressor.algorithms.masks import is_nm_sparse, parse_nm
from compressor.cli import main
from compressor.kernels.quant_linear import QuantLinear
from tests.merge_fixtures import perturbed_copy

RECIPE = """\
name: all-five
description: merge, then 2:4 SparseGPT, GPTQ 4-bit, distillation from the merged model, EoRA.
calibration:
  dataset: builtin:abstracts
  samples: 8
  seq_len: 64
  seed: 0
stages:
  - merge:
      method: ties
      base: {base}
      models:
        - {{model: {math}, weight: 0.6, density: 0.5}}
        - {{model: {code}, weight: 0.4, density: 0.5}}
  - prune:
      method: sparsegpt
      sparsity: "2:4"
      ignore: [lm_head]
  - quantize:
      method: gptq
      weights: {{bits: 4, group_size: 32, symmetric: true}}
      activations: null
      targets: [Linear]
      ignore: [lm_head]
      act_order: true
  - distill:
      teacher: base
      loss: {{kind: kl, temperature: 2.0}}
      steps: 3
      lr: 1.0e-3
  - lowrank:
      method: eora
      rank: 8
evaluate:
  tasks: [perplexity, abstracts_match]
  limit: 4
output:
  format: compressed-tensors
  push_to_hub: null
"""


def test_one_recipe_runs_every_stage_kind_and_each_keeps_the_last_ones_work(tiny_llama, tmp_path):
    math = perturbed_copy(tiny_llama, tmp_path / "math", seed=1)
    code = perturbed_copy(tiny_llama, tmp_path / "code", seed=2)
    recipe = tmp_path / "all-five.yaml"
    recipe.write_text(RECIPE.format(base=tiny_llama, math=math, code=code))
    out = tmp_path / "out"
    assert main(["--recipe", str(recipe), "-o", str(out), "-q"]) == 0

    record = json.loads((out / "compression.json").read_text())
    assert [(s["kind"], s["method"]) for s in record["stages"]] == [
        ("merge", "ties"), ("prune", "sparsegpt"), ("quantize", "gptq"), ("distill", "kl"), ("lowrank", "eora")
    ]
    card = (out / "README.md").read_text()
    assert "merge (ties), then prune (sparsegpt), then quantize (gptq), then distill (kl), then lowrank (eora)" in card

    # The quantized codes still hold the 2:4 masks after distillation trained the scales.
    model = compressor.load(out, device="cpu")
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 2 * 7
    for name, module in quantized.items():
        assert module.bits == 4 and module.group_size == 32, name
        assert is_nm_sparse(module.dequantized_weight(torch.float32), parse_nm("2:4")), name
    adapter = json.loads((out / "lowrank_adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(out.resolve())  # not the merge's temporary folder

    tokens = torch.tensor([[1, 5, 9, 13, 17, 21]])
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        ours, theirs = model(tokens).logits.float(), plain(tokens).logits.float()
    assert torch.isfinite(ours).all() and torch.isfinite(theirs).all()
    # Plain transformers has no place for the EoRA factors (stored beside the weights), so the two
    # differ by exactly that correction: close, not equal.
    assert not torch.equal(ours, theirs)
    assert torch.allclose(ours, theirs, atol=0.5), (ours - theirs).abs().max()

    report = json.loads((out / "eval" / "report.json").read_text())
    rows = {row["name"]: row for row in report["models"]}
    assert set(rows) == {"base", "all-five"}
    assert rows["base"]["reference"] == f"ties merge of {math}, {code}, {tiny_llama} (base)"
    assert ".merged-" not in (out / "eval" / "report.json").read_text() + json.dumps(adapter)
    for row in rows.values():
        assert set(row["metrics"]) == {"perplexity", "abstracts_match"}, row
    assert rows["all-five"]["bits_per_weight"] < 5 < rows["base"]["bits_per_weight"]

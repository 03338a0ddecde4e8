"""The lowrank stage: EoRA, SVD and LoRA on tiny models; the peft adapter round trip; bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.adapters import ADAPTER_DIR, SVD_DIR, apply_svd_factors, load_with_adapters, write_lowrank_artifacts
from compressor.algorithms.lowrank import eora_factors, rank_for_energy, svd_factors, weighted_error
from compressor.cli import main
from compressor.errors import RecipeError
from compressor.formats import write_quantization_config
from compressor.kernels.lowrank import FactorizedLinear, compensations
from compressor.kernels.quant_linear import QuantLinear
from compressor.model_io import load_model
from compressor.recipe import parse_recipe_text
from compressor.stages.base import StageContext
from tests.cli_runs import compress_into
from tests.training_fixtures import StepNorms

IDS = torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2, 44, 200, 17, 3]])


def _recipe(*stages: str, samples: int = 8) -> str:
    body = "\n".join(f"  - {s}" for s in stages)
    return f"name: t\ncalibration: {{samples: {samples}, seq_len: 64}}\nstages:\n{body}\n"


def _run_stages(folder: Path, *stages: str):
    """Load `folder`, run the stages in memory (as the pipeline does), return model, ctx, tokens."""
    from compressor.cache import cache_root
    from compressor.calibration.batches import build_calibration
    from compressor.pipeline import plan_recipe
    from compressor.registry import stage_registry

    recipe = parse_recipe_text(_recipe(*stages))
    loaded = load_model(str(folder))
    tokens = build_calibration(recipe.calibration, loaded.tokenizer, cache_root() / "calibration")
    ctx = StageContext(tokenizer=loaded.tokenizer, calibration=lambda: tokens, device=torch.device("cpu"), show_progress=False)
    model = loaded.model
    plan_recipe(model, recipe)
    for spec in recipe.stages:
        stage = stage_registry().get(spec.kind).implementation
        plan = stage.plan(model, spec.config, lambda *k: {})
        model = stage.run(model, spec.config, ctx, plan)
    return model, ctx, tokens, loaded


def _save(model, loaded, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    write_quantization_config(model, folder)
    loaded.tokenizer.save_pretrained(str(folder))
    write_lowrank_artifacts(model, folder, str(loaded.source.reference))
    return folder


# ------------------------------------------------------------------ math


def test_eora_beats_plain_svd_on_the_weighted_error(seeded):
    out_f, in_f, rank = 48, 40, 6
    delta = torch.randn(out_f, in_f)
    mixing = torch.randn(in_f, in_f) * torch.logspace(0, -2, in_f)  # strongly anisotropic inputs
    x = torch.randn(2000, in_f) @ mixing
    covariance = x.T @ x / x.shape[0]
    eora = eora_factors(delta, covariance, rank)
    plain = svd_factors(delta, rank=rank)
    before = weighted_error(delta, covariance)
    with_eora = weighted_error(delta - eora.b @ eora.a, covariance)
    with_svd = weighted_error(delta - plain.b @ plain.a, covariance)
    assert with_eora < with_svd < before
    # The weighted error equals ‖Δ Xᵀ‖² / n, computed directly from the inputs.
    direct = float(((delta - eora.b @ eora.a).double() @ x.double().T).square().sum() / x.shape[0])
    assert with_eora == pytest.approx(direct, rel=1e-4)
    full = eora_factors(delta, covariance, min(out_f, in_f))
    assert weighted_error(delta - full.b @ full.a, covariance) < 1e-6 * before


def test_svd_exact_at_full_rank(seeded):
    weight = torch.randn(24, 40, dtype=torch.float64)
    factors = svd_factors(weight, rank=24)
    assert torch.allclose((factors.b.double() @ factors.a.double()), weight, atol=1e-5)
    layer = nn.Linear(40, 24)
    full = svd_factors(layer.weight.data, rank=24)
    factorized = FactorizedLinear(full.a, full.b, layer.bias.data)
    x = torch.randn(5, 40)
    assert torch.allclose(factorized(x), layer(x), atol=1e-5)
    assert set(factorized.state_dict()) == {"weight", "bias"}
    assert torch.allclose(factorized.state_dict()["weight"], layer.weight.data, atol=1e-5)


def test_rank_for_energy():
    values = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1: 64 %, 93 %, 100 %
    assert rank_for_energy(values, 0.5) == 1
    assert rank_for_energy(values, 0.9) == 2
    assert rank_for_energy(values, 0.95) == 3
    assert svd_factors(torch.diag(values), energy=0.9).rank == 2


# ------------------------------------------------------------------ eora


def test_eora_reduces_weighted_error_on_every_layer(tiny_llama):
    model, ctx, tokens, _ = _run_stages(
        tiny_llama,
        "quantize: {method: rtn, weights: {bits: 4, group_size: 32}}",
        "lowrank: {method: eora, rank: 8}",
    )
    found = compensations(model)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(found) == quantized and len(found) == 14
    from safetensors import safe_open

    with safe_open(str(tiny_llama / "model.safetensors"), framework="pt") as handle:
        originals = {name: handle.get_tensor(f"{name}.weight").float() for name in found}
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in found}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: inputs[n].append(a[0].detach())) for n in found]
    with torch.no_grad():
        model(input_ids=tokens)
    for hook in hooks:
        hook.remove()
    for name, compensation in found.items():
        layer = model.get_submodule(name)
        x = torch.cat(inputs[name]).reshape(-1, layer.in_features).double()
        delta = originals[name].double() - layer.dequantized_weight(torch.float32).double()
        correction = compensation.B.double() @ compensation.A.double()
        before = (delta @ x.T).norm()
        after = ((delta - correction) @ x.T).norm()
        assert after < 0.9 * before, name
        record = ctx.records[name]["lowrank"][0]
        assert record["weighted_error_after"] < record["weighted_error_before"]


def test_eora_adapter_round_trip_through_peft(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, _, _, loaded = _run_stages(
        tiny_llama,
        "quantize: {method: rtn, weights: {bits: 4, group_size: 32}}",
        "lowrank: {method: eora, rank: 8}",
    )
    with torch.no_grad():
        ours = model(input_ids=IDS).logits.float()
    out = _save(model, loaded, tmp_path / "out")
    config = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 8
    # The README's call, on a fresh load: the adapter goes on before any forward (a compressed load
    # gets its `weight`s only from the first forward, which peft cannot wait for).
    plain = AutoModelForCausalLM.from_pretrained(str(out), quantization_config=CompressedTensorsConfig(dequantize=True))
    peft_model = PeftModel.from_pretrained(plain.eval(), str(out / ADAPTER_DIR)).eval()
    with torch.no_grad():
        through_peft = peft_model(input_ids=IDS).logits.float()
        with peft_model.disable_adapter():
            base_only = peft_model(input_ids=IDS).logits.float()  # the base alone, no compensation
        through_ours = load_with_adapters(out)(input_ids=IDS).logits.float()
    scale = ours.abs().max()
    assert (through_peft - ours).abs().max() < 0.02 * scale
    assert (through_ours - ours).abs().max() < 0.02 * scale
    assert (base_only - ours).abs().max() > 5 * (through_peft - ours).abs().max()
    # the main checkpoint is untouched compressed-tensors: no adapter tensor in it
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert not any("lowrank" in k or "lora" in k for k in handle.keys())


def test_eora_through_the_cli_records_sizes(tiny_llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe("quantize: {method: rtn, weights: {bits: 4, group_size: 32}}", "lowrank: {method: eora, rank: 4}"))
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(tmp_path / "out"), "-q", "--no-perplexity"]) == 0
    meta = json.loads((tmp_path / "out" / "compression.json").read_text())
    size = (tmp_path / "out" / ADAPTER_DIR / "adapter_model.safetensors").stat().st_size
    assert meta["sizes"]["lowrank_bytes"] == {ADAPTER_DIR: size}
    assert meta["modules"]["model.layers.0.mlp.up_proj"]["method"] == "rtn"
    assert meta["modules"]["model.layers.0.mlp.up_proj"]["lowrank"][0]["rank"] == 4


def test_eora_adapter_names_the_compressed_checkpoint_as_its_base(tiny_llama, tmp_path, capsys):
    """The factors correct OUT's quantized weights: put on the original model (what the file used to
    name) they would make a third model. Locally the base is OUT; on the Hub, the repo itself."""
    out = compress_into(tiny_llama, _recipe("quantize: {method: rtn, weights: {bits: 4, group_size: 32}}",
                                            "lowrank: {method: eora, rank: 4}"), tmp_path)
    local = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert local["base_model_name_or_path"] == str(out.resolve())
    preview = tmp_path / "preview"
    assert main(["push", str(out), "org/tiny-w4-eora", "--dry-run", "--preview", str(preview)]) == 0
    uploaded = json.loads((preview / ADAPTER_DIR / "adapter_config.json").read_text())
    assert uploaded["base_model_name_or_path"] == "org/tiny-w4-eora"
    assert {k: v for k, v in uploaded.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in local.items() if k != "base_model_name_or_path"}
    assert f"{ADAPTER_DIR}/adapter_config.json" in capsys.readouterr().out


# ------------------------------------------------------------------ svd


def test_svd_stage_shrinks_and_plain_transformers_loads(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    # rank 32: 96×96 (q, o) and 160×96 layers shrink; 48×96 (k, v) would not (32·144 = 48·96).
    model, ctx, _, loaded = _run_stages(tiny_llama, "lowrank: {method: svd, rank: 32}")
    factorized = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    assert "model.layers.0.self_attn.q_proj" in factorized and "model.layers.0.mlp.up_proj" in factorized
    assert "model.layers.0.self_attn.k_proj" not in factorized
    with torch.no_grad():
        ours = model(input_ids=IDS).logits.float()
    out = _save(model, loaded, tmp_path / "svd")
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=IDS).logits.float(), ours, atol=0.05 * float(ours.abs().max()))
    assert apply_svd_factors(plain, out / SVD_DIR) == len(factorized)
    assert isinstance(plain.get_submodule("model.layers.0.self_attn.q_proj"), FactorizedLinear)
    factor_bytes = (out / SVD_DIR / "factors.safetensors").stat().st_size
    dense_bytes = sum(m.in_features * m.out_features * 2 for m in factorized.values())
    assert factor_bytes < dense_bytes
    # Loaded in another dtype than the checkpoint's (bf16), the factors follow: they used to stay bf16,
    # and the first matmul failed with "expected m1 and m2 to have the same dtype".
    import compressor

    plain32 = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    for loaded_model in (compressor.load(out, dtype=torch.float32), load_with_adapters(out, dtype=torch.float32)):
        layer = loaded_model.get_submodule("model.layers.0.self_attn.q_proj")
        assert isinstance(layer, FactorizedLinear) and layer.A.dtype == layer.B.dtype == torch.float32
        with torch.no_grad():
            reference = plain32(input_ids=IDS).logits
            assert torch.allclose(loaded_model(input_ids=IDS).logits, reference, atol=1e-3 * float(reference.abs().max()))


def test_svd_energy_keeps_only_shrinking_layers(tiny_llama):
    model, ctx, _, _ = _run_stages(tiny_llama, "lowrank: {method: svd, energy: 0.5}")
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLinear):
            assert module.rank * (module.in_features + module.out_features) < module.in_features * module.out_features
            assert ctx.records[name]["lowrank"][0]["rank"] == module.rank


# ------------------------------------------------------------------ lora


def test_lora_on_compressed_model_trains_only_the_adapters(tiny_llama, tmp_path):
    model, ctx, tokens, loaded = _run_stages(tiny_llama, "quantize: {method: rtn, weights: {bits: 4, group_size: 32}}")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = parse_recipe_text(_recipe("lowrank: {method: lora, rank: 4, steps: 6, lr: 0.01, batch_size: 2}"))
    from compressor.stages.lowrank import LowRankStage

    stage, config = LowRankStage(), recipe.stages[0].config
    stage.run(model, config, ctx, stage.plan(model, config, lambda *k: {}))
    after = model.state_dict()
    assert set(after) == set(frozen)  # no peft wrapper left in the saved names
    for key, value in frozen.items():
        assert torch.equal(after[key], value), key
    found = compensations(model)
    assert len(found) == 14 and all(c.B.abs().max() > 0 for c in found.values())
    losses = [r["lowrank"][0] for r in ctx.records.values() if "lowrank" in r]
    assert losses and all(r["method"] == "lora" for r in losses)
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), QuantLinear)
    out = _save(model, loaded, tmp_path / "lora")
    with torch.no_grad():
        assert torch.allclose(load_with_adapters(out)(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=0.05)


def test_lora_stage_clips_gradients_and_warms_up(tiny_llama):
    model, ctx, tokens, loaded = _run_stages(tiny_llama, "quantize: {method: rtn, weights: {bits: 4, group_size: 32}}")
    clip = 1e-4  # far below the gradient norms of this model at lr 1
    recipe = parse_recipe_text(_recipe(f"lowrank: {{method: lora, rank: 4, steps: 5, lr: 1.0, batch_size: 2, max_grad_norm: {clip}, warmup_steps: 2}}"))
    from compressor.stages.lowrank import LowRankStage

    stage, config = LowRankStage(), recipe.stages[0].config
    with StepNorms() as seen:
        stage.run(model, config, ctx, stage.plan(model, config, lambda *k: {}))
    record = next(r["lowrank"][0] for r in ctx.records.values() if "lowrank" in r)
    assert record["warmup_steps"] == 2 and record["max_grad_norm"] == clip and record["largest_grad_norm"] > 10 * clip
    assert len(seen.norms) == 5 and all(norm <= clip * 1.001 for norm in seen.norms), seen.norms
    assert seen.rates == pytest.approx([0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))])


def test_lora_stage_defaults_follow_qlora(tiny_llama):
    config = parse_recipe_text(_recipe("lowrank: {method: lora, steps: 200}")).stages[0].config
    assert config.max_grad_norm == 0.3 and config.warmup_steps is None  # None: 3 % of steps, here 6


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "stage, key, fragment",
    [
        ("lowrank: {method: eora, rank: 500}", "stages[1].lowrank.rank", "rank 500 is larger than layer"),
        ("lowrank: {method: eora, rank: 8, steps: 3}", "stages[1].lowrank.steps", "'steps' does not apply to method eora"),
        ("lowrank: {method: svd}", "stages[1].lowrank.method", "exactly one of `rank` and `energy`"),
        ("lowrank: {method: svd, rank: 4, energy: 0.9}", "stages[1].lowrank.rank", "exactly one of"),
        ("lowrank: {method: eorra}", "stages[1].lowrank.method", "did you mean 'eora'"),
        ("lowrank: {method: svd, energy: 1.5}", "stages[1].lowrank.energy", "less than or equal to 1"),
        ("lowrank: {method: lora, steps: 5, warmup_steps: 5}", "stages[1].lowrank.warmup_steps", "must be fewer than the steps (5), got 5"),
        ("lowrank: {method: lora, max_grad_norm: -1}", "stages[1].lowrank.max_grad_norm", "greater than or equal to 0"),
        ("lowrank: {method: lora, warmup_steps: -1}", "stages[1].lowrank.warmup_steps", "greater than or equal to 0"),
        ("lowrank: {method: eora, rank: 8, max_grad_norm: 1}", "stages[1].lowrank.max_grad_norm", "'max_grad_norm' does not apply to method eora"),
        # Batches larger than the windows silently held every window (checked for distill only).
        ("lowrank: {method: lora, batch_size: 3, dataset: {samples: 2, seq_len: 32}}", "stages[1].lowrank.batch_size",
         "batch_size 3 is larger than the 2 windows it draws batches from (dataset.samples)"),
        ("lowrank: {method: lora, batch_size: 9}", "stages[1].lowrank.batch_size",
         "batch_size 9 is larger than the 8 windows it draws batches from (calibration.samples)"),
    ],
)
def test_bad_lowrank_recipes_fail_at_dry_run(stage, key, fragment, tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(_recipe("quantize: {method: rtn}", stage))
    assert main([str(tiny_llama), "--recipe", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}:5 {key}" in err and fragment in err


def test_eora_without_quantize_is_refused(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe("lowrank: {method: eora, rank: 4}"))
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(tmp_path / "out"), "-q", "--no-perplexity"]) == 2
    assert "put a quantize stage before it" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_rank_error_names_the_layer(tiny_llama):
    recipe = parse_recipe_text(_recipe("lowrank: {method: lora, rank: 49, targets: [k_proj]}"))
    from compressor.pipeline import skeleton_model, plan_recipe

    with pytest.raises(RecipeError, match=r"layer model\.layers\.0\.self_attn\.k_proj allows \(48×96, at most 48\)"):
        plan_recipe(skeleton_model(str(tiny_llama), allow_pickle=False, trust_remote_code=False), recipe)


def test_default_rank_is_checked_too(tiny_llama):
    recipe = parse_recipe_text(_recipe(  # rank 32 ≤ 48: fine
        "quantize: {method: rtn, weights: {bits: 4, group_size: 32}}", "lowrank: {method: eora, targets: [k_proj]}"))
    from compressor.pipeline import skeleton_model, plan_recipe

    model = skeleton_model(str(tiny_llama), allow_pickle=False, trust_remote_code=False)
    _, plan = plan_recipe(model, recipe)
    assert all(detail.startswith("rank 32") for detail in plan.selected.values()) and len(plan.selected) == 2


def test_bad_lora_dataset_file_is_refused_at_dry_run(tiny_llama, tmp_path, capsys):
    # The lora stage's own `dataset` was read only when the stage ran, after the stages before it.
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "one line"}\n{"text": 3}\n')
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(_recipe("quantize: {method: rtn}", f"lowrank: {{method: lora, steps: 2, dataset: {{dataset: {data}, samples: 4, seq_len: 32}}}}"))
    assert main([str(tiny_llama), "--recipe", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {recipe}:5 stages[1].lowrank.dataset.dataset: {data}: record 1: column 'text' is neither text nor a list of messages"

"""AWQ, HQQ and mixed-precision rules: against reference computations, and round trips."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compressor.algorithms.awq import fold_scale, search_scale
from compressor.algorithms.grid import WeightGrid, dequantize_codes, expand_groups
from compressor.algorithms.hqq import shrink_lp
from compressor.algorithms.rtn import rtn_quantize
from compressor.cli import main
from compressor.errors import RecipeError
from compressor.formats import write_quantization_config
from compressor.kernels.quant_linear import QuantLinear
from compressor.recipe import parse_recipe_text
from compressor.stages.base import StageContext
from compressor.stages.quantize import QuantizeStage

# --- helpers ---------------------------------------------------------------------------------


def tiny_model(kv_heads: int = 2, dtype=torch.float32, kind: str = "llama"):
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        kind, vocab_size=384, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
    )
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def run_stage(model, stage_yaml: str, tokens: torch.Tensor | None = None) -> dict:
    recipe = parse_recipe_text(f"name: t\nstages:\n  - quantize:\n{textwrap.indent(stage_yaml, '      ')}", "t.yaml")
    config = recipe.stages[0].config
    stage = QuantizeStage()
    plan = stage.plan(model, config, lambda *k: recipe.where(("stages", 0, "quantize", *k)))
    if tokens is None:
        tokens = torch.randint(0, 384, (8, 48), generator=torch.Generator().manual_seed(1))
    ctx = StageContext(tokenizer=None, calibration=lambda: tokens, device=torch.device("cpu"), show_progress=False)
    stage.run(model, config, ctx, plan)
    return {"records": ctx.records, "plan": plan}


def logits(model, ids=None) -> torch.Tensor:
    ids = ids if ids is not None else torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2, 44, 300]])
    with torch.no_grad():
        return model(ids).logits[0].float()


def reference_fake_quant(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric min-max fake quantization, group by group, in loops (codes rounded in float32,
    as the grid computes them: the largest weight sits exactly on a rounding tie)."""
    out = torch.empty_like(w, dtype=torch.float64)
    half = 2 ** (bits - 1)
    for r in range(w.shape[0]):
        for g in range(w.shape[1] // group):
            block = w[r, g * group : (g + 1) * group].float()
            scale = block.abs().max() / ((2 * half - 1) / 2)
            codes = torch.clamp(torch.round(block / scale), -half, half - 1)
            out[r, g * group : (g + 1) * group] = codes.double() * float(scale)
    return out


# --- AWQ -------------------------------------------------------------------------------------


def test_awq_search_matches_brute_force_loop(seeded):
    x = torch.randn(64, 32)
    x[:, [3, 17]] *= 15  # salient input channels
    weight = torch.randn(12, 32) * 0.1
    grid = WeightGrid(4, True, 16, scale_dtype=torch.float32)
    found = search_scale(x, x.abs().mean(0), [weight], [grid], grid_points=10, duo_scaling=False)

    reference = x.double() @ weight.double().t()
    errors = []
    for step in range(10):
        ratio = step / 10
        s = (x.abs().mean(0) ** ratio).clamp_min(1e-4)  # float32, as the search computes it
        s = s / (s.max() * s.min()).sqrt()
        w_q = reference_fake_quant(weight * s, 4, 16)
        out = (x.double() / s.double()) @ w_q.t()
        errors.append(float((out - reference).pow(2).mean()))
    assert found.errors == pytest.approx(errors, rel=1e-3)
    best = min(range(10), key=errors.__getitem__)
    assert found.ratio == best / 10
    assert found.unscaled_error == pytest.approx(errors[0], rel=1e-3)  # ratio 0 is s = 1 without duo scaling
    assert min(errors) < 0.8 * errors[0]  # the salient channels make scaling pay off


@pytest.mark.parametrize("kv_heads, expect_o_proj", [(4, True), (2, False)])
def test_awq_finds_mappings_from_structure(kv_heads, expect_o_proj):
    model = tiny_model(kv_heads)
    records = run_stage(model, "method: awq\nweights: {bits: 4, group_size: 32}\n")["records"]
    producer = {name: rec["awq"]["producer"] for name, rec in records.items()}
    for layer in (0, 1):
        p = f"model.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert producer[p + f"self_attn.{proj}"] == p + "input_layernorm"
        assert producer[p + "mlp.gate_proj"] == producer[p + "mlp.up_proj"] == p + "post_attention_layernorm"
        assert producer[p + "mlp.down_proj"] == p + "mlp.up_proj"
        # o_proj reads attention over v: foldable into v_proj only when the head layout matches
        assert producer[p + "self_attn.o_proj"] == (p + "self_attn.v_proj" if expect_o_proj else None)
    assert all(rec["method"] == "awq" and isinstance(model.get_submodule(n), QuantLinear) for n, rec in records.items())
    assert all(rec["awq"].get("search_error", 0) <= rec["awq"].get("unscaled_error", 0) for rec in records.values())


def test_scale_folding_preserves_the_float_model():
    discovered = run_stage(tiny_model(4), "method: awq\nweights: {bits: 4, group_size: 32}\n")["records"]
    mappings: dict[str, list[str]] = {}
    for name, record in discovered.items():
        if record["awq"]["producer"]:
            mappings.setdefault(record["awq"]["producer"], [])
            if name not in mappings[record["awq"]["producer"]]:
                mappings[record["awq"]["producer"]].append(name)
    assert len(mappings) == 8  # 4 per block: norm→qkv, v→o, norm→gate/up, up→down

    model = tiny_model(4)
    before = logits(model)
    generator = torch.Generator().manual_seed(3)
    for producer, consumers in mappings.items():
        modules = [model.get_submodule(c) for c in consumers]
        scale = torch.exp(torch.randn(modules[0].in_features, generator=generator))
        fold_scale(model.get_submodule(producer), modules, scale)
    after = logits(model)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, torch.ones(96))  # something was folded


def test_awq_then_gptq_uses_scaled_hessians():
    model = tiny_model(4)
    records = run_stage(model, "method: awq\nweights: {bits: 4, group_size: 32}\nawq: {then: gptq, grid: 8}\n")["records"]
    record = records["model.layers.1.mlp.down_proj"]
    assert record["then"] == "gptq" and math.isfinite(record["gptq_error"]) and record["fallback"] is None


def test_awq_beats_rtn_on_output_error_of_a_trained_like_layer(seeded):
    """A synthetic layer with outlier input channels: the quantized output error drops with AWQ."""
    x = torch.randn(256, 64)
    x[:, :4] *= 30
    weight = torch.randn(48, 64) * 0.05
    grid = WeightGrid(3, True, 32, scale_dtype=torch.float32)
    found = search_scale(x, x.abs().mean(0), [weight], [grid], grid_points=20, duo_scaling=True)
    assert found.ratio is not None
    assert min(found.errors) < 0.7 * found.unscaled_error


# --- HQQ -------------------------------------------------------------------------------------


def test_shrink_lp_is_the_generalised_soft_threshold():
    x = torch.tensor([-2.0, -0.05, 0.0, 0.01, 0.3, 5.0])
    beta, p = 10.0, 0.7
    expected = [math.copysign(max(abs(v) - abs(v) ** (p - 1) / beta, 0.0), v) if v else 0.0 for v in x.tolist()]
    assert shrink_lp(x, beta, p).tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_hqq_reduces_weight_error_against_minmax(symmetric, seeded):
    weight = torch.randn(128, 256) * 0.02
    weight[torch.rand_like(weight) < 0.01] *= 8  # outliers, as trained weights have
    errors = {}
    for observer in ("minmax", "hqq"):
        grid = WeightGrid(4, symmetric, 64, scale_dtype=torch.bfloat16, hqq_search=observer == "hqq")
        codes, scale, zero = rtn_quantize(weight, grid)
        assert codes.min() >= -8 and codes.max() <= 7
        if zero is not None:
            assert torch.equal(zero, zero.round()) and zero.min() >= -8 and zero.max() <= 7
        restored = dequantize_codes(codes.float(), expand_groups(scale, 256), expand_groups(zero, 256) if zero is not None else None)
        errors[observer] = ((restored - weight).abs().mean().item(), (restored - weight).pow(2).mean().item())
    assert errors["hqq"][0] < 0.97 * errors["minmax"][0]  # HQQ's own criterion (mean |error|)
    assert errors["hqq"][1] < errors["minmax"][1]  # and the squared error too, on this distribution


def test_hqq_observer_under_gptq_and_method_hqq():
    model = tiny_model()
    records = run_stage(model, "method: gptq\nweights: {bits: 4, group_size: 32, observer: hqq}\n")["records"]
    assert records["model.layers.0.mlp.up_proj"]["method"] == "gptq"
    model = tiny_model()
    plan_records = run_stage(model, "method: hqq\nweights: {bits: 4, group_size: 32, symmetric: false}\n")
    assert plan_records["records"]["model.layers.0.mlp.up_proj"]["hqq_search"] is True
    assert "hqq observer" in plan_records["plan"].selected["model.layers.0.mlp.up_proj"]


# --- mixed precision -------------------------------------------------------------------------

MIXED = """\
method: {method}
weights: {{bits: 4, group_size: 32}}
overrides:
  - targets: ["re:model\\\\.layers\\\\.1\\\\.mlp\\\\.down_proj"]
    weights: {{bits: 8}}
  - targets: ["re:model\\\\.layers\\\\.0\\\\..*"]
    skip: true
"""


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_mixed_rules_choose_bits_per_module(method):
    model = tiny_model()
    result = run_stage(model, MIXED.format(method=method))
    layers = model.model.layers
    assert isinstance(layers[0].mlp.down_proj, torch.nn.Linear) and isinstance(layers[0].self_attn.q_proj, torch.nn.Linear)
    assert layers[1].mlp.down_proj.bits == 8 and layers[1].mlp.down_proj.group_size == 32
    assert layers[1].mlp.up_proj.bits == 4 and layers[1].self_attn.o_proj.bits == 4
    assert result["plan"].skipped["model.layers.0.mlp.gate_proj"] == "skipped by `overrides[1]`"
    assert result["plan"].selected["model.layers.1.mlp.down_proj"].startswith("int8 sym group 32 [overrides[0]]")


def test_overlapping_rules_are_an_error_naming_both():
    text = (
        "name: t\nstages:\n  - quantize:\n      method: rtn\n      overrides:\n"
        "        - {targets: [down_proj], weights: {bits: 8}}\n"
        "        - {targets: [\"re:model\\\\.layers\\\\.0\\\\..*\"], skip: true}\n"
    )
    recipe = parse_recipe_text(text, "mixed.yaml")
    with pytest.raises(RecipeError) as err:
        QuantizeStage().plan(tiny_model(), recipe.stages[0].config, lambda *k: recipe.where(("stages", 0, "quantize", *k)))
    message = str(err.value)
    assert "mixed.yaml:6 stages[0].quantize.overrides[0]" in message
    assert "mixed.yaml:7 stages[0].quantize.overrides[1]" in message
    assert "model.layers.0.mlp.down_proj" in message
    assert err.value.where == "mixed.yaml:7"


@pytest.mark.parametrize(
    "stage, expected",
    [
        ("{method: rtn, overrides: [{targets: [nope_proj], weights: {bits: 8}}]}", "t.yaml:3 stages[0].quantize.overrides[0].targets: matches no module"),
        ("{method: rtn, overrides: [{targets: [down_proj], skip: true, weights: {bits: 8}}]}", "either skips its modules or sets their weights"),
        ("{method: rtn, overrides: [{targets: [down_proj]}]}", "a rule needs `weights: {...}` or `skip: true`"),
        ("{method: rtn, overrides: [{targets: [down_proj], weights: {bits: 5}}]}", "overrides[0].weights.bits: must be one of 2, 3, 4, 8"),
        ("{method: gptq, awq: {then: rtn}}", "`awq` options only apply to method: awq"),
        ("{method: awq, awq: {then: magic}}", "awq.then: must be one of 'rtn', 'gptq'"),
        ("{method: hqq, weights: {observer: mse}}", "method: hqq chooses its own scales"),
    ],
)
def test_bad_rules_and_options_are_recipe_errors(stage, expected):
    with pytest.raises(RecipeError) as err:
        recipe = parse_recipe_text(f"name: t\nstages:\n  - quantize: {stage}\n", "t.yaml")
        QuantizeStage().plan(tiny_model(), recipe.stages[0].config, lambda *k: recipe.where(("stages", 0, "quantize", *k)))
    assert expected in str(err.value)


def test_overlap_is_caught_by_dry_run(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: t\ncalibration: {samples: 4, seq_len: 32}\nstages:\n  - quantize:\n      method: awq\n      overrides:\n"
        "        - {targets: [\"re:.*down_proj\"], weights: {bits: 8}}\n"
        "        - {targets: [\"re:model\\\\.layers\\\\.0\\\\..*\"], skip: true}\n"
    )
    out = tmp_path / "never"
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}:7 stages[0].quantize.overrides[0]" in err and f"{recipe}:8 stages[0].quantize.overrides[1]" in err
    assert not out.exists()


# --- round trips through save and plain transformers -----------------------------------------

RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2, 44, 300]])
    result = {}
    for folder in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            result[folder] = model(ids).logits[0].float().tolist()
    assert "compressor" not in sys.modules
    print(json.dumps(result))
    """
)

ROUND_TRIPS = {
    "awq-gptq": "method: awq\nweights: {bits: 4, group_size: 32}\nawq: {then: gptq, grid: 6}\n",
    "hqq": "method: hqq\nweights: {bits: 4, group_size: 32}\n",
    "mixed": MIXED.format(method="awq") + "awq: {grid: 6}\n",
}


def test_round_trips_through_plain_transformers(tiny_llama, tmp_path):
    """AWQ+GPTQ, HQQ and mixed precision saved as compressed-tensors; one subprocess reloads all."""
    expected = {}
    for name, stage in ROUND_TRIPS.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
        run_stage(model, stage)
        folder = tmp_path / name
        model.save_pretrained(str(folder))
        block = write_quantization_config(model, folder)
        if name == "mixed":
            bits = sorted(g["weights"]["num_bits"] for g in block["config_groups"].values())
            assert bits == [4, 8]
            assert "model.layers.0.mlp.down_proj" in block["ignore"] and "lm_head" in block["ignore"]
        expected[str(folder)] = logits(model)
    out = subprocess.run([sys.executable, "-c", RELOAD, *expected], capture_output=True, text=True, check=True)
    reloaded = json.loads(out.stdout.strip().splitlines()[-1])
    for folder, ours in expected.items():
        assert torch.allclose(torch.tensor(reloaded[folder]), ours, atol=3e-2, rtol=3e-2), folder


def test_cli_awq_run_records_mappings(tiny_llama, tmp_path):
    recipe = tmp_path / "awq.yaml"
    recipe.write_text(
        "name: t\ncalibration: {samples: 8, seq_len: 64}\nstages:\n"
        "  - quantize: {method: awq, weights: {bits: 4, group_size: 32}, awq: {grid: 5}}\n"
    )
    out = tmp_path / "o"
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]) == 0
    record = json.loads((out / "compression.json").read_text())
    assert record["stages"][0]["method"] == "awq"
    assert record["modules"]["model.layers.0.mlp.gate_proj"]["awq"]["producer"] == "model.layers.0.post_attention_layernorm"


@pytest.mark.parametrize("name", ["w4a16-awq", "w4a16-awq-gptq", "w4a16-hqq", "w4a16-mixed", "fp8-dynamic-smoothquant"])
def test_builtin_recipes_plan_on_a_tiny_model(name):
    from compressor.recipe import load_recipe

    recipe = load_recipe(name)
    config = recipe.stages[0].config
    plan = QuantizeStage().plan(tiny_model(), config, lambda *k: recipe.where(("stages", 0, "quantize", *k)))
    assert len(plan.selected) == (7 if name == "w4a16-mixed" else 14)
    if name == "w4a16-mixed":
        assert plan.selected["model.layers.1.mlp.down_proj"].startswith("int8 sym group 32")
        assert plan.skipped["model.layers.0.self_attn.q_proj"] == "skipped by `overrides[1]`"

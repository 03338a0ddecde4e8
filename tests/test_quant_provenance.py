"""What the saved `quantization_config` says about how scales were found (`actorder`, `observer`,
as llm-compressor writes them) and about layers whose group size had to change; both must still
load in plain transformers, in `compressor.load`, and survive a reload and a re-run of recipe.yaml."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.cli import main
from tests.cli_runs import compress_into

IDS = torch.tensor([[5, 17, 42, 99, 7, 64, 3, 250]])


def saved_block(out) -> dict:
    return json.loads((out / "config.json").read_text())["quantization_config"]


def weights_of(block: dict) -> dict[str, dict]:
    """The weight args of each config group, keyed by the group's first target."""
    return {group["targets"][0]: group["weights"] for group in block["config_groups"].values()}


def assert_loads_like_transformers(out) -> None:
    from transformers import AutoModelForCausalLM

    import compressor

    with torch.no_grad():
        ours = compressor.load(str(out))(IDS).logits.float()
        plain = AutoModelForCausalLM.from_pretrained(str(out))(IDS).logits.float()
    assert ((ours - plain).norm() / plain.norm()).item() < 0.02  # the same weights, bf16 matmuls


def test_gptq_writes_actorder_and_each_layers_observer(tiny_llama, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    import compressor
    from compressor.formats import build_quantization_config

    out = compress_into(tiny_llama, (
        "name: x\ncalibration: {samples: 4, seq_len: 32}\nstages:\n"
        "  - quantize:\n      method: gptq\n      weights: {bits: 4, group_size: 32, observer: mse}\n"
        "      overrides: [{targets: [down_proj], weights: {bits: 8, group_size: 32, observer: hqq}}]\n"
    ), tmp_path)
    block = saved_block(out)
    config = QuantizationConfig.model_validate(block)  # compressed-tensors' own schema accepts it
    int4, int8 = sorted(config.config_groups.values(), key=lambda group: group.weights.num_bits)
    assert int4.weights.actorder == "static" and int8.weights.actorder == "static"
    assert int4.weights.observer == "mse"
    assert int4.weights.observer_kwargs == {"grid": 40, "maxshrink": 0.525, "norm": 2.0, "patience": 21}
    assert int8.weights.observer == "hqq"
    assert int8.weights.observer_kwargs == {"lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "iterations": 20}
    assert_loads_like_transformers(out)
    # compressor.load keeps what the config said, so a reloaded model saves the same groups
    again = build_quantization_config(compressor.load(str(out))).model_dump(mode="json")
    assert again["config_groups"] == block["config_groups"]
    # the output's resolved recipe.yaml runs again and writes the same description
    rerun = tmp_path / "rerun"
    assert main([str(tiny_llama), "--recipe", str(out / "recipe.yaml"), "-o", str(rerun), "-q", "--no-perplexity"]) == 0
    assert saved_block(rerun)["config_groups"] == block["config_groups"]


@pytest.mark.parametrize("stage, actorder, observer", [
    ("{method: rtn, weights: {bits: 4, group_size: 32}}", None, "minmax"),
    ("{method: gptq, act_order: false, weights: {bits: 4, group_size: 32}}", None, "minmax"),
    ("{method: awq, weights: {bits: 4, group_size: 32}}", None, "minmax"),
    ("{method: awq, awq: {then: gptq}, weights: {bits: 4, group_size: 32}}", "static", "minmax"),
    ("{method: hqq, weights: {bits: 4, group_size: 32}}", None, "hqq"),
    ("{method: fp8, weights: {observer: mse}}", None, "mse"),
    ("{method: smoothquant+gptq, activations: {bits: 8, dynamic: true}}", "static", "minmax"),
])
def test_actorder_only_where_gptq_reordered_columns(tiny_llama, tmp_path, stage, actorder, observer):
    from compressed_tensors.quantization import QuantizationConfig

    out = compress_into(tiny_llama, f"name: x\ncalibration: {{samples: 4, seq_len: 32}}\nstages:\n  - quantize: {stage}\n", tmp_path)
    block = saved_block(out)
    QuantizationConfig.model_validate(block)
    for weights in weights_of(block).values():
        assert weights.get("actorder") == actorder
        assert weights["observer"] == observer
    if "fp8" not in stage and "activations" not in stage:  # those two read activations differently
        assert_loads_like_transformers(out)


@pytest.mark.parametrize("stage, observer", [
    ("{method: fp8, activations: {type: float, dynamic: false}}", "static_minmax"),
    ("{method: smoothquant, activations: {bits: 8, dynamic: false}}", "static_minmax"),
    ("{method: smoothquant, activations: {bits: 8, dynamic: true}}", None),
])
def test_activation_observer_says_how_the_input_scale_was_found(tiny_llama, tmp_path, stage, observer):
    """A static input scale is the calibration's largest |x| (llm-compressor's static_minmax); a dynamic one has none."""
    from compressed_tensors.quantization import QuantizationConfig

    out = compress_into(tiny_llama, f"name: x\ncalibration: {{samples: 4, seq_len: 32}}\nstages:\n  - quantize: {stage}\n", tmp_path)
    block = saved_block(out)
    config = QuantizationConfig.model_validate(block)
    (group,) = config.config_groups.values()
    assert group.input_activations.dynamic is (observer is None)
    assert group.input_activations.observer == observer


def test_a_layer_gptq_gave_to_rtn_claims_no_act_order(tiny_llama, tmp_path, monkeypatch):
    """GPTQ falls back to RTN when the Hessian will not factor; that layer's columns went in order."""
    import compressor.algorithms.gptq as gptq

    monkeypatch.setattr(gptq, "_inverse_hessian_factor", lambda hessian, dampening: (None, dampening))
    out = compress_into(tiny_llama, (
        "name: x\ncalibration: {samples: 4, seq_len: 32}\nstages:\n  - quantize: {method: gptq, weights: {bits: 4, group_size: 32}}\n"
    ), tmp_path)
    for weights in weights_of(saved_block(out)).values():
        assert "actorder" not in weights and weights["observer"] == "minmax"


@pytest.mark.parametrize("module_name, lowest_attr", [
    ("compressor.algorithms.grid", "MSE_LOWEST_RATIO"),
    ("compressor.algorithms.fp8", "MSE_LOWEST_FRACTION"),
])
def test_mse_observer_kwargs_name_exactly_the_ratios_we_tried(module_name, lowest_attr):
    """llm-compressor's mse observer tries p = 1 - i / grid for i < int(maxshrink × grid), stopping
    after `patience` tries without a gain; ours tries linspace(1, lowest, steps) to the end."""
    import importlib

    from compressor.stages.quant_provenance import shrink_search_kwargs

    module = importlib.import_module(module_name)
    steps, lowest = module.MSE_SHRINK_STEPS, getattr(module, lowest_attr)
    kwargs = shrink_search_kwargs(steps, lowest)
    theirs = [1 - i / kwargs["grid"] for i in range(int(kwargs["maxshrink"] * kwargs["grid"]))]
    ours = torch.linspace(1.0, lowest, steps).tolist()
    assert theirs == pytest.approx(ours, abs=1e-6)
    assert kwargs["patience"] >= steps and kwargs["norm"] == 2.0


def test_a_group_wider_than_a_layer_is_per_channel_and_the_config_says_so(tiny_llama, tmp_path, capsys):
    """Group 128 on the tiny Llama: its 96-column layers get one scale per row (one group spanning
    the row, as GPTQModel and compressed-tensors count it), its 160-column down_proj group 32;
    each is written as what it is, warned under the stage line and by --dry-run."""
    from compressed_tensors.quantization import QuantizationConfig

    recipe = "name: x\ncalibration: {samples: 4, seq_len: 32}\nstages:\n  - quantize: {method: gptq, weights: {bits: 4, group_size: 128}}\n"
    (tmp_path / "r.yaml").write_text(recipe)
    assert main([str(tiny_llama), "--recipe", str(tmp_path / "r.yaml"), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    wide = (
        "warning: group_size 128 does not fit model.layers.*.self_attn.q_proj, model.layers.*.self_attn.k_proj,"
        " model.layers.*.self_attn.v_proj, model.layers.*.self_attn.o_proj, model.layers.*.mlp.gate_proj,"
        " model.layers.*.mlp.up_proj (128 > 96 columns): per-channel there"
    )
    odd = "warning: group_size 128 does not fit model.layers.*.mlp.down_proj (128 does not divide 160 columns): group 32 there"
    assert wide in dry and odd in dry
    assert "int4 sym per-channel (128 > 96 columns)" in dry

    out = tmp_path / "out"
    assert main([str(tiny_llama), "--recipe", str(tmp_path / "r.yaml"), "-o", str(out), "-q", "--no-perplexity"]) == 0
    printed = capsys.readouterr().out
    stage_line = printed.index("stage 1/1: quantize (gptq)")
    assert printed.index(wide) > stage_line and printed.index(odd) > stage_line

    config = QuantizationConfig.model_validate(saved_block(out))
    by_strategy = {(group.weights.strategy, group.weights.group_size): group.targets for group in config.config_groups.values()}
    assert set(by_strategy) == {("channel", None), ("group", 32)}
    assert by_strategy["group", 32] == ["re:^model\\.layers\\.\\d+\\.mlp\\.down_proj$"]
    assert_loads_like_transformers(out)

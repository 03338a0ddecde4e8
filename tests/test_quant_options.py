"""Quantize options as llm-compressor and GPTQModel users write them: channel-wise `group_size: -1`,
GPTQ options on methods that never run GPTQ, other tools' key names, `ignore` entries naming nothing."""

from __future__ import annotations

import textwrap

import pytest
import torch

from compressor.errors import RecipeError
from compressor.recipe import parse_recipe_text
from compressor.cli import main


def parse(stage: str):
    text = "name: x\nstages:\n  - quantize:\n" + textwrap.indent(textwrap.dedent(stage), "      ")
    return parse_recipe_text(text, source="r.yaml")


def error_of(stage: str) -> str:
    with pytest.raises(RecipeError) as info:
        parse(stage)
    return info.value.format()


def test_group_size_minus_one_is_channel_wise_like_compressed_tensors():
    recipe = parse("method: gptq\nweights: {bits: 4, group_size: -1}\noverrides:\n  - {targets: [down_proj], weights: {bits: 8, group_size: -1}}\n")
    config = recipe.stages[0].config
    assert config.weights.group_size is None
    assert config.overrides[0].weights.group_size is None
    # the saved recipe.yaml shows the canonical spelling and parses again
    assert "group_size: null" in recipe.to_yaml()
    assert parse_recipe_text(recipe.to_yaml(), source="again.yaml").to_dict() == recipe.to_dict()


def test_other_negative_group_sizes_stay_refused():
    assert error_of("method: rtn\nweights: {group_size: -2}\n").startswith(
        "r.yaml:5 stages[0].quantize.weights.group_size: must be greater than 0, got -2"
    )


@pytest.mark.parametrize(
    "stage, key",
    [
        ("method: rtn\ndampening: 0.05\n", "dampening"),
        ("method: hqq\nblock_size: 64\n", "block_size"),
        ("method: fp8\nact_order: false\n", "act_order"),
        ("method: smoothquant\ndampening: 0.1\n", "dampening"),
        ("method: awq\nawq: {then: rtn}\nact_order: false\n", "act_order"),
    ],
)
def test_gptq_options_on_methods_without_gptq_are_refused(stage, key):
    message = error_of(stage)
    assert message.startswith("r.yaml:3 stages[0].quantize: "), message
    assert f"`{key}` is a GPTQ option" in message and "does not use it" in message


@pytest.mark.parametrize(
    "stage",
    [
        "method: gptq\ndampening: 0.05\nact_order: false\nblock_size: 64\n",
        "method: smoothquant+gptq\ndampening: 0.05\n",
        "method: awq\nawq: {then: gptq}\nact_order: false\n",
        "method: rtn\nact_order: true\ndampening: 0.01\nblock_size: 128\n",  # defaults, as recipe.yaml writes them
    ],
)
def test_gptq_options_where_gptq_runs_or_at_their_defaults_parse(stage):
    parse(stage)


@pytest.mark.parametrize(
    "stage, fragment",
    [
        ("method: gptq\ndamp_percent: 0.05\n", "stages[0].quantize.damp_percent: unknown key 'damp_percent': use `dampening`"),
        ("method: gptq\ndesc_act: true\n", "unknown key 'desc_act': use `act_order: true|false`"),
        ("method: gptq\nstatic_groups: true\n", "unknown key 'static_groups': groups are always static"),
        ("method: gptq\ntrue_sequential: true\n", "unknown key 'true_sequential': GPTQ is always true-sequential"),
        ("method: gptq\nbits: 4\n", "unknown key 'bits': put it under `weights:`"),
        ("method: gptq\nscheme: W4A16\n", "unknown key 'scheme': write the scheme as keys"),
        ("method: gptq\nweights: {sym: true}\n", "stages[0].quantize.weights.sym: unknown key 'sym': use `symmetric`"),
        ("method: gptq\nweights: {num_bits: 4}\n", "unknown key 'num_bits': use `bits`"),
    ],
)
def test_other_tools_key_names_get_a_hint(stage, fragment):
    assert fragment in error_of(stage)


def test_misspelt_key_still_lists_the_known_keys():
    assert "unknown key 'dampning' (known: method, weights," in error_of("method: gptq\ndampning: 0.05\n")


def test_ignore_entries_matching_no_module_are_printed(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: x\ncalibration: {seq_len: 64}\nstages:\n"
        "  - quantize: {method: rtn, targets: [q_proj, v_prj, down_proj], ignore: [lm-head, 're:.*mlp\\.gate$', down_proj]}\n"
    )
    assert main([str(tiny_llama), "--recipe", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "warning: `targets: v_prj` matches no module of this model" in out
    assert "`targets: q_proj` matches" not in out
    assert "warning: `ignore: lm-head` matches no module of this model" in out
    assert "warning: `ignore: re:.*mlp\\.gate$` matches no module of this model" in out
    assert "ignore: down_proj` matches" not in out  # it matches, and its layers are skipped
    assert "skipped model.layers.0.mlp.down_proj: ignored by `ignore: down_proj`" in out
    # the real run says it too, next to the stage line
    out_dir = tmp_path / "out"
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out_dir), "-q", "--no-perplexity"]) == 0
    assert "  warning: `ignore: lm-head` matches no module of this model" in capsys.readouterr().out


def test_prune_reports_unmatched_ignore_entries_too(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ncalibration: {seq_len: 64}\nstages:\n  - prune: {method: magnitude, sparsity: 0.5, ignore: [lm_haed]}\n")
    assert main([str(tiny_llama), "--recipe", str(recipe), "--dry-run"]) == 0
    assert "warning: `ignore: lm_haed` matches no module of this model" in capsys.readouterr().out


def test_mixed_stages_write_every_scheme_load_in_transformers_and_tag_the_card(tiny_llama, tmp_path):
    """FP8 attention, then int4 MLP with int8 down_proj: one config group per scheme on disk, plain
    transformers reads it like compressor.load, and the card is tagged with every scheme."""
    import json

    import yaml
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM

    import compressor
    from compressor.model_card import build_model_card
    from tests.cli_runs import compress_into

    out = compress_into(tiny_llama, (
        "name: mix\ncalibration: {samples: 4, seq_len: 32}\nstages:\n"
        "  - quantize: {method: fp8, targets: ['re:.*self_attn.*']}\n"
        "  - quantize:\n      method: rtn\n      targets: ['re:.*mlp.*']\n      weights: {bits: 4, group_size: null}\n"
        "      overrides: [{targets: [down_proj], weights: {bits: 8}}]\n"
    ), tmp_path)
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(block)  # compressed-tensors reads back what was written
    assert config.format == "mixed-precision"
    by_bits = {(group.format, group.weights.num_bits): group for group in config.config_groups.values()}
    assert set(by_bits) == {("float-quantized", 8), ("pack-quantized", 4), ("pack-quantized", 8)}
    fp8, int4, int8 = by_bits["float-quantized", 8], by_bits["pack-quantized", 4], by_bits["pack-quantized", 8]
    assert (fp8.weights.type, fp8.weights.strategy, fp8.input_activations.strategy, fp8.input_activations.dynamic) == (
        "float", "channel", "token", True
    )
    assert (int4.weights.num_bits, int4.weights.strategy, int4.weights.group_size) == (4, "channel", None)
    assert (int8.weights.strategy, int8.weights.group_size) == ("channel", None)  # the override kept the stage's null
    assert all("self_attn" in t for t in fp8.targets) and all("mlp" in t for t in int4.targets)
    assert int8.targets == ["re:^model\\.layers\\.\\d+\\.mlp\\.down_proj$"]

    ids = torch.tensor([[5, 17, 42, 99, 7, 64, 3, 250]])
    with torch.no_grad():
        ours = compressor.load(str(out))(ids).logits.float()
        plain = AutoModelForCausalLM.from_pretrained(str(out))(ids).logits.float()
    # the weights agree to bf16 rounding; the FP8 activation rounding of the two readers differs a little
    assert ((ours - plain).norm() / plain.norm()).item() < 0.08

    tags = yaml.safe_load(str(build_model_card(out, "me/mix")).split("---\n")[1])["tags"]
    assert {"fp8", "w4a16", "w8a16"} <= set(tags) and "w8a8" not in tags  # w8a8 names int8 × int8


def test_a_calibrated_method_says_it_leaves_a_targeted_lm_head_dense(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ncalibration: {samples: 4, seq_len: 32}\nstages:\n  - quantize: {method: gptq, ignore: []}\n")
    out_dir = tmp_path / "out"
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out_dir), "-q", "--no-perplexity"]) == 0
    printed = capsys.readouterr().out
    assert (
        "  warning: gptq leaves lm_head unquantized: it calibrates only the decoder blocks"
        " (a later `method: rtn` stage can quantize it)"
    ) in printed
    # and that advice works: a second stage quantizes it, so the saved head is packed
    recipe.write_text(
        "name: x\ncalibration: {samples: 4, seq_len: 32}\nstages:\n  - quantize: {method: gptq, ignore: []}\n"
        "  - quantize: {method: rtn, targets: [lm_head], ignore: []}\n"
    )
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out_dir), "-q", "--no-perplexity", "--overwrite"]) == 0
    assert "stage 2/2: quantize (rtn) on 1 modules" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(out_dir / "model.safetensors"), "pt") as handle:
        assert "lm_head.weight_packed" in handle.keys()


def test_moe_gates_stay_dense_as_vllm_builds_them(tiny_qwen2_moe, tmp_path):
    """vLLM's Qwen2-MoE holds `shared_expert_gate` as a plain nn.Linear: packed tensors there fail its load."""
    import json

    from safetensors import safe_open

    from tests.cli_runs import compress_into

    out = compress_into(tiny_qwen2_moe, "name: x\ncalibration: {samples: 4, seq_len: 32}\nstages:\n  - quantize: {method: rtn, weights: {group_size: 32}}\n", tmp_path)
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("model.layers.0.mlp.shared_expert_gate.weight").dtype == torch.bfloat16
    assert not any(key.startswith("model.layers.0.mlp.shared_expert_gate.weight_") for key in keys)
    assert "model.layers.0.mlp.shared_expert.up_proj.weight_packed" in keys  # its neighbours are quantized
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.mlp.shared_expert_gate" in block["ignore"]
    assert not any("shared_expert_gate" in target for group in block["config_groups"].values() for target in group["targets"])


def test_a_default_entry_that_matches_nothing_is_not_reported(tiny_llama, tmp_path, capsys):
    """lowrank's default targets are [Linear, QuantLinear]; before any quantize stage QuantLinear matches
    nothing, and that is no typo. Written out (as recipe.yaml does) it stays quiet too."""
    recipe = tmp_path / "r.yaml"
    for stage in ("{method: svd, energy: 0.9}", "{method: svd, energy: 0.9, targets: [Linear, QuantLinear]}"):
        recipe.write_text(f"name: x\ncalibration: {{seq_len: 64}}\nstages:\n  - lowrank: {stage}\n")
        assert main([str(tiny_llama), "--recipe", str(recipe), "--dry-run"]) == 0
        assert "matches no module" not in capsys.readouterr().out

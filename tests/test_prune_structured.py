"""Structured pruning: smaller tensors and config, plain-transformers reload, GQA, MoE experts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.errors import RecipeError
from tests.prune_fixtures import calibration_tokens, plan_only, prune_recipe, run_stages, tiny_model

IDS = torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2]])


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def reload(model, tmp_path):
    model.save_pretrained(str(tmp_path / "m"))
    return AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_heads_respect_gqa_and_reload(method, tmp_path):
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2)  # 4 query heads per KV head
    before = parameters(model)
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    ctx = run_stages(model, prune_recipe(f"{{method: {method}, sparsity: {{heads: 0.25}}}}"))
    assert model.config.num_attention_heads == 6 and model.config.num_key_value_heads == 2 and model.config.head_dim == 12
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (72, 96) and attention.k_proj.weight.shape == (24, 96)
    assert attention.o_proj.weight.shape == (96, 72)
    kept = ctx.records["model.layers.0.self_attn"]["kept_heads"]
    assert [h // 4 for h in kept] == [0, 0, 0, 1, 1, 1]  # one query head removed from each KV group
    assert torch.equal(attention.q_proj.weight.reshape(6, 12, 96), q_before.reshape(8, 12, 96)[kept])
    reloaded = reload(model, tmp_path)
    assert parameters(reloaded) == parameters(model) < before
    assert torch.allclose(logits(reloaded), logits(model), atol=1e-5)


def test_heads_without_gqa_remove_whole_heads():
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=4)
    run_stages(model, prune_recipe("{method: magnitude, sparsity: {heads: 0.5}}"))
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 2
    assert model.model.layers[1].self_attn.v_proj.weight.shape == (48, 96)
    assert torch.isfinite(logits(model)).all()


def test_mlp_channels_shrink_intermediate_size(tmp_path):
    model = tiny_model("qwen2")
    run_stages(model, prune_recipe("{method: wanda, sparsity: {mlp_channels: 0.3}}"))
    assert model.config.intermediate_size == 134  # 192 - round(0.3 * 192)
    mlp = model.model.layers[1].mlp
    assert mlp.gate_proj.weight.shape == (134, 96) and mlp.down_proj.weight.shape == (96, 134)
    reloaded = reload(model, tmp_path)
    assert torch.allclose(logits(reloaded), logits(model), atol=1e-5)


def test_mlp_channel_importance_keeps_the_loud_channels():
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, 7] *= 100.0  # channel 7 matters most by any measure
        mlp.down_proj.weight[:, 9] = 0.0  # channel 9 contributes nothing
    up_row_7 = mlp.up_proj.weight[7].detach().clone()
    run_stages(model, prune_recipe("{method: magnitude, sparsity: {mlp_channels: 0.5}}"))
    assert any(torch.equal(row, up_row_7) for row in model.model.layers[0].mlp.up_proj.weight)
    assert not (model.model.layers[0].mlp.down_proj.weight == 0).all(0).any()


def test_explicit_layers_are_removed(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4)
    kept_block = model.model.layers[2]
    run_stages(model, prune_recipe("{method: magnitude, sparsity: {layers: [1, 3]}}"))
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert model.model.layers[1] is kept_block and kept_block.self_attn.layer_idx == 1
    reloaded = reload(model, tmp_path)
    assert reloaded.config.num_hidden_layers == 2
    assert torch.allclose(logits(reloaded), logits(model), atol=1e-5)


def test_auto_layers_remove_the_block_that_changes_least():
    model = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():  # block 2 becomes (almost) the identity: its residual branches output ~0
        model.model.layers[2].self_attn.o_proj.weight.mul_(1e-4)
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-4)
    ctx = run_stages(model, prune_recipe("{method: sparsegpt, sparsity: {layers: auto, count: 1}}"))
    assert ctx.records["model.layers.2"]["removed"] is True
    assert ctx.records["model.layers.2"]["cosine_in_out"] > max(ctx.records[f"model.layers.{i}"]["cosine_in_out"] for i in (0, 1, 3))
    assert model.config.num_hidden_layers == 3


def test_experts_pruned_by_router_frequency_and_contribution(tmp_path):
    model = tiny_model("qwen2_moe")
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():  # expert 5 of layer 0 contributes nothing, however often it is routed to
        experts.down_proj[5].zero_()
    before = parameters(model)
    kept_down = experts.down_proj[0].detach().clone()
    ctx = run_stages(model, prune_recipe("{method: wanda, sparsity: {experts: 0.25}}"), calibration_tokens(4, 16))
    record = ctx.records["model.layers.0.mlp.experts"]
    assert record["importance"][5] == 0.0
    assert 5 not in record["kept"] and len(record["kept"]) == 6
    assert model.config.num_experts == 6
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (6, 64, 64)
    assert model.model.layers[0].mlp.gate.weight.shape == (6, 64)
    if 0 in record["kept"]:
        assert torch.equal(model.model.layers[0].mlp.experts.down_proj[record["kept"].index(0)], kept_down)
    reloaded = reload(model, tmp_path)
    assert parameters(reloaded) == parameters(model) < before
    assert torch.allclose(logits(reloaded), logits(model), atol=1e-4)


@pytest.mark.parametrize(
    "kind,block,message,key",
    [
        ("llama", "{method: magnitude, sparsity: {heads: 0.9}}", "would remove every head", "stages[0].prune.sparsity.heads"),
        ("llama", "{method: magnitude, sparsity: {heads: 0.1}}", "rounds to removing no head", "stages[0].prune.sparsity.heads"),
        ("llama", "{method: wanda, sparsity: {experts: 0.25}}", "no mixture-of-experts layers", "stages[0].prune.sparsity.experts"),
        ("qwen2_moe", "{method: wanda, sparsity: {experts: 0.9}}", "between 1 and 6 can go", "stages[0].prune.sparsity.experts"),
        ("llama", "{method: magnitude, sparsity: {layers: [0, 1]}}", "every one of the 2 blocks", "stages[0].prune.sparsity.layers"),
        ("llama", "{method: magnitude, sparsity: {layers: [7]}}", "block 7 does not exist", "stages[0].prune.sparsity.layers"),
        ("llama", "{method: magnitude, sparsity: {layers: auto, count: 2}}", "every one of the 2 blocks", "stages[0].prune.sparsity.count"),
        ("llama", "{method: magnitude, sparsity: {layers: [1, 1]}}", "block 1 is listed twice", "stages[0].prune.sparsity.layers"),
        # 160 channels: 0.999 rounds to all of them (the old plan saved intermediate_size 0), 0.002 to none.
        ("llama", "{method: wanda, sparsity: {mlp_channels: 0.999}}", "rounds to removing every channel; between 1 and 159",
         "stages[0].prune.sparsity.mlp_channels"),
        ("llama", "{method: wanda, sparsity: {mlp_channels: 0.002}}", "rounds to removing no channel",
         "stages[0].prune.sparsity.mlp_channels"),
        # Qwen2-MoE's MLPs are experts (and a shared expert): the old plan changed the config only.
        ("qwen2_moe", "{method: wanda, sparsity: {mlp_channels: 0.25}}", "no gated MLP", "stages[0].prune.sparsity.mlp_channels"),
    ],
)
def test_bad_structured_requests_are_refused_in_plan(kind, block, message, key):
    with pytest.raises(RecipeError) as caught:
        plan_only(tiny_model(kind), prune_recipe(block))
    assert message in caught.value.message
    assert caught.value.key == key and caught.value.where == "r.yaml:3"


def test_removing_experts_after_a_stage_split_them_says_to_reorder():
    recipe = "name: t\nstages:\n  - prune: {method: magnitude, sparsity: 0.5}\n  - prune: {method: wanda, sparsity: {experts: 0.25}}\n"
    with pytest.raises(RecipeError) as caught:
        plan_only(tiny_model("qwen2_moe"), recipe)
    assert "split the experts into one Linear each; put the {experts: r} stage first" in caught.value.message
    assert caught.value.key == "stages[1].prune.sparsity.experts"

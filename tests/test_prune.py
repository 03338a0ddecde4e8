"""Unstructured and N:M pruning: exact masks, per-layer sparsity, SparseGPT quality, OWL."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.algorithms.masks import is_nm_sparse, measured_sparsity, nm_mask, parse_nm, unstructured_mask
from compressor.algorithms.sparsegpt import factor_hessian, sparsegpt_prune
from compressor.algorithms.wanda import owl_sparsities, wanda_prune
from tests.prune_fixtures import prune_recipe, run_stages, tiny_model

LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pruned_linears(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.data for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in LAYERS}


@pytest.mark.parametrize("text,keep,group", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_nm_mask_keeps_exactly_the_top_n_of_each_group(text, keep, group):
    pattern = parse_nm(text)
    scores = torch.rand(7, 8 * group)
    mask = nm_mask(scores, pattern)
    grouped_mask = mask.reshape(7, -1, group)
    assert (grouped_mask.sum(-1) == keep).all()
    grouped = scores.reshape(7, -1, group)
    kept_min = torch.where(grouped_mask, grouped, torch.inf).min(-1).values
    dropped_max = torch.where(grouped_mask, -torch.inf, grouped).max(-1).values
    assert (kept_min > dropped_max).all()


@pytest.mark.parametrize("bad", ["3:2", "4:4", "0:4", "2-4", "a:b"])
def test_parse_nm_refuses(bad):
    with pytest.raises(ValueError):
        parse_nm(bad)


def test_unstructured_mask_per_row_and_per_matrix():
    scores = torch.rand(6, 50)
    per_row = unstructured_mask(scores, 0.3, per_row=True)
    assert (per_row.sum(1) == 35).all()
    whole = unstructured_mask(scores, 0.3, per_row=False)
    assert int((~whole).sum()) == int(300 * 0.3)
    assert scores[whole].min() > scores[~whole].max()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", ['"2:4"', '"4:8"', "0.5", "0.7"])
def test_stage_reaches_the_sparsity_in_every_layer(method, sparsity):
    model = tiny_model()
    lm_head = model.lm_head.weight.detach().clone()
    ctx = run_stages(model, prune_recipe(f"{{method: {method}, sparsity: {sparsity}}}"))
    layers = pruned_linears(model)
    assert len(layers) == 14
    for name, weight in layers.items():
        if sparsity.startswith('"'):
            pattern = parse_nm(sparsity.strip('"'))
            assert is_nm_sparse(weight, pattern), name
            groups = (weight == 0).reshape(weight.shape[0], -1, pattern.group).sum(-1)
            assert (groups >= pattern.group - pattern.keep).all(), name  # every group of M has >= M-N zeros
        else:
            target = float(sparsity)
            assert abs(measured_sparsity(weight) - target) <= 1.0 / weight.shape[1], (name, measured_sparsity(weight))
        assert ctx.records[name]["stage"] == "prune" and ctx.records[name]["method"] == method
        assert model.get_submodule(name).sparsity_structure
    assert torch.equal(model.lm_head.weight, lm_head)  # ignored by default


def _correlated_layer(out_features=48, in_features=64, tokens=2048):
    generator = torch.Generator().manual_seed(5)
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(3))
    mixing = torch.randn(in_features, in_features, generator=generator) / in_features**0.5
    x = torch.randn(tokens, in_features, generator=generator) @ mixing
    return w, x * (torch.rand(in_features, generator=generator) + 0.2)  # features of unequal scale


@pytest.mark.parametrize("target", [0.5, "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(target):
    w, x = _correlated_layer()
    hessian = 2 * x.t() @ x / x.shape[0]
    sparsity, pattern = (target, None) if isinstance(target, float) else (None, parse_nm(target))
    ours = sparsegpt_prune(w, factor_hessian(hessian, 0.01), sparsity=sparsity, pattern=pattern, block_size=16).weight
    wanda = wanda_prune(w, x.pow(2).sum(0).sqrt(), sparsity=sparsity, pattern=pattern)
    magnitude = w * (nm_mask(w.abs(), pattern) if pattern else unstructured_mask(w.abs(), 0.5, per_row=True))

    def error(pruned):
        return float((x @ (w - pruned).t()).pow(2).sum())

    assert measured_sparsity(ours) >= 0.5 - 1e-6
    if pattern:
        assert is_nm_sparse(ours, pattern)
    assert error(ours) < 0.8 * error(wanda)
    assert error(wanda) < error(magnitude)


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    # With H = I there is nothing to compensate: the OBS choice is the smallest |w| and no update.
    w = torch.randn(8, 16)
    pruned = sparsegpt_prune(w, factor_hessian(torch.eye(16), 1e-9), pattern=parse_nm("2:4"), block_size=8).weight
    assert torch.allclose(pruned, w * nm_mask(w.abs(), parse_nm("2:4")), atol=1e-5)


def test_owl_schedule_averages_to_target_and_records_blocks():
    assert owl_sparsities([0.01, 0.03, 0.02], 0.5, 0.08) == pytest.approx([0.58, 0.42, 0.5])
    model = tiny_model(num_hidden_layers=4)
    ctx = run_stages(model, prune_recipe("{method: wanda, sparsity: 0.5, schedule: owl, owl: {threshold: 3.0, spread: 0.1}}"))
    per_block = [ctx.records[f"model.layers.{i}"]["sparsity"] for i in range(4)]
    assert sum(per_block) / 4 == pytest.approx(0.5, abs=1e-3)
    assert max(per_block) - min(per_block) == pytest.approx(0.2, abs=1e-3)
    for name, weight in pruned_linears(model).items():
        block = int(name.split(".")[2])
        assert abs(measured_sparsity(weight) - per_block[block]) <= 1.0 / weight.shape[1] + 1e-3


@pytest.mark.parametrize("sparsity", ["{heads: 0.25}", "{layers: auto, count: 2}", '"2:4"', "0.5"])
def test_saved_recipe_round_trips(sparsity):
    from compressor.recipe import parse_recipe_text

    recipe = parse_recipe_text(prune_recipe(f"{{method: wanda, sparsity: {sparsity}}}"))
    assert parse_recipe_text(recipe.to_yaml()).to_dict() == recipe.to_dict()

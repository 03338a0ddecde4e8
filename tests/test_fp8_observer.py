"""The MSE observer for 8-bit per-channel weights (FP8 e4m3 and int8 W8A8)."""

from __future__ import annotations

import pytest
import torch

from compressor.algorithms.fp8 import MSE_SHRINK_STEPS, fp8_quantize
from compressor.algorithms.rtn import rtn_quantize
from compressor.errors import RecipeError
from compressor.kernels.w8a8_linear import W8A8Linear
from compressor.model_io import load_model
from compressor.recipe import parse_recipe_text
from tests.test_quant_formats import recipe_for, run_stages


def _row_errors(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (codes.float() * scale - weight).pow(2).sum(dim=1)


def test_fp8_mse_search_picks_the_best_fraction_per_row(seeded):
    weight = torch.randn(24, 96) * torch.logspace(-2, 1, 24)[:, None]
    weight[3, 7] = 40.0  # an outlier row
    plain_codes, plain_scale = fp8_quantize(weight, torch.bfloat16)
    codes, scale = fp8_quantize(weight, torch.bfloat16, mse_search=True)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (24, 1)
    assert torch.equal(scale, scale.to(torch.bfloat16).float())  # what is saved is what was chosen
    assert torch.all(codes.float().abs() <= 448)
    chosen = _row_errors(weight, codes, scale)
    plain = _row_errors(weight, plain_codes, plain_scale)
    assert torch.all(chosen <= plain) and (chosen / plain).mean() < 0.97
    # Reference: every candidate fraction, computed independently, per row.
    absmax = weight.abs().amax(dim=1, keepdim=True)
    best = torch.full((24,), float("inf"))
    for fraction in torch.linspace(1.0, 0.5, MSE_SHRINK_STEPS).tolist():
        s = (absmax * fraction / 448).to(torch.bfloat16).float()
        q = (weight / s).clamp(-448, 448).to(torch.float8_e4m3fn).float()
        best = torch.minimum(best, (q * s - weight).pow(2).sum(dim=1))
    assert torch.allclose(chosen, best, rtol=1e-6, atol=0)
    ratio = scale / plain_scale
    assert torch.all((ratio >= 0.49) & (ratio <= 1.0 + 1e-6))


def test_fp8_mse_search_keeps_all_zero_rows_finite():
    weight = torch.zeros(2, 16)
    weight[1] = torch.linspace(-1, 1, 16)
    codes, scale = fp8_quantize(weight, torch.bfloat16, mse_search=True)
    assert torch.isfinite(scale).all() and torch.all(codes[0].float() == 0)


def test_fp8_stage_with_mse_observer_stores_the_searched_codes(tiny_llama):
    original = load_model(str(tiny_llama)).model
    body = "- quantize: {method: fp8, weights: {type: float, observer: mse}, activations: {type: float}}\n"
    loaded, records = run_stages(tiny_llama, recipe_for(body))
    layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, W8A8Linear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        codes, scale = fp8_quantize(original.get_submodule(name).weight.data, layer.weight_scale.dtype, mse_search=True)
        assert torch.equal(layer.weight.float(), codes.float())
        assert torch.equal(layer.weight_scale.float(), scale)
        assert records[name]["observer"] == "mse"


def test_int8_w8a8_with_mse_observer_uses_the_searched_grid(tiny_llama, monkeypatch):
    import compressor.stages.activation_methods as activation_methods

    grids = []

    def spy(weight, grid):
        grids.append(grid)
        return rtn_quantize(weight, grid)

    monkeypatch.setattr(activation_methods, "rtn_quantize", spy)
    original = load_model(str(tiny_llama)).model
    body = "- quantize: {method: rtn, weights: {bits: 8, group_size: null, observer: mse}, activations: {bits: 8}}\n"
    loaded, _ = run_stages(tiny_llama, recipe_for(body))
    assert len(grids) == 14 and all(g.mse_search and g.bits == 8 and g.group_size is None for g in grids)
    name = "model.layers.0.mlp.down_proj"
    weight = original.get_submodule(name).weight.data
    codes, scale, _ = rtn_quantize(weight, grids[0])
    layer = loaded.model.get_submodule(name)
    assert torch.equal(layer.weight.to(torch.int64), codes.to(torch.int64))
    assert torch.allclose(layer.weight_scale.float().flatten(), scale.float().flatten())


def test_fp8_with_hqq_observer_is_a_recipe_error():
    with pytest.raises(RecipeError) as err:
        parse_recipe_text(recipe_for("- quantize: {method: fp8, weights: {type: float, observer: hqq}}\n"))
    assert "observer: minmax or mse" in str(err.value) and "stages[0].quantize" in str(err.value)

"""Each merge method against a direct formula on small tensors, and the parameter resolution."""

from __future__ import annotations

import math

import pytest
import torch

from compressor.algorithms.merge_methods import TensorMerge, merge_method_registry, slerp_tensors
from compressor.algorithms.sparsify import keep_largest, keep_middle, keep_random
from compressor.merging.params import FilteredValue, evaluate, layer_position, resolve


def call(method: str, tensors, base_index=None, weight=None, density=None, gamma=None, **options) -> torch.Tensor:
    n = len(tensors)
    spec = merge_method_registry().get(method)
    merge = TensorMerge(
        tensors=tuple(tensors),
        base_index=base_index,
        weight=tuple(weight if weight is not None else [None] * n),
        density=tuple(density if density is not None else [1.0] * n),
        gamma=tuple(gamma if gamma is not None else [0.01] * n),
        normalize=options.pop("normalize", spec.default_normalize),
        rescale=options.pop("rescale", spec.default_rescale),
        **options,
    )
    return spec.function(merge)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_linear_is_the_normalized_weighted_average():
    a, b, c = randn(5, 7, seed=1), randn(5, 7, seed=2), randn(5, 7, seed=3)
    out = call("linear", [a, b, c], weight=[1.0, 2.0, 3.0])
    torch.testing.assert_close(out, (a + 2 * b + 3 * c) / 6, rtol=1e-12, atol=1e-12)
    raw = call("linear", [a, b, c], weight=[1.0, 2.0, 3.0], normalize=False)
    torch.testing.assert_close(raw, a + 2 * b + 3 * c, rtol=1e-12, atol=1e-12)


def test_task_arithmetic_adds_weighted_deltas_times_lambda():
    base, a, b = randn(4, 6, seed=1), randn(4, 6, seed=2), randn(4, 6, seed=3)
    out = call("task_arithmetic", [a, b, base], base_index=2, weight=[0.5, 0.25, None], lambda_=0.8)
    torch.testing.assert_close(out, base + 0.8 * (0.5 * (a - base) + 0.25 * (b - base)), rtol=1e-12, atol=1e-12)
    normalized = call("task_arithmetic", [a, b, base], base_index=2, weight=[0.5, 0.25, None], normalize=True)
    expected = base + (0.5 * (a - base) + 0.25 * (b - base)) / 0.75
    torch.testing.assert_close(normalized, expected, rtol=1e-12, atol=1e-12)


def _ties_reference(base, models, weights, density):
    """TIES written out element by element: trim, elect sign by summed mass, disjoint mean."""
    trimmed = []
    for model in models:
        delta = (model - base).flatten()
        keep = max(1, int(density * delta.numel()))
        threshold = delta.abs().sort(descending=True).values[keep - 1]
        trimmed.append(torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta)))
    out = base.flatten().clone()
    for j in range(out.numel()):
        weighted = [w * d[j].item() for w, d in zip(weights, trimmed)]
        sign = 1.0 if sum(weighted) >= 0 else -1.0
        agree = [(w, x) for w, x in zip(weights, weighted) if x != 0 and math.copysign(1.0, x) == sign]
        divisor = sum(w for w, _ in agree) or 1.0
        out[j] += sum(x for _, x in agree) / divisor
    return out.reshape(base.shape)


def test_ties_matches_trim_elect_disjoint_mean():
    base = randn(6, 8, seed=1)
    models = [base + 0.1 * randn(6, 8, seed=s) for s in (2, 3, 4)]
    weights = [0.5, 0.3, 0.7]
    out = call("ties", [*models, base], base_index=3, weight=[*weights, None], density=[0.4, 0.4, 0.4, 1.0])
    torch.testing.assert_close(out, _ties_reference(base, models, weights, 0.4), rtol=1e-10, atol=1e-12)


def test_breadcrumbs_drops_outliers_then_smallest():
    delta = torch.arange(1, 101, dtype=torch.float64)  # magnitudes 1..100
    kept = keep_middle(delta, density=0.5, rescale=False, gamma=0.1)
    expected = torch.where((delta > 40) & (delta <= 90), delta, torch.zeros_like(delta))
    torch.testing.assert_close(kept, expected)
    base = torch.zeros(100, dtype=torch.float64)
    out = call("breadcrumbs", [delta, base], base_index=1, weight=[2.0, None], density=[0.5, 1.0], gamma=[0.1, 0.01])
    torch.testing.assert_close(out, 2 * expected)


def test_magnitude_keeps_the_largest_share():
    delta = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 1.0], dtype=torch.float64)
    torch.testing.assert_close(keep_largest(delta, 0.5, rescale=False), torch.tensor([0, -5.0, 0, 2.0, 0, 1.0], dtype=torch.float64))


def test_dare_keeps_density_share_and_l1_rescales():
    delta = randn(200, 200, seed=5)
    kept = keep_random(delta, 0.3, rescale=True, generator=torch.Generator().manual_seed(0))
    share = (kept != 0).double().mean().item()
    assert abs(share - 0.3) < 0.01
    torch.testing.assert_close(kept.abs().sum(), delta.abs().sum(), rtol=1e-10, atol=0)
    nonzero = kept != 0
    ratio = kept[nonzero] / delta[nonzero]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))  # one common scale
    again = keep_random(delta, 0.3, rescale=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(kept, again)


def test_dare_linear_is_base_plus_rescaled_random_deltas():
    base = randn(50, 40, seed=1)
    model = base + randn(50, 40, seed=2)
    out = call("dare_linear", [model, base], base_index=1, weight=[1.0, None], density=[0.5, 1.0],
               generator=torch.Generator().manual_seed(3))
    delta = out - base
    assert abs((delta != 0).double().mean().item() - 0.5) < 0.03
    torch.testing.assert_close(delta.abs().sum(), (model - base).abs().sum(), rtol=1e-9, atol=0)


def test_slerp_follows_the_great_circle_and_falls_back_to_lerp():
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 2.0], dtype=torch.float64)
    out = slerp_tensors(1 / 3, a, b)
    theta = math.pi / 2
    expected = math.sin(2 * theta / 3) / math.sin(theta) * a + math.sin(theta / 3) / math.sin(theta) * b
    torch.testing.assert_close(out, expected)
    colinear = slerp_tensors(0.25, a, 3 * a)
    torch.testing.assert_close(colinear, 0.75 * a + 0.25 * 3 * a)
    base, other = randn(3, 4, seed=1), randn(3, 4, seed=2)
    torch.testing.assert_close(call("slerp", [other, base], base_index=1, t=0.0), base)
    torch.testing.assert_close(call("slerp", [other, base], base_index=1, t=1.0), other)


def test_model_stock_uses_the_angle_between_deltas():
    base = torch.zeros(4, dtype=torch.float64)
    w1 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    w2 = torch.tensor([0.5, 0.5 * math.sqrt(3), 0.0, 0.0], dtype=torch.float64)  # 60 degrees from w1
    out = call("model_stock", [w1, w2, base], base_index=2)
    cos = 0.5
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(out, t * (w1 + w2) / 2)
    rows = call("model_stock", [w1.repeat(2, 1), w2.repeat(2, 1), base.repeat(2, 1)], base_index=2, filter_wise=True)
    torch.testing.assert_close(rows, (t * (w1 + w2) / 2).repeat(2, 1))


def test_bf16_inputs_are_merged_in_bf16_like_mergekit():
    base = randn(8, 8, seed=1).to(torch.bfloat16)
    other = randn(8, 8, seed=2).to(torch.bfloat16)
    assert call("ties", [other, base], base_index=1, weight=[0.5, None], density=[0.5, 1]).dtype == torch.bfloat16
    assert call("linear", [other, base], weight=[0.5, 0.5]).dtype == torch.bfloat16


def test_layer_gradients_and_filters_resolve_like_mergekit():
    assert layer_position("model.layers.0.mlp.up_proj.weight", 5) == 0.0
    assert layer_position("model.layers.4.mlp.up_proj.weight", 5) == 1.0
    assert layer_position("model.embed_tokens.weight", 5) == 0.0
    assert evaluate([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert evaluate([0.0, 1.0], "x", 0.75) == pytest.approx(0.75)
    setting = [FilteredValue(filter="self_attn", value=[0.0, 1.0]), FilteredValue(value=0.3)]
    assert evaluate(setting, "model.layers.1.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate(setting, "model.layers.1.mlp.up_proj.weight", 0.5) == pytest.approx(0.3)
    only_mlp = [FilteredValue(filter="mlp", value=2.0)]
    assert resolve([only_mlp, 0.7], "model.norm.weight", 0.0, None) == pytest.approx(0.7)
    assert resolve([None, None], "model.norm.weight", 0.0, 1.0) == 1.0

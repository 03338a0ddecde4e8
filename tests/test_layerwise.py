"""The layer-by-layer engine's statistics pass: cut short once every target has its input,
with statistics identical to those of a full forward; bf16 Hessians close to float32 ones."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from compressor.algorithms.gptq import HessianAccumulator
from compressor.input_statistics import InputStatisticsAlgorithm
from compressor.layerwise import find_decoder_blocks, run_layerwise
from tests.layerwise_fixtures import decoder_linears, plain_forward_hessians


def test_statistics_pass_stops_after_the_last_target_and_keeps_statistics_exact(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    tokens = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    reference = plain_forward_hessians(model, tokens)

    # Count how often each block's last layer really runs its matmul.
    _, blocks = find_decoder_blocks(model)
    down_calls = [0] * len(blocks)
    for index, block in enumerate(blocks):
        block.mlp.down_proj.register_forward_hook(lambda *_a, i=index: down_calls.__setitem__(i, down_calls[i] + 1))

    seen: dict[str, torch.Tensor] = {}

    def solve(names, statistic):  # no compression: the next block sees the same inputs
        for name in names:
            seen[name] = statistic.hessian.clone()

    algorithm = InputStatisticsAlgorithm(decoder_linears(model), lambda n, d: HessianAccumulator(n, d), solve)
    run_layerwise(model, tokens, algorithm, batch_size=4, show_progress=False)

    chunks = 2
    # Block 0..n-2: propagation pass only; the last block is never propagated.
    assert down_calls == [chunks] * (len(blocks) - 1) + [0]
    assert set(seen) == set(reference)
    for name, hessian in reference.items():
        torch.testing.assert_close(seen[name], hessian, rtol=1e-4, atol=1e-5)


def test_bf16_hessian_matches_float32_within_rounding():
    torch.manual_seed(0)
    chunks = [torch.randn(256, 48, dtype=torch.bfloat16) * 3 for _ in range(6)]
    fast, exact = HessianAccumulator(48), HessianAccumulator(48)
    for chunk in chunks:
        fast.add(chunk)
        exact.add(chunk.float())
    relative = (fast.hessian - exact.hessian).norm() / exact.hessian.norm()
    assert relative < 5e-3
    assert fast.count == exact.count == 6 * 256


def test_float16_inputs_are_upcast_not_overflowed():
    big = torch.full((4096, 8), 60.0, dtype=torch.float16)  # 4096 * 3600 overflows float16
    accumulator = HessianAccumulator(8)
    accumulator.add(big)
    assert torch.isfinite(accumulator.hessian).all()
    torch.testing.assert_close(accumulator.hessian, torch.full((8, 8), 2 * 3600.0))


def test_float32_products_make_the_bf16_hessian_exact_to_float32():
    torch.manual_seed(1)
    chunks = [torch.randn(256, 48, dtype=torch.bfloat16) * 3 for _ in range(4)]
    upcast, fast, exact = HessianAccumulator(48, float32_products=True), HessianAccumulator(48), HessianAccumulator(48)
    for chunk in chunks:
        upcast.add(chunk)
        fast.add(chunk)
        exact.add(chunk.float())
    torch.testing.assert_close(upcast.hessian, exact.hessian, rtol=1e-5, atol=1e-4)
    assert (upcast.hessian - exact.hessian).norm() < (fast.hessian - exact.hessian).norm() / 10


def test_sparsegpt_collects_float32_product_hessians(monkeypatch):
    # SparseGPT chooses its masks from the inverse Hessian, so its statistics must not use the
    # bf16 shortcut GPTQ takes.
    import compressor.stages.prune_methods as prune_methods
    from tests.prune_fixtures import prune_recipe, run_stages, tiny_model

    made = []
    original = prune_methods.HessianAccumulator

    def spy(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(prune_methods, "HessianAccumulator", spy)
    run_stages(tiny_model(), prune_recipe('{method: sparsegpt, sparsity: "2:4"}'))
    assert made and all(accumulator.float32_products and accumulator.count > 0 for accumulator in made)


def test_gram_by_panels_equals_the_full_product():
    from compressor.algorithms.gptq import gram

    torch.manual_seed(2)
    for width in (48, 256, 600, 1536):
        x = torch.randn(300, width, dtype=torch.float64)
        product = gram(x)
        torch.testing.assert_close(product, x.t() @ x)
        if width > 256:  # below the first panel's rows: mirrored, not multiplied
            assert torch.equal(product[256:, :256], product[:256, 256:].t())
    x = torch.randn(512, 600, dtype=torch.bfloat16)
    reference = x.double().t() @ x.double()
    relative = (gram(x).double() - reference).norm() / reference.norm()
    assert relative < 5e-3

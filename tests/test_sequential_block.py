"""The true-sequential block pass (compressor.sequential_block): every layer is calibrated on
what the already compressed layers produce, the down projection's inputs are kept within one
hidden-state-sized buffer, and a block of another shape goes through the two-pass engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from compressor.algorithms.gptq import HessianAccumulator
from compressor.input_statistics import InputStatisticsAlgorithm
from compressor.layerwise import find_decoder_blocks, run_layerwise
from compressor.sequential_block import SequentialBlockPass, match_layout, plan_steps
from tests.layerwise_fixtures import decoder_linears, plain_forward_hessians
from tests.tiny_models import build_tiny_checkpoint


class _CoarseRounding(InputStatisticsAlgorithm):
    """Records each layer's Hessian, then 'compresses' the layer by rounding its weights to a
    coarse grid in place, so that later layers see a changed input."""

    def __init__(self, model: nn.Module, sequential: bool):
        self.seen: dict[str, torch.Tensor] = {}
        self.order: list[list[str]] = []
        super().__init__(decoder_linears(model), lambda n, d: HessianAccumulator(n, d), self._solve)
        self.sequential = sequential

    def _solve(self, names: list[str], statistic: HessianAccumulator) -> None:
        self.order.append(sorted(names))
        for name in names:
            self.seen[name] = statistic.hessian.clone()
            weight = self.modules[name].weight.data
            weight.copy_(torch.round(weight * 4) / 4)


def _model(path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


TOKENS = torch.randint(3, 300, (16, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory, tiny_tokenizer_dir):
    # Qwen3 normalizes q and k inside the attention: still one output projection at its end.
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3", tiny_tokenizer_dir)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
def test_each_layer_is_calibrated_on_the_compressed_layers_before_it(fixture, request):
    model = _model(request.getfixturevalue(fixture))
    algorithm = _CoarseRounding(model, sequential=True)
    run_layerwise(model, TOKENS, algorithm, batch_size=4, show_progress=False)

    # Groups are solved in the order the layers run: q/k/v, o, gate/up, down.
    first = algorithm.order[:4]
    assert first == [
        ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"],
        ["model.layers.0.self_attn.o_proj"],
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
        ["model.layers.0.mlp.down_proj"],
    ]
    # True sequential: every layer's Hessian is that of its input in the *final* model.
    final = plain_forward_hessians(model, TOKENS)
    assert set(algorithm.seen) == set(final)
    for name, hessian in final.items():
        torch.testing.assert_close(algorithm.seen[name], hessian, rtol=1e-4, atol=1e-5)


def test_the_two_pass_engine_differs_so_the_check_above_can_fail(tiny_llama):
    model = _model(tiny_llama)
    algorithm = _CoarseRounding(model, sequential=False)
    run_layerwise(model, TOKENS, algorithm, batch_size=4, show_progress=False)
    final = plain_forward_hessians(model, TOKENS)
    name = "model.layers.0.mlp.down_proj"
    assert (algorithm.seen[name] - final[name]).norm() > 1e-3 * final[name].norm()


def test_down_inputs_are_kept_within_one_hidden_buffer(tiny_llama):
    model = _model(tiny_llama)
    _, blocks = find_decoder_blocks(model)
    gate_calls = [0] * len(blocks)
    down_calls = [0] * len(blocks)
    for index, block in enumerate(blocks):
        block.mlp.gate_proj.register_forward_hook(lambda *_a, i=index: gate_calls.__setitem__(i, gate_calls[i] + 1))
        block.mlp.down_proj.register_forward_hook(lambda *_a, i=index: down_calls.__setitem__(i, down_calls[i] + 1))
    algorithm = _CoarseRounding(model, sequential=True)
    run_layerwise(model, TOKENS, algorithm, batch_size=4, show_progress=False)

    chunks = 4
    hidden, intermediate = model.config.hidden_size, model.config.intermediate_size
    kept = chunks * hidden // intermediate  # down inputs that fit where the hidden states' size allows
    assert 0 < kept < chunks
    # Gate runs once per chunk for down's statistics (not for its own: step 3 stops at the
    # norm), again for the chunks not kept; down once per chunk, for the output. The last
    # block is not propagated. The layout check runs block 0's first chunk twice (+2, +2).
    assert gate_calls == [2 + chunks + (chunks - kept), chunks]
    assert down_calls == [2 + chunks, 0]


def test_a_block_of_another_shape_goes_through_two_passes(tiny_llama, monkeypatch):
    model = _model(tiny_llama)
    _, blocks = find_decoder_blocks(model)
    for block in blocks:  # an extra scaling of the block output: no longer h2 + mlp(norm(h2))
        block.register_forward_hook(lambda _m, _a, output: output * 0.5)
    runs = []
    monkeypatch.setattr(SequentialBlockPass, "run", lambda self, *a: runs.append(self))
    reference = plain_forward_hessians(model, TOKENS)

    seen: dict[str, torch.Tensor] = {}

    def solve(names, statistic):
        for name in names:
            seen[name] = statistic.hessian.clone()

    algorithm = InputStatisticsAlgorithm(decoder_linears(model), lambda n, d: HessianAccumulator(n, d), solve)
    algorithm.sequential = True
    run_layerwise(model, TOKENS, algorithm, batch_size=4, show_progress=False)
    assert runs == []
    for name, hessian in reference.items():
        torch.testing.assert_close(seen[name], hessian, rtol=1e-4, atol=1e-5)


def test_steps_refuse_a_target_outside_attention_and_mlp(tiny_llama):
    model = _model(tiny_llama)
    _, blocks = find_decoder_blocks(model)
    parts = match_layout(blocks[0])
    assert parts is not None
    name = "model.layers.0"
    inside = [f"{name}.self_attn.q_proj", f"{name}.mlp.down_proj"]
    steps = plan_steps(parts, name, inside)
    assert steps is not None and steps.attention_inputs == inside[:1] and steps.mlp_output == inside[1:]
    assert plan_steps(parts, name, inside + [f"{name}.extra_proj"]) is None
    assert match_layout(nn.Linear(2, 2)) is None


def test_a_mixture_of_experts_block_has_no_layout(tmp_path, tiny_tokenizer_dir):
    # Qwen2-MoE's MLP is a router over experts, with no down projection of its own.
    model = _model(build_tiny_checkpoint(tmp_path / "moe", "qwen2_moe", tiny_tokenizer_dir))
    _, blocks = find_decoder_blocks(model)
    assert match_layout(blocks[0]) is None


def test_layers_reading_different_tensors_go_through_two_passes(tiny_llama, monkeypatch):
    model = _model(tiny_llama)
    _, blocks = find_decoder_blocks(model)
    for block in blocks:  # k reads a copy of the normalized input: the same values, another tensor
        block.self_attn.k_proj.register_forward_pre_hook(lambda _m, args: (args[0] * 1.0,))
    runs = []
    monkeypatch.setattr(SequentialBlockPass, "run", lambda self, *a: runs.append(self))
    algorithm = _CoarseRounding(model, sequential=True)
    run_layerwise(model, TOKENS, algorithm, batch_size=4, show_progress=False)
    assert runs == [] and len(algorithm.seen) == len(decoder_linears(model))


def test_attention_wider_than_the_hidden_size_recomputes_what_does_not_fit():
    # Qwen3-style heads: 4 × 32 = 128 attention columns on a 64-wide residual, so o's inputs
    # for only half the chunks fit in the buffer; the other half re-run the attention.
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "qwen3", vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=32,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    _, blocks = find_decoder_blocks(model)
    q_calls = [0] * len(blocks)
    for index, block in enumerate(blocks):
        block.self_attn.q_proj.register_forward_hook(lambda *_a, i=index: q_calls.__setitem__(i, q_calls[i] + 1))
    algorithm = _CoarseRounding(model, sequential=True)
    run_layerwise(model, TOKENS, algorithm, batch_size=4, show_progress=False)

    chunks, kept = 4, 2  # o's inputs: 128 columns where the buffer has room for 64 per token
    # q runs once per chunk for o's inputs, again for the chunks whose o input was not kept
    # (the last block too: its gate/up statistics need h + attention); +2 for block 0's check.
    assert q_calls == [2 + chunks + (chunks - kept), chunks + (chunks - kept)]
    final = plain_forward_hessians(model, TOKENS)
    for name, hessian in final.items():
        torch.testing.assert_close(algorithm.seen[name], hessian, rtol=1e-4, atol=1e-5)

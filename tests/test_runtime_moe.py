"""`compressor.load` on a mixture-of-experts checkpoint (Qwen2-MoE).

transformers 5 keeps the experts of a block as fused 3-D tensors (`experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I]) but saves them one Linear per expert
(`experts.3.up_proj.weight`); the runtime must load them through transformers' own conversion.
Here the recipe ignores the experts (`re:.*experts.*`): the quantize stage compresses the
attention, shared-expert and gate Linears and the fused experts stay dense (test_moe_experts.py
covers quantized experts).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import compressor
from tests.cli_runs import compress_into
from compressor.kernels.quant_linear import QuantLinear

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 13, 64, 3, 120]])
RECIPE = """\
name: tiny-moe-w4
calibration: {samples: 4, seq_len: 32}
stages:
  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}, ignore: [lm_head, 're:.*experts.*']}
"""


@pytest.fixture(scope="module")
def moe_w4(tiny_qwen2_moe, tmp_path_factory) -> Path:
    return compress_into(tiny_qwen2_moe, RECIPE, tmp_path_factory.mktemp("moe-w4"))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def test_moe_checkpoint_loads_with_fused_experts_and_quantized_linears(tiny_qwen2_moe, moe_w4):
    from transformers import AutoModelForCausalLM

    from compressor.kernels.gated_mlp import remove_fused_mlps

    with safe_open(str(moe_w4 / "model.safetensors"), "pt") as handle:
        assert "model.layers.0.mlp.experts.5.up_proj.weight" in handle.keys()  # saved one Linear per expert
        saved_up = handle.get_tensor("model.layers.0.mlp.experts.5.up_proj.weight")
    model = compressor.load(moe_w4)
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 14  # q/k/v/o, shared expert gate/up/down (shared_expert_gate stays dense); 2 blocks
    experts = model.model.layers[0].mlp.experts
    intermediate = experts.gate_up_proj.shape[1] // 2
    assert torch.equal(experts.gate_up_proj[5, intermediate:], saved_up)

    # The same model built by plain transformers from the source, its quantized Linears given our
    # dequantized weights: every other tensor (experts, router, norms, embeddings) must be the same.
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_moe), dtype=torch.bfloat16)
    with torch.no_grad():
        for name, module in quantized.items():
            reference.get_submodule(name).weight.copy_(module.dequantized_weight(torch.bfloat16))
    remove_fused_mlps(model)  # the shared expert's own forward, so that each layer below takes the reference path
    for module in quantized.values():
        module.forward = module.reference_forward  # dequantize then matmul: what the reference model computes
    assert torch.equal(_logits(model), _logits(reference))


def test_moe_model_saves_per_expert_names_and_reloads(moe_w4, tmp_path):
    model = compressor.load(moe_w4)
    before = _logits(model)
    model.save_pretrained(str(tmp_path / "again"))
    with safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys and "model.layers.1.mlp.experts.down_proj" not in keys
    assert torch.equal(_logits(compressor.load(tmp_path / "again")), before)

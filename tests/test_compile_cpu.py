"""torch.compile over a model with QuantLinear layers on CPU: one graph, same logits as eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.kernels.cpu_int4_avx512 import kernel_unavailable, repack_avx512
from compressor.kernels.gated_mlp import FusedGatedMlpForward, install_fused_mlps
from compressor.kernels.quant_linear import QuantLinear
from compressor.runtime import plan_for_compile
from compressor.stages.base import replace_module
from compressor.transformers_names import cache_argument
from tests.kernel_fixtures import TOLERANCE, random_quant_linear, relative_error

needs_kernel = pytest.mark.skipif(kernel_unavailable() is not None, reason=str(kernel_unavailable()))


def round_to_nearest(linear: nn.Linear, group: int = 32) -> QuantLinear:
    weight = linear.weight.detach().float()
    grouped = weight.reshape(weight.shape[0], -1, group)
    scale = grouped.abs().amax(-1).clamp(min=1e-8) / 7
    codes = torch.round(grouped / scale.unsqueeze(-1)).clamp(-8, 7).to(torch.int8).reshape(weight.shape)
    return QuantLinear.from_codes(codes, scale, None, bits=4, group_size=group, bias=linear.bias, dtype=linear.weight.dtype)


def tiny_w4_llama(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).eval()
    for name, module in list(model.model.named_modules()):
        if isinstance(module, nn.Linear):
            replace_module(model.model, name, round_to_nearest(module))
    install_fused_mlps(model, torch.device("cpu"), dtype)  # as compressor.load does (bf16 only)
    return model


def static_decode_logits(model, step, prompt: torch.Tensor, tokens: int) -> list[torch.Tensor]:
    """Greedy decode with a static cache: prefill eager, every next token through `step`."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + tokens)
    positions = torch.arange(prompt.shape[1] + tokens)
    name = cache_argument(model)
    with torch.no_grad():
        out = model(input_ids=prompt, **{name: cache}, use_cache=True, cache_position=positions[: prompt.shape[1]])
        logits = [out.logits[:, -1]]
        for index in range(prompt.shape[1], prompt.shape[1] + tokens - 1):
            token = logits[-1].argmax(-1, keepdim=True)
            out = step(input_ids=token, **{name: cache}, use_cache=True, cache_position=positions[index : index + 1])
            logits.append(out.logits[:, -1])
    return logits


@pytest.mark.parametrize(
    "dtype,kernel",
    [pytest.param(torch.bfloat16, "cpu-w4a16-avx512bf16", marks=needs_kernel), (torch.float32, "cpu-int4pack")],
)
def test_compiled_decode_is_one_graph_with_the_eager_logits(dtype, kernel):
    model = tiny_w4_llama(dtype)
    fused = [isinstance(layer.mlp.__dict__.get("forward"), FusedGatedMlpForward) for layer in model.model.layers]
    assert fused == [dtype == torch.bfloat16] * 2  # eager decode takes the fused MLP call; the graph must not
    assert set(plan_for_compile(model).values()) == {kernel}
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, dynamic=False)  # fullgraph: a break is an error
    prompt = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    eager = static_decode_logits(model, model, prompt, 4)
    traced = static_decode_logits(model, compiled, prompt, 4)
    for expected, actual in zip(eager, traced):
        assert relative_error(actual, expected.double()) <= TOLERANCE[dtype]


def test_layers_without_a_plan_compile_to_the_reference_path():
    layer = random_quant_linear(48, 64, bits=4, group_size=32, symmetric=False, dtype=torch.float32, bias=True)
    x = torch.randn(3, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)
        assert relative_error(compiled(x), layer.reference_forward(x).double()) <= TOLERANCE[torch.float32]


@needs_kernel
def test_the_kernel_operator_passes_torch_opcheck():
    layer = random_quant_linear(70, 96, bits=4, group_size=32, symmetric=False, dtype=torch.bfloat16)
    state = repack_avx512(layer)
    x = torch.randn(2, 96).to(torch.bfloat16)
    args = (x, state.packed, state.scale, state.zero_times_scale, state.group_size, state.out_features)
    torch.library.opcheck(torch.ops.compressor.w4a16_avx512bf16.default, args)
    out = torch.ops.compressor.w4a16_avx512bf16(*args)
    assert out.shape == (2, 70) and out.is_contiguous()
    assert relative_error(out, x.double() @ layer.dequantized_weight(torch.float64).t()) <= TOLERANCE[torch.bfloat16] / 2


@pytest.mark.parametrize(
    "dtype,operator",
    [pytest.param(torch.bfloat16, "compressor.w4a16_avx512bf16", marks=needs_kernel),
     (torch.float32, "aten._weight_int4pack_mm_for_cpu")],
)
def test_the_graph_calls_the_planned_kernel_once_per_layer(dtype, operator):
    model = tiny_w4_llama(dtype)
    plan_for_compile(model)
    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model.forward, backend=keep_graph, fullgraph=True, dynamic=False)(input_ids=torch.tensor([[3]]))
    targets = [str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"]
    layers = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert layers == 14 and sum(operator in target for target in targets) == layers

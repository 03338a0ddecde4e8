"""Decode speed: tokens per second of greedy decoding with a KV cache, and a dense twin to compare.

Only the decode loop is timed (one token in, one token out, cache growing), not the prompt's
prefill, since that is what a chat user waits on token by token.

Compiled decoding (``compiled_step``): each model's one-token forward through
``torch.compile(fullgraph=True, dynamic=False)`` with a static KV cache (a cache that grows
would change the graph's shapes every token); the prompt's prefill stays eager. Compiling
removes most of the per-operator Python both models pay, so it shows the kernels' share.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from compressor.transformers_names import cache_argument, returned_cache


@dataclass(frozen=True)
class DecodeTiming:
    tokens: int
    seconds: list[float]  # one per repeat

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / statistics.median(self.seconds)


@dataclass(frozen=True)
class CompiledStep:
    """A model's compiled one-token forward and the static cache length it was traced for."""

    forward: Callable[..., Any]
    max_cache_len: int


def compiled_step(model: nn.Module, max_cache_len: int) -> CompiledStep:
    from compressor.runtime import plan_for_compile

    plan_for_compile(model, rows=1)
    return CompiledStep(torch.compile(model.forward, fullgraph=True, dynamic=False), max_cache_len)


@torch.no_grad()
def _decode_once(model: nn.Module, prompt: torch.Tensor, new_tokens: int, compiled: CompiledStep | None = None) -> float:
    if compiled is None:
        cache, step, positions = None, model, None
    else:
        from transformers import StaticCache

        cache, step = StaticCache(config=model.config, max_cache_len=compiled.max_cache_len), compiled.forward
        positions = torch.arange(prompt.shape[1] + new_tokens, device=prompt.device)
    cache_name = cache_argument(model)
    extra = {} if positions is None else {"cache_position": positions[: prompt.shape[1]]}
    out = model(input_ids=prompt, use_cache=True, **{cache_name: cache}, **extra)
    cache = returned_cache(out)
    token = out.logits[:, -1:].argmax(-1)
    started = time.perf_counter()
    for index in range(new_tokens):
        extra = {} if positions is None else {"cache_position": positions[prompt.shape[1] + index : prompt.shape[1] + index + 1]}
        out = step(input_ids=token, use_cache=True, **{cache_name: cache}, **extra)
        cache = returned_cache(out)
        token = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - started


def time_decode(
    models: dict[str, nn.Module], prompt: torch.Tensor, new_tokens: int, repeats: int = 3, compile: bool = False
) -> dict[str, DecodeTiming]:
    """Decode timings for each model, runs interleaved so that load from other processes hits all alike."""
    length = prompt.shape[1] + new_tokens
    steps = {name: compiled_step(model, length) if compile else None for name, model in models.items()}
    for name, model in models.items():
        _decode_once(model, prompt, min(4, new_tokens), steps[name])  # warm-up: packing, allocator, caches, compiling
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            seconds[name].append(_decode_once(model, prompt, new_tokens, steps[name]))
    return {name: DecodeTiming(new_tokens, values) for name, values in seconds.items()}


def _dequantized_nf4(module: nn.Module) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(module.weight.data, module.weight.quant_state)


def dense_weight_functions() -> dict[type, Callable[[nn.Module], torch.Tensor]]:
    """Module class → the float weight a compressed module of that class stands for."""
    from compressor.kernels.lowrank import FactorizedLinear
    from compressor.kernels.quant_linear import QuantLinear
    from compressor.kernels.sparse_linear import SparseLinear
    from compressor.kernels.w8a8_linear import W8A8Linear

    functions: dict[type, Callable[[nn.Module], torch.Tensor]] = {
        QuantLinear: lambda m: m.dequantized_weight(),
        W8A8Linear: lambda m: m.dequantized_weight(),
        SparseLinear: lambda m: m.dense_weight(),
        FactorizedLinear: lambda m: m.dense_weight(),
    }
    try:  # NF4 checkpoints (bitsandbytes, an optional extra)
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return functions
    functions[Linear4bit] = _dequantized_nf4
    return functions


def densified(model: nn.Module) -> nn.Module:
    """A copy of `model` with every compressed layer turned into a plain Linear (see `densify`)."""
    return densify(copy.deepcopy(model))


def densify(dense: nn.Module) -> nn.Module:
    """`dense` itself, every compressed layer (quantized, W8A8/FP8, sparse, NF4, factorized) turned
    into a plain Linear holding the weight it stands for; returned for chaining.
    Low-rank compensations are left out: plain transformers does not apply them either."""
    from compressor.kernels.gated_mlp import remove_fused_mlps
    from compressor.stages.base import replace_module

    functions = dense_weight_functions()
    remove_fused_mlps(dense)  # the twin runs transformers' own modules throughout
    for name, module in list(dense.named_modules()):
        dense_weight = functions.get(type(module))
        if dense_weight is None:
            continue
        with torch.no_grad():
            weight = dense_weight(module)
        bias = getattr(module, "bias", None)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
        linear.weight.data.copy_(weight)
        if bias is not None:
            linear.bias.data.copy_(bias.data)
        linear.requires_grad_(False)
        replace_module(dense, name, linear)
    return dense

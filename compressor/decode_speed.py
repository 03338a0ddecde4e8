"""Decode speed: tokens per second of greedy decoding with a KV cache, and a dense twin to compare.

Only the decode loop is timed (one token in, one token out, cache growing), not the prompt's
prefill, since that is what a chat user waits on token by token.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DecodeTiming:
    tokens: int
    seconds: list[float]  # one per repeat

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / statistics.median(self.seconds)


@torch.no_grad()
def _decode_once(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    out = model(input_ids=prompt, use_cache=True)
    cache = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    started = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - started


def time_decode(models: dict[str, nn.Module], prompt: torch.Tensor, new_tokens: int, repeats: int = 3) -> dict[str, DecodeTiming]:
    """Decode timings for each model, runs interleaved so that load from other processes hits all alike."""
    for model in models.values():
        _decode_once(model, prompt, min(4, new_tokens))  # warm-up: packing, allocator, caches
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            seconds[name].append(_decode_once(model, prompt, new_tokens))
    return {name: DecodeTiming(new_tokens, values) for name, values in seconds.items()}


def densified(model: nn.Module) -> nn.Module:
    """A copy of `model` with every quantized layer turned into a plain Linear (dequantized weight)."""
    from compressor.kernels.quant_linear import QuantLinear
    from compressor.stages.base import replace_module

    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, QuantLinear):
            weight = module.dequantized_weight()
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               dtype=weight.dtype, device=weight.device)
            linear.weight.data.copy_(weight)
            if module.bias is not None:
                linear.bias.data.copy_(module.bias.data)
            linear.requires_grad_(False)
            replace_module(dense, name, linear)
    return dense

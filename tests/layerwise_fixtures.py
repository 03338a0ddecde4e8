"""Shared by the layer-by-layer engine tests: the decoder's Linear layers, and the Hessian of
each one's input from one plain forward of the model as it stands."""

from __future__ import annotations

import torch
from torch import nn


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def plain_forward_hessians(model: nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """H = 2/n Σ x xᵀ of every decoder Linear's input, in float64 from a forward in chunks of 4."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def grab(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.t() @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return grab

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in decoder_linears(model).items()]
    with torch.no_grad():
        for chunk in tokens.split(4):
            model(input_ids=chunk, use_cache=False)
    for handle in handles:
        handle.remove()
    return {n: (2.0 * sums[n] / counts[n]).float() for n in sums}

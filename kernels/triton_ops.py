"""The Triton W4A16/W8A16 matmul as a torch custom op, so ``torch.compile`` and CUDA graphs
see one opaque, shape-described call (the fake implementation gives the output's shape).

``compressor::wxa16_linear(x, packed, scale, zero, bits, group_size, counters=None)``:
x [..., K] → [..., N]. ``counters`` (int32 zeros, one per 16 output columns) is the split-K
kernels' scratch; the kernel leaves it zero again, so the op does not mutate it as
far as any caller can see. A layer passes its own (one allocation, not a memset per call);
without it the op allocates zeros per call. Two streams running the same layer at once would
share the counters: don't.
The backward pass with respect to ``x`` multiplies by the dequantized weight (frozen
weights: no gradient for the packed tensors). The Triton module is imported on first call,
so ``TRITON_INTERPRET`` can still be set before that.
"""

from __future__ import annotations

from typing import Optional

import torch

from compressor.kernels.reference import dequantize_packed


@torch.library.custom_op("compressor::wxa16_linear", mutates_args=())
def wxa16_linear(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int, group_size: int,
    counters: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    from compressor.kernels.triton_wxa16 import wxa16_matmul

    k = x.shape[-1]
    out = wxa16_matmul(x.reshape(-1, k), packed, scale, zero, bits, group_size, counters=counters)
    return out.reshape(*x.shape[:-1], scale.shape[0])


@wxa16_linear.register_fake
def _wxa16_linear_fake(x, packed, scale, zero, bits, group_size, counters=None):
    return x.new_empty((*x.shape[:-1], scale.shape[0]))


def _setup_context(ctx, inputs, output):
    x, packed, scale, zero, bits, group_size, _counters = inputs
    ctx.save_for_backward(packed, scale, zero)
    ctx.bits = bits
    ctx.in_features = x.shape[-1]


def _backward(ctx, grad):
    packed, scale, zero = ctx.saved_tensors
    weight = dequantize_packed(packed, scale, zero, ctx.bits, ctx.in_features, grad.dtype)
    return grad @ weight, None, None, None, None, None, None


wxa16_linear.register_autograd(_backward, setup_context=_setup_context)

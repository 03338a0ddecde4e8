"""W8A8 int8 and FP8 matmuls as one torch custom op, so ``torch.compile`` sees a single
shape-described call (the fake implementation gives the output's shape and dtype).

``compressor::w8a8_linear(x, weight_t, weight_scale, input_scale, bias)``: x [M, K] → [M, N] in
x's dtype. The op quantizes ``x`` itself (one scale per row when ``input_scale`` is None, the
static per-tensor scale otherwise), then multiplies codes by codes:

- int8 weights: ``torch._int_mm`` (int8 × int8 → exact int32), then ``acc · s_x · s_w`` in fp32;
- FP8 e4m3 weights: ``torch._scaled_mm`` with row-wise scales (``[M, 1]`` for the input,
  ``[1, N]`` for the weight), which applies both scales inside the op.

``weight_t`` is the stored [N, K] code matrix transposed (a view: column-major [K, N], the
layout ``_scaled_mm`` requires and the faster one for ``_int_mm`` at decode sizes).

Backward with respect to ``x`` (frozen weights): ``grad · W`` with the dequantized weight, i.e.
the activation quantization is passed straight through, the same gradient as
``W8A8Linear.reference_forward``.
"""

from __future__ import annotations

from typing import Optional

import torch

from compressor.kernels.w8a8_linear import quantize_per_tensor, quantize_per_token


def _code_kind(weight_t: torch.Tensor) -> str:
    return "int" if weight_t.dtype == torch.int8 else "float"


def _quantize_rows(x: torch.Tensor, input_scale: Optional[torch.Tensor], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] → codes [M, K] and a float32 scale per row [M, 1]."""
    if input_scale is None:
        return quantize_per_token(x, kind)
    scale = input_scale.float().reshape(1, 1)
    return quantize_per_tensor(x, scale, kind), scale.expand(x.shape[0], 1).contiguous()


def w8a8_linear_eager(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    kind = _code_kind(weight_t)
    codes, row_scale = _quantize_rows(x, input_scale, kind)
    if kind == "int":
        out = torch._int_mm(codes, weight_t).float() * row_scale * weight_scale
    else:
        # Row-wise scaled FP8 GEMMs on CUDA produce bf16 only; on CPU fp32 keeps the exact sum.
        out_dtype = torch.bfloat16 if x.device.type == "cuda" else torch.float32
        out = torch._scaled_mm(codes, weight_t, scale_a=row_scale, scale_b=weight_scale, out_dtype=out_dtype).float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# The op's dispatcher wrapper costs ~0.2 ms a call on this CPU (as much as a decode-sized int8
# matmul), so eager calls that need neither autograd nor tracing call the function itself.
w8a8_linear = torch.library.custom_op("compressor::w8a8_linear", mutates_args=())(w8a8_linear_eager)


def needs_custom_op(x: torch.Tensor) -> bool:
    """True under torch.compile / export, or when autograd must record the op's backward."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad)


@w8a8_linear.register_fake
def _w8a8_linear_fake(x, weight_t, weight_scale, input_scale, bias):
    return x.new_empty((x.shape[0], weight_t.shape[1]))


def _setup_context(ctx, inputs, output):
    x, weight_t, weight_scale, input_scale, bias = inputs
    ctx.save_for_backward(weight_t, weight_scale)


def _backward(ctx, grad):
    weight_t, weight_scale = ctx.saved_tensors
    dequantized_t = weight_t.float() * weight_scale  # [K, N]
    grad_x = (grad.float() @ dequantized_t.t()).to(grad.dtype)
    return grad_x, None, None, None, None


w8a8_linear.register_autograd(_backward, setup_context=_setup_context)

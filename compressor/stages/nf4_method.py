"""`method: nf4`: bitsandbytes 4-bit NormalFloat, the QLoRA base format.

Each targeted Linear becomes a ``bitsandbytes.nn.Linear4bit`` whose weight bitsandbytes itself
quantizes (blocks of 64 weights, one absmax each; with ``double_quant`` the absmaxes are
quantized again to 8 bits in blocks of 256). The model's config gets the matching
``BitsAndBytesConfig``, so ``save_pretrained`` writes what transformers writes for a model
loaded with ``load_in_4bit``: packed ``weight`` plus the ``weight.absmax`` /
``weight.quant_map`` / ``weight.nested_*`` / ``weight.quant_state.bitsandbytes__nf4`` tensors,
and ``quantization_config.quant_method: bitsandbytes`` in config.json. Plain
``AutoModelForCausalLM.from_pretrained(OUT)`` then loads it as a 4-bit model (QLoRA-ready).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressor.errors import CompressionError
from compressor.stages.base import StageContext, replace_module
from compressor.stages.nf4_layout import keep_serialized_layout

NF4_BLOCK_SIZE = 64  # what bitsandbytes uses for 4-bit weights; not configurable there
NF4_CPU_ROW_BLOCK = 32  # rows bitsandbytes' CPU repack (_convert_weight_packed_for_cpu) packs together


def _bnb():
    try:
        import bitsandbytes
    except ImportError as err:  # pragma: no cover - bitsandbytes is a declared dependency
        raise CompressionError(f"method nf4 needs bitsandbytes: {err}") from None
    return bitsandbytes


def to_linear4bit(module: nn.Linear, *, double_quant: bool, device: torch.device) -> nn.Module:
    """A bitsandbytes NF4 Linear holding `module`'s weight, quantized on `device`."""
    bnb = _bnb()
    compute_dtype = module.weight.dtype if module.weight.dtype.is_floating_point else torch.bfloat16
    new = bnb.nn.Linear4bit(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
        device="meta",
    )
    new.weight = bnb.nn.Params4bit(
        module.weight.data.detach().to("cpu"),
        requires_grad=False,
        quant_type="nf4",
        blocksize=NF4_BLOCK_SIZE,
        compress_statistics=double_quant,
    )
    if module.bias is not None:
        new.bias = nn.Parameter(module.bias.data.detach().to("cpu"), requires_grad=False)
    new.train(module.training)
    # Perplexity and evaluation run before the save: they must not leave bitsandbytes' CPU layout behind.
    keep_serialized_layout(new)
    return new.to(device)  # moving a Params4bit to a device is what quantizes it


def bitsandbytes_config(model: nn.Module, quantized: set[str], double_quant: bool, compute_dtype: torch.dtype):
    """The BitsAndBytesConfig for `model`: every Linear not in `quantized` is listed as skipped."""
    from transformers import BitsAndBytesConfig

    skipped = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, _bnb().nn.Linear4bit) and name not in quantized
    ]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skipped or None,
    )


class NF4Method:
    calibrated = False
    layer_class = "Linear4bit"
    # transformers' bitsandbytes loader reads MoE experts only as its fused tensors: keep them so.
    splits_experts = False

    def skip_reason(self, module: nn.Linear) -> str | None:
        # bitsandbytes' CPU kernel reshapes the absmaxes to [out, in / 64]: whole blocks per row.
        if module.in_features % NF4_BLOCK_SIZE:
            return f"{module.in_features} input features are not a multiple of the NF4 block ({NF4_BLOCK_SIZE})"
        # On AVX-512 BF16 CPUs its inference forward repacks 32 output rows at a time and asserts
        # otherwise, in plain transformers as in compressor.load (Qwen2-MoE's 1-row shared_expert_gate).
        if module.out_features % NF4_CPU_ROW_BLOCK:
            return f"{module.out_features} output features are not a multiple of {NF4_CPU_ROW_BLOCK} (bitsandbytes' CPU kernel)"
        return None

    def describe(self, module: nn.Linear, config: Any) -> str:
        return f"nf4 block {NF4_BLOCK_SIZE}" + (" + double quant" if config.double_quant else "")

    def quantize(self, model, modules, grids, config, ctx: StageContext) -> None:
        bnb = _bnb()
        dtype = next(iter(modules.values())).weight.dtype
        for name, module in modules.items():
            device = module.weight.device
            replace_module(model, name, to_linear4bit(module, double_quant=config.double_quant, device=device))
            ctx.records[name] = {
                "stage": "quantize", "method": "nf4", "block_size": NF4_BLOCK_SIZE, "double_quant": config.double_quant,
            }
        quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        model.config.quantization_config = bitsandbytes_config(model, quantized, config.double_quant, dtype)

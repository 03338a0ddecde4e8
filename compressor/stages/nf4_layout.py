"""Keep bitsandbytes NF4 layers in the layout bitsandbytes serializes.

On a CPU with AVX-512 BF16, bitsandbytes 0.50's ``Linear4bit.forward`` (eval mode, no grad)
repacks the weight in place for its CPU kernel: nibbles reordered in blocks of 32 rows, the
absmaxes dequantized, cast to bf16 and transposed to ``[in / 64, out]``. Its save path undoes
the repack with ``_convert_weight_packed_for_cpu_inverse``, which restores the weight but leaves
plain (not double-quantized) absmaxes transposed: the checkpoint then loads with scales of the
wrong blocks. A held-out perplexity or an ``evaluate:`` block before the save was enough.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def disable_cpu_repack(layer: nn.Module) -> None:
    """Forwards keep the serialized layout (bitsandbytes' dequantize-and-matmul path): the
    checkpoint then holds the exact float32 absmaxes, which a repack would round to bf16."""
    layer.support_avx512bf16_for_cpu = False


def restore_serialized_layout(layer: nn.Module) -> bool:
    """Undo a CPU repack of `layer`'s weight in place; False when it was not repacked.

    The absmaxes come back in bitsandbytes' order and dtype, but rounded to bf16 by the repack."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return False
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not state.nested and state.absmax.dim() == 2:
        # The inverse re-quantizes nested absmaxes from [in / 64, out] but leaves plain ones as they are.
        state.absmax = state.absmax.T.reshape(-1).float().contiguous()
    weight.data, weight.quant_state = data, state  # the same QuantState object, changed in place
    return True


def _restore_before_save(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    restore_serialized_layout(module)


def restore_layout_on_save(layer: nn.Module) -> Any:
    """Every ``state_dict()`` of `layer` (``save_pretrained``, stage checkpoints) first undoes a
    CPU repack; runs before bitsandbytes' own incomplete inverse. Returns the hook handle."""
    return layer.register_state_dict_pre_hook(_restore_before_save)


def keep_serialized_layout(layer: nn.Module) -> None:
    """What the nf4 method applies to each layer it makes: no repack, and a save-time guard
    for code that turns the repack back on."""
    disable_cpu_repack(layer)
    restore_layout_on_save(layer)


def _drop_bitsandbytes_deserialize(model: nn.Module) -> None:
    """transformers 5 records the step that turned the stored NF4 tensors into ``Params4bit`` and
    tries to reverse it on ``save_pretrained``, which raises NotImplementedError (5.23; see
    huggingface/transformers#45743). ``Linear4bit``'s state_dict already is the stored form: nothing to reverse."""
    from transformers.integrations.bitsandbytes import Bnb4bitDeserialize

    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [
            c for c in conversions if not any(isinstance(op, Bnb4bitDeserialize) for op in getattr(c, "operations", ()))
        ]


def guard_loaded_bitsandbytes(model: nn.Module, *, keep_exact: bool) -> dict[str, str]:
    """For a model transformers loaded from a bitsandbytes checkpoint: ``save_pretrained`` works
    and writes the layout bitsandbytes serializes. `keep_exact` also turns the CPU repack off, so
    a re-save keeps the float32 absmaxes bit for bit (at the cost of bitsandbytes' fastest CPU
    path): what a model that is compressed further needs. Returns {layer name: format}."""
    from bitsandbytes.nn import Linear4bit

    _drop_bitsandbytes_deserialize(model)
    formats = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            if keep_exact:
                disable_cpu_repack(module)
            restore_layout_on_save(module)
            formats[name] = f"bitsandbytes-{module.weight.quant_type}"
    return formats

"""peft LoRA on the project's QuantLinear, through peft's custom-module mapping.

peft knows nothing of QuantLinear (it is not an ``nn.Linear`` and has no ``weight``). Its
``LoraConfig._register_custom_module({QuantLinear: QuantLoraLinear})`` hook lets peft wrap it
with the class below: peft's own dense LoRA layer, told the layer's shape, with merging refused
(the base is packed integers; adding a float delta would need re-quantization and would lose
the adapter in rounding). The frozen base runs its own forward (differentiable with respect
to its input), and the adapter is added on top.
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from compressor.kernels.quant_linear import QuantLinear


class QuantLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear around a QuantLinear base."""

    def _get_in_out_features(self, module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "a LoRA adapter cannot be merged into packed integer weights; keep it as an adapter"
            " (compressor saves it as OUT/lowrank_adapter) or merge into the bf16 model before quantizing"
        )

    def unmerge(self) -> None:  # nothing is ever merged
        return None


def lora_config_for_quantized(**kwargs: Any) -> LoraConfig:
    """A LoraConfig that wraps QuantLinear layers (and nn.Linear as usual)."""
    config = LoraConfig(**kwargs)
    config._register_custom_module({QuantLinear: QuantLoraLinear})
    return config


class device_anchors:
    """While peft injects adapters it asks each target for a weight tensor to learn its device
    (``qweight``/``weight``/first parameter); a symmetric QuantLinear without bias has none of
    these. Point ``qweight`` at the packed codes for the duration (a plain attribute, not a
    buffer: nothing is saved), and remove it afterwards."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, QuantLinear) and not hasattr(m, "qweight")]

    def __enter__(self):
        for layer in self.layers:
            object.__setattr__(layer, "qweight", layer.weight_packed)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            object.__delattr__(layer, "qweight")

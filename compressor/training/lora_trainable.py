"""`train: lora` for distillation: peft LoRA factors on frozen layers, the only tensors that train.

The adapters come from the same code as the `lowrank` stage's `method: lora`
(`compressor.lora_training.inject_lora`: peft, with QuantLinear wrapped through peft's custom
module mapping), injected into the model in place, so the distillation loop, DDP and
gradient checkpointing see an ordinary module tree. Every base tensor stays frozen and
unchanged (packed codes, scales, zero points, pruned weights). When training ends the peft
wrappers are removed and each adapter stays on its layer as a compensation term
(`compressor.kernels.lowrank`), which the pipeline saves as the peft adapter
OUT/lowrank_adapter, the same place and format as the lowrank stage's.
"""

from __future__ import annotations

from torch import nn

from compressor.lora_training import inject_lora, keep_as_compensations
from compressor.training.trainable import TrainableSet


def select_lora_trainable(model: nn.Module, targets: list[str], *, rank: int, alpha: float, dropout: float) -> TrainableSet:
    """Freeze `model`, inject LoRA on `targets` (module names); the adapters are the trainable set."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    peft_model = inject_lora(model, targets, rank=rank, alpha=alpha, dropout=dropout)
    trainable = TrainableSet()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:  # peft leaves only lora_A / lora_B trainable
            parameter.data = parameter.data.float()  # fp32 masters, as for the other modes
            trainable.named[name] = parameter

    def restore() -> None:
        keep_as_compensations(peft_model, targets)
        for parameter in model.parameters():
            parameter.requires_grad_(False)

    trainable._restores.append(restore)
    return trainable

"""Train LoRA adapters with peft on a frozen model (compressed or not), then keep them as
compensation terms on the base layers so the model saves in its own format.

The base stays frozen and unchanged: only the adapters' parameters reach the optimizer. After
training, peft's wrappers are removed (``unload``, no merge: merging into packed integers is
impossible without re-quantizing) and each adapter becomes a ``LowRankCompensation`` with the
LoRA scaling folded into B, which ``compressor.adapters`` saves as a peft adapter folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.kernels.lowrank import attach_compensation
from compressor.peft_quant import device_anchors, lora_config_for_quantized
from compressor.training.stability import clip_gradients, warmup_cosine_schedule


@dataclass
class LoRAResult:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)  # before clipping
    learning_rates: list[float] = field(default_factory=list)  # the lr each step used


def train_lora_on(
    model: nn.Module,
    targets: list[str],
    tokens: torch.Tensor,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    max_grad_norm: float,
    warmup_steps: int,
) -> LoRAResult:
    """Causal-LM LoRA training on token windows [N, L]; adapters end up attached to `model`.

    lr: linear warm-up over `warmup_steps`, then cosine to 0; gradients clipped to global norm
    `max_grad_norm` (0: no clipping), as in `compress finetune`."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    peft_model = inject_lora(model, targets, rank=rank, alpha=alpha, dropout=dropout)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps, steps)
    device = next(model.parameters()).device
    result = LoRAResult()
    peft_model.train()
    for _ in range(steps):
        rows = torch.randint(0, tokens.shape[0], (min(batch_size, tokens.shape[0]),), generator=generator)
        batch = tokens[rows].to(device)
        loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        result.grad_norms.append(clip_gradients(trainable, max_grad_norm))
        result.learning_rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(float(loss.detach()))
    base = keep_as_compensations(peft_model, targets)
    for name, parameter in base.named_parameters():
        parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))
    base.train(was_training)
    return result


def inject_lora(model: nn.Module, targets: list[str], *, rank: int, alpha: float, dropout: float) -> nn.Module:
    """peft LoRA layers on `targets` (Linear or QuantLinear), injected into `model` in place;
    returns the peft wrapper. Only the adapters require gradients afterwards."""
    from peft import get_peft_model

    config = lora_config_for_quantized(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM"
    )
    with device_anchors(model):
        return get_peft_model(model, config)


def keep_as_compensations(peft_model: nn.Module, targets: list[str]) -> nn.Module:
    """Remove peft's wrappers (no merge) and attach each trained adapter to its base layer as a
    compensation term, LoRA scaling folded into B; returns the base model."""
    adapters = {}
    for name in targets:
        layer = peft_model.base_model.model.get_submodule(name)
        scaling = layer.scaling["default"]
        adapters[name] = (layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach() * scaling)
    base = peft_model.unload()
    for name, (a, b) in adapters.items():
        layer = base.get_submodule(name)
        dtype = _layer_dtype(layer)
        attach_compensation(layer, a.to(dtype), b.to(dtype), "lora")
    return base


def _layer_dtype(layer: nn.Module) -> torch.dtype:
    scale = getattr(layer, "weight_scale", None)
    return scale.dtype if scale is not None else layer.weight.dtype

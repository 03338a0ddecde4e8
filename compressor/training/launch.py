"""Which `accelerate launch` configurations the training loops run under, and the Accelerator for each.

Data-parallel launches (`--multi_gpu`, several processes; gloo on a CPU) and DeepSpeed ZeRO
stage 1 or 2 are supported. Both keep every parameter whole on every process, so the trainable
set (fp32 masters, scales, zero points, LoRA factors) and the pruning masks apply unchanged.

Refused, before any weight is read:
- FSDP (version 1 or 2). accelerate enables it only for GPU-family processes: on a CPU it
  silently runs something else (`Accelerator(cpu=True)`: plain DDP; otherwise every process
  alone, unsynchronised), and with `fsdp_sync_module_states: true` it stops with "There are
  currently no available devices found". So no FSDP run can be tested on the CPU machines this
  project is built on, and FSDP shards the very tensors the masks cover.
- DeepSpeed ZeRO stage 3: it partitions the parameters, so each process would hold a slice of
  the masks' tensors and of the QuantLinear scales the training forward reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from compressor.errors import UserError
from compressor.extras import require_extra

Backend = Literal["data_parallel", "deepspeed"]

_TRUE = ("1", "true", "yes")


def _flag(environ: Mapping[str, str], variable: str) -> bool:
    return environ.get(variable, "").lower() in _TRUE


def check_launch(environ: Mapping[str, str]) -> None:
    """Refuse what `accelerate launch` asked for when the loops cannot honour it (see the module docstring)."""
    if _flag(environ, "ACCELERATE_USE_FSDP"):
        raise UserError(
            "the distill stage does not run under an accelerate FSDP config: accelerate enables FSDP only on GPUs"
            " (on a CPU it silently falls back to unsharded copies), so it is untested here, and FSDP shards the"
            " tensors the pruning masks cover; launch it data-parallel (accelerate launch --multi_gpu"
            " --num_processes N) or with a DeepSpeed ZeRO stage 1 or 2 config"
        )
    if _flag(environ, "ACCELERATE_USE_DEEPSPEED"):
        require_extra("deepspeed", "this launch (a DeepSpeed config)")
        if environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip() == "3":
            raise UserError(_ZERO3)


_ZERO3 = (
    "the distill stage does not run under DeepSpeed ZeRO stage 3 (it partitions the parameters the masks"
    " and quantization scales cover); use zero_stage 1 or 2, or a data-parallel launch"
)


def launch_backend(environ: Mapping[str, str]) -> Backend:
    return "deepspeed" if _flag(environ, "ACCELERATE_USE_DEEPSPEED") else "data_parallel"


def make_accelerator(cpu: bool, backend: Backend):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if backend == "deepspeed":
        # accelerate switches to DeepSpeed only when `cpu` is False, and without a GPU it finds no
        # process-group backend (each process then believes it is alone): name gloo for it.
        handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
        return Accelerator(cpu=False, kwargs_handlers=handlers)
    return Accelerator(cpu=cpu)


def configure_deepspeed(accelerator, *, batch_size: int, gradient_accumulation: int, max_grad_norm: float | None) -> None:
    """The recipe owns the batch, accumulation and clipping; the accelerate config owns the sharding.

    DeepSpeed clips and accumulates inside its engine, so the recipe's values are written into its
    config before `prepare` (a launch config's own values for these keys are replaced)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin.zero_stage not in (0, 1, 2):
        raise UserError(_ZERO3)
    config = plugin.deepspeed_config
    for key in ("fp16", "bf16"):
        if config.get(key, {}).get("enabled") is True:
            raise UserError(
                f"the distill stage keeps fp32 master weights and autocasts by itself; DeepSpeed's {key} mode would"
                " cast them down: launch with mixed_precision: 'no'"
            )
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["gradient_accumulation_steps"] = gradient_accumulation
    config["train_batch_size"] = batch_size * gradient_accumulation * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm if max_grad_norm is not None else 0.0

"""Checks that stop a run early with a clear message: non-finite numbers and a full disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from compressor.errors import CompressionError, UserError

# Room for the tokenizer, config, recipe and metadata written beside the weights.
_METADATA_ALLOWANCE = 64 * 1024 * 1024


def assert_finite(model: nn.Module, stage: str) -> None:
    """Raise naming the first module and tensor holding NaN or Inf after `stage`."""
    for module_name, module in model.named_modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for tensor_name, tensor in tensors:
            if not tensor.is_floating_point() or tensor.device.type == "meta":
                continue
            values = tensor.float() if tensor.element_size() == 1 else tensor  # FP8 has no isfinite kernel
            if not torch.isfinite(values).all():
                raise CompressionError(
                    f"{stage} left NaN or Inf in {module_name or 'the model'}.{tensor_name}; nothing was written"
                )


def state_bytes(model: nn.Module) -> int:
    """Bytes the model's tensors take when saved (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.state_dict(keep_vars=True).values()):
        if tensor.device.type == "meta":
            continue
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def check_free_space(out_dir: Path, expected_bytes: int) -> None:
    """Refuse to start writing when the disk holding OUT cannot take the checkpoint."""
    anchor = out_dir.resolve()
    while not anchor.exists():
        anchor = anchor.parent
    free = shutil.disk_usage(anchor).free
    needed = expected_bytes + _METADATA_ALLOWANCE
    if free < needed:
        raise UserError(
            f"not enough free disk space: the checkpoint needs about {needed / 1e6:.0f} MB, {free / 1e6:.0f} MB are free",
            where=str(out_dir),
        )

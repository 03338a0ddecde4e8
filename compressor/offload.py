"""Models larger than memory: load with an accelerate device map that leaves what does not fit
in `--max-memory` on disk, and bring weights into memory one decoder block at a time.

accelerate attaches an AlignDevicesHook to every offloaded module; its weights sit on the meta
device and are read from the checkpoint's safetensors (memory-mapped) for each forward. The
layer-by-layer engine calls `onload` on a block before calibrating it: the block's weights are
read once, the hook is removed, and the block becomes an ordinary in-memory module that the
algorithm compresses in place. Compressed blocks are a fraction of the dense size, so the
dense model never has to fit in memory at once; only one dense block does.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


def parse_memory_size(text: str) -> int:
    """Bytes in a size such as `2GiB`, `500MB` or `1000000` (the format accelerate reads)."""
    from accelerate.utils import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GiB or 500MB, got {text!r}") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return size


def offload_device_map(max_memory_bytes: int) -> dict:
    """`from_pretrained` arguments that keep at most `max_memory_bytes` of weights in CPU memory
    (and on each GPU) and leave the rest on disk."""
    budget: dict = {"cpu": max_memory_bytes}
    for index in range(torch.cuda.device_count()):
        budget[index] = max_memory_bytes
    return {"device_map": "auto", "max_memory": budget}


def is_dispatched(model: nn.Module) -> bool:
    """Loaded with a device map (accelerate hooks attached)."""
    return hasattr(model, "hf_device_map") or any(hasattr(m, "_hf_hook") for m in model.modules())


def has_offloaded_weights(model: nn.Module) -> bool:
    from accelerate.utils import has_offloaded_params

    return any(has_offloaded_params(module) for module in model.modules())


def onload(module: nn.Module) -> None:
    """Read every offloaded weight under `module` into memory and drop accelerate's hooks there,
    so the weights can be changed in place and modules replaced freely."""
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import has_offloaded_params

    offloaded = [m for m in module.modules() if has_offloaded_params(m)]
    if not offloaded:
        return
    for sub in offloaded:
        sub._hf_hook.pre_forward(sub)  # places the weights on the hook's execution device
    for sub in offloaded:
        remove_hook_from_module(sub)


def undispatch(model: nn.Module) -> None:
    """Every weight in memory and every accelerate hook gone: an ordinary model again, which
    stages that read whole weights and `save_pretrained` can treat like any other."""
    from accelerate.hooks import remove_hook_from_module

    onload(model)
    remove_hook_from_module(model, recurse=True)
    if hasattr(model, "hf_device_map"):
        del model.hf_device_map
    # Onloading gives tied parameters (embeddings and lm_head) separate copies: tie them again.
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def compute_device(module: nn.Module) -> torch.device:
    """Where `module` runs: its hook's execution device when offloaded, else its weights' device."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")

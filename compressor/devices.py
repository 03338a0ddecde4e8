"""Whether a torch device exists on this machine: one check for every `--device` flag and for
`compressor.load(device=...)`, so a bad device is one line instead of torch's own error later."""

from __future__ import annotations

from typing import Callable

import torch


def _device_counts() -> dict[str, Callable[[], int]]:
    """How many devices of each supported type this machine has (0: none, or torch built without it)."""
    xpu = getattr(torch, "xpu", None)
    return {
        "cpu": lambda: 1,  # torch ignores a CPU index, so `cpu:N` is not checked against this
        "cuda": lambda: torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "mps": lambda: 1 if torch.backends.mps.is_available() else 0,
        "xpu": lambda: xpu.device_count() if xpu is not None and xpu.is_available() else 0,
    }


def device_problem(device: str | torch.device) -> str | None:
    """Why `device` cannot be used here (None: it can): unknown to torch, a type we do not
    support, none of that type on this machine, or an index past the ones it has."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        return f"unknown device {str(device)!r} (use cpu, cuda or cuda:N)"
    count = _device_counts().get(parsed.type)
    if count is None:
        return f"unsupported device {str(device)!r} (use cpu, cuda or cuda:N)"
    available = count()
    if available == 0:
        return f"{str(device)!r}: {parsed.type.upper()} is not available on this machine"
    if parsed.type != "cpu" and parsed.index is not None and parsed.index >= available:
        return f"{str(device)!r}: this machine has {available} {parsed.type.upper()} devices"
    return None

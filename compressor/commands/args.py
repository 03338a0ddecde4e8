"""argparse pieces every subcommand shares: one-line errors with exit code 2, typed flags."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}")
    return value


def example_limit(text: str) -> int | float:
    """lm-eval's `--limit`: a count of examples per task, or a fraction of each task below 1 (`0.1`)."""
    message = f"expected a positive whole number of examples or a fraction between 0 and 1, got {text!r}"
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        fraction = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None
    if not 0 < fraction < 1:
        raise argparse.ArgumentTypeError(message)
    return fraction


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _device_counts() -> dict[str, Callable[[], int]]:
    """How many devices of each supported type this machine has (0: none, or torch built without it)."""
    import torch

    xpu = getattr(torch, "xpu", None)
    return {
        "cpu": lambda: 1,  # torch ignores a CPU index, so `cpu:N` is not checked against this
        "cuda": lambda: torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "mps": lambda: 1 if torch.backends.mps.is_available() else 0,
        "xpu": lambda: xpu.device_count() if xpu is not None and xpu.is_available() else 0,
    }


def device_name(text: str) -> str:
    """A torch device string that exists on this machine (`cpu`, `cuda`, `cuda:1`, `mps`, `xpu`)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (use cpu, cuda or cuda:N)") from None
    count = _device_counts().get(device.type)
    if count is None:
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (use cpu, cuda or cuda:N)")
    available = count()
    if available == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: {device.type.upper()} is not available on this machine")
    if device.type != "cpu" and device.index is not None and device.index >= available:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {available} {device.type.upper()} devices")
    return text

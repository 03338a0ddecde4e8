"""argparse pieces every subcommand shares: one-line errors with exit code 2, typed flags."""

from __future__ import annotations

import argparse
import importlib.util
import sys


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message}{self._dashed_hint(message)}", file=sys.stderr)
        raise SystemExit(2)

    def _dashed_hint(self, message: str) -> str:
        """lm-eval and transformers spell flags with underscores (`--num_fewshot`); ours have dashes."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        for word in message.split()[2:]:
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and "_" in flag and flag.replace("_", "-") in self._option_string_actions:
                return f" (this command spells it {flag.replace('_', '-')})"
        return ""


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


def quiet_datasets() -> None:
    """No progress bars from `datasets`, through which lm-eval's tasks and the calibration read their data."""
    if importlib.util.find_spec("datasets") is None:  # an optional extra: nothing to quiet without it
        return
    import datasets

    datasets.disable_progress_bars()


def device_name(text: str) -> str:
    """A torch device string that exists on this machine (`cpu`, `cuda`, `cuda:1`, `mps`, `xpu`)."""
    from compressor.devices import device_problem

    problem = device_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text

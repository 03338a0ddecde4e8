"""Subcommands of `compress`, one module each.

Each module defines ``run(argv: list[str]) -> int``. The table maps the subcommand word to
its module, imported only when that subcommand runs (so `compress recipes` stays fast).
Plain `compress MODEL --recipe R` is the ``compress`` module.
"""

from __future__ import annotations

import importlib
from typing import Callable

SUBCOMMAND_MODULES: dict[str, str] = {
    "recipes": "compressor.commands.recipes",
    "generate": "compressor.commands.generate", "bench": "compressor.commands.bench",
    "densify": "compressor.commands.densify",
    "merge": "compressor.commands.merge",
    "push": "compressor.commands.push",
    "eval": "compressor.commands.eval",
    "finetune": "compressor.commands.finetune",
}

DEFAULT_MODULE = "compressor.commands.compress"


def command_for(argv: list[str]) -> tuple[Callable[[list[str]], int], list[str]]:
    """The subcommand's `run` function and the arguments left for it."""
    if argv and argv[0] in SUBCOMMAND_MODULES:
        return importlib.import_module(SUBCOMMAND_MODULES[argv[0]]).run, argv[1:]
    return importlib.import_module(DEFAULT_MODULE).run, argv

"""Subcommands of `compress`, one module each.

Each module defines ``run(argv: list[str]) -> int``. The table maps the subcommand word to
its module, imported only when that subcommand runs (so `compress recipes` stays fast).
Plain `compress MODEL --recipe R` is the ``compress`` module.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Callable

from compressor.errors import UserError

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


class _ProbeError(Exception):
    pass


class _Probe(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _ProbeError(message)


def _recipe_given(words: list[str]) -> bool:
    """Whether `compress`'s parser would see --recipe/-r (abbreviated, `=`-joined or after -q)."""
    probe = _Probe(add_help=False)
    probe.add_argument("--recipe", "-r")
    probe.add_argument("--quiet", "-q", action="store_true")
    try:
        known, _ = probe.parse_known_args(words)
    except _ProbeError:  # a malformed --recipe: the compress parser says what is wrong with it
        return True
    return known.recipe is not None


def _could_be_model(word: str) -> bool:
    """An existing path, a built-in, a GGUF file or an org/name Hub id: not a mistyped subcommand."""
    return word.startswith("builtin:") or word.endswith(".gguf") or "/" in word or Path(word).expanduser().exists()


def command_for(argv: list[str]) -> tuple[Callable[[list[str]], int], list[str]]:
    """The subcommand's `run` function and the arguments left for it."""
    if argv and argv[0] in SUBCOMMAND_MODULES:
        return importlib.import_module(SUBCOMMAND_MODULES[argv[0]]).run, argv[1:]
    word = argv[0] if argv else ""
    # A bare word may still be a Hub id without an org (`gpt2`), so only without --recipe is it
    # surely not a model run; the message then names both readings.
    asks_help = any(a in ("-h", "--help") for a in argv)
    if word and not word.startswith("-") and not asks_help and not _could_be_model(word) and not _recipe_given(argv[1:]):
        raise UserError(
            f"unknown command '{word}' (commands: {', '.join(sorted(SUBCOMMAND_MODULES))});"
            f" or, to compress a model '{word}', give --recipe/-r",
            where="compress",
        )
    return importlib.import_module(DEFAULT_MODULE).run, argv

"""The `compress` command.

    compress MODEL --recipe R -o OUT [--dry-run] [--overwrite] ...
    compress recipes

Exit codes: 0 success, 1 failure during compression, 2 bad input (one line on stderr,
nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

from compressor.errors import CompressionError, UserError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _run_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="compress", description="Compress a Hugging Face model with a YAML recipe.")
    parser.add_argument("model", help="Hub id, local checkpoint folder, .gguf file, or builtin:smollm2-135m-instruct")
    parser.add_argument("--recipe", "-r", required=True, help="built-in recipe name (see `compress recipes`) or a YAML path")
    parser.add_argument("--output", "-o", type=Path, help="output folder (required unless --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="validate against the model and list targets; write nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading .bin/.pt pickle checkpoints")
    parser.add_argument("--trust-remote-code", action="store_true", help="run model code from the model's repository")
    parser.add_argument("--device", help="compute device for calibration (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="calibration windows per forward (default 8)")
    parser.add_argument("--no-perplexity", action="store_true", help="skip the held-out perplexity before and after")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _cmd_recipes(argv: list[str]) -> int:
    parser = _Parser(prog="compress recipes", description="List the built-in recipes.")
    parser.parse_args(argv)
    from compressor.recipe import builtin_recipes, load_recipe

    for name, path in builtin_recipes().items():
        recipe = load_recipe(str(path))
        print(f"{name:<22} {recipe.description}")
    return 0


def _pattern_of(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def _print_plans(plans, echo: Callable[[str], None]) -> None:
    for index, plan in enumerate(plans, start=1):
        echo(f"stage {index}: {plan.kind} ({plan.method}): {len(plan.selected)} modules targeted, {len(plan.skipped)} skipped")
        grouped: dict[tuple[str, str], int] = defaultdict(int)
        for name, detail in plan.selected.items():
            grouped[(_pattern_of(name), detail)] += 1
        for (pattern, detail), count in grouped.items():
            echo(f"  {pattern:<40} x{count:<4} {detail}")
        for name, reason in plan.skipped.items():
            echo(f"  skipped {name}: {reason}")


def _cmd_compress(argv: list[str]) -> int:
    args = _run_parser().parse_args(argv)
    if args.output is None and not args.dry_run:
        raise UserError("--output/-o is required (or pass --dry-run)", where="compress")
    from compressor.pipeline import RunOptions, dry_run, run_recipe
    from compressor.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    options = RunOptions(
        out_dir=args.output,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        device=args.device,
        batch_size=args.batch_size,
        show_progress=not args.quiet,
        measure_perplexity=not args.no_perplexity,
    )
    if args.dry_run:
        _print_plans(dry_run(args.model, recipe, options), print)
        print("dry run: nothing written")
        return 0
    summary = run_recipe(args.model, recipe, options)
    ratio = summary.original_bytes / max(summary.compressed_bytes, 1)
    print(f"saved: {summary.out_dir}")
    print(
        f"size: {summary.compressed_bytes / 1e6:.1f} MB (original {summary.original_bytes / 1e6:.1f} MB, {ratio:.2f}x smaller)"
    )
    if summary.base_perplexity is not None and summary.compressed_perplexity is not None:
        change = (summary.compressed_perplexity / summary.base_perplexity - 1) * 100
        print(
            f"held-out perplexity: {summary.compressed_perplexity:.3f} (original {summary.base_perplexity:.3f}, {change:+.1f}%)"
        )
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {"recipes": _cmd_recipes}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        return _cmd_compress(argv)
    except UserError as err:
        print(f"error: {err.format()}", file=sys.stderr)
        return err.exit_code
    except CompressionError as err:
        print(f"compression failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

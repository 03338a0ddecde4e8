"""`compress MODEL --recipe R -o OUT`: run a recipe on a model (or `--dry-run` it)."""

from __future__ import annotations

import argparse
import re
import shlex
from collections import defaultdict
from pathlib import Path
from typing import Callable

from compressor.commands.args import Parser, device_name, positive_int, quiet_datasets, quiet_transformers
from compressor.errors import UserError
from compressor.offload import parse_memory_size


def _run_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="compress", description="Compress a Hugging Face model with a YAML recipe.")
    parser.add_argument(
        "model",
        nargs="?",
        help="Hub id, local checkpoint folder, .gguf file, or builtin:smollm2-135m-instruct"
        " (left out when the recipe starts with a merge stage)",
    )
    parser.add_argument("--recipe", "-r", required=True, help="built-in recipe name (see `compress recipes`) or a YAML path")
    parser.add_argument("--output", "-o", type=Path, help="output folder (required unless --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="validate against the model and list targets; write nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading .bin/.pt pickle checkpoints")
    parser.add_argument("--trust-remote-code", action="store_true", help="run model code from the model's repository")
    parser.add_argument("--device", type=device_name, help="compute device for calibration (default: cuda if available, else cpu)")
    parser.add_argument(
        "--max-memory", type=parse_memory_size, metavar="SIZE",
        help="keep at most SIZE of weights in memory (e.g. 4GiB); the rest is read from disk one block at a time",
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="calibration windows per forward (default 8)")
    parser.add_argument("--no-perplexity", action="store_true", help="skip the held-out perplexity before and after")
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last completed stage (and training checkpoint)"
    )
    parser.add_argument(
        "--no-stage-checkpoints", action="store_true", help="do not save the model after each stage (saves disk and time; --resume then restarts)"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def _print_plans(plans, echo: Callable[[str], None]) -> None:
    from compressor.targets import layer_pattern

    for index, plan in enumerate(plans, start=1):
        echo(f"stage {index}: {plan.kind} ({plan.method}): {len(plan.selected)} {plan.unit} targeted, {len(plan.skipped)} skipped")
        grouped: dict[tuple[str, str], int] = defaultdict(int)
        for name, detail in plan.selected.items():
            grouped[(layer_pattern(name), detail)] += 1
        for (pattern, detail), count in grouped.items():
            echo(f"  {pattern:<40} x{count:<4} {detail}")
        for name, reason in plan.skipped.items():
            echo(f"  skipped {name}: {reason}")
        for note in plan.notes:
            echo(f"  warning: {note}")


_SECRET_FLAGS = ("--token", "--hub-token")
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")


def command_line(argv: list[str]) -> str:
    """The command as typed, for compression.json and the model card, with secrets masked."""
    words, hide_next = [], False
    for word in argv:
        flag, eq, _ = word.partition("=")
        if hide_next or (eq and flag in _SECRET_FLAGS):
            word = f"{flag}=REDACTED" if eq and not hide_next else "REDACTED"
        hide_next = word in _SECRET_FLAGS
        words.append(_TOKEN_LIKE.sub("REDACTED", word))
    return shlex.join(["compress", *words])


def run_options(args: argparse.Namespace, **more):
    """The pipeline's options from the flags `compress` and `compress merge` share, plus `more`."""
    from compressor.pipeline import RunOptions

    return RunOptions(
        out_dir=args.output, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code, device=args.device, batch_size=args.batch_size,
        show_progress=not args.quiet, measure_perplexity=not args.no_perplexity, **more,
    )


def _compared_with_original(summary) -> str:
    if summary.original_bytes is None:  # a merge alone: nothing was compressed
        return ""
    ratio = summary.original_bytes / max(summary.compressed_bytes, 1)
    # A GGUF input is compressed from its dequantized load; its own file is smaller than that.
    gguf = "" if summary.original_gguf_bytes is None else f"; the GGUF file it was read from: {summary.original_gguf_bytes / 1e6:.1f} MB"
    return f" (original {summary.original_bytes / 1e6:.1f} MB, {ratio:.2f}x smaller{gguf})"


def run(argv: list[str]) -> int:
    args = _run_parser().parse_args(argv)
    if args.output is None and not args.dry_run:
        raise UserError("--output/-o is required (or pass --dry-run)", where="compress")
    from compressor.pipeline import dry_run, run_recipe
    from compressor.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.quiet:
        quiet_transformers()
        quiet_datasets()  # the evaluate: block's tasks read their data before the model loads
    options = run_options(
        args, resume=args.resume, max_memory=args.max_memory, stage_checkpoints=not args.no_stage_checkpoints,
        command=command_line(argv),
    )
    from compressor.merging.recipe_run import check_merge_position, dry_run_merge_recipe, run_merge_recipe, starts_with_merge

    check_merge_position(recipe)
    merging = starts_with_merge(recipe)
    if merging and args.model is not None:
        raise UserError("this recipe starts with a merge stage, which builds the model: leave MODEL out", where=args.model)
    if not merging and args.model is None:
        raise UserError("MODEL is required (only a recipe whose first stage is `merge` takes none)", where="compress")
    if args.dry_run:
        plans = dry_run_merge_recipe(recipe, options) if merging else dry_run(args.model, recipe, options)
        _print_plans(plans, print)
        if recipe.output.push_to_hub:
            print(f"then: push to {recipe.output.push_to_hub} (output.push_to_hub)")
        print("dry run: nothing written")
        return 0
    summary = run_merge_recipe(recipe, options) if merging else run_recipe(args.model, recipe, options)
    if not summary.saved:  # another process of this launch saved the output
        return 0
    print(f"saved: {summary.out_dir}")
    print(f"size: {summary.compressed_bytes / 1e6:.1f} MB{_compared_with_original(summary)}")
    if summary.base_perplexity is not None and summary.compressed_perplexity is not None:
        change = (summary.compressed_perplexity / summary.base_perplexity - 1) * 100
        print(
            f"held-out perplexity: {summary.compressed_perplexity:.3f} (original {summary.base_perplexity:.3f}, {change:+.1f}%)"
        )
    if summary.evaluation is not None:
        print(f"evaluation report: {summary.out_dir / 'eval' / 'report.md'}")
    return 0

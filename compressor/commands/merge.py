"""`compress merge CONFIG.yaml -o OUT` (or `compress merge CONFIG.yaml OUT`, as `mergekit-yaml` takes it):
run a merge recipe, or a mergekit config, as is."""

from __future__ import annotations

from pathlib import Path

from compressor.commands.args import Parser, device_name, positive_int, quiet_transformers
from compressor.errors import RecipeError


def _parser() -> Parser:
    parser = Parser(prog="compress merge", description="Merge models from a recipe or a mergekit YAML config.")
    parser.add_argument("config", help="a recipe whose first stage is `merge`, or a mergekit config (merge_method: ...)")
    parser.add_argument("out", nargs="?", type=Path, help="output folder, as mergekit-yaml takes it (or -o)")
    parser.add_argument("--output", "-o", type=Path, help="output folder (required unless --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="check inputs, shapes and parameters; write nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading .bin/.pt pickle checkpoints")
    parser.add_argument("--trust-remote-code", action="store_true", help="run model code from the model's repository")
    parser.add_argument("--device", type=device_name, help="device for later calibrated stages (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="calibration windows per forward (default 8)")
    parser.add_argument("--no-perplexity", action="store_true", help="skip the held-out perplexity of later stages")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def load_merge_config(path: Path):
    """Our recipe or a mergekit config, as a Recipe that starts with `merge`."""
    from compressor.merging.mergekit_config import is_mergekit_config, recipe_from_mergekit
    from compressor.merging.recipe_run import starts_with_merge
    from compressor.recipe import parse_recipe
    from compressor.yaml_lines import read_yaml_file

    doc = read_yaml_file(path)
    recipe = recipe_from_mergekit(doc) if is_mergekit_config(doc) else parse_recipe(doc)
    if not starts_with_merge(recipe):
        raise RecipeError("not a merge: the first stage must be `merge` (or give a mergekit config)", **recipe.where(("stages", 0)))
    return recipe


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from compressor.errors import UserError

    if args.out is not None and args.output is not None and args.out != args.output:
        raise UserError(f"two output folders: {args.out} and -o {args.output}; give one", where="compress merge")
    args.output = args.output or args.out
    if args.output is None and not args.dry_run:
        raise UserError("--output/-o is required (or pass --dry-run)", where="compress merge")
    from compressor.commands.compress import _print_plans, run_options
    from compressor.merging.recipe_run import dry_run_merge_recipe, run_merge_recipe

    recipe = load_merge_config(args.config if isinstance(args.config, Path) else Path(args.config))
    if args.quiet:
        quiet_transformers()
    options = run_options(args)
    if args.dry_run:
        _print_plans(dry_run_merge_recipe(recipe, options), print)
        print("dry run: nothing written")
        return 0
    summary = run_merge_recipe(recipe, options)
    print(f"saved: {summary.out_dir}")
    print(f"size: {summary.compressed_bytes / 1e6:.1f} MB")
    return 0

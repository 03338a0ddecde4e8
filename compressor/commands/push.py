"""`compress push OUT org/name`: upload a compressed checkpoint and its model card to the Hub.

    compress push OUT org/name [--private] [--revision BRANCH] [--token T] [--commit-message M]
                               [--base-model ID ...] [--eval DIR] [--dry-run [--preview DIR]]

`--dry-run` writes the folder exactly as it would be uploaded to `--preview DIR` (default:
`OUT.push-preview`, a sibling of OUT, replaced on each dry run; OUT is never touched) and
prints its files and sizes. Nothing reaches the network.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.commands.args import Parser
from compressor.errors import UserError
from compressor.hub_ids import revision_problem
from compressor.output_lock import output_lock

if TYPE_CHECKING:
    from compressor.hub import UploadPlan


def branch_name(text: str) -> str:
    if problem := revision_problem(text):
        raise argparse.ArgumentTypeError(problem)
    return text


def _parser() -> Parser:
    parser = Parser(prog="compress push", description="Upload a compressed checkpoint and its model card to the Hub.")
    parser.add_argument("out", type=Path, help="a folder written by `compress MODEL -o OUT`, or an adapter folder of `compress finetune`")
    parser.add_argument("repo_id", help="the Hub repository, org/name (created if absent)")
    parser.add_argument("--private", action="store_true", help="create the repository private (ignored if it exists)")
    parser.add_argument("--revision", type=branch_name, help="branch to commit to (created from main if absent; default main)")
    parser.add_argument("--token", help="Hub token with write access (default: HF_TOKEN, else the `hf auth login` one)")
    parser.add_argument("--commit-message", help="summary of the commit")
    parser.add_argument("--base-model", nargs="+", metavar="ID", help="Hub id(s) the card names as base_model, "
                        "where compression.json records none (a local or GGUF source)")  # fmt: skip
    parser.add_argument("--eval", type=Path, metavar="DIR", help="a `compress eval -o DIR` report to publish as eval/")
    parser.add_argument("--dry-run", action="store_true", help="write the folder as it would be uploaded; upload nothing")
    parser.add_argument("--preview", type=Path, metavar="DIR", help="where --dry-run writes (default: OUT.push-preview)")
    return parser


def default_preview_dir(out_dir: Path) -> Path:
    resolved = out_dir.resolve()
    return resolved.with_name(resolved.name + ".push-preview")


def _prepare_preview_dir(folder: Path, is_default: bool) -> None:
    """The default preview folder is ours and replaced; a folder the user named must be empty."""
    if folder.exists() and not folder.is_dir():
        raise UserError("exists and is not a folder", where=str(folder))
    if folder.is_dir() and any(folder.iterdir()):
        if not is_default:
            raise UserError("preview folder exists and is not empty; name another one", where=str(folder))
        shutil.rmtree(folder)
    elif folder.is_dir():
        folder.rmdir()


def _write_preview(plan: UploadPlan, args: argparse.Namespace) -> int:
    from compressor import hub

    preview = args.preview or default_preview_dir(args.out)
    with output_lock(preview):  # two dry runs would empty and fill one preview folder at once
        _prepare_preview_dir(preview, is_default=args.preview is None)
        hub.write_preview(plan, preview)
    for entry in plan.files:
        print(f"{entry.size:>14,}  {entry.path_in_repo}")
    print(f"{plan.total_bytes:>14,}  total, {len(plan.files)} files")
    print(f"dry run: wrote the folder as it would be uploaded to {args.repo_id} into {preview}; nothing uploaded")
    return 0


def run(argv: list[str]) -> int:
    from compressor import hub

    args = _parser().parse_args(argv)
    hub.check_repo_id(args.repo_id)
    for base in args.base_model or []:
        hub.check_repo_id(base, where="--base-model")
    if args.preview is not None and not args.dry_run:
        raise UserError("--preview only goes with --dry-run", where="compress push")
    hub.check_checkpoint(args.out)
    if not args.dry_run:
        # Cheap refusals before the card is built or anything is sent.
        hub.check_online()
        token = hub.resolve_token(args.token)
    # OUT stays ours until the last byte is read: a `compress -o OUT --overwrite` replacing it
    # meanwhile would mix old and new files in one commit (or one preview); it is refused instead.
    with output_lock(args.out, activity="previewing" if args.dry_run else "uploading"):
        plan = hub.plan_upload(args.out, args.repo_id, base_model=args.base_model, eval_dir=args.eval)
        if args.dry_run:
            return _write_preview(plan, args)
        url = hub.push(
            plan, token, private=args.private, revision=args.revision, commit_message=args.commit_message
        )
    print(f"pushed {len(plan.files)} files to {args.repo_id}: {url}")
    return 0

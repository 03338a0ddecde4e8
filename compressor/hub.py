"""Push a compressed checkpoint to the Hugging Face Hub, with its model card, as one commit.

    plan_upload(OUT) ─▶ UploadPlan: every file of OUT + README.md (the model card)
        ├─ write_preview(plan, DIR)            `compress push --dry-run`: the same files on disk
        └─ push(plan, token, ...)              create_repo(exist_ok) ─▶ create_branch (if any)
                                               ─▶ create_commit(all files): LFS/xet uploads, then ONE commit

Large files go the way huggingface_hub sends them (xet or LFS, its choice) before the commit
that references them, so a failure at any step leaves the repository's history as it was.
The token is handed to huggingface_hub and nowhere else: it is scrubbed from every error
message, and nothing this module writes contains it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compressor.errors import UserError
from compressor.hub_ids import repo_id_problem
from compressor.weight_files import safetensors_files

CARD_NAME = "README.md"
COMPRESSED = "compressed"  # a folder written by `compress MODEL -o OUT` (or `compress merge`)
ADAPTER = "adapter"  # a peft LoRA adapter folder written by `compress finetune`
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    COMPRESSED: ("compression.json", "config.json"),
    ADAPTER: ("adapter_config.json", "adapter_model.safetensors"),
}
# `compress finetune --merge/--recompress` write whole checkpoints inside the adapter folder;
# an adapter repository holds the adapter (push `OUT/compressed` on its own).
ADAPTER_SKIPPED_FOLDERS = ("merged", "compressed")


class HubError(UserError):
    """The Hub refused or failed the push: one line, exit code 1, no commit made."""

    exit_code = 1


@dataclass(frozen=True)
class UploadFile:
    path_in_repo: str
    size: int
    source: Path | None = None  # a file of OUT, uploaded as it is
    content: bytes | None = None  # generated here (the model card)


@dataclass(frozen=True)
class UploadPlan:
    out_dir: Path
    repo_id: str
    files: tuple[UploadFile, ...]
    base_model: tuple[str, ...] = ()  # as given on the command line, for the retry command
    eval_dir: Path | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def check_repo_id(repo_id: str, where: str = "repo id") -> str:
    problem = repo_id_problem(repo_id)
    if problem:
        raise UserError(problem, where=where)
    return repo_id


def check_checkpoint(out_dir: Path) -> str:
    """Refuse a folder that is not a finished output of `compress` or `compress finetune`;
    return its kind (COMPRESSED or ADAPTER)."""
    from compressor.checkpoint import is_staging_folder

    if not out_dir.is_dir():
        raise UserError("no such folder", where=str(out_dir))
    if is_staging_folder(out_dir):
        raise UserError(
            "a staging folder of a run that is still writing or was stopped, not a finished output;"
            " push the OUT folder the run names when it has finished",
            where=str(out_dir),
        )
    kind = ADAPTER if (out_dir / "adapter_config.json").is_file() else COMPRESSED
    missing = [name for name in REQUIRED_FILES[kind] if not (out_dir / name).is_file()]
    if missing:
        what = "a finetune adapter" if kind == ADAPTER else "a compressed checkpoint"
        source = "`compress finetune ... -o OUT`" if kind == ADAPTER else "`compress MODEL -o OUT`"
        raise UserError(f"not {what} (no {' or '.join(missing)}); push a folder written by {source}", where=str(out_dir))
    if not any(out_dir.glob("*.safetensors")):
        raise UserError("not a compressed checkpoint (no *.safetensors weights)", where=str(out_dir))
    safetensors_files(out_dir)  # a shard its index lists but the folder lacks: half copied
    return kind


def _folder_files(root: Path) -> dict[str, Path]:
    """Regular files under `root` by their POSIX path relative to it; hidden ones skipped."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        found[relative.as_posix()] = path
    return found


def plan_upload(
    out_dir: Path,
    repo_id: str,
    *,
    base_model: list[str] | None = None,
    eval_dir: Path | None = None,
) -> UploadPlan:
    """What a push of `out_dir` to `repo_id` uploads: OUT's files and a fresh model card.

    `eval_dir` (a `compress eval -o DIR` folder) is uploaded as `eval/`, in place of any
    `eval/` inside OUT. An existing README.md in OUT is replaced by the card built now,
    which knows the repo id and the evaluation.
    """
    from compressor.model_card import EVAL_DIR, build_model_card

    kind = check_checkpoint(out_dir)
    files = _folder_files(out_dir)
    files.pop(CARD_NAME, None)
    if kind == ADAPTER:
        if eval_dir is not None:
            raise UserError("an adapter's card has no evaluation table; push --eval with a compressed checkpoint", where="--eval")
        return _plan_adapter_upload(out_dir, repo_id, files, base_model)
    if eval_dir is not None:
        if not (eval_dir / "report.json").is_file():
            raise UserError("no report.json here; pass the folder `compress eval -o DIR` wrote", where=str(eval_dir))
        files = {name: path for name, path in files.items() if not name.startswith(f"{EVAL_DIR}/")}
        files.update({f"{EVAL_DIR}/{name}": path for name, path in _folder_files(eval_dir).items()})
    card = str(build_model_card(out_dir, repo_id, base_model=base_model, eval_dir=eval_dir)).encode("utf-8")
    generated = {CARD_NAME: card, **_lowrank_adapter_config(out_dir, repo_id)}
    entries = [UploadFile(name, path.stat().st_size, source=path) for name, path in sorted(files.items()) if name not in generated]
    entries += [UploadFile(name, len(content), content=content) for name, content in generated.items()]
    return UploadPlan(
        out_dir=out_dir,
        repo_id=repo_id,
        files=tuple(sorted(entries, key=lambda f: f.path_in_repo)),
        base_model=tuple(base_model or ()),
        eval_dir=eval_dir,
    )


def _lowrank_adapter_config(out_dir: Path, repo_id: str) -> dict[str, bytes]:
    """OUT's EoRA/LoRA adapter corrects OUT's own weights: on the Hub its base is the repo itself
    (the local file names the OUT folder)."""
    from compressor.adapter_card import ADAPTER_CONFIG, hub_adapter_config
    from compressor.adapters import ADAPTER_DIR

    if not (out_dir / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        return {}
    content = hub_adapter_config(out_dir / ADAPTER_DIR, [repo_id])
    return {f"{ADAPTER_DIR}/{ADAPTER_CONFIG}": content} if content is not None else {}


def _plan_adapter_upload(out_dir: Path, repo_id: str, files: dict[str, Path], base_model: list[str] | None) -> UploadPlan:
    """An adapter's files (its merged/recompressed checkpoints left out), its card, and an
    adapter_config.json naming the Hub base where one is known."""
    from compressor.adapter_card import ADAPTER_CONFIG, adapter_base_models, build_adapter_card, hub_adapter_config, read_adapter_facts

    files = {name: path for name, path in files.items() if name.split("/", 1)[0] not in ADAPTER_SKIPPED_FOLDERS}
    generated = {CARD_NAME: str(build_adapter_card(out_dir, repo_id, base_model=base_model)).encode("utf-8")}
    config = hub_adapter_config(out_dir, adapter_base_models(read_adapter_facts(out_dir), base_model))
    if config is not None:
        generated[ADAPTER_CONFIG] = config
        files.pop(ADAPTER_CONFIG)
    entries = [UploadFile(name, path.stat().st_size, source=path) for name, path in files.items()]
    entries += [UploadFile(name, len(content), content=content) for name, content in generated.items()]
    return UploadPlan(out_dir=out_dir, repo_id=repo_id, files=tuple(sorted(entries, key=lambda f: f.path_in_repo)),
                      base_model=tuple(base_model or ()))


def write_preview(plan: UploadPlan, folder: Path) -> None:
    """Write the files of `plan` into `folder`, exactly as they would be uploaded."""
    folder.mkdir(parents=True)
    for entry in plan.files:
        target = folder / entry.path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        if entry.content is not None:
            target.write_bytes(entry.content)
        else:
            assert entry.source is not None
            shutil.copyfile(entry.source, target)


def resolve_token(explicit: str | None) -> str:
    """--token, else HF_TOKEN, else the token `hf auth login` stored; refuse when none."""
    if explicit:
        return explicit
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError(
            "no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login` (a token with write access)",
            where="push",
        )
    return token


def check_online() -> None:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        raise UserError("HF_HUB_OFFLINE is set; unset it to push to the Hub", where="push")


def scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def retry_command(plan: UploadPlan, *, private: bool, revision: str | None, commit_message: str | None) -> str:
    """The command that pushes the same folder again (the token is never part of it)."""
    words = ["compress", "push", str(plan.out_dir), plan.repo_id]
    if private:
        words.append("--private")
    if revision:
        words += ["--revision", revision]
    if commit_message:
        words += ["--commit-message", commit_message]
    if plan.base_model:
        words += ["--base-model", *plan.base_model]
    if plan.eval_dir is not None:
        words += ["--eval", str(plan.eval_dir)]
    return shlex.join(words)


_STATUS_HINTS = {
    401: "the Hub did not accept the token (401): check that it is valid",
    403: "the token may not write there (403): it needs write access to the namespace",
    404: "the Hub found no such repository or branch (404)",
    409: "the Hub reported a conflict (409): the repository or branch changed or is busy",
}


def _describe_failure(err: BaseException, token: str, endpoint: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, HfHubHTTPError):  # LFS errors wrap the HTTP one
        cause = cause.__cause__ or cause.__context__
    err = cause or err
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        hint = _STATUS_HINTS.get(status) or (
            f"the Hub failed ({status}); try again later" if status >= 500 else f"the Hub refused the request ({status})"
        )
        detail = (getattr(err, "server_message", None) or "").strip()
    else:
        name = type(err).__name__
        hint = f"could not reach {endpoint}" if "Connect" in name or "Timeout" in name else f"upload failed ({name})"
        detail = str(err).strip()
    detail = " ".join(scrub(detail, token).split())[:300]
    return f"{hint}: {detail}" if detail else hint


def default_commit_message(out_dir: Path) -> str:
    if not (out_dir / "compression.json").is_file():
        return f"Upload {out_dir.name}, a LoRA adapter trained with compress finetune, and its model card"
    recipe = (json.loads((out_dir / "compression.json").read_text(encoding="utf-8")).get("recipe") or {}).get("name")
    return f"Upload {out_dir.name}, compressed with the compressor recipe {recipe}, and its model card"


def push(
    plan: UploadPlan,
    token: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    echo: Callable[[str], None] = print,
) -> str:
    """Create the repo if absent and upload `plan` as one commit; return the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    api = HfApi(token=token)
    message = commit_message or default_commit_message(plan.out_dir)
    operations = [
        CommitOperationAdd(
            path_in_repo=entry.path_in_repo,
            path_or_fileobj=entry.content if entry.content is not None else str(entry.source),
        )
        for entry in plan.files
    ]
    step = "create the repository"
    try:
        api.create_repo(plan.repo_id, private=private, exist_ok=True)
        if revision and revision != constants.DEFAULT_REVISION:
            step = f"create the branch {revision}"
            api.create_branch(plan.repo_id, branch=revision, exist_ok=True)
        step = "upload and commit"
        echo(f"uploading {len(plan.files)} files ({plan.total_bytes / 1e6:.1f} MB) to {plan.repo_id} as one commit")
        info = api.create_commit(plan.repo_id, operations, commit_message=message, revision=revision)
    except Exception as err:  # any failure: one scrubbed line, and how to retry
        reason = _describe_failure(err, token, api.endpoint)
        retry = retry_command(plan, private=private, revision=revision, commit_message=commit_message)
        raise HubError(
            f"could not {step}: {reason}; no commit was made. Retry with: {retry}", where=f"push {plan.repo_id}"
        ) from None
    return str(info.commit_url)

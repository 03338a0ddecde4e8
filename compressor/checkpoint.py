"""Writing the output folder atomically.

Everything is written into a hidden staging folder beside OUT and renamed into place only
when complete, so a failed or killed run leaves OUT absent or as it was; never a folder
that looks complete but is not.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from compressor.errors import UserError
from compressor.output_lock import LOCK_SUFFIX


def check_output_dir(out_dir: Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an OUT that holds something, unless --overwrite; refuse a file at OUT; refuse an
    OUT that cannot be created (a file on its path, a folder we may not write), before any work.
    `inputs`: local files or folders the command reads, which OUT must not be or hold."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError("output path exists and is not a folder", where=str(out_dir))
    check_output_spares(out_dir, inputs)
    _check_can_create(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError("output folder exists and is not empty; pass --overwrite to replace it", where=str(out_dir))


def input_replaced_by(out_dir: Path, inputs: Iterable[str | Path]) -> Path | None:
    """The first local input that OUT is, or holds: replacing OUT as a whole would delete it
    (`compress M -o M`, or `-o` M's parent, with --overwrite). References that are not local
    paths (Hub ids, built-in names) are skipped."""
    out = out_dir.expanduser().resolve()
    for reference in inputs:
        path = Path(reference).expanduser()
        if not str(reference).strip() or not path.exists():
            continue
        source = path.resolve()
        if source == out or out in source.parents:
            return source
    return None


def check_output_spares(out_dir: Path, inputs: Iterable[str | Path]) -> None:
    source = input_replaced_by(out_dir, inputs)
    if source is not None:
        raise UserError(f"the output folder is, or holds, the input {source}, which writing it would delete; "
                        "pick another output folder", where=str(out_dir))


def _check_can_create(out_dir: Path) -> None:
    """The staging folder is made beside OUT (creating missing parents), so the nearest existing
    ancestor of OUT's parent must be a folder we can write into."""
    parent = out_dir.resolve().parent
    ancestor = next(p for p in (parent, *parent.parents) if os.path.lexists(p))
    if not ancestor.is_dir():
        raise UserError(f"cannot create the output folder: {ancestor} is not a folder", where=str(out_dir))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot create the output folder: {ancestor} is not writable", where=str(out_dir))
    # os.access says yes to root everywhere, and knows nothing of read-only mounts or of /proc:
    # make (and remove) a folder there, as the staging folder will be made.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".compressor-probe-", dir=ancestor))
    except OSError as err:
        raise UserError(f"cannot create the output folder: {ancestor} refuses new folders ({err.strerror})",
                        where=str(out_dir)) from None


_OWNER_FILE = ".owner-pid"


def claim(folder: Path) -> None:
    """Mark a scratch folder beside OUT as this process's, so a later run can tell it is stale."""
    (folder / _OWNER_FILE).write_text(str(os.getpid()))


def is_staging_folder(folder: Path) -> bool:
    """A folder this module writes beside OUT (`.OUT.partial-*`, `.OUT.merged-*`, `.OUT.work`,
    `.OUT.old-*`; `.OUT.lock` is the writer's lock file, compressor.output_lock), or any folder
    still marked as a run's scratch: not a finished output."""
    name = folder.resolve().name
    scratch_suffix = name.endswith((".work", LOCK_SUFFIX))
    scratch_name = name.startswith(".") and (scratch_suffix or any(f".{kind}-" in name for kind in ("partial", "merged", "old")))
    return scratch_name or (folder / _OWNER_FILE).exists()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove staging folders left by runs that were killed (SIGKILL skips every cleanup)."""
    removed = []
    leftovers = [*out_dir.parent.glob(f".{out_dir.name}.partial-*"), *out_dir.parent.glob(f".{out_dir.name}.merged-*")]
    for candidate in leftovers:
        owner = candidate / _OWNER_FILE
        try:
            pid = int(owner.read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid is None or not _process_alive(pid):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def _default_folder_mode() -> int:
    """0o777 less the process's umask: what `mkdir` would give (mkdtemp gives 0o700)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:  # read-only where Linux offers it
            for line in status:
                if line.startswith("Umask:"):
                    return 0o777 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


@contextmanager
def atomic_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces `out_dir`, on failure it is removed."""
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        staging.chmod(_default_folder_mode())  # OUT is shared like any folder the user makes
        claim(staging)
        yield staging
        (staging / _OWNER_FILE).unlink()
        previous = None
        if out_dir.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, previous / "old")
        os.replace(staging, out_dir)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def workdir_for(out_dir: Path) -> Path:
    """Where stage checkpoints live: a hidden folder beside OUT (same disk, so renames are cheap)."""
    out_dir = out_dir.resolve()
    return out_dir.parent / f".{out_dir.name}.work"


def prepare_workdir(out_dir: Path, resume: bool) -> Path:
    """The work folder for this run: kept as it is with --resume, emptied otherwise.

    It is created by the first stage that writes a checkpoint, so runs without one leave no trace.
    """
    workdir = workdir_for(out_dir)
    if workdir.exists() and not resume:
        shutil.rmtree(workdir)
    return workdir

"""One writer per output folder: a run that writes OUT holds an exclusive lock on `.OUT.lock`.

Two runs writing one OUT would share its work folder (`.OUT.work`): the second empties the
first's stage checkpoints, the first removes the second's when it finishes, and the slower
one replaces the other's OUT. The lock is `flock` on a file beside OUT, so the kernel drops it
when its process ends, however it ends: a lock file left by a killed run blocks nobody.

The holder records its pid and what it does (writing, uploading) in the file, for the refusal's
message, and removes the file when
it lets go; a run that opened the file just before it was removed checks, once it holds the
lock, that the path still names the file it locked, and tries again otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from compressor.errors import UserError

LOCK_SUFFIX = ".lock"


def lock_path_for(out_dir: Path) -> Path:
    out_dir = out_dir.resolve()
    return out_dir.parent / f".{out_dir.name}{LOCK_SUFFIX}"


def _holder(lock: Path) -> str:
    """`another compress run (pid N) is writing`, from what the holder recorded in the lock file."""
    try:
        pid, _, activity = lock.read_text(encoding="ascii").strip().partition(" ")
    except (OSError, UnicodeDecodeError):
        pid, activity = "", ""
    who = f"another compress run (pid {pid})" if pid.isdigit() else "another compress run"
    return f"{who} is {activity if activity.isalpha() else 'using'}"


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, deepest first."""
    return [p for p in (folder, *folder.parents) if not os.path.lexists(p)]


def _try_lock(lock: Path) -> int | None:
    """An open descriptor holding the lock on `lock`, or None when another process holds it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # the last holder removed it between our open and our lock
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def output_lock(out_dir: Path, activity: str = "writing") -> Iterator[None]:
    """Hold OUT for this run, or refuse at once (exit 2) when another run is writing it.

    `activity` (one word: writing, uploading) is what the refusal tells a second run this one does.

    Released on any exit (an error, Ctrl-C, SIGTERM); folders made only to hold the lock file are
    removed again when nothing else was written into them."""
    lock = lock_path_for(out_dir)
    made = _missing_folders(lock.parent)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = None
    try:
        fd = _try_lock(lock)
        if fd is None:
            raise UserError(f"{_holder(lock)} this output folder; wait for it to finish or pick another"
                            " output folder", where=str(out_dir))
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {activity}".encode("ascii"))
        yield
    finally:
        if fd is not None:
            lock.unlink(missing_ok=True)  # while still holding it: see the module docstring
            os.close(fd)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # holds OUT, or something else: not ours to remove
                break

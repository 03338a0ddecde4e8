"""Where the project keeps what it computes once: converted models, calibration batches."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def cache_root() -> Path:
    """``$COMPRESSOR_CACHE``, else ``$XDG_CACHE_HOME/compressor``, else ``~/.cache/compressor``."""
    explicit = os.environ.get("COMPRESSOR_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "compressor"


@contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """Hold an exclusive lock on building the cache entry `entry`, waiting for another process's
    build to end. The builder checks for a finished entry again once it holds the lock: two runs
    that start on one missing entry then build it once (the second waits, then reuses it) instead
    of both building and the later one replacing the folder while the first reads it. `flock`
    lets go when its process ends, however it ends; the lock file itself stays."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(entry.parent / f".{entry.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock

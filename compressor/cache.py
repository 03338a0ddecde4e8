"""Where the project keeps what it computes once: converted models, calibration batches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$COMPRESSOR_CACHE``, else ``$XDG_CACHE_HOME/compressor``, else ``~/.cache/compressor``."""
    explicit = os.environ.get("COMPRESSOR_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "compressor"

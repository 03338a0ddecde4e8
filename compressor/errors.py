"""Errors that reach the user as one line and a non-zero exit code."""

from __future__ import annotations

import errno

# A write the storage refused: disk full, quota, file size limit, read-only file system, I/O.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (its type name when it has none): what a
    one-line error quotes from a library's multi-line one."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def storage_failure(err: BaseException) -> str | None:
    """One line for a write the storage refused (None for any other error). safetensors' Rust
    writer reports these as `SafetensorError("... I/O error: No space left on device (os error 28)")`."""
    if isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:
        return f"{err.filename}: {err.strerror}" if err.filename else str(err.strerror)
    text = first_line(err)
    if "I/O error" in text and any(f"(os error {code})" in text for code in _STORAGE_ERRNOS):
        return text
    return None


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, nothing written.

    `where` is "file:line" when the problem sits in a file, `key` the dotted path of the
    offending key (``stages[1].quantize.weights.bits``).
    """

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, key: str | None = None):
        self.message = message
        self.where = where
        self.key = key
        super().__init__(self.format())

    def format(self) -> str:
        head = " ".join(part for part in (self.where, self.key) if part)
        return f"{head}: {self.message}" if head else self.message


class RecipeError(UserError):
    """A recipe that does not parse or does not validate."""


class ModelError(UserError):
    """A model reference that cannot be resolved or loaded safely."""


class DataError(UserError):
    """A calibration or evaluation dataset that cannot be used."""


class CompressionError(RuntimeError):
    """A failure during compression itself (not the user's input): exit code 1."""

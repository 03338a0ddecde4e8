"""Errors that reach the user as one line and a non-zero exit code."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (its type name when it has none): what a
    one-line error quotes from a library's multi-line one."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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

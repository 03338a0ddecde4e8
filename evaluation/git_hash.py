"""lm-eval's git-hash lookup, without git's complaint outside a git checkout.

`lm_eval.simple_evaluate` records a `git_hash` in its results by running
``git describe --always`` (``lm_eval.loggers.utils.get_git_commit_hash``, lm-eval 0.4.13) with
git's stderr left on ours, so outside a git checkout every run printed
``fatal: not a git repository (or any of the parent directories): .git``. Git has no
environment variable that quiets that message (``GIT_REDIRECT_STDERR`` exists on Windows only),
and the lookup needs a repository, which the folder a user runs from need not be. So for the
duration of the call lm-eval's evaluator gets the same lookup with git's stderr alone dropped:
the hash it records is unchanged (the checkout's, else lm-eval's own fallback), and every other
line lm-eval or its tasks write to stderr still reaches the user.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from typing import Iterator


def _git_hash() -> str | None:
    """`get_git_commit_hash` of lm-eval 0.4.13, with git's stderr sent to /dev/null."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()  # noqa: S607
    except (subprocess.CalledProcessError, FileNotFoundError):  # not a checkout, or no git installed
        return get_commit_from_path(os.getcwd())


@contextmanager
def quiet_git_hash_lookup() -> Iterator[None]:
    """While inside, `lm_eval.simple_evaluate` looks its git hash up with `_git_hash`."""
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:  # a later lm-eval that looks it up elsewhere: leave it as it is
        yield
        return
    evaluator.get_git_commit_hash = _git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original

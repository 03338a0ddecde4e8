"""lm-eval's bootstrapped standard errors, computed in our process instead of a fork pool.

For metrics without a closed-form standard error (a `perplexity`, `median`, `f1`, `bleu`...
aggregation, lambada's perplexity among them) lm-eval 0.4.13's `bootstrap_stderr` forks
`multiprocessing.Pool(cpu_count())` from the evaluating process. That process holds the model
and runs torch, tqdm and (under pytest-xdist) execnet threads, and forking it hung runs: at the
pool's exit the parent waited forever on a worker blocked on the pool's queue lock that its
SIGTERM never ended (twice in the suite, in `Pool._terminate_pool`). lm-eval's own switch,
`DISABLE_MULTIPROC`, runs the same draws in process (`_bootstrap_internal_no_mp`: chunk i seeded
with i, as each pool task is), so the standard errors are the same numbers; 1000 draws of a
task's per-document scores take well under a second.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

SWITCH = "DISABLE_MULTIPROC"


@contextmanager
def in_process_bootstrap() -> Iterator[None]:
    """While inside, lm-eval bootstraps without forking; the variable is put back as it was."""
    before = os.environ.get(SWITCH)
    os.environ[SWITCH] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[SWITCH]
        else:
            os.environ[SWITCH] = before

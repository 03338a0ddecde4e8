"""How `pytest -n 2 --dist loadfile` (`make test`) splits the suite between its two workers.

xdist's loadfile sends whole files, so a file's module fixtures are built once. On top of it:
- files that hold the same machine-wide resource form one unit and never run at the same time;
- the heaviest units go first: the SmolLM2 GPTQ run alone is about a third of the suite, and
  started last it would leave one worker idle while the other finishes it (xdist's default
  order, by number of tests, puts a two-test file near the end).
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath

# File name -> the unit it runs in.
SHARED_UNITS = {
    # `accelerate launch --multi_gpu` starts torchrun on its fixed default port (29500).
    "test_distill_launch.py": "torchrun-port",
    "test_finetune.py": "torchrun-port",
    # Both convert SmolLM2 into the user's cache (~/.cache/compressor), not the session's: on one
    # worker the first converts and the second reuses it (on two, one would wait on the other's
    # conversion lock, compressor.cache.entry_lock).
    "test_integration_smollm2.py": "smollm2-user-cache",
    "test_eval_integration.py": "smollm2-user-cache",
}

# Units by measured time, the longest first (the rest follow in collection order).
HEAVIEST_FIRST = (
    "smollm2-user-cache",
    "test_prune_smollm2.py",
    "test_hub_push.py",
    "test_pipeline.py",
    "test_quant_formats.py",
    "torchrun-port",
    "test_interrupts.py",
    "test_integration_runtime.py",
    "test_eval_lm_eval_flags.py",
)


# Each worker runs torch on its share of the cores: two workers of two OpenMP threads each on two
# cores spin against each other, and SmolLM2's bf16 perplexity ran several times slower.
# These files run with every core: they cover the OpenMP-parallel path of the native int4 kernel
# (kernels/csrc/w4a16_avx512bf16.c), which one thread never takes.
ALL_CORES_FILES = {"test_kernels_avx512.py", "test_gated_mlp.py", "test_bound_kernel.py"}


def worker_threads(all_threads: int) -> int | None:
    """Torch threads for this xdist worker, or None outside xdist (and when OMP_NUM_THREADS is set)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, all_threads // workers)


def unit_of(nodeid: str) -> str:
    name = PurePosixPath(nodeid.split("::", 1)[0]).name
    return SHARED_UNITS.get(name, name)


def unit_rank(unit: str) -> int:
    return HEAVIEST_FIRST.index(unit) if unit in HEAVIEST_FIRST else len(HEAVIEST_FIRST)


def make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        """loadfile with the units above, the heaviest handed out first."""

        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

        def _assign_work_unit(self, node) -> None:
            # min() keeps the first of equal ranks: the rest go in xdist's own order.
            heaviest = min(self.workqueue, key=unit_rank)
            self.workqueue.move_to_end(heaviest, last=False)
            super()._assign_work_unit(node)

    return UnitScheduling(config, log)

"""How long the task names take to read: our text scan of lm-eval's task files against lm-eval's
own full index, in one process, alternating.

    python benchmarks/lm_eval_task_index.py [--repeats 3]

`scan`: `compressor.evaluation.lm_eval_index.scan_lm_eval_index` over the installed lm-eval's
tasks/ folder (what `--tasks` checks names against and `--tasks list` prints; cached per lm-eval
version after the first run, this times the uncached scan). `full index`: lm-eval's
`TaskManager()` (its `TaskIndex.build` over every task file, which a tag spanning several lm-eval
folders needs at run time). Also checks that both hold the same names with the same kinds.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import lm_eval
    from lm_eval.tasks import TaskManager

    from compressor.evaluation.catalog import _lm_eval_task_root
    from compressor.evaluation.lm_eval_index import scan_lm_eval_index

    root = _lm_eval_task_root()
    times: dict[str, list[float]] = {"scan": [], "full index": []}
    scanned, manager = {}, None
    for _ in range(args.repeats):
        started = time.perf_counter()
        scanned = scan_lm_eval_index(root)
        times["scan"].append(time.perf_counter() - started)
        started = time.perf_counter()
        manager = TaskManager()
        times["full index"].append(time.perf_counter() - started)
    kinds = {name: "group" for name in manager.all_groups} | {name: "tag" for name in manager.all_tags}
    kinds |= {name: "task" for name in manager.all_subtasks}
    ours = {name: entry.kind for name, entry in scanned.items()}
    mismatched = sorted(set(ours.items()) ^ set(kinds.items()))
    print(f"lm-eval {lm_eval.__version__}: {len(ours):,} names scanned, {len(kinds):,} in the full index, "
          f"{len(mismatched)} (name, kind) pairs differ")
    print("| reader | median s | min s |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} |")


if __name__ == "__main__":
    main()

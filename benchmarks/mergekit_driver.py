"""Run one mergekit merge and report its wall time and peak RSS as JSON (runs in .venv-mergekit).

Usage: benchmarks/.venv-mergekit/bin/python benchmarks/mergekit_driver.py CONFIG.yaml OUT [--seed N]
Prints one JSON line: {"seconds": ..., "peak_rss_bytes": ..., "baseline_rss_bytes": ..., "version": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import yaml
    from importlib.metadata import version

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    with open(args.config, encoding="utf-8") as handle:
        config = MergeConfiguration.model_validate(yaml.safe_load(handle))
    baseline = rss_bytes()
    started = time.perf_counter()
    run_merge(
        config,
        args.out,
        options=MergeOptions(random_seed=args.seed, copy_tokenizer=True, lazy_unpickle=True, quiet=True, write_model_card=False),
    )
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "baseline_rss_bytes": baseline, "version": version("mergekit")}))


if __name__ == "__main__":
    main()

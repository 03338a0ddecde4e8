"""lm-eval's per-sample records (`--log-samples`), written the way lm-eval's own CLI writes them.

lm-eval's `EvaluationTracker` does the writing, so the files are the ones an lm-eval user knows:
``samples/<model>/results_<date>.json`` and ``samples/<model>/samples_<task>_<date>.jsonl``
(one line per document: its doc, the request arguments with the prompt as lm-eval built it, the
responses, the per-sample metrics). The tracker logs a warning instead of raising when a write
fails; the files are checked here, so a failed write is an error, not a missing file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

SAMPLES_FOLDER = "samples"


def write_samples(
    folder: Path, name: str, run: dict[str, Any], samples: dict[str, list[dict[str, Any]]], prompt: dict[str, Any]
) -> list[Path]:
    """Write model `name`'s samples under ``folder/samples/name/``; returns the sample files.
    `run`: lm-eval's results JSON; `prompt`: system_instruction, chat_template (text), fewshot_as_multiturn."""
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(folder / SAMPLES_FOLDER))
    tracker.general_config_tracker.log_experiment_args(
        model_source="compressor", model_args={"pretrained": name}, **prompt  # the folder is named after `pretrained`
    )
    tracker.save_results_aggregated(results=copy.deepcopy(run), samples=samples)
    written = []
    for task, records in samples.items():
        tracker.save_results_samples(task_name=task, samples=copy.deepcopy(records))
        path = folder / SAMPLES_FOLDER / name / f"samples_{task}_{tracker.date_id}.jsonl"
        if not path.is_file():
            raise OSError(f"lm-eval did not write the samples of '{name}' on '{task}' ({path})")
        written.append(path)
    return written

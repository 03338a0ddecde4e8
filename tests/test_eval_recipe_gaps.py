"""A recipe's `evaluate:` block where it used to fall short of `compress eval`: lm-eval's saved
results naming a merge's deleted temporary folder, and a task that runs model-written code
refused only once the base model had loaded."""

from __future__ import annotations

import json
from pathlib import Path

from compressor.cli import main
from tests.merge_fixtures import perturbed_copy

MERGE_THEN_PRUNE = """\
name: pruned-merge
calibration: {{samples: 2, seq_len: 32}}
stages:
  - merge:
      method: ties
      base: {base}
      models:
        - {{model: {math}, weight: 0.6, density: 0.5}}
        - {{model: {code}, weight: 0.4, density: 0.5}}
  - prune:
      method: magnitude
      sparsity: 0.5
      ignore: [lm_head]
evaluate:
  tasks: [perplexity]
  limit: 2
  log_samples: true
"""


def _strings(value) -> list[str]:
    """Every string anywhere in a JSON value (keys included)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def test_saved_lm_eval_results_of_a_merge_name_the_report_rows_not_the_deleted_temporary_folder(tiny_llama, tmp_path):
    math = perturbed_copy(tiny_llama, tmp_path / "math", seed=1)
    code = perturbed_copy(tiny_llama, tmp_path / "code", seed=2)
    (tmp_path / "r.yaml").write_text(MERGE_THEN_PRUNE.format(base=tiny_llama, math=math, code=code))
    out = tmp_path / "out"
    assert main(["--recipe", str(tmp_path / "r.yaml"), "-o", str(out), "-q", "--no-perplexity"]) == 0

    report = json.loads((out / "eval" / "report.json").read_text())
    rows = {row["name"]: row["reference"] for row in report["models"]}
    assert rows["base"] == f"ties merge of {math}, {code}, {tiny_llama} (base)"
    for name, reference in rows.items():
        results = json.loads((out / "eval" / "lm_eval_results" / f"{name}.json").read_text())
        assert results["config"]["model"] == reference, name
        assert [s for s in _strings(results) if ".merged-" in s] == [], name
    # Nowhere in OUT (lm-eval's samples folder and its own results JSON there included) is the
    # temporary folder named: it is gone once the run ends.
    assert not list(tmp_path.glob(".out.merged-*"))
    named = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".md", ".yaml") and ".merged-" in p.read_text()]
    assert named == []
    assert list((out / "eval" / "samples" / "base").glob("results_*.json"))

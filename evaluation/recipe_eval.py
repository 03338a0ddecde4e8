"""A recipe's `evaluate:` block: the same lm-eval run on the base (before the stages, or from
the results cache) and on the compressed in-memory model (after them), reported into
``OUT/eval/`` inside the run's staging folder, so a failed evaluation leaves no OUT behind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compressor.evaluation.catalog import TaskCatalog
from compressor.evaluation.compare import Comparison
from compressor.evaluation.loading import model_identity
from compressor.evaluation.results_cache import ResultsCache
from compressor.evaluation.runner import EvalSettings, EvalTarget
from compressor.evaluation.size import measure_checkpoint, measure_model_files
from compressor.model_io import LoadedModel

BASE_NAME = "base"
REPORT_FOLDER = "eval"


@dataclass
class RecipeEvaluation:
    comparison: Comparison
    compressed_name: str

    @classmethod
    def plan(
        cls, tasks: list[str], limit: int | float | None, recipe_name: str, batch_size: int, echo: Callable[[str], None],
        num_fewshot: int | None = None,
    ) -> "RecipeEvaluation":
        """Resolve the tasks (they were checked at parse time; this also finds their definitions)."""
        catalog = TaskCatalog()
        settings = EvalSettings(tuple(catalog.resolve(tasks, where="evaluate.tasks")), limit, "hf", batch_size, num_fewshot=num_fewshot)
        name = recipe_name if recipe_name != BASE_NAME else "compressed"
        return cls(Comparison(settings, catalog, ResultsCache(), echo), name)

    def evaluate_base(self, loaded: LoadedModel, reference: str) -> None:
        """Call before any stage runs: `loaded.model` is still the base model."""
        size = measure_model_files(loaded.source.gguf_file, loaded.folder)
        target = EvalTarget(BASE_NAME, reference, loaded=loaded, identity=model_identity(reference))
        self.comparison.add(target, size)

    def evaluate_compressed(self, loaded: LoadedModel, staging: Path, out_dir: Path) -> dict:
        """Call after the checkpoint is written into `staging`; writes `staging/eval/`."""
        target = EvalTarget(self.compressed_name, str(out_dir), loaded=loaded)
        self.comparison.add(target, measure_checkpoint(staging))
        return self.comparison.write(staging / REPORT_FOLDER, BASE_NAME)

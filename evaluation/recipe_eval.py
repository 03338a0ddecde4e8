"""A recipe's `evaluate:` block: the same lm-eval run on the base (before the stages, or from
the results cache) and on the compressed in-memory model (after them), reported into
``OUT/eval/`` inside the run's staging folder, so a failed evaluation leaves no OUT behind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from compressor.evaluation.catalog import TaskCatalog
from compressor.evaluation.compare import Comparison
from compressor.evaluation.loading import model_identity
from compressor.evaluation.results_cache import ResultsCache
from compressor.evaluation.runner import EvalSettings, EvalTarget
from compressor.evaluation.size import measure_checkpoint, measure_model_files
from compressor.model_io import LoadedModel

if TYPE_CHECKING:
    from compressor.recipe import EvaluateSpec

BASE_NAME = "base"
REPORT_FOLDER = "eval"


@dataclass
class RecipeEvaluation:
    comparison: Comparison
    compressed_name: str
    chat_template: str | None = None  # the template's text when `apply_chat_template` is set

    @classmethod
    def plan(
        cls, spec: "EvaluateSpec", recipe_name: str, batch_size: int, echo: Callable[[str], None], chat_template: str | None = None,
    ) -> "RecipeEvaluation":
        """Resolve the tasks (they were checked at parse time; this also finds their definitions).
        `batch_size` applies where the block sets none; `chat_template`: the base tokenizer's, checked by the caller."""
        catalog = TaskCatalog()
        settings = EvalSettings(
            tuple(catalog.resolve(spec.tasks, where="evaluate.tasks")), spec.limit, "hf",
            spec.batch_size if spec.batch_size is not None else batch_size,
            num_fewshot=spec.num_fewshot, max_batch_size=spec.max_batch_size, options=spec.lm_eval_options(),
        )
        name = recipe_name if recipe_name != BASE_NAME else "compressed"
        return cls(Comparison(settings, catalog, ResultsCache(), echo), name, chat_template)

    def evaluate_base(self, loaded: LoadedModel, reference: str) -> None:
        """Call before any stage runs: `loaded.model` is still the base model."""
        size = measure_model_files(loaded.source.gguf_file, loaded.folder)
        target = EvalTarget(BASE_NAME, reference, loaded=loaded, identity=model_identity(reference), chat_template=self.chat_template)
        self.comparison.add(target, size)

    def evaluate_compressed(self, loaded: LoadedModel, staging: Path, out_dir: Path) -> dict:
        """Call after the checkpoint is written into `staging`; writes `staging/eval/`."""
        target = EvalTarget(self.compressed_name, str(out_dir), loaded=loaded, chat_template=self.chat_template)
        self.comparison.add(target, measure_checkpoint(staging))
        return self.comparison.write(staging / REPORT_FOLDER, BASE_NAME)

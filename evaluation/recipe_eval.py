"""A recipe's `evaluate:` block: the same lm-eval run on the base (before the stages, or from
the results cache) and on the compressed in-memory model (after them), reported into
``OUT/eval/`` inside the run's staging folder, so a failed evaluation leaves no OUT behind.

Its tasks are built and checked first (`prepare_recipe_tasks`), before any weight is read (and
by `--dry-run`): a task that runs model-written code without `confirm_run_unsafe_code`, or one
whose data cannot be read, is refused at ``file:line evaluate.tasks``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from compressor.evaluation.catalog import TaskCatalog, TaskError
from compressor.evaluation.compare import Comparison
from compressor.evaluation.loading import model_identity
from compressor.evaluation.results_cache import ResultsCache
from compressor.evaluation.runner import EvalSettings, EvalTarget, PreparedTasks, prepare_tasks
from compressor.evaluation.size import measure_checkpoint, measure_model_files
from compressor.model_io import LoadedModel

if TYPE_CHECKING:
    from compressor.recipe import EvaluateSpec, Recipe

BASE_NAME = "base"
REPORT_FOLDER = "eval"


def prepare_recipe_tasks(recipe: "Recipe") -> PreparedTasks | None:
    """The `evaluate:` block's tasks, built and checked (`prepare_tasks`); None without the block.
    Errors point at the recipe's `evaluate.tasks`."""
    if recipe.evaluate is None:
        return None
    spec = recipe.evaluate
    try:
        catalog = TaskCatalog()
        return prepare_tasks(catalog, catalog.resolve(spec.tasks, where="evaluate.tasks"), spec.confirm_run_unsafe_code)
    except TaskError as err:
        raise TaskError(err.message, **recipe.where(("evaluate", "tasks"))) from None


@dataclass
class RecipeEvaluation:
    comparison: Comparison
    compressed_name: str
    chat_template: str | None = None  # the template's text when `apply_chat_template` is set

    @classmethod
    def plan(
        cls, spec: "EvaluateSpec", prepared: PreparedTasks, recipe_name: str, batch_size: int, echo: Callable[[str], None],
        chat_template: str | None = None, show_progress: bool = True,
    ) -> "RecipeEvaluation":
        """`prepared`: the block's tasks (`prepare_recipe_tasks`). `batch_size` applies where the
        block sets none; `chat_template`: the base tokenizer's, checked by the caller;
        `show_progress`: False under `compress -q` (lm-eval draws no bars)."""
        settings = EvalSettings(
            prepared.tasks, spec.limit, "hf",
            spec.batch_size if spec.batch_size is not None else batch_size,
            num_fewshot=spec.num_fewshot, max_batch_size=spec.max_batch_size, max_batch_size_source="recipe", options=spec.lm_eval_options(),
            show_progress=show_progress,
        )
        name = recipe_name if recipe_name != BASE_NAME else "compressed"
        return cls(Comparison(settings, prepared.catalog, ResultsCache(), echo, prepared=prepared), name, chat_template)

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

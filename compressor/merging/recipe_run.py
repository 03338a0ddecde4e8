"""Recipes whose first stage is `merge`: they take no input MODEL; the merge makes it.

    merge (streamed into a staging folder) ─▶ only stage: that folder, plus recipe.yaml and
    compression.json, becomes OUT; more stages: the merged folder is the model the usual
    pipeline loads, calibrates on and saves (its compression.json records the merge inputs).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from compressor.checkpoint import atomic_output_dir, check_output_dir, check_output_spares, claim, remove_stale_staging
from compressor.errors import RecipeError
from compressor.merging.engine import MergePlan, plan_merge, run_merge
from compressor.model_io import weights_bytes
from compressor.recipe import Recipe
from compressor.stages.base import StagePlan
from compressor.stages.merge import MergeConfig


def starts_with_merge(recipe: Recipe) -> bool:
    return bool(recipe.stages) and recipe.stages[0].kind == "merge"


def check_merge_position(recipe: Recipe) -> None:
    """`merge` makes the model, so it can only come first."""
    for index, spec in enumerate(recipe.stages):
        if spec.kind == "merge" and index > 0:
            raise RecipeError("merge must be the first stage (it builds the model the later stages work on)",
                              **recipe.where(("stages", index, "merge")))


def _merge_locator(recipe: Recipe) -> Callable[..., dict[str, str]]:
    return lambda *suffix: recipe.where(("stages", 0, "merge", *suffix))


def check_merge_only_evaluation(recipe: Recipe) -> None:
    """`evaluate:` compares the model before and after the compression stages; a merge-only
    recipe has no such pair (it would compare the merged model with itself)."""
    if len(recipe.stages) == 1 and recipe.evaluate is not None:
        raise RecipeError(
            "`evaluate:` compares the model before and after the compression stages, and this recipe only merges:"
            " add a stage after the merge, or evaluate OUT with `compress eval merged=OUT base=MODEL`",
            **recipe.where(("evaluate",)),
        )


def plan_recipe_merge(recipe: Recipe, allow_pickle: bool = False) -> MergePlan:
    check_merge_position(recipe)
    check_merge_only_evaluation(recipe)
    config = recipe.stages[0].config
    assert isinstance(config, MergeConfig)
    return plan_merge(config, _merge_locator(recipe), allow_pickle=allow_pickle)


def merge_stage_plan(plan: MergePlan) -> StagePlan:
    """The merge as `--dry-run` prints it: inputs and how many tensors each gives."""
    stage = StagePlan(kind="merge", method=plan.method.name, unit="input models")
    for i, item in enumerate(plan.inputs):
        role = "base" if i == plan.base_index else "model"
        stage.selected[item.reference] = f"{role}, {len(plan.slots)} tensors"
    if plan.ignored_base is not None:
        stage.skipped[plan.ignored_base] = ignored_base_note(plan)
    return stage


def ignored_base_note(plan: MergePlan) -> str:
    name = plan.method.name
    return f"base ignored by {name}, which averages the listed models only (list it under `models` to include it)"


def merge_stage_record(plan: MergePlan, seconds: float) -> dict[str, Any]:
    """The merge's entry in compression.json's `stages`, ahead of the later stages' entries."""
    return {"kind": "merge", "method": plan.method.name, "models": len(plan.inputs), "seconds": round(seconds, 3)}


def _input_paths(plan: MergePlan) -> list[Path | str]:
    """Every local folder the merge reads: checkpoints, their configs, LoRA adapters."""
    return [p for item in plan.inputs for p in (item.folder, item.config_folder, item.adapter_folder or "")]


def dry_run_merge_recipe(recipe: Recipe, options) -> list[StagePlan]:
    """Validate the merge (headers only) and the later stages against the merged structure."""
    from compressor.pipeline import (
        check_local_dataset_contents, check_recipe_fits_model, plan_recipe, prepare_evaluation_tasks, skeleton_model,
    )

    if options.out_dir is not None:
        check_output_dir(options.out_dir, options.overwrite)
    plan = plan_recipe_merge(recipe, options.allow_pickle)
    if options.out_dir is not None:
        check_output_spares(options.out_dir, _input_paths(plan))
    plans = [merge_stage_plan(plan)]
    if len(recipe.stages) > 1:
        base_folder = plan.inputs[plan.reference_index].config_folder
        model = skeleton_model(str(base_folder), allow_pickle=options.allow_pickle, trust_remote_code=options.trust_remote_code)
        check_recipe_fits_model(recipe, model.config)
        plans += [p for p in plan_recipe(model, recipe) if p.kind != "merge"]
        check_local_dataset_contents(recipe, str(base_folder), options)
        prepare_evaluation_tasks(recipe)
    return plans


def merge_description(plan: MergePlan) -> str:
    """`ties merge of org/base (base), org/math, org/code`: the merged model, which lives only in a
    temporary folder while the recipe runs."""
    names = [f"{i.reference} (base)" if n == plan.base_index else i.reference for n, i in enumerate(plan.inputs)]
    return f"{plan.method.name} merge of {', '.join(names)}"


def _merge_metadata(plan: MergePlan, seconds: float, stats) -> dict[str, Any]:
    record = plan.record()
    record["seconds"] = round(seconds, 3)
    record["peak_tensor_bytes"] = stats.peak_tensor_bytes
    return record


def run_merge_recipe(recipe: Recipe, options, echo: Callable[[str], None] = print):
    """Merge, then run the remaining stages (if any) on the merged model; write OUT atomically,
    holding OUT's lock."""
    from compressor.pipeline import hold_output

    assert options.out_dir is not None
    check_output_dir(options.out_dir, options.overwrite)
    with hold_output(options):
        return _run_merge_recipe_holding_output(recipe, options, echo)


def _run_merge_recipe_holding_output(recipe: Recipe, options, echo: Callable[[str], None]):
    from compressor.pipeline import (
        RunSummary, _hub_token_for, _push_output, _versions, _write_model_card, prepare_evaluation_tasks, run_recipe_holding_output,
    )

    plan = plan_recipe_merge(recipe, options.allow_pickle)
    check_output_spares(options.out_dir, _input_paths(plan))
    hub_token = _hub_token_for(recipe)  # before the merge: a missing token or network costs no work
    evaluation_tasks = prepare_evaluation_tasks(recipe)  # likewise a task that cannot run (its data is read here)
    base_reference = plan.inputs[plan.reference_index].reference
    source = {"reference": base_reference, "kind": "merge", "hub_id": plan.inputs[plan.reference_index].hub_id}
    echo(f"stage 1/{len(recipe.stages)}: merge ({plan.method.name}) of {len(plan.inputs)} models, {len(plan.slots)} tensors")
    if plan.ignored_base is not None:
        echo(f"  {plan.ignored_base}: {ignored_base_note(plan)}")
    if len(recipe.stages) == 1:
        with atomic_output_dir(options.out_dir) as staging:
            started = time.perf_counter()
            stats = run_merge(plan, staging, show_progress=options.show_progress, trust_remote_code=options.trust_remote_code)
            seconds = time.perf_counter() - started
            size = weights_bytes(staging)
            metadata = {
                "recipe": {"name": recipe.name, "sha256": recipe.sha256()},
                "source": source,
                "merge": _merge_metadata(plan, seconds, stats),
                "stages": [merge_stage_record(plan, seconds)],
                "sizes": {"compressed_bytes": size},  # no original: the inputs were merged, not compressed
                "versions": _versions(),
            }
            (staging / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
            (staging / "compression.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            _write_model_card(staging, recipe, options.out_dir.name)
        if hub_token is not None:
            _push_output(recipe, options.out_dir, hub_token, echo)
        return RunSummary(options.out_dir, None, size, None, None, [seconds], [merge_stage_plan(plan)])

    out_parent = options.out_dir.resolve().parent
    out_parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(options.out_dir)
    merged = Path(tempfile.mkdtemp(prefix=f".{options.out_dir.name}.merged-", dir=out_parent))
    claim(merged)  # a SIGKILL skips the `finally` below; the next run removes the folder
    try:
        started = time.perf_counter()
        stats = run_merge(plan, merged, show_progress=options.show_progress, trust_remote_code=options.trust_remote_code)
        seconds = time.perf_counter() - started
        extra = {"source": source, "merge": _merge_metadata(plan, seconds, stats)}
        summary = run_recipe_holding_output(str(merged), recipe, options, echo=echo, extra_metadata=extra,
                                            prior_stages=[merge_stage_record(plan, seconds)],
                                            base_description=merge_description(plan), evaluation_tasks=evaluation_tasks)
        summary.stage_seconds.insert(0, seconds)
        summary.plans.insert(0, merge_stage_plan(plan))
        return summary
    finally:
        shutil.rmtree(merged, ignore_errors=True)

"""Run a recipe: load the model, plan and run each stage, measure, save atomically.

    model ─▶ plan every stage (validation, dry run) ─▶ base perplexity
          ─▶ stage.run(model, ctx) for each stage ─▶ compressed perplexity
          ─▶ staging folder: weights + config + tokenizer + recipe.yaml + compression.json
          ─▶ rename into OUT
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from compressor import __version__
from compressor.adapters import write_lowrank_artifacts
from compressor.cache import cache_root
from compressor.checkpoint import atomic_output_dir, check_output_dir, prepare_workdir, workdir_for
from compressor.errors import DataError, RecipeError
from compressor.file_pages import release_file_pages
from compressor.formats import untie_compressed_head, write_quantization_config
from compressor.guards import assert_finite, check_free_space, state_bytes
from compressor.load_checks import check_weight_names
from compressor.model_card import build_model_card
from compressor.model_io import (
    LoadedModel, load_config, load_model, load_tokenizer, prepare_source, skeleton_from_config, source_tokenizer,
    weights_bytes,
)
from compressor.offload import is_dispatched, undispatch
from compressor.output_lock import output_lock
from compressor.processes import launch_processes
from compressor.recipe import CalibrationSpec, Recipe
from compressor.resume import LoopState, StageCheckpoints, run_key
from compressor.sparse_format import pack_sparse_layers, write_sparsity_config
from compressor.registry import stage_registry
from compressor.stages.base import StageContext, StagePlan
from compressor.stages.quant_sequence import check_quantize_sequence
from compressor.stages.stage_sequence import check_stage_sequence, describe_after_earlier_quantization


@dataclass
class RunOptions:
    out_dir: Path | None
    overwrite: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    device: str | None = None
    batch_size: int = 8
    show_progress: bool = True
    measure_perplexity: bool = True
    resume: bool = False
    max_memory: int | None = None  # bytes of weights kept in memory at load; the rest stays on disk
    stage_checkpoints: bool = True  # write .OUT.work/stage-<i>/ after each stage but the last (for --resume)
    command: str | None = None  # the command line, recorded in compression.json and the model card


@dataclass
class RunSummary:
    out_dir: Path
    original_bytes: int | None  # None for a merge alone: nothing was compressed
    compressed_bytes: int
    base_perplexity: float | None
    compressed_perplexity: float | None
    stage_seconds: list[float] = field(default_factory=list)
    plans: list[StagePlan] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None  # report.json of the `evaluate:` block
    original_gguf_bytes: int | None = None  # a GGUF input's own file; original_bytes is its dequantized load
    saved: bool = True  # False in the other processes of an `accelerate launch` (the main one saves)


def default_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _locator(recipe: Recipe, index: int, kind: str) -> Callable[..., dict[str, str]]:
    return lambda *suffix: recipe.where(("stages", index, kind, *suffix))


def check_recipe_fits_model(recipe: Recipe, config: Any) -> None:
    """Windows no longer than the model's positions: the calibration's and every stage's own data
    block (RoPE models run past the limit without an error, on positions they never learned)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return
    blocks = [(("calibration",), recipe.calibration), *((path[:-1], block) for path, block in _dataset_blocks(recipe))]
    for path, block in blocks:
        if block.seq_len > limit:
            # A default nobody wrote needs saying so, or the line points at a key the file lacks.
            unwritten = "seq_len" not in block.model_fields_set
            what = f"{block.seq_len} (the default)" if unwritten else str(block.seq_len)
            hint = f"; set seq_len: {limit} or less" if unwritten else ""
            raise RecipeError(f"{what} is longer than the model allows ({limit} positions){hint}",
                              **recipe.where((*path, "seq_len")))


def _dataset_blocks(recipe: Recipe) -> list[tuple[tuple[Any, ...], CalibrationSpec]]:
    """The recipe's calibration when a stage reads it, and every stage's own dataset block
    (distill `data`, lora `dataset`), each with its key path."""
    registry = stage_registry()
    blocks: list[tuple[tuple[Any, ...], CalibrationSpec]] = []
    if any(registry.get(s.kind).implementation.needs_calibration(s.config) for s in recipe.stages):
        blocks.append((("calibration", "dataset"), recipe.calibration))
    for index, spec in enumerate(recipe.stages):
        for key in type(spec.config).model_fields:
            value = getattr(spec.config, key)
            if isinstance(value, CalibrationSpec):
                blocks.append((("stages", index, spec.kind, key, "dataset"), value))
    return blocks


def check_recipe_datasets(recipe: Recipe) -> None:
    """Refuse a dataset reference that cannot work (a missing file, an unknown built-in) before
    any weight is read."""
    from compressor.calibration.sources import dataset_problem

    for path, block in _dataset_blocks(recipe):
        problem = dataset_problem(block.dataset)
        if problem is not None:
            raise RecipeError(f"{block.dataset}: {problem}", **recipe.where(path))


def _located_data_error(err: DataError, recipe: Recipe, block: tuple[Any, ...] = ("calibration",)) -> DataError:
    """A DataError from reading the dataset block at `block` (the recipe's calibration, a distill
    `data`, a lora `dataset`) with the recipe's file and line: the data file's own place (a bad
    line) stays in the message; an error about the block itself points at its key."""
    if err.where and err.where.startswith("calibration"):  # a key of the block: calibration.samples
        return DataError(err.message, **recipe.where((*block, *err.where.split(".")[1:])))
    message = f"{err.where}: {err.message}" if err.where else err.message
    return DataError(message, **recipe.where((*block, "dataset")))


def check_dataset_contents(recipe: Recipe, tokenizer, dry_run: bool = False) -> None:
    """Read and window the dataset blocks the recipe reads (exists, UTF-8, records with the text
    field, enough tokens for samples × seq_len), so that a bad distill `data` or lora `dataset`
    fails before any weight is read, not after the stages before it. The windows land in the
    calibration cache, where the stage finds them. `dry_run`: only the local files the user
    gave (no Hub dataset, not the built-in corpus), and nothing written to the cache."""
    from compressor.calibration.batches import build_calibration

    for path, block in _dataset_blocks(recipe):
        if dry_run and not Path(block.dataset).expanduser().exists():
            continue
        try:
            build_calibration(block, tokenizer, None if dry_run else cache_root() / "calibration")
        except DataError as err:
            raise _located_data_error(err, recipe, path[:-1]) from None


def plan_recipe(model: nn.Module, recipe: Recipe) -> list[StagePlan]:
    """Validate every stage against `model` as loaded; what each stage would touch."""
    registry = stage_registry()
    plans = []
    by_index: dict[int, StagePlan] = {}
    for i, spec in enumerate(recipe.stages):
        stage = registry.get(spec.kind).implementation
        if getattr(stage, "runs_before_load", False):  # a merge builds the model before loading
            if i > 0:
                raise RecipeError(f"{spec.kind} must be the first stage", **recipe.where(("stages", i, spec.kind)))
            continue
        plans.append(stage.plan(model, spec.config, _locator(recipe, i, spec.kind)))
        by_index[i] = plans[-1]
    check_quantize_sequence(recipe, by_index)
    check_stage_sequence(recipe, by_index, model)
    describe_after_earlier_quantization(recipe, by_index, model)
    return plans


def _versions() -> dict[str, str]:
    import compressed_tensors
    import transformers

    return {
        "compressor": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "python": platform.python_version(),
    }


def _write_checkpoint(loaded: LoadedModel, recipe: Recipe, folder: Path, out_dir: Path, metadata: dict[str, Any]) -> None:
    pack_sparse_layers(loaded.model)
    untie_compressed_head(loaded.model)
    loaded.model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="2GB")
    write_quantization_config(loaded.model, folder)
    write_sparsity_config(loaded.model, folder)
    loaded.tokenizer.save_pretrained(str(folder))
    # The adapter corrects the compressed weights, so its base is OUT itself (the final folder, not
    # the staging one), never the original model: loaded there, it would be neither model.
    metadata["sizes"]["lowrank_bytes"] = write_lowrank_artifacts(loaded.model, folder, str(out_dir.resolve()))
    (folder / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    metadata["sizes"]["compressed_bytes"] = weights_bytes(folder)
    (folder / "compression.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_model_card(folder: Path, recipe: Recipe, out_name: str) -> None:
    card = build_model_card(folder, recipe.output.push_to_hub, local_name=out_name)
    (folder / "README.md").write_text(str(card), encoding="utf-8")


def _plan_evaluation(recipe: Recipe, options: RunOptions, echo: Callable[[str], None], tokenizer: Any, prepared: Any = None):
    """The recipe's `evaluate:` block as lm-eval runs, or None without one; a chat template the
    tokenizer lacks, and a task that cannot run, are refused here, before the model loads.
    `prepared`: the block's tasks when the caller built them already (`prepare_recipe_tasks`)."""
    if recipe.evaluate is None:
        return None
    from compressor.evaluation.recipe_eval import RecipeEvaluation

    template = evaluation_chat_template(recipe, tokenizer)
    prepared = prepared if prepared is not None else prepare_evaluation_tasks(recipe)
    return RecipeEvaluation.plan(recipe.evaluate, prepared, recipe.name, options.batch_size, echo, template, options.show_progress)


def evaluation_chat_template(recipe: Recipe, tokenizer: Any) -> str | None:
    """The chat template `evaluate.apply_chat_template` asks for, from the model's tokenizer
    (None when it asks for none); RecipeError at that key when the tokenizer has no such template."""
    if recipe.evaluate is None or not recipe.evaluate.apply_chat_template:
        return None
    from compressor.evaluation.options import chat_template_text

    try:
        return chat_template_text(tokenizer, recipe.evaluate.apply_chat_template)
    except ValueError as err:
        raise RecipeError(str(err), **recipe.where(("evaluate", "apply_chat_template"))) from None


def hold_output(options: RunOptions) -> ContextManager[None]:
    """The lock on OUT for this run (compressor.output_lock); under a launch of several
    processes only the main one writes OUT, so only it holds the lock."""
    assert options.out_dir is not None
    processes = launch_processes(default_device(options.device))
    return output_lock(options.out_dir) if processes.is_main else nullcontext()


def run_recipe(
    model_reference: str,
    recipe: Recipe,
    options: RunOptions,
    echo: Callable[[str], None] = print,
) -> RunSummary:
    """Compress `model_reference` with `recipe` into `options.out_dir`, holding OUT's lock."""
    assert options.out_dir is not None
    check_output_dir(options.out_dir, options.overwrite, inputs=[model_reference])
    with hold_output(options):
        return run_recipe_holding_output(model_reference, recipe, options, echo)


def run_recipe_holding_output(
    model_reference: str,
    recipe: Recipe,
    options: RunOptions,
    echo: Callable[[str], None] = print,
    extra_metadata: dict[str, Any] | None = None,
    prior_stages: list[dict[str, Any]] | None = None,
    base_description: str | None = None,
    evaluation_tasks: Any = None,
) -> RunSummary:
    """`run_recipe` for a caller that has checked OUT (check_output_dir) and holds its lock
    (`hold_output`).

    `prior_stages`: entries for stages that ran before the model was loaded (the merge that made
    it), logged ahead of this run's stages in compression.json. `base_description`: what the
    evaluation report calls the base when `model_reference` is a temporary folder (a merge's).
    `evaluation_tasks`: the `evaluate:` block's tasks, built and checked before the merge ran.
    """
    from compressor.calibration.batches import build_calibration
    from compressor.evaluation.perplexity import evaluation_windows, limited_count, perplexity_on

    assert options.out_dir is not None
    hub_token = _hub_token_for(recipe)
    device = default_device(options.device)
    registry = stage_registry()
    pre_load = [s.kind for s in recipe.stages if getattr(registry.get(s.kind).implementation, "runs_before_load", False)]
    if pre_load and "merge" not in (extra_metadata or {}):  # the merge runner passes its record here
        raise RecipeError(f"this recipe starts with `{pre_load[0]}`, which builds the model: run it without a MODEL",
                          **recipe.where(("stages", 0)))

    # Cheap checks first: config and calibration data fail before any weight is read.
    check_recipe_datasets(recipe)
    source, path, folder = prepare_source(model_reference, allow_pickle=options.allow_pickle)
    config = load_config(path, model_reference, options.trust_remote_code)
    check_recipe_fits_model(recipe, config)
    if getattr(config, "quantization_config", None) is None:  # a compressed input is planned once loaded
        skeleton = skeleton_from_config(config, options.trust_remote_code)
        if folder is not None:  # first: planning may unfuse MoE experts, renaming their weights
            check_weight_names(folder, skeleton, model_reference)
        plan_recipe(skeleton, recipe)  # targets fail before any weight is read
    tokenizer = load_tokenizer(path, model_reference, options.trust_remote_code)
    evaluation = _plan_evaluation(recipe, options, echo, tokenizer, evaluation_tasks)
    calibration: dict[str, torch.Tensor] = {}

    def calibration_tokens() -> torch.Tensor:
        if "tokens" not in calibration:
            try:
                calibration["tokens"] = build_calibration(recipe.calibration, tokenizer, cache_root() / "calibration")
            except DataError as err:
                raise _located_data_error(err, recipe) from None
        return calibration["tokens"]

    if any(registry.get(s.kind).implementation.needs_calibration(s.config) for s in recipe.stages):
        calibration_tokens()
    check_dataset_contents(recipe, tokenizer)  # the stages' own data blocks too (built once, cached)

    # Kept alive for the whole run: accelerate may spill weights it cannot memory-map there.
    offload_scratch = tempfile.TemporaryDirectory(prefix="compressor-offload-") if options.max_memory else None
    loaded = load_model(
        model_reference,
        allow_pickle=options.allow_pickle,
        trust_remote_code=options.trust_remote_code,
        max_memory=options.max_memory,
        offload_folder=Path(offload_scratch.name) if offload_scratch else None,
    )
    model = loaded.model
    plan_recipe(model, recipe)
    original_bytes = weights_bytes(loaded.folder) if loaded.folder else sum(
        t.numel() * t.element_size() for t in model.state_dict().values()
    )

    windows = evaluation_windows(tokenizer, recipe.calibration.seq_len) if options.measure_perplexity else None
    if windows is not None and recipe.evaluate is not None and recipe.evaluate.limit is not None:
        windows = windows[: limited_count(len(windows), recipe.evaluate.limit)]
    base_ppl = perplexity_on(model, windows).perplexity if windows is not None else None
    if base_ppl is not None:
        echo(f"base held-out perplexity: {base_ppl:.3f}")
    if evaluation is not None:
        from compressor.evaluation.catalog import TaskError

        try:
            evaluation.evaluate_base(loaded, base_description or model_reference)
        except TaskError as err:  # a task whose data cannot be read: point at the recipe's key
            raise TaskError(err.message, **recipe.where(("evaluate", "tasks"))) from None
    # The base evaluation made every mapped weight resident; stages read them back block by block.
    release_file_pages(model.parameters())

    def reference_model() -> nn.Module:
        # Under `--max-memory` the frozen copy (a distill teacher) gets the same accelerate device
        # map as the model: what does not fit is read from disk for each forward, never trained.
        return load_model(
            model_reference,
            allow_pickle=options.allow_pickle,
            trust_remote_code=options.trust_remote_code,
            max_memory=options.max_memory,
            offload_folder=Path(offload_scratch.name) if offload_scratch else None,
        ).model

    processes = launch_processes(device)
    workdir = prepare_workdir(options.out_dir, options.resume) if processes.is_main else workdir_for(options.out_dir)
    processes.wait()
    ctx = StageContext(
        tokenizer=tokenizer,
        calibration=calibration_tokens,
        device=device,
        batch_size=options.batch_size,
        show_progress=options.show_progress,
        workdir=workdir,
        resume=options.resume,
        load_reference_model=reference_model,
    )
    gguf_file = loaded.source.gguf_file
    summary = RunSummary(options.out_dir, original_bytes, 0, base_ppl, None,
                         original_gguf_bytes=gguf_file.stat().st_size if gguf_file is not None else None)
    stage_log: list[dict[str, Any]] = []
    # A merged model sits in a fresh temporary folder each run: its stage checkpoints could never match.
    checkpoints = stage_checkpoints_for(model_reference, loaded, recipe, options, device, echo,
                                        merged="merge" in (extra_metadata or {}), writes=processes.is_main)
    loop = LoopState(stage_log, summary.stage_seconds, summary.plans)
    model, first_stage = checkpoints.restore(model, ctx, loop)
    try:
        model = _run_stages(model, recipe, first_stage, ctx, checkpoints, loop, echo)
    except BaseException:  # Ctrl-C, SIGTERM or a failure: say what stays beside OUT
        note = checkpoints.kept_note() if processes.is_main else None
        if note is not None:
            print(note, file=sys.stderr)
        elif processes.is_main:
            checkpoints.drop_empty_workdir()
        raise
    loaded.model = model
    if not processes.is_main:
        echo(f"process {processes.index + 1} of {processes.count}: every stage done; process 1 saves {options.out_dir}")
        summary.saved = False
        return summary

    if windows is not None:
        summary.compressed_perplexity = perplexity_on(model, windows).perplexity
    metadata: dict[str, Any] = {
        "recipe": {"name": recipe.name, "sha256": recipe.sha256()},
        "source": {"reference": model_reference, "kind": loaded.source.kind, "hub_id": loaded.source.hub_id},
        "seed": recipe.calibration.seed,
        "stages": [*(prior_stages or []), *stage_log],
        "modules": ctx.records,
        "training": ctx.notes,
        "sizes": {"original_bytes": original_bytes, **({"original_gguf_bytes": summary.original_gguf_bytes} if gguf_file else {})},
        "perplexity": {
            "base": base_ppl,
            "compressed": summary.compressed_perplexity,
            "tokens": int(windows[:, 1:].numel()) if windows is not None else 0,
            "seq_len": recipe.calibration.seq_len,
            "slice": "builtin:abstracts evaluation slice",
        },
        "versions": _versions(),
    }
    metadata.update(extra_metadata or {})
    if options.command:
        metadata["command"] = options.command
    check_free_space(options.out_dir, state_bytes(model))
    with atomic_output_dir(options.out_dir) as staging:
        _write_checkpoint(loaded, recipe, staging, options.out_dir, metadata)
        for name, source in ctx.artifacts.items():
            shutil.copyfile(source, staging / name)
        summary.compressed_bytes = metadata["sizes"]["compressed_bytes"]
        if evaluation is not None:
            summary.evaluation = evaluation.evaluate_compressed(loaded, staging, options.out_dir)
        # Last, so the card can show the evaluation that just ran.
        _write_model_card(staging, recipe, options.out_dir.name)
    shutil.rmtree(workdir, ignore_errors=True)
    if hub_token is not None:
        _push_output(recipe, options.out_dir, hub_token, echo)
    return summary


def _run_stages(
    model: nn.Module,
    recipe: Recipe,
    first_stage: int,
    ctx: StageContext,
    checkpoints: StageCheckpoints,
    loop: LoopState,
    echo: Callable[[str], None],
) -> nn.Module:
    """Plan and run every stage from `first_stage` on, checkpointing after each."""
    registry = stage_registry()
    for index, spec in enumerate(recipe.stages):
        stage = registry.get(spec.kind).implementation
        if getattr(stage, "runs_before_load", False) or index < first_stage:
            continue
        locate = _locator(recipe, index, spec.kind)
        plan = stage.plan(model, spec.config, locate)
        ctx.stage_index, ctx.locate = index, locate
        echo(f"stage {index + 1}/{len(recipe.stages)}: {spec.kind} ({plan.method}) on {len(plan.selected)} modules")
        for note in plan.notes:
            echo(f"  warning: {note}")
        started = time.perf_counter()
        if is_dispatched(model) and not getattr(stage, "streams_blocks", lambda _config: False)(spec.config):
            undispatch(model)  # this stage reads whole weights: everything comes into memory first
        model = stage.run(model, spec.config, ctx, plan)
        if is_dispatched(model):
            undispatch(model)  # what is left on disk after a streaming stage is small (norms, rotary)
        seconds = time.perf_counter() - started
        assert_finite(model, f"stage {index + 1} ({spec.kind})")
        loop.stage_seconds.append(seconds)
        loop.plans.append(plan)
        loop.stage_log.append({"kind": spec.kind, "method": plan.method, "modules": len(plan.selected), "seconds": round(seconds, 3)})
        checkpoints.save(index, model, ctx, loop)
        # Last in the loop: the finiteness check and the stage checkpoint read every weight again.
        release_file_pages(model.parameters())
    return model


def stage_checkpoints_for(
    model_reference: str,
    loaded: LoadedModel,
    recipe: Recipe,
    options: RunOptions,
    device: torch.device,
    echo: Callable[[str], None],
    merged: bool = False,
    writes: bool = True,
) -> StageCheckpoints:
    assert options.out_dir is not None
    from compressor.calibration.batches import source_fingerprint

    data = [source_fingerprint(block.dataset) for _, block in _dataset_blocks(recipe)]
    key = run_key(recipe.sha256(), model_reference, loaded.folder, device, options.batch_size, data)
    enabled = options.stage_checkpoints and not merged and writes
    return StageCheckpoints(workdir_for(options.out_dir), key, [s.kind for s in recipe.stages], enabled, options.resume, echo)


def _hub_token_for(recipe: Recipe) -> str | None:
    """The token for `output.push_to_hub`, found before any work so a missing one costs nothing."""
    if recipe.output.push_to_hub is None:
        return None
    from compressor.hub import check_online, resolve_token

    check_online()
    return resolve_token(None)


def _push_output(recipe: Recipe, out_dir: Path, token: str, echo: Callable[[str], None]) -> None:
    """`output.push_to_hub`: upload the saved folder and its card (after the save succeeded)."""
    from compressor.hub import plan_upload, push

    assert recipe.output.push_to_hub is not None
    plan = plan_upload(out_dir, recipe.output.push_to_hub)
    echo(f"pushed to {recipe.output.push_to_hub}: {push(plan, token, echo=echo)}")


def skeleton_model(model_reference: str, *, allow_pickle: bool, trust_remote_code: bool) -> nn.Module:
    """The model's structure with no weights (meta tensors): enough to plan, nothing written."""
    from compressor.model_io import check_weights_are_safe, gguf_config, load_config, resolve_model

    source = resolve_model(model_reference)
    if source.kind == "gguf":
        assert source.gguf_file is not None
        config = gguf_config(source.gguf_file, model_reference)
    else:
        if source.kind == "local":
            check_weights_are_safe(Path(source.load_path), allow_pickle, model_reference)
        config = load_config(source.load_path, model_reference, trust_remote_code)
    skeleton = skeleton_from_config(config, trust_remote_code)
    if source.kind == "local" and getattr(config, "quantization_config", None) is None:
        check_weight_names(Path(source.load_path), skeleton, model_reference)
    return skeleton


def dry_run(model_reference: str, recipe: Recipe, options: RunOptions) -> list[StagePlan]:
    """Validate `recipe` against the model's structure and report what each stage targets."""
    if options.out_dir is not None:
        check_output_dir(options.out_dir, options.overwrite, inputs=[model_reference])
    check_recipe_datasets(recipe)
    model = skeleton_model(model_reference, allow_pickle=options.allow_pickle, trust_remote_code=options.trust_remote_code)
    check_recipe_fits_model(recipe, model.config)
    plans = plan_recipe(model, recipe)
    check_local_dataset_contents(recipe, model_reference, options)
    if recipe.evaluate is not None and recipe.evaluate.apply_chat_template:
        evaluation_chat_template(recipe, source_tokenizer(model_reference, options.trust_remote_code))
    prepare_evaluation_tasks(recipe)
    return plans


def prepare_evaluation_tasks(recipe: Recipe) -> Any:
    """The `evaluate:` block's tasks built (their data read) and checked, as the run does before
    any weight is read and `--dry-run` does too (`prepare_recipe_tasks`); None without the block."""
    if recipe.evaluate is None:  # the evaluation modules need lm-eval and matplotlib: not imported without it
        return None
    from compressor.evaluation.recipe_eval import prepare_recipe_tasks

    return prepare_recipe_tasks(recipe)


def check_local_dataset_contents(recipe: Recipe, model_reference: str, options: RunOptions) -> None:
    """`--dry-run`: the dataset files the recipe names, read and windowed with the model's
    tokenizer (check_dataset_contents); the tokenizer is loaded only when there is such a file."""
    if any(Path(block.dataset).expanduser().exists() for _, block in _dataset_blocks(recipe)):
        check_dataset_contents(recipe, source_tokenizer(model_reference, options.trust_remote_code), dry_run=True)

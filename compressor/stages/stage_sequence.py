"""Rules across the stages of one recipe that no single stage's plan can see.

Each stage plans against the model as loaded, but at run time it meets the model the earlier
stages left: a layer quantized by stage 1 is no longer a Linear layer for stage 2. These rules
replay that, so `--dry-run` (and the checks before any weight is read) refuse what the run
would refuse later, after spending the earlier stages' time:

- a quantize or (unstructured) prune stage every one of whose targets an earlier stage already
  replaced (quantized, or factorized by SVD): at run time it matches nothing;
- a lowrank ``eora`` stage none of whose targets is compressed, by an earlier quantize stage or
  in the checkpoint as loaded: EoRA compensates quantization error, so there is nothing for it
  to compensate.

A stage that only smooths (SmoothQuant with ``activations: null``) replaces no layer.

- a training stage (distill, lowrank lora) whose `batch_size` is larger than the windows it draws
  batches from (its `data` / `dataset`, else the recipe's calibration): each batch would silently
  hold every window.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from compressor.errors import RecipeError
from compressor.stages.base import EarlierQuantization, StagePlan
from compressor.stages.quant_schemes import smooths_only


def _replaces_layers(kind: str, config: Any) -> bool:
    """Stages whose targets stop being plain Linear layers: quantized layers, and SVD's
    factorized ones (at a fixed rank; at an `energy` a layer it would not shrink stays)."""
    if kind == "quantize":
        return not smooths_only(config)
    return kind == "lowrank" and config.method == "svd" and config.rank is not None


def _matches_only_replaced(kind: str, config: Any) -> bool:
    """Stages that act on plain Linear layers only, so layers replaced earlier drop out of them."""
    if kind == "quantize":
        return True
    return kind == "prune" and getattr(config, "structured", None) is None


def _few(names: set[str]) -> str:
    ordered = sorted(names)
    return ", ".join(ordered[:2]) + (f" and {len(ordered) - 2} more" if len(ordered) > 2 else "")


def _compressed_as_loaded(model: nn.Module, names: set[str]) -> bool:
    # A dry run plans on a skeleton built from the config, whose layers are plain Linear even
    # for a compressed checkpoint: its quantization_config is what tells.
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        return True
    return any(hasattr(model.get_submodule(name), "weight_packed") for name in names)


def _check_batches_fit_the_data(recipe) -> None:
    from compressor.registry import stage_registry

    registry = stage_registry()
    for index, spec in enumerate(recipe.stages):
        config = spec.config
        # A stage that trains names the key of its own dataset block (distill `data`, lora `dataset`).
        key = getattr(registry.get(spec.kind).implementation, "batch_data_key", lambda _config: None)(config)
        if key is None:
            continue
        own = getattr(config, key)
        data, where = (own, f"{key}.samples") if own is not None else (recipe.calibration, "calibration.samples")
        if config.batch_size > data.samples:
            raise RecipeError(
                f"batch_size {config.batch_size} is larger than the {data.samples} windows it draws batches from"
                f" ({where}): lower batch_size or raise the samples",
                **recipe.where(("stages", index, spec.kind, "batch_size")),
            )


def check_stage_sequence(recipe, plans: dict[int, StagePlan], model: nn.Module) -> None:
    """Raise RecipeError when a stage would find nothing left to act on (`plans` by stage index,
    made against `model` as loaded), or draws batches larger than its data."""
    _check_batches_fit_the_data(recipe)
    replaced: dict[str, int] = {}  # module name → index of the stage that replaced it
    for index, spec in enumerate(recipe.stages):
        plan = plans.get(index)
        if plan is None:
            continue
        selected = set(plan.selected)
        earlier = {replaced[name] for name in selected if name in replaced}
        if _matches_only_replaced(spec.kind, spec.config) and selected and selected <= replaced.keys():
            stages = ", ".join(f"stages[{i}]" for i in sorted(earlier))
            advice = "prune before quantizing" if spec.kind == "prune" else "narrow the earlier stage's targets"
            raise RecipeError(
                f"every module it targets ({_few(selected)}) is already replaced by {stages} (quantized or"
                f" factorized), so it would match nothing when it runs; {advice}",
                **recipe.where(("stages", index, spec.kind, "targets")),
            )
        eora = spec.kind == "lowrank" and getattr(spec.config, "method", None) == "eora"
        if eora and not earlier and not _compressed_as_loaded(model, selected):
            raise RecipeError(
                "eora compensates quantization error, and no earlier quantize stage compresses any of its"
                " targets: put a quantize stage before it",
                **recipe.where(("stages", index, spec.kind, "method")),
            )
        if _replaces_layers(spec.kind, spec.config):
            for name in selected:
                replaced.setdefault(name, index)


def quantized_before(recipe, plans: dict[int, StagePlan]) -> dict[int, dict[str, EarlierQuantization]]:
    """For each stage (by index), the layers that earlier quantize stages replace, and how."""
    from compressor.stages.quantize import resolve_method

    earlier: dict[str, EarlierQuantization] = {}
    found: dict[int, dict[str, EarlierQuantization]] = {}
    for index, spec in enumerate(recipe.stages):
        found[index] = dict(earlier)
        plan = plans.get(index)
        if plan is None or spec.kind != "quantize" or smooths_only(spec.config):
            continue
        layer_class = resolve_method(spec.config).layer_class
        for name, scheme in plan.selected.items():
            earlier.setdefault(name, EarlierQuantization(index + 1, scheme, layer_class))
    return found


def describe_after_earlier_quantization(recipe, plans: dict[int, StagePlan], model: nn.Module) -> None:
    """A stage whose plan depends on what earlier quantize stages make of its layers (distill
    trains scales or adapters on them, not their weights) rewrites its plan to say so: each plan
    saw the model as loaded, where those layers are still Linear."""
    from compressor.registry import stage_registry

    registry = stage_registry()
    for index, quantized in quantized_before(recipe, plans).items():
        spec = recipe.stages[index]
        describe = getattr(registry.get(spec.kind).implementation, "describe_after_quantization", None)
        if describe is not None and index in plans:
            describe(plans[index], spec.config, model, quantized,
                     lambda *suffix, index=index, kind=spec.kind: recipe.where(("stages", index, kind, *suffix)))

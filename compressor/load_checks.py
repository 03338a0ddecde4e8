"""Load a causal LM with `from_pretrained` and refuse what transformers would quietly paper over.

transformers loads a checkpoint whose tensor names do not match the architecture (or a BERT
config) by leaving the unmatched weights random, with a multi-line report as a warning; a
shape that does not fit the config raises a RuntimeError after that report. Compressing such
a model would "succeed" on random weights, so both become a one-line ModelError here.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from compressor.errors import ModelError, first_line
from compressor.weight_files import has_safetensors, safetensors_files

# Architecture names a checkpoint declares when it was saved with a language-model head.
CAUSAL_NAME_ENDINGS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _causal_class_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def check_causal_lm(config: Any, reference: str) -> None:
    """Refuse a config that is not a causal language model (BERT, T5, a bare base model)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return  # remote code names its own causal-LM class
    model_type = getattr(config, "model_type", None) or type(config).__name__
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelError(f"model_type `{model_type}` is not a causal language model (transformers has no "
                         "AutoModelForCausalLM class for it)", where=reference)
    # BERT has a causal-LM class (BertLMHeadModel), but a checkpoint saved as BertModel is an encoder.
    declared = list(getattr(config, "architectures", None) or [])
    causal = _causal_class_names()
    if declared and not any(name in causal or name.endswith(CAUSAL_NAME_ENDINGS) for name in declared):
        raise ModelError(f"checkpoint is a {declared[0]} (model_type `{model_type}`), not a causal language model",
                         where=reference)


class _HeldRecords(logging.Filter):
    """Holds back what a logger logs: dropped when the load is refused (the one-line error says
    what matters), passed on when it is accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


@contextlib.contextmanager
def _held_load_report() -> Iterator[_HeldRecords]:
    """transformers' multi-line load report (and its other loading warnings), held back.
    A filter, not a raised level: transformers logs other warnings when that logger's level is set."""
    from transformers.utils import logging as hf_logging

    report_logger = hf_logging.get_logger("transformers.modeling_utils")
    held = _HeldRecords()
    report_logger.addFilter(held)
    try:
        yield held
    finally:
        report_logger.removeFilter(held)


def _missing_parameters(model: torch.nn.Module, missing: set[str]) -> list[str]:
    """Missing keys that are parameters left random: not tied copies, not buffers the model computes."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # transformers 5 drops these already
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return sorted(key for key in missing if key not in tied and key in parameters)


def check_loading_info(model: torch.nn.Module, info: dict[str, Any], reference: str) -> None:
    """Refuse a load that left parameters random or found tensors of the wrong shape."""
    architecture = type(model).__name__
    model_type = getattr(model.config, "model_type", "?")
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda item: item[0])
    if mismatched:
        name, found, expected = mismatched[0]
        raise ModelError(
            f"the weights do not fit config.json: tensor {name} is {list(found)} in the checkpoint, but "
            f"{architecture} needs {list(expected)} ({len(mismatched)} tensors differ)",
            where=reference,
        )
    missing = _missing_parameters(model, set(info.get("missing_keys") or []))
    if missing:
        unexpected = sorted(info.get("unexpected_keys") or [])
        found = f"; the checkpoint has e.g. {unexpected[0]}" if unexpected else ""
        raise ModelError(
            f"the checkpoint lacks {len(missing)} of {architecture}'s weights (e.g. {missing[0]}{found}): "
            f"its tensor names do not match model_type `{model_type}`, and those weights would be random",
            where=reference,
        )


def load_causal_lm(path: str, reference: str, **kwargs: Any) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)`, refusing unreadable or incomplete weights."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        with _held_load_report() as held:
            # Mismatched shapes are reported in the loading info instead of raised after the report.
            model, info = AutoModelForCausalLM.from_pretrained(
                path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
    except OSError as err:
        raise ModelError(f"cannot load: {first_line(err)}", where=reference) from None
    except (SafetensorError, pickle.UnpicklingError, EOFError) as err:
        # Local files are checked beforehand (compressor.weight_files); this is a Hub snapshot.
        raise ModelError(f"cannot read the weights: {first_line(err)}", where=reference) from None
    check_loading_info(model, info, reference)
    for record in held.records:  # an accepted load (unexpected tensors, say) warns as before
        logging.getLogger(record.name).handle(record)
    return model


def _checkpoint_shapes(folder: Path) -> dict[str, list[int]]:
    """Each tensor's name and shape in a folder's safetensors files, read from the headers only."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt") as handle:
            shapes.update({name: list(handle.get_slice(name).get_shape()) for name in handle.keys()})
    return shapes


def planned_loading_info(folder: Path, skeleton: torch.nn.Module) -> dict[str, Any]:
    """What `from_pretrained` would report for `folder` (missing, unexpected and mismatched tensors),
    worked out from the safetensors headers and a meta-device model: no weight is read.

    Checkpoint names go through transformers' own renaming rules for the architecture (legacy names,
    the base-model prefix); a tensor that a converter fuses with others (MoE experts) counts as found
    but its shape is not compared, since only the fused result has the model's shape."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    expected = skeleton.state_dict()
    transforms = get_model_conversion_mapping(skeleton)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(skeleton, "base_model_prefix", None)
    found: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[tuple[str, list[int], list[int]]] = []
    for name, shape in _checkpoint_shapes(folder).items():
        renamed, converter = rename_source_key(name, renamings, converters, prefix, expected)
        if renamed not in expected and name in expected:  # as transformers: keep the name, fix the prefix only
            renamed, converter = rename_source_key(name, [], [], prefix, expected)
        if renamed not in expected:
            unexpected.append(name)
            continue
        found.add(renamed)
        if converter is None and shape != list(expected[renamed].shape):
            mismatched.append((name, shape, list(expected[renamed].shape)))
    return {"missing_keys": set(expected) - found, "unexpected_keys": unexpected, "mismatched_keys": mismatched}


def check_weight_names(folder: Path, skeleton: torch.nn.Module, reference: str) -> None:
    """Refuse, before any weight is read, a safetensors folder whose tensors do not fit the model
    its config.json describes (the same refusals `load_causal_lm` makes after the load).
    A pickle checkpoint (--allow-pickle) has no header to read: its load makes the check."""
    if not has_safetensors(folder):
        return
    check_loading_info(skeleton, planned_loading_info(folder, skeleton), reference)

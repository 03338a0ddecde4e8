"""The compressed-tensors on-disk format, built with the ``compressed-tensors`` library.

A model whose quantized layers are ``QuantLinear`` modules already holds the tensors of the
``pack-quantized`` format under the right names (``W8A8Linear``: ``int-quantized`` for int8
W8A8, ``float-quantized`` for FP8); this module describes them in a ``QuantizationConfig``
(one config group per distinct scheme, each with its format, targets written as compact
regexes; ``mixed-precision`` at the top when the formats differ) and writes it into
``config.json`` so that transformers and vLLM load the folder. A module's ``weight_calibration``
(``WeightCalibration``: GPTQ's ``actorder``, the weight ``observer``) is part of its scheme.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
    QuantizationType,
)
from torch import nn

from compressor.kernels.quant_linear import QuantLinear
from compressor.kernels.w8a8_linear import W8A8Linear

_INDEX = re.compile(r"\.\d+\.")


@dataclass(frozen=True)
class WeightCalibration:
    """How a layer's scales were found, as compressed-tensors' ``QuantizationArgs`` names it:
    ``actorder`` (GPTQ's column order: "static", or None when columns went in order) and
    ``observer`` with its ``observer_kwargs`` (as sorted (key, value) pairs, so it hashes).
    Quantized modules carry it as ``weight_calibration`` (None: not known, written as nothing)."""

    actorder: str | None = None
    observer: str | None = None
    observer_kwargs: tuple[tuple[str, Any], ...] = ()

    def args(self) -> dict[str, Any]:
        """The `QuantizationArgs` fields this sets (only those it knows, as llm-compressor writes them)."""
        fields: dict[str, Any] = {}
        if self.actorder is not None:
            fields["actorder"] = self.actorder
        if self.observer is not None:
            fields["observer"] = self.observer
        if self.observer_kwargs:
            fields["observer_kwargs"] = dict(self.observer_kwargs)
        return fields

    @classmethod
    def from_args(cls, weights: QuantizationArgs) -> "WeightCalibration | None":
        """What a saved config group says (None when it says neither), for a reloaded model."""
        actorder = str(getattr(weights.actorder, "value", weights.actorder)) if weights.actorder is not None else None
        observer = weights.observer if "observer" in weights.model_fields_set else None
        if actorder is None and observer is None:
            return None
        return cls(actorder, observer, tuple(sorted((weights.observer_kwargs or {}).items())))


SchemeKey = tuple  # ("pack", bits, group_size, symmetric, calibration) | ("w8a8", weight type, act type | None, dynamic, calibration)


def _scheme_key(module: QuantLinear | W8A8Linear) -> SchemeKey:
    calibration = getattr(module, "weight_calibration", None)
    if isinstance(module, W8A8Linear):
        acts = module.activations
        return ("w8a8", module.weight_type, acts.type if acts else None, acts.dynamic if acts else None, calibration)
    return ("pack", module.bits, module.group_size, module.symmetric, calibration)


def _calibration_args(calibration: WeightCalibration | None) -> dict[str, Any]:
    return calibration.args() if calibration is not None else {}


def _w8a8_scheme(
    targets: list[str], weight_type: str, act_type: str | None, dynamic: bool | None, calibration: WeightCalibration | None
) -> QuantizationScheme:
    weights = QuantizationArgs(
        num_bits=8, type=weight_type, symmetric=True, strategy=QuantizationStrategy.CHANNEL, dynamic=False,
        **_calibration_args(calibration),
    )
    inputs = None
    if act_type is not None:
        inputs = QuantizationArgs(
            num_bits=8,
            type=act_type,
            symmetric=True,
            strategy=QuantizationStrategy.TOKEN if dynamic else QuantizationStrategy.TENSOR,
            dynamic=bool(dynamic),
            # A static scale is the largest |x| over every calibration token: llm-compressor's
            # static_minmax (its `minmax` averages over batches). Dynamic scales are found at run time.
            **({} if dynamic else {"observer": "static_minmax"}),
        )
    fmt = CompressionFormat.int_quantized if weight_type == "int" else CompressionFormat.float_quantized
    return QuantizationScheme(targets=targets, weights=weights, input_activations=inputs, format=fmt.value)


def _scheme(key: SchemeKey, targets: list[str]) -> QuantizationScheme:
    if key[0] == "w8a8":
        return _w8a8_scheme(targets, *key[1:])
    return QuantizationScheme(
        targets=targets, weights=_weight_args(*key[1:]), format=CompressionFormat.pack_quantized.value
    )


def _weight_args(bits: int, group_size: int | None, symmetric: bool, calibration: WeightCalibration | None) -> QuantizationArgs:
    return QuantizationArgs(
        num_bits=bits,
        type=QuantizationType.INT,
        symmetric=symmetric,
        strategy=QuantizationStrategy.GROUP if group_size else QuantizationStrategy.CHANNEL,
        group_size=group_size,
        dynamic=False,
        **_calibration_args(calibration),
    )


def _generic_pattern(name: str) -> str:
    """`model.layers.3.mlp.up_proj` → the regex for that module in every layer."""
    parts = _INDEX.split(name)
    return "re:^" + r"\.\d+\.".join(re.escape(p) for p in parts) + "$"


def _compact_targets(names: list[str], all_linear: list[str]) -> list[str]:
    """Regexes covering exactly `names` among `all_linear`, falling back to plain names."""
    chosen = set(names)
    by_pattern: dict[str, list[str]] = defaultdict(list)
    for name in all_linear:
        by_pattern[_generic_pattern(name)].append(name)
    targets: list[str] = []
    covered: set[str] = set()
    for name in names:
        if name in covered:
            continue
        pattern = _generic_pattern(name)
        members = by_pattern[pattern]
        if len(members) > 1 and all(m in chosen for m in members):
            targets.append(pattern)
            covered.update(members)
        else:
            targets.append(name)
            covered.add(name)
    return targets


def checkpoint_module_names(model: nn.Module) -> Callable[[str], str]:
    """Module name in memory → the name its tensors get on disk. transformers 5 renames some modules
    on load and back on save (Mixtral's `block_sparse_moe` is `mlp` in memory); readers of the saved
    file (vLLM) match targets against the on-disk names, transformers against the in-memory ones."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # a transformers without load-time renaming: the names are the same
        return lambda name: name
    reverse = [t.reverse_transform() for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]

    def on_disk(name: str) -> str:
        renamed, _ = rename_source_key(f"{name}.weight", reverse, [], reverse=True)
        return renamed.removesuffix(".weight")

    return on_disk


def _both_namings(entries: list[str], on_disk: Callable[[str], str]) -> list[str]:
    """`entries` (module names or their regexes) plus their on-disk forms where those differ."""
    names = list(entries)
    for entry in entries:
        if entry.startswith("re:"):
            continue
        names.append(on_disk(entry))
    return list(dict.fromkeys(names))


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear | W8A8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, W8A8Linear))}


def build_quantization_config(model: nn.Module) -> QuantizationConfig | None:
    """The compressed-tensors description of every QuantLinear in `model`."""
    quantized = quantized_modules(model)
    if not quantized:
        return None
    linear_names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear, W8A8Linear))]
    on_disk = checkpoint_module_names(model)
    disk_linear_names = [on_disk(n) for n in linear_names]
    groups: dict[SchemeKey, list[str]] = defaultdict(list)
    for name, module in quantized.items():
        groups[_scheme_key(module)].append(name)
    config_groups: dict[str, Any] = {}
    for index, (key, names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        targets = _compact_targets(names, linear_names)
        targets += _compact_targets([on_disk(n) for n in names], disk_linear_names)
        config_groups[f"group_{index}"] = _scheme(key, list(dict.fromkeys(targets)))
    formats = {scheme.format for scheme in config_groups.values()}
    ignore = _both_namings([n for n in linear_names if n not in quantized], on_disk)
    return QuantizationConfig(
        config_groups=config_groups,
        quant_method="compressed-tensors",
        format=formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )


def write_quantization_config(model: nn.Module, directory: Path) -> dict[str, Any] | None:
    """Add ``quantization_config`` to ``directory/config.json``; return what was written."""
    qconfig = build_quantization_config(model)
    if qconfig is None:
        return None
    import compressed_tensors

    data = qconfig.model_dump(mode="json", exclude={"quant_method"})
    block = {
        "quant_method": "compressed-tensors",
        "version": compressed_tensors.__version__,
        "sparsity_config": {},
        "transform_config": {},
        **data,
    }
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = block
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return block


def untie_compressed_head(model: nn.Module) -> bool:
    """Set ``tie_word_embeddings: false`` when the output layer was compressed on its own (it is no
    longer an ``nn.Linear`` sharing the embedding's weight). A tied config makes transformers (and
    vLLM) tie lm_head to the dense embedding: transformers' loader fails on the compressed lm_head
    ("Linear has no attribute `weight`"), vLLM would drop it. Returns whether the config changed."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if head is None or isinstance(head, nn.Linear) or not getattr(config, "tie_word_embeddings", False):
        return False
    config.tie_word_embeddings = False
    return True

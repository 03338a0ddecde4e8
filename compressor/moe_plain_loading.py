"""Which MoE outputs plain transformers cannot load, said at plan time (`--dry-run` and the run).

transformers (5.23 checked) loads a compressed-tensors MoE checkpoint's per-expert tensors
(``mlp.experts.E.gate_proj...``, the layout vLLM's MoE loaders and llm-compressor's saves use)
through its fused-experts conversion, with ``CompressedTensorsDequantize`` run first
(``transformers/integrations/compressed_tensors.py``). That op keeps only what it can
dequantize for the experts' scheme: FP8 ``weight``/``weight_scale`` pairs (an unscaled
``weight`` passes through) or, for every other scheme, ``weight_packed`` tensors. So:

- experts kept dense (plain ``weight``) beside a ``pack-quantized`` or ``int-quantized`` group
  are dropped, and the merge fails ("Concatenate ... Ckpt contains: 0");
- ``int-quantized`` experts (int8 ``weight`` + ``weight_scale``) are dropped the same way.

The fused layout (``mlp.experts.gate_up_proj``) would load in transformers but not in vLLM,
whose Qwen2-MoE/Mixtral loaders read per-expert names only, so the layout stays and the plan
says so. ``compressor.load`` reads both cases.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

from compressor.moe_experts import UnfusedExperts, fused_experts

DENSE_EXPERTS_NOTE = (
    "the routed experts ({names}) stay dense beside {format} layers: plain transformers {version} cannot load"
    " this output (its compressed-tensors MoE loader keeps only packed or FP8 expert tensors and drops dense"
    " ones); compressor.load reads it, and an FP8 stage (method: fp8) or quantized experts load in both"
)
INT8_EXPERTS_NOTE = (
    "the routed experts are saved as int8 W8A8 (int-quantized): plain transformers {version} cannot load this"
    " output (its compressed-tensors MoE loader dequantizes only packed or FP8 experts); compressor.load reads"
    " it, and FP8 W8A8 experts (method: fp8) or int4/int8 weight-only experts load in both"
)


def stage_format(layer_class: str, config: Any, smooths_only: bool) -> str | None:
    """The compressed-tensors format a quantize stage writes (None: none, e.g. NF4 or smoothing only)."""
    if layer_class == "QuantLinear":
        return "pack-quantized"
    if layer_class == "W8A8Linear" and not smooths_only:
        return "int-quantized" if config.weights.type == "int" else "float-quantized"
    return None


def _version() -> str:
    import transformers

    return transformers.__version__


def _is_expert_linear(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and isinstance(model.get_submodule(".".join(parts[:-2])), UnfusedExperts)


def plain_transformers_notes(model: nn.Module, selected: dict[str, str], format: str | None) -> list[str]:
    """Warnings for a stage writing `format` on `model` (its experts as this stage leaves them)."""
    if format not in ("pack-quantized", "int-quantized"):
        return []
    notes = []
    dense = sorted(fused_experts(model))
    if dense:
        names = dense[0] + (f" and {len(dense) - 1} more" if len(dense) > 1 else "")
        notes.append(DENSE_EXPERTS_NOTE.format(names=names, format=format, version=_version()))
    if format == "int-quantized" and any(_is_expert_linear(model, name) for name in selected):
        notes.append(INT8_EXPERTS_NOTE.format(version=_version()))
    return notes


# A per-expert projection's tensors in a saved checkpoint: model.layers.0.mlp.experts.3.up_proj.weight
_EXPERT_TENSOR = re.compile(r"^(?P<layer>.+\.experts\.\d+\.[^.]+)\.(?P<tensor>weight|weight_packed|weight_scale)$")
SAVED_NOTE = (
    "Plain transformers ({version} checked) cannot load this MoE checkpoint: its compressed-tensors experts"
    " loader keeps only packed or FP8 expert tensors, and this one stores its routed experts {how}. vLLM reads"
    " the per-expert layout; `compressor.load(\"{{repo_id}}\")` loads it too."
)


def _checkpoint_tensor_dtypes(out_dir: Path) -> dict[str, str]:
    """Name → safetensors dtype ("I8", "BF16", ...) of every tensor in `out_dir`, from the file headers."""
    from safetensors import safe_open

    dtypes: dict[str, str] = {}
    for shard in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            for name in handle.keys():
                dtypes[name] = handle.get_slice(name).get_dtype()
    return dtypes


def saved_checkpoint_note(out_dir: Path, quantization_config: dict[str, Any] | None) -> str | None:
    """The model card's warning for a saved MoE output plain transformers cannot load (the two cases of
    the module docstring), read from the checkpoint itself; None when there is nothing to say."""
    formats = {str(group.get("format") or (quantization_config or {}).get("format"))
               for group in ((quantization_config or {}).get("config_groups") or {}).values()}
    if not formats & {"pack-quantized", "int-quantized"}:
        return None
    tensors: dict[str, dict[str, str]] = {}
    for name, dtype in _checkpoint_tensor_dtypes(out_dir).items():
        match = _EXPERT_TENSOR.match(name)
        if match:
            tensors.setdefault(match["layer"], {})[match["tensor"]] = dtype
    if any(set(kinds) == {"weight"} for kinds in tensors.values()):
        how = "dense (unquantized) beside packed layers"
    elif any(kinds.get("weight") == "I8" and "weight_scale" in kinds for kinds in tensors.values()):
        how = "as int8 W8A8 (int-quantized)"
    else:
        return None
    return SAVED_NOTE.format(version=_version(), how=how)

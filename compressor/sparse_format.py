"""The ``sparse-bitmask`` checkpoint layout for pruned layers, and its dense conversion.

compressed-tensors 0.20 dropped its sparse compressors (``sparse-bitmask`` and
``sparse-24-bitmask`` remain only as config names, with no compressor behind them, and
transformers does not decompress them), so the layout is ours, documented here and in the
README:

- each pruned Linear that was not quantized afterwards is saved as three tensors instead of
  ``{name}.weight``: ``{name}.weight_bitmask`` (uint8, one bit per weight, LSB first),
  ``{name}.weight_values`` (the non-zeros, row-major, in the model's dtype) and
  ``{name}.weight_shape`` (int64 [out, in]); ``{name}.bias`` is unchanged;
- ``config.json`` gets a ``sparsity_config`` block naming the format, the layers and their
  structure (``2:4``, ``unstructured``) and the measured sparsity.

``compressor.load`` (through ``build_sparse_linear``) or ``load_sparse_model`` here rebuild the
layers as ``SparseLinear``. Plain transformers does not know the layout: ``densify_folder``
(``compress densify SRC DST``) writes the dense equivalent it loads. Pruned layers that a
later stage quantized are stored by that stage's format (their zeros are exact codes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compressor.errors import ModelError
from compressor.kernels.sparse_linear import SparseLinear, build_sparse_linear, unpack_bitmask

FORMAT = "sparse-bitmask"
CONFIG_KEY = "sparsity_config"
_SUFFIXES = ("weight_bitmask", "weight_values", "weight_shape")


def pack_sparse_layers(model: nn.Module) -> dict[str, str]:
    """Replace every pruned, still-dense Linear asking for sparse storage by a SparseLinear.
    Returns {module name: sparsity structure}."""
    from compressor.stages.base import replace_module

    packed: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        structure = getattr(module, "sparsity_structure", None)
        if isinstance(module, nn.Linear) and structure and getattr(module, "sparse_storage", "sparse") == "sparse":
            sparse = SparseLinear.from_dense(module.weight.data, module.bias)
            sparse.sparsity_structure = structure
            replace_module(model, name, sparse)
            packed[name] = structure
    return packed


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def write_sparsity_config(model: nn.Module, directory: Path) -> dict[str, Any] | None:
    """Describe the model's SparseLinear layers in ``directory/config.json``."""
    layers = sparse_layers(model)
    if not layers:
        return None
    total = sum(m.in_features * m.out_features for m in layers.values())
    nonzero = sum(m.nnz for m in layers.values())
    block = {
        "format": FORMAT,
        "version": 1,
        "producer": "compressor",
        "global_sparsity": round(1 - nonzero / total, 6),
        "layers": {name: getattr(m, "sparsity_structure", "unstructured") for name, m in sorted(layers.items())},
        "tensors": list(_SUFFIXES),
        "dense_loading": "run `compress densify SRC DST` for a checkpoint plain transformers loads",
    }
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config[CONFIG_KEY] = block
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return block


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError("no .safetensors files in the folder", where=str(folder))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def sparse_prefixes(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(key[: -len(".weight_bitmask")] for key in tensors if key.endswith(".weight_bitmask"))


def dense_tensor(tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    out_features, in_features = (int(v) for v in tensors[f"{prefix}.weight_shape"].tolist())
    keep = unpack_bitmask(tensors[f"{prefix}.weight_bitmask"], in_features)
    values = tensors[f"{prefix}.weight_values"]
    weight = torch.zeros(out_features, in_features, dtype=values.dtype)
    weight[keep] = values
    return weight


def densify_folder(source: Path, destination: Path) -> list[str]:
    """Write a copy of `source` with every sparse-bitmask layer stored as a dense weight."""
    config_path = source / "config.json"
    if not config_path.exists():
        raise ModelError("not a checkpoint folder (no config.json)", where=str(source))
    tensors = _read_tensors(source)
    prefixes = sparse_prefixes(tensors)
    if not prefixes:
        raise ModelError("the checkpoint holds no sparse-bitmask layers", where=str(source))
    for prefix in prefixes:
        tensors[f"{prefix}.weight"] = dense_tensor(tensors, prefix)
        for suffix in _SUFFIXES:
            del tensors[f"{prefix}.{suffix}"]
    destination.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.suffix == ".safetensors" or item.name.endswith(".safetensors.index.json") or item.is_dir():
            continue
        shutil.copy2(item, destination / item.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(destination / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(config_path.read_text())
    config.pop(CONFIG_KEY, None)
    (destination / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return prefixes


def load_sparse_model(folder: Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The checkpoint with its sparse layers as SparseLinear modules (no dense copy kept).
    Layers quantized by a later stage are not handled here (that is `compressor.load`'s job)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from compressor.stages.base import replace_module

    config = AutoConfig.from_pretrained(str(folder))
    if getattr(config, "quantization_config", None):
        raise ModelError("quantized checkpoint: load it with compressor.load", where=str(folder))
    tensors = _read_tensors(folder)
    saved_dtype = next(v.dtype for k, v in tensors.items() if k.endswith(".weight_values"))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or saved_dtype)
    for prefix in sparse_prefixes(tensors):
        replace_module(model, prefix, build_sparse_linear(prefix, tensors))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {k for k in missing if k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)}
    if unexpected or set(missing) - tied:
        problem = sorted(unexpected) or sorted(set(missing) - tied)
        raise ModelError(f"checkpoint does not fit its config: {problem[0]} (and {len(problem) - 1} more)", where=str(folder))
    model.tie_weights()
    return model.to(dtype) if dtype is not None else model.eval()

"""Low-rank terms on disk, next to the compressed weights, in formats other tools read.

- Compensations (EoRA, LoRA trained on the compressed model) → ``OUT/lowrank_adapter/``, a
  standard peft LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
  ``base_model.model.<layer>.lora_A.weight`` (r×in) and ``lora_B.weight`` (out×r), ``lora_alpha``
  equal to the rank so peft's scaling is 1 (LoRA scaling is folded into B). Plain transformers
  loads OUT without them (the base alone); ``PeftModel.from_pretrained(model, OUT/lowrank_adapter)``
  on a model loaded with ``quantization_config=CompressedTensorsConfig(dequantize=True)`` (peft needs
  each layer's ``weight``, which a compressed load lacks until its first forward), or
  :func:`apply_adapter`, adds them.
- SVD factorizations → ``OUT/svd_factors/factors.safetensors`` (``<layer>.A``, ``<layer>.B``)
  + ``factors.json``; the main checkpoint holds the dense product B A under the layer's
  ``weight`` so that plain transformers loads it. :func:`apply_svd_factors` swaps the dense
  layers back to the small factorized form.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compressor.errors import ModelError
from compressor.kernels.lowrank import FactorizedLinear, attach_compensation, compensations

ADAPTER_DIR = "lowrank_adapter"
SVD_DIR = "svd_factors"
_PEFT_PREFIX = "base_model.model."


def _pattern(name: str) -> str:
    return "^" + re.escape(name) + "$"


def write_peft_adapter(model: nn.Module, folder: Path, base_reference: str | None) -> int:
    """Write every compensation of `model` as one peft adapter; returns the bytes written."""
    found = compensations(model)
    if not found:
        return 0
    from peft import LoraConfig

    folder.mkdir(parents=True, exist_ok=True)
    ranks = {name: c.rank for name, c in found.items()}
    common = Counter(ranks.values()).most_common(1)[0][0]
    odd = {_pattern(name): rank for name, rank in ranks.items() if rank != common}
    config = LoraConfig(
        r=common,
        lora_alpha=common,
        target_modules=sorted(found),
        rank_pattern=odd,
        alpha_pattern=dict(odd),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_reference,
    )
    config.save_pretrained(str(folder))
    tensors = {}
    for name, compensation in found.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = compensation.A.contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = compensation.B.contiguous()
    path = folder / "adapter_model.safetensors"
    origins = sorted({o for c in found.values() for o in c.origins})
    save_file(tensors, str(path), metadata={"format": "pt", "compressor_origin": "+".join(origins)})
    return path.stat().st_size


def apply_adapter(model: nn.Module, folder: Path | str, origin: str = "adapter") -> int:
    """Attach a peft LoRA adapter folder to `model` as compensation terms; returns layers touched."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise ModelError("not a peft adapter folder (no adapter_config.json)", where=str(folder))
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ModelError(f"adapter type {config.get('peft_type')!r} is not LORA", where=str(folder))
    if config.get("use_dora"):
        # DoRA rescales every output of W + BA by a trained magnitude over its norm: no added term can hold that.
        raise ModelError("a DoRA adapter (use_dora) is no added low-rank term; merge it (compress finetune --merge,"
                         " or peft's merge_and_unload) or load it with peft's PeftModel", where=str(folder))
    if config.get("modules_to_save"):
        # Whole trained modules (compress finetune --modules-to-save) are no low-rank term either.
        raise ModelError(f"this adapter also holds trained copies of whole modules ({', '.join(config['modules_to_save'])},"
                         " modules_to_save), which compensation terms cannot carry; merge it (compress finetune --merge,"
                         " or peft's merge_and_unload) or load it with peft's PeftModel", where=str(folder))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    use_rslora = bool(config.get("use_rslora"))
    touched = 0
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len(_PEFT_PREFIX) : -len(".lora_A.weight")]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        rank = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", rank))
        scaling = alpha / (rank**0.5 if use_rslora else rank)
        layer = model.get_submodule(name)
        attach_compensation(layer, a, (b.float() * scaling).to(b.dtype), origin)
        touched += 1
    return touched


def _pattern_value(patterns: dict[str, float], name: str, default: float) -> float:
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def write_svd_factors(model: nn.Module, folder: Path) -> int:
    """Write every FactorizedLinear's factors; returns the bytes written."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    if not found:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, module in found.items():
        tensors[f"{name}.A"] = module.A.detach().contiguous()
        tensors[f"{name}.B"] = module.B.detach().contiguous()
    save_file(tensors, str(folder / "factors.safetensors"), metadata={"format": "pt"})
    ranks = {name: module.rank for name, module in found.items()}
    (folder / "factors.json").write_text(json.dumps({"ranks": ranks}, indent=2, sort_keys=True) + "\n")
    return (folder / "factors.safetensors").stat().st_size


def apply_svd_factors(model: nn.Module, folder: Path | str) -> int:
    """Replace the dense layers a checkpoint's ``svd_factors/`` describes by FactorizedLinear."""
    folder = Path(folder)
    ranks = json.loads((folder / "factors.json").read_text())["ranks"]
    tensors = load_file(str(folder / "factors.safetensors"))
    for name in ranks:
        dense = model.get_submodule(name)
        bias = dense.bias.data if getattr(dense, "bias", None) is not None else None
        a, b = tensors[f"{name}.A"], tensors[f"{name}.B"]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # The factors take the dtype the model was loaded in (they are saved in the checkpoint's).
        setattr(parent, child, FactorizedLinear(a, b, bias).to(device=dense.weight.device, dtype=dense.weight.dtype))
    return len(ranks)


def write_lowrank_artifacts(model: nn.Module, folder: Path, base_reference: str | None) -> dict[str, int]:
    """Everything low-rank that `model` carries, written under the checkpoint `folder`."""
    sizes = {
        ADAPTER_DIR: write_peft_adapter(model, folder / ADAPTER_DIR, base_reference),
        SVD_DIR: write_svd_factors(model, folder / SVD_DIR),
    }
    return {k: v for k, v in sizes.items() if v}


def load_with_adapters(path: Path | str, dtype: torch.dtype | None = None) -> nn.Module:
    """Plain-transformers load of a checkpoint, then its low-rank parts applied (if any)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto")
    if (path / SVD_DIR / "factors.json").is_file():
        apply_svd_factors(model, path / SVD_DIR)
    if (path / ADAPTER_DIR / "adapter_config.json").is_file():
        apply_adapter(model, path / ADAPTER_DIR, origin="checkpoint")
    return model.eval()

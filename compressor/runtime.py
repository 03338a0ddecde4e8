"""Load a compressed checkpoint with the project's own modules: ``compressor.load(path)``.

The model skeleton is built from ``config.json`` with empty (meta) weights; every Linear that
the ``quantization_config`` (compressed-tensors) names is replaced by the module its format's
builder makes (``pack-quantized`` → ``QuantLinear``); then the safetensors tensors are
assigned as they are stored (packed codes stay packed; only floating tensors are cast to the
requested dtype), tied weights are re-tied, and each quantized layer packs its weight for the
kernel it will use at batch 1 on the target device.

Formats are a registry (format name → builder). The builders for sparse 2:4
(``sparse-24-bitmask``), W8A8 (``int-quantized``) and FP8 (``float-quantized``) belong to the
branches that add those modules (``kernels/<name>.py``); register them in
``format_builders()`` below.

A bitsandbytes checkpoint (what ``method: nf4`` writes) is not compressed-tensors: transformers
builds it, with its bitsandbytes ``Linear4bit`` layers (``_load_bitsandbytes``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compressor.errors import ModelError
from compressor.registry import Registry

# name, the Linear it replaces, the config group's scheme, dtype → module on the meta device
ModuleBuilder = Callable[[str, nn.Linear, Any, torch.dtype], nn.Module]


def build_pack_quantized(name: str, linear: nn.Linear, scheme: Any, dtype: torch.dtype) -> nn.Module:
    from compressed_tensors.quantization import QuantizationStrategy, QuantizationType

    from compressor.formats import WeightCalibration
    from compressor.kernels.quant_linear import QuantLinear

    if scheme.input_activations is not None:
        raise ModelError(f"{name}: pack-quantized layers are weight-only here; activations are not quantized")
    weights = scheme.weights

    if weights.type != QuantizationType.INT:
        raise ModelError(f"{name}: pack-quantized weights of type {weights.type} are not supported (int only)")
    if weights.strategy not in (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL):
        raise ModelError(f"{name}: weight strategy {weights.strategy} is not supported (group or channel)")
    group_size = weights.group_size if weights.strategy == QuantizationStrategy.GROUP else None
    if group_size is not None and linear.in_features % group_size:
        raise ModelError(f"{name}: group size {group_size} does not divide {linear.in_features} columns")
    module = QuantLinear(
        linear.in_features,
        linear.out_features,
        bits=weights.num_bits,
        group_size=group_size,
        symmetric=weights.symmetric,
        bias=linear.bias is not None,
        dtype=dtype,
        device="meta",
    )
    module.weight_calibration = WeightCalibration.from_args(weights)  # saved again as it was read
    return module


def build_eight_bit(name: str, linear: nn.Linear, scheme: Any, dtype: torch.dtype) -> nn.Module:
    """W8A8 int8 (`int-quantized`) and FP8 (`float-quantized`): 8-bit codes, one scale per channel."""
    from compressor.formats import WeightCalibration
    from compressor.kernels.w8a8_linear import build_from_scheme

    try:
        module = build_from_scheme(linear, scheme.model_dump(mode="json"), dtype)
    except ValueError as err:
        raise ModelError(f"{name}: {err}") from None
    module.weight_calibration = WeightCalibration.from_args(scheme.weights)  # saved again as it was read
    return module


@functools.cache
def format_builders() -> Registry[ModuleBuilder]:
    registry: Registry[ModuleBuilder] = Registry("compressed-tensors format")
    registry.register("pack-quantized", build_pack_quantized)
    registry.register("int-quantized", build_eight_bit)
    registry.register("float-quantized", build_eight_bit)
    return registry.freeze()


def _checkpoint_files(folder: Path) -> list[Path]:
    """The folder's safetensors files, each checked to be readable (a corrupt one names itself)."""
    from compressor.weight_files import check_safetensors_file, safetensors_files

    files = safetensors_files(folder)
    for file in files:
        check_safetensors_file(file)
    return files


def _read_tensors(files: list[Path], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                # 8-bit floats are FP8 codes, not values to cast.
                wide_float = tensor.is_floating_point() and tensor.element_size() > 1
                tensors[key] = tensor.to(dtype) if wide_float else tensor
    return tensors


def _replace_compressed_modules(model: nn.Module, qconfig: dict[str, Any], dtype: torch.dtype) -> dict[str, str]:
    """Swap every targeted Linear for its format's module; returns module name → format."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils import match_named_modules

    from compressor.stages.base import replace_module

    parsed = QuantizationConfig.model_validate(qconfig)
    builders = format_builders()
    chosen: dict[str, str] = {}
    for group_name, scheme in parsed.config_groups.items():
        fmt = scheme.format or parsed.format
        if fmt not in builders:
            raise ModelError(f"quantization_config.config_groups.{group_name}: {builders.unknown_message(fmt)}")
        if scheme.weights is None:
            raise ModelError(f"quantization_config.config_groups.{group_name}: a scheme without weights does not load here")
        for name, module in list(match_named_modules(model, scheme.targets, parsed.ignore or [])):
            if not isinstance(module, nn.Linear) or name in chosen:
                continue
            replace_module(model, name, builders.get(fmt)(name, module, scheme, dtype))
            chosen[name] = fmt
    return chosen


def _replace_sparse_modules(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Pruned layers stored as bitmask + values (see compressor.sparse_format) become SparseLinear."""
    from compressor.kernels.sparse_linear import build_sparse_linear
    from compressor.sparse_format import sparse_prefixes
    from compressor.stages.base import replace_module

    chosen = {}
    for prefix in sparse_prefixes(tensors):
        replace_module(model, prefix, build_sparse_linear(prefix, tensors))
        chosen[prefix] = "sparse-bitmask"
    return chosen


def _load_converted_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype, where: str
) -> dict[str, torch.Tensor]:
    """Load the checkpoint tensors whose names the model lacks through transformers' own conversion
    mapping for the architecture, as ``from_pretrained`` does; return the others (named as the
    model names them) for ``load_state_dict``.

    transformers 5 holds the experts of an MoE block (Qwen2-MoE, Mixtral, ...) as fused 3-D tensors
    but saves them one Linear per expert (``mlp.experts.3.up_proj.weight``), so without this a
    saved MoE checkpoint would not load. The conversion is kept on the model, so that
    ``save_pretrained`` writes the per-expert names again."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings, convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    expected = set(model.state_dict())
    mapping = get_model_conversion_mapping(model)
    renamings = [transform for transform in mapping if isinstance(transform, WeightRenaming)]
    # A name the model has once only renamed (Mixtral's `block_sparse_moe.experts.3.w1.weight` of
    # an unfused int8 expert is `mlp.experts.3.w1.weight`) loads as is: the experts merge must not claim it.
    renamed = {key: apply_renamings(key, renamings) for key in tensors if key not in expected}
    direct = {key: value for key, value in tensors.items() if renamed.get(key, key) in expected}
    foreign = {key: value for key, value in tensors.items() if key not in direct}
    if foreign:
        config = LoadStateDictConfig(dtype=dtype, device_map={"": str(device)}, weight_mapping=mapping)
        info, _ = convert_and_load_state_dict_in_model(model, foreign, config)
        problems = sorted(info.unexpected_keys) + sorted(str(key) for key in info.mismatched_keys) + sorted(info.conversion_errors)
        if problems:
            raise ModelError(f"checkpoint tensors the model has no place for: {problems[:5]}", where=where)
    return {renamed.get(key, key): value for key, value in direct.items()}


def _unfuse_compressed_experts(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """MoE experts stored compressed one Linear per expert (`experts.3.up_proj.weight_packed`)
    get one module per expert, as the quantize stage gave them (compressor.moe_experts); dense
    experts stay fused and load through transformers' conversion (_load_converted_tensors)."""
    from compressor.moe_experts import UnknownExpertsError, unfuse_stored_experts

    try:
        unfuse_stored_experts(model, tensors)
    except UnknownExpertsError as err:
        raise ModelError(str(err).split(";")[0], where=where) from None


def _apply_lowrank_artifacts(model: nn.Module, folder: Path) -> None:
    """Error-compensation adapters and SVD factors saved beside the weights (compressor.adapters)."""
    from compressor.adapters import apply_adapter, apply_svd_factors

    if (folder / "lowrank_adapter").is_dir():
        apply_adapter(model, folder / "lowrank_adapter")
    if (folder / "svd_factors").is_dir():
        apply_svd_factors(model, folder / "svd_factors")


def _resolve_dtype(config: Any, dtype: torch.dtype | str | None) -> torch.dtype:
    value = dtype if dtype is not None else getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if value is None:
        return torch.float32
    if isinstance(value, str):
        value = getattr(torch, value, None)
        if not isinstance(value, torch.dtype):
            raise ModelError(f"unknown dtype {dtype!r}")
    if not value.is_floating_point:  # the dtype of activations, scales and dense weights
        raise ModelError(f"dtype {value} is not a floating-point dtype (use bfloat16, float16 or float32)")
    return value


def _target_device(device: torch.device | str | None) -> torch.device:
    """The device to load onto, refused in one line when torch does not know it or this machine lacks it."""
    from compressor.devices import device_problem

    if device is None:
        return torch.device("cpu")
    problem = device_problem(device)
    if problem is not None:
        raise ModelError(problem)
    return torch.device(device)


def _load_bitsandbytes(folder: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes checkpoint (method nf4) as transformers builds it: its ``Linear4bit``
    layers and quantizer. Two additions, both for ``save_pretrained``: it undoes bitsandbytes'
    CPU repack correctly, and it no longer fails on transformers' irreversible load step."""
    from transformers import AutoModelForCausalLM

    from compressor.stages.nf4_layout import guard_loaded_bitsandbytes

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, device_map={"": str(device)})
    model.eval()
    # bitsandbytes' fast CPU path stays on for generate/bench; a save still writes the stored layout.
    model.compressed_formats = guard_loaded_bitsandbytes(model, keep_exact=False)
    return model


def load(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    prepare_kernels: bool = True,
):
    """A compressed checkpoint folder → a PreTrainedModel whose compressed layers stay compressed.

    `prepare_kernels=False` skips packing each layer for its decode kernel (done lazily on first
    use anyway): for a model that is about to be compressed further, not run.

    A bitsandbytes checkpoint (``quant_method: bitsandbytes``, what ``method: nf4`` writes) is
    loaded by transformers itself: the model is the one ``AutoModelForCausalLM.from_pretrained``
    returns (bitsandbytes ``Linear4bit`` layers, its own kernels), not this project's modules."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    from compressor.model_io import load_config

    if not str(path).strip():  # Path("") would be the current folder
        raise ModelError("the model argument is empty; give a compressed checkpoint folder")
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelError("not a checkpoint folder (no config.json)", where=str(path))
    target = _target_device(device)
    config = load_config(str(folder), str(path), trust_remote_code=False)  # unreadable or not a causal LM: one line
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is not None:
        del config.quantization_config
        qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    torch_dtype = _resolve_dtype(config, dtype)
    if qconfig is not None and qconfig.get("quant_method") == "bitsandbytes":
        return _load_bitsandbytes(folder, target, torch_dtype)

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    tensors = _read_tensors(_checkpoint_files(folder), target, torch_dtype)
    _unfuse_compressed_experts(model, tensors, str(path))
    formats = _replace_compressed_modules(model, qconfig, torch_dtype) if qconfig else {}
    if any(key.endswith("weight_g_idx") for key in tensors):
        raise ModelError("activation-ordered groups (weight_g_idx) are not supported", where=str(path))
    formats.update(_replace_sparse_modules(model, tensors))
    tensors = _load_converted_tensors(model, tensors, target, torch_dtype, str(path))
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise ModelError(f"checkpoint tensors the model has no place for: {result.unexpected_keys[:5]}", where=str(path))
    model.tie_weights()
    still_empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if still_empty:
        raise ModelError(f"checkpoint lacks tensors: {still_empty[:5]}", where=str(path))
    _apply_lowrank_artifacts(model, folder)
    model.to(target)
    model.eval()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model.compressed_formats = formats
    if qconfig is not None:
        # Kept as the plain dict (no hf_quantizer is attached), so save_pretrained writes it back
        # and the saved folder is again a compressed-tensors checkpoint.
        model.config.quantization_config = qconfig
    if prepare_kernels:
        _prepare_kernels(model, target, torch_dtype)
    return model


def _prepare_kernels(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Pack each quantized layer for the kernel it will use at batch 1 (decode), and run gated
    MLPs of such layers as one native call where they qualify (kernels/gated_mlp.py)."""
    from compressor.kernels.gated_mlp import install_fused_mlps

    for module in model.modules():
        prepare = getattr(module, "prepare_kernels", None)
        if prepare is not None:
            prepare(torch.zeros(1, module.in_features, dtype=dtype, device=device))
    install_fused_mlps(model, device, dtype)


def plan_for_compile(model: nn.Module, rows: int = 1) -> dict[str, str]:
    """Fix every quantized layer's kernel for inputs of `rows` rows (decode: 1), so that
    ``torch.compile(model.forward, fullgraph=True)`` traces it; module name → kernel."""
    from compressor.kernels.quant_linear import QuantLinear

    planned = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            scale = module.weight_scale  # in the model's dtype and on its device
            planned[name] = module.plan_for_compile(torch.zeros(rows, module.in_features, dtype=scale.dtype, device=scale.device))
    return planned


def kernel_summary(model: nn.Module, rows: int | None = None) -> dict[str, dict[str, Any]]:
    """Module name → the kernel its last forward used and why faster ones were skipped; with
    `rows`, the kernel each layer chooses for inputs of that many rows in the model's dtype instead.

    A decode call reuses the kernel bound at its last full dispatch without touching
    ``kernel_report`` (bound_kernel.py), so after a long prefill took the reference path the last
    report says "reference" while decoding runs the fast kernel: ask with ``rows=1`` for decode."""
    from compressor.kernels.dispatched_module import DispatchedModule

    dtype = getattr(model, "dtype", None)
    summary = {}
    for name, module in model.named_modules():
        if rows is not None and isinstance(module, DispatchedModule):
            device = next(iter(module.buffers())).device
            module.choose_kernel(torch.zeros(rows, module.in_features, dtype=dtype, device=device))
        if getattr(module, "kernel_report", None):
            summary[name] = dict(module.kernel_report)
    return summary

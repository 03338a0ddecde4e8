"""Mixture-of-experts blocks with one Linear per expert, so the Linear stages reach the experts.

transformers 5 holds the routed experts of an MoE block (Qwen2-MoE, Qwen3-MoE, Mixtral, ...) as
fused 3-D parameters (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]),
while checkpoints, vLLM and compressed-tensors name them one Linear per expert
(``mlp.experts.3.gate_proj.weight_packed``). ``UnfusedExperts`` holds the same weights as
``experts.{i}.{gate,up,down}`` Linears, computes what the fused module does, and its
state_dict names are the checkpoint's per-expert names, so a quantized expert saves in the
layout those readers expect.

Which fused classes can be unfused (and the names their checkpoints give the projections) is
a registry keyed by class name; a targeted experts class not in it is refused.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from compressor.registry import Registry
from compressor.targets import first_match


@dataclass(frozen=True)
class ExpertLayout:
    """The names of one expert's projections in checkpoints: act(gate(x)) * up(x) → down."""

    gate: str
    up: str
    down: str

    def names(self) -> tuple[str, str, str]:
        return (self.gate, self.up, self.down)


QWEN_NAMES = ExpertLayout("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = ExpertLayout("w1", "w3", "w2")


@functools.cache
def expert_layouts() -> Registry[ExpertLayout]:
    """Fused experts classes whose forward is transformers' gated loop over `gate_up_proj`
    ([gate; up] stacked on dim 1) and `down_proj`, with no biases."""
    registry: Registry[ExpertLayout] = Registry("fused experts class")
    for name in ("Qwen2MoeExperts", "Qwen3MoeExperts", "OlmoeExperts", "Qwen3NextExperts"):
        registry.register(name, QWEN_NAMES)
    registry.register("MixtralExperts", MIXTRAL_NAMES)
    return registry.freeze()


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its Linears under the checkpoint's names."""

    def __init__(self, layout: ExpertLayout, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn: Callable):
        super().__init__()
        self.layout = layout
        self.act_fn = act_fn
        for attribute, linear in zip(layout.names(), (gate, up, down)):
            setattr(self, attribute, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.layout.names())
        return down(self.act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.ModuleList):
    """transformers' fused experts module, one ExpertMLP per expert; same forward signature
    (hidden states [T, H], routing indices and weights [T, k]) and result."""

    def __init__(self, experts: Iterable[ExpertMLP], num_experts: int):
        super().__init__(experts)
        self.num_experts = num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_index in hit[:, 0].tolist():
            if expert_index == self.num_experts:
                continue
            top_k_pos, token_index = torch.where(expert_mask[expert_index])
            out = self[expert_index](hidden_states[token_index]) * top_k_weights[token_index, top_k_pos, None]
            final.index_add_(0, token_index, out.to(final.dtype))
        return final


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return linear


def unfuse(fused: nn.Module, layout: ExpertLayout) -> UnfusedExperts:
    """The per-expert equivalent of `fused` (copies of its weights, on its device; meta stays meta)."""
    gate_up, down = fused.gate_up_proj, fused.down_proj
    intermediate = gate_up.shape[1] // 2
    experts = [
        ExpertMLP(layout, _linear(gate_up[e, :intermediate]), _linear(gate_up[e, intermediate:]), _linear(down[e]), fused.act_fn)
        for e in range(gate_up.shape[0])
    ]
    return UnfusedExperts(experts, gate_up.shape[0])


def fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding experts as fused 3-D parameters (of a known class or not)."""
    return {
        name: module
        for name, module in model.named_modules()
        if any(p.dim() == 3 for p in module.parameters(recurse=False)) and hasattr(module, "down_proj")
    }


def _names_of(module: nn.Module) -> ExpertLayout:
    """The module's projection names; an unknown class is probed with the common ones."""
    class_name = type(module).__name__
    return expert_layouts().get(class_name) if class_name in expert_layouts() else QWEN_NAMES


def _probe_names(name: str, module: nn.Module) -> list[str]:
    """The Linear names the module would have unfused (expert 0 stands for all)."""
    return [f"{name}.0.{projection}" for projection in _names_of(module).names()]


def targeted(name: str, module: nn.Module, targets: list[str], ignore: list[str]) -> bool:
    """Whether `targets`/`ignore` would select the module's expert Linears once unfused."""
    probe = nn.Linear(1, 1, device="meta")
    return any(
        first_match(targets, n, probe) is not None and first_match(ignore, n, probe) is None
        for n in _probe_names(name, module)
    )


class UnknownExpertsError(ValueError):
    """A fused experts class this module cannot unfuse."""


def unfuse_module(model: nn.Module, name: str, module: nn.Module) -> None:
    from compressor.stages.base import replace_module

    class_name = type(module).__name__
    if getattr(module, "_hf_hook", None) is not None and module.gate_up_proj.device.type == "meta":
        # Offloaded by accelerate (--max-memory): unfused copies would all have to be resident.
        raise UnknownExpertsError(
            f"{name}: its experts are offloaded (--max-memory) and cannot be split into Linears there; "
            "run without --max-memory or add 're:.*experts.*' to `ignore`"
        )
    if class_name not in expert_layouts():
        raise UnknownExpertsError(
            f"{name} ({class_name}) keeps its experts as fused 3-D weights that this version cannot split into "
            f"Linears (known: {', '.join(expert_layouts().names())}); add 're:.*experts.*' to `ignore`"
        )
    replace_module(model, name, unfuse(module, expert_layouts().get(class_name)))


def unfuse_targeted_experts(model: nn.Module, targets: list[str], ignore: list[str]) -> list[str]:
    """Unfuse every fused experts module whose expert Linears `targets`/`ignore` select; their names."""
    chosen = [name for name, module in fused_experts(model).items() if targeted(name, module, targets, ignore)]
    for name in chosen:
        unfuse_module(model, name, model.get_submodule(name))
    return chosen


def _stored_compressed(name: str, layout: ExpertLayout, keys: list[str]) -> bool:
    """Whether `keys` hold compressed tensors (not a dense `.weight`) of the experts module `name`.
    The block's own name may differ in the checkpoint (Mixtral saves `mlp` as `block_sparse_moe`)."""
    block, _, experts = name.rpartition(".")
    layer = block.rpartition(".")[0]
    pattern = re.compile(
        rf"{re.escape(layer)}\.[^.]+\.{re.escape(experts)}\.\d+\.({'|'.join(layout.names())})\.(?!weight$|bias$)[^.]+"
    )
    return any(pattern.fullmatch(key) for key in keys)


def unfuse_stored_experts(model: nn.Module, tensor_names: Iterable[str]) -> list[str]:
    """Unfuse the experts modules a checkpoint stores compressed (per-expert tensors other than
    a dense `.weight`, e.g. `weight_packed`); dense experts stay fused, as transformers loads them."""
    keys = list(tensor_names)
    chosen = []
    for name, module in fused_experts(model).items():
        if _stored_compressed(name, _names_of(module), keys):
            unfuse_module(model, name, module)
            chosen.append(name)
    return chosen


def moe_gate_reason(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """Why a Linear that computes an MoE block's gating logits stays dense, else None: a router or
    Qwen2-MoE/Qwen3-Next's `shared_expert_gate` (a direct child of a block holding `experts`, with
    at most one output per expert). vLLM builds these layers unquantized (a plain `nn.Linear`), so
    a checkpoint with their packed tensors does not load there; llm-compressor recipes ignore them."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    experts = getattr(parent, "experts", None)
    if not isinstance(module, nn.Linear) or not isinstance(experts, nn.Module):
        return None
    count = getattr(experts, "num_experts", None) or (len(experts) if isinstance(experts, nn.ModuleList) else 1)
    if module.out_features > count:
        return None
    return "MoE gate (routing logits): left dense, as vLLM and llm-compressor keep it"

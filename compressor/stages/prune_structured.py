"""Structured pruning that shrinks tensors and the config: attention heads, MLP channels,
whole decoder blocks, MoE experts.

Transformers builds every layer from one config, so each kind removes the same *number* of
heads / channels / experts in every block (which ones is chosen per block), and the config's
counts change accordingly; plain transformers then loads the smaller checkpoint.

Importance:
- heads, mlp_channels: Wanda-style, ``‖W[:, j]‖ · ‖X_j‖`` over the input columns of o_proj /
  down_proj (summed over a head's columns), with the norms from the layer-by-layer engine;
  ``method: magnitude`` uses the weight norms alone, without calibration.
- layers (auto): cosine similarity between a block's input and output hidden states on the
  calibration set; the blocks that change their input least go.
- experts: Σ over the tokens routed to the expert of routing weight × ‖expert output‖, i.e. router
  frequency × mean weighted output contribution.
GQA: with G query heads per KV head, ``heads: r`` removes round(r·G) query heads from every KV
group (the KV heads stay); without GQA (G = 1) it removes round(r·heads) heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import RecipeError
from compressor.layerwise import find_decoder_blocks, run_layerwise
from compressor.moe_experts import UnfusedExperts
from compressor.algorithms.wanda import ColumnNormAccumulator
from compressor.stages.base import Locator, StageContext, StagePlan
from compressor.stages.prune_methods import run_statistics

_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts")


def structured_needs_calibration(config) -> bool:
    kind = config.structured.kind
    if kind in ("experts",) or config.structured.layers == "auto":
        return True
    if kind == "layers":
        return False
    return config.method != "magnitude"


# ---- discovery -------------------------------------------------------------------------------


def _attentions(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))}


def _mlps(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m for n, m in model.named_modules()
        if all(isinstance(getattr(m, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj"))
        and "shared_expert" not in n
    }


def _expert_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Fused expert collections (transformers 5 layout: gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    return {
        n: m for n, m in model.named_modules()
        if isinstance(getattr(m, "gate_up_proj", None), nn.Parameter) and getattr(m, "gate_up_proj").dim() == 3
    }


def _router_of(model: nn.Module, experts_name: str) -> nn.Module:
    parent = model.get_submodule(experts_name.rpartition(".")[0])
    for child in ("gate", "router"):
        router = getattr(parent, child, None)
        if router is not None and hasattr(router, "weight"):
            return router
    raise RecipeError(f"cannot find the router beside {experts_name}")


@dataclass
class HeadCut:
    heads: int
    kv_heads: int
    head_dim: int
    remove_per_group: int  # query heads removed from each KV group (GQA), or heads removed (MHA)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def new_heads(self) -> int:
        return self.heads - self.remove_per_group * (self.kv_heads if self.group > 1 else 1)

    @property
    def new_kv_heads(self) -> int:
        return self.kv_heads if self.group > 1 else self.new_heads


def _head_cut(config: Any, ratio: float, locate: Locator) -> HeadCut:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    group = heads // kv_heads
    pool = group if group > 1 else heads
    remove = round(ratio * pool)
    what = f"of the {group} query heads of each KV group" if group > 1 else f"of {heads} heads"
    if remove >= pool:
        raise RecipeError(f"heads: {ratio} would remove every head ({remove} {what}); keep at least one", **locate("sparsity", "heads"))
    if remove == 0:
        raise RecipeError(f"heads: {ratio} rounds to removing no head ({what})", **locate("sparsity", "heads"))
    return HeadCut(heads, kv_heads, head_dim, remove)


def plan_structured(model: nn.Module, config, locate: Locator) -> StagePlan:
    spec = config.structured
    plan = StagePlan(kind="prune", method=f"{config.method} structured {spec.kind}")
    model_config = model.config
    blocks_name, blocks = find_decoder_blocks(model)
    if spec.kind == "heads":
        cut = _head_cut(model_config, spec.heads, locate)
        for name in _attentions(model):
            plan.selected[name] = f"heads {cut.heads} → {cut.new_heads}, KV heads {cut.kv_heads} → {cut.new_kv_heads}"
    elif spec.kind == "mlp_channels":
        mlps = _mlps(model)
        if not mlps:  # else the config's intermediate_size would change and no weight would
            raise RecipeError("mlp_channels: this model has no gated MLP (gate_proj/up_proj/down_proj) outside its"
                              " experts; for mixture-of-experts blocks use {experts: r}", **locate("sparsity", "mlp_channels"))
        width = model_config.intermediate_size
        remove = round(spec.mlp_channels * width)
        if remove == 0 or remove >= width:
            outcome = "removing no channel" if remove == 0 else "removing every channel"
            raise RecipeError(f"mlp_channels: {spec.mlp_channels} of {width} channels rounds to {outcome}; between 1 and"
                              f" {width - 1} can go", **locate("sparsity", "mlp_channels"))
        for name in mlps:
            plan.selected[name] = f"intermediate {width} → {width - remove} channels"
    elif spec.kind == "layers":
        count = len(blocks)
        if spec.layers == "auto":
            if spec.count >= count:
                raise RecipeError(f"count {spec.count} would remove every one of the {count} blocks", **locate("sparsity", "count"))
            plan.selected[blocks_name] = f"remove the {spec.count} least important of {count} blocks (measured)"
        else:
            bad = [i for i in spec.layers if not 0 <= i < count]
            if bad:
                raise RecipeError(f"block {bad[0]} does not exist (the model has {count}: 0..{count - 1})", **locate("sparsity", "layers"))
            twice = sorted({i for i in spec.layers if spec.layers.count(i) > 1})
            if twice:  # most likely a typo for another block
                raise RecipeError(f"block {twice[0]} is listed twice", **locate("sparsity", "layers"))
            if len(set(spec.layers)) >= count:
                raise RecipeError(f"would remove every one of the {count} blocks", **locate("sparsity", "layers"))
            for index in sorted(set(spec.layers)):
                plan.selected[f"{blocks_name}.{index}"] = "remove block"
    else:
        experts = _expert_blocks(model)
        if not experts and any(isinstance(m, UnfusedExperts) for m in model.modules()):
            raise RecipeError("experts: an earlier prune or quantize stage split the experts into one Linear each;"
                              " put the {experts: r} stage first", **locate("sparsity", "experts"))
        if not experts:
            raise RecipeError("experts: this model has no mixture-of-experts layers", **locate("sparsity", "experts"))
        total = next(getattr(model_config, k) for k in _EXPERT_COUNT_KEYS if hasattr(model_config, k))
        remove = round(spec.experts * total)
        top_k = getattr(model_config, "num_experts_per_tok", 1)
        if remove == 0 or total - remove < top_k:
            raise RecipeError(
                f"experts: {spec.experts} of {total} removes {remove}; between 1 and {total - top_k} can go"
                f" ({top_k} are routed per token)",
                **locate("sparsity", "experts"),
            )
        for name in experts:
            plan.selected[name] = f"experts {total} → {total - remove}"
    return plan


# ---- running -----------------------------------------------------------------------------------


def run_structured(model: nn.Module, config, ctx: StageContext, plan: StagePlan) -> nn.Module:
    kind = config.structured.kind
    {"heads": _prune_heads, "mlp_channels": _prune_mlp, "layers": _prune_layers, "experts": _prune_experts}[kind](
        model, config, ctx, plan
    )
    return model


def _take_rows(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[index].clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[index].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features = index.numel()


def _take_columns(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[:, index].clone(), requires_grad=linear.weight.requires_grad)
    linear.in_features = index.numel()


def _column_importance(weight: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    """‖W[:, j]‖ · ‖X_j‖ for each input column j (norms of 1 without calibration)."""
    importance = weight.float().norm(dim=0)
    return importance * norms.to(importance.device) if norms is not None else importance


def _with_input_norms(model, config, ctx, targets: dict[str, nn.Linear], apply) -> None:
    """Call apply(name, norms) per target, norms from calibration unless method is magnitude."""
    if config.method == "magnitude":
        for name in targets:
            apply(name, None)
        return

    def solve(names, accumulator: ColumnNormAccumulator) -> None:
        for name in names:
            apply(name, accumulator.norms())

    run_statistics(model, targets, ColumnNormAccumulator, solve, ctx, "structured importance")


def _prune_heads(model, config, ctx, plan) -> None:
    cut = _head_cut(model.config, config.structured.heads, lambda *k: {})
    attentions = {name: model.get_submodule(name) for name in plan.selected}
    o_projs = {f"{name}.o_proj": m.o_proj for name, m in attentions.items()}

    def apply(o_name: str, norms: torch.Tensor | None) -> None:
        attention = attentions[o_name.rpartition(".")[0]]
        per_head = _column_importance(attention.o_proj.weight.data, norms).reshape(cut.heads, cut.head_dim).sum(-1)
        if cut.group > 1:
            grouped = per_head.reshape(cut.kv_heads, cut.group)
            keep_in_group = torch.topk(grouped, cut.group - cut.remove_per_group, dim=1).indices.sort(dim=1).values
            kept_heads = (keep_in_group + torch.arange(cut.kv_heads).unsqueeze(1) * cut.group).flatten()
            kept_kv = torch.arange(cut.kv_heads)
        else:
            kept_heads = torch.topk(per_head, cut.new_heads).indices.sort().values
            kept_kv = kept_heads
        channels = lambda heads: (heads.unsqueeze(1) * cut.head_dim + torch.arange(cut.head_dim)).flatten()  # noqa: E731
        _take_rows(attention.q_proj, channels(kept_heads))
        _take_rows(attention.k_proj, channels(kept_kv))
        _take_rows(attention.v_proj, channels(kept_kv))
        _take_columns(attention.o_proj, channels(kept_heads))
        attention.num_key_value_groups = cut.new_heads // cut.new_kv_heads
        attention.head_dim = cut.head_dim
        ctx.records[o_name.rpartition(".")[0]] = {"stage": "prune", "structured": "heads", "kept_heads": kept_heads.tolist()}

    _with_input_norms(model, config, ctx, o_projs, apply)
    model.config.head_dim = cut.head_dim
    model.config.num_attention_heads = cut.new_heads
    model.config.num_key_value_heads = cut.new_kv_heads


def _prune_mlp(model, config, ctx, plan) -> None:
    width = model.config.intermediate_size
    keep_count = width - round(config.structured.mlp_channels * width)
    mlps = {name: model.get_submodule(name) for name in plan.selected}
    downs = {f"{name}.down_proj": m.down_proj for name, m in mlps.items()}

    def apply(down_name: str, norms: torch.Tensor | None) -> None:
        mlp = mlps[down_name.rpartition(".")[0]]
        keep = torch.topk(_column_importance(mlp.down_proj.weight.data, norms), keep_count).indices.sort().values
        _take_rows(mlp.gate_proj, keep)
        _take_rows(mlp.up_proj, keep)
        _take_columns(mlp.down_proj, keep)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep_count
        ctx.records[down_name.rpartition(".")[0]] = {"stage": "prune", "structured": "mlp_channels", "kept": keep_count}

    _with_input_norms(model, config, ctx, downs, apply)
    model.config.intermediate_size = keep_count


class _BlockSimilarity:
    """Mean cosine similarity between each block's input and output tokens (no compression)."""

    def __init__(self):
        self.similarity: dict[int, list[float]] = {}
        self._index = 0

    def attach(self, index, name, block):
        self._index = index
        self.similarity[index] = [0.0, 0]

        def hook(_module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, (tuple, list)) else output
            cos = F.cosine_similarity(hidden_in.float().flatten(0, -2), hidden_out.float().flatten(0, -2), dim=-1)
            self.similarity[index][0] += float(cos.sum())
            self.similarity[index][1] += cos.numel()

        return [block.register_forward_hook(hook, with_kwargs=True)]

    def after_chunk(self):
        pass

    def compress(self, index, name, block):
        pass

    def mean(self) -> dict[int, float]:
        return {i: total / max(count, 1) for i, (total, count) in self.similarity.items()}


def _prune_layers(model, config, ctx, plan) -> None:
    blocks_name, blocks = find_decoder_blocks(model)
    spec = config.structured
    if spec.layers == "auto":
        measure = _BlockSimilarity()
        run_layerwise(model, ctx.calibration(), measure, batch_size=ctx.batch_size, device=ctx.device,
                      description="block importance", show_progress=ctx.show_progress)
        similarity = measure.mean()
        remove = sorted(sorted(similarity, key=lambda i: -similarity[i])[: spec.count])
        for index, value in similarity.items():
            ctx.records[f"{blocks_name}.{index}"] = {"stage": "prune", "structured": "layers", "cosine_in_out": round(value, 5),
                                                     "removed": index in remove}
    else:
        remove = sorted(set(spec.layers))
    kept = [i for i in range(len(blocks)) if i not in remove]
    parent = model.get_submodule(blocks_name.rpartition(".")[0]) if "." in blocks_name else model
    setattr(parent, blocks_name.rpartition(".")[2], nn.ModuleList([blocks[i] for i in kept]))
    for new_index, block in enumerate(model.get_submodule(blocks_name)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    model.config.num_hidden_layers = len(kept)
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(blocks):
        model.config.layer_types = [layer_types[i] for i in kept]
    plan.selected = {f"{blocks_name}.{i}": "removed" for i in remove}


class _ExpertImportance:
    """Per expert: Σ routing weight × ‖expert output‖ over the tokens routed to it; prunes in compress."""

    def __init__(self, model, experts: dict[str, nn.Module], remove: int, ctx: StageContext):
        self.model, self.experts, self.remove, self.ctx = model, experts, remove, ctx
        self.scores: dict[str, torch.Tensor] = {}

    def attach(self, index, name, block):
        handles = []
        for experts_name, experts in self.experts.items():
            if experts_name.startswith(name + "."):
                self.scores[experts_name] = torch.zeros(experts.gate_up_proj.shape[0], dtype=torch.float64)
                handles.append(experts.register_forward_hook(self._hook(experts_name), with_kwargs=True))
        return handles

    def _hook(self, experts_name):
        def hook(module, args, kwargs, _output):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            hidden, top_index, top_weights = (list(args) + [kwargs[k] for k in names[len(args) :]])[:3]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            for expert in torch.unique(top_index).tolist():
                if expert >= module.gate_up_proj.shape[0]:
                    continue
                token, slot = torch.where(top_index == expert)
                gate, up = F.linear(hidden[token], module.gate_up_proj[expert]).chunk(2, dim=-1)
                out = F.linear(module.act_fn(gate) * up, module.down_proj[expert])
                weight = top_weights[token, slot].float()
                self.scores[experts_name][expert] += float((weight * out.float().norm(dim=-1)).sum())

        return hook

    def after_chunk(self):
        pass

    def compress(self, index, name, block):
        for experts_name, experts in self.experts.items():
            if not experts_name.startswith(name + "."):
                continue
            scores = self.scores[experts_name]
            total = scores.numel()
            keep = torch.topk(scores, total - self.remove).indices.sort().values
            experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.data[keep].clone(), requires_grad=False)
            experts.down_proj = nn.Parameter(experts.down_proj.data[keep].clone(), requires_grad=False)
            experts.num_experts = keep.numel()
            router = _router_of(self.model, experts_name)
            router.weight = nn.Parameter(router.weight.data[keep].clone(), requires_grad=False)
            if getattr(router, "bias", None) is not None and router.bias.shape[0] == total:
                router.bias = nn.Parameter(router.bias.data[keep].clone(), requires_grad=False)
            if hasattr(router, "num_experts"):
                router.num_experts = keep.numel()
            self.ctx.records[experts_name] = {"stage": "prune", "structured": "experts", "kept": keep.tolist(),
                                              "importance": [round(float(s), 4) for s in scores]}


def _prune_experts(model, config, ctx, plan) -> None:
    experts = {name: model.get_submodule(name) for name in plan.selected}
    key = next(k for k in _EXPERT_COUNT_KEYS if hasattr(model.config, k))
    total = getattr(model.config, key)
    remove = round(config.structured.experts * total)
    run_layerwise(model, ctx.calibration(), _ExpertImportance(model, experts, remove, ctx), batch_size=ctx.batch_size,
                  device=ctx.device, description="expert importance", show_progress=ctx.show_progress)
    setattr(model.config, key, total - remove)

"""`quantize.method: awq`: AWQ scale search through the layer-by-layer engine, then RTN or GPTQ.

Mappings (which module's output feeds which group of Linears) are found from the model's
structure while it runs, not from a table per architecture:

1. During the statistics pass, every Linear of the block records its input; Linears whose
   input is the very same tensor form a group (q/k/v, gate/up, down, o). Leaf modules record
   the order in which they run.
2. For each group, the modules that ran before it and whose output channels can absorb a
   division (a Linear with as many outputs as the group's inputs, or a norm-like module with
   a 1-D weight of that size) are candidates, nearest first. A candidate is accepted when,
   on a float32 copy of the block, folding a random positive scale into it and into the
   group leaves the block's output unchanged. That one test covers every condition: the
   candidate produced the input up to a per-channel linear map (a norm; up_proj through the
   gated product; v_proj through attention when the head layout matches), nothing else reads
   its output, and the fold itself is right for that module type (e.g. a norm computing
   `(1 + w) x` fails and is left alone).
3. The scale search (compressor.algorithms.awq) runs on a sample of the group's inputs, the
   scale is folded in, and once every group of the block is scaled, the block's targets are
   quantized with RTN, or with GPTQ on Hessians of the scaled inputs (H / s sᵀ, no second
   pass needed).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compressor.algorithms.awq import fold_scale, producer_kind, search_scale
from compressor.algorithms.gptq import HessianAccumulator
from compressor.algorithms.grid import WeightGrid
from compressor.layerwise import run_layerwise
from compressor.stages.base import StageContext

FOLD_CHECK_TOLERANCE = 1e-3  # relative change of the block's output (float32) that still counts as equal


@dataclass
class _GroupStats:
    members: list[str]  # module names relative to the block, in call order
    abs_sum: torch.Tensor
    count: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)
    hessian: HessianAccumulator | None = None


def _first_sample(value: Any, batch: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:1] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_first_sample(v, batch) for v in value)
    return value


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float32(v) for v in value)
    return value


def _first_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _FoldChecker:
    """Tries folds on a float32 copy of one block, on the first calibration sample."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]):
        self.block = copy.deepcopy(block).float()
        self.hidden = hidden.float()
        self.kwargs = _to_float32(kwargs)
        self.reference = self._run()
        update = self.reference - self.hidden if self.reference.shape == self.hidden.shape else self.reference
        self.norm = float(update.norm()) or 1.0
        self.generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def _run(self) -> torch.Tensor:
        return _first_output(self.block(self.hidden, **self.kwargs)).float()

    @torch.no_grad()
    def preserves_output(self, producer: str, members: list[str]) -> bool:
        modules = [self.block.get_submodule(name) for name in (producer, *members)]
        saved = [{k: v.detach().clone() for k, v in m.named_parameters(recurse=False)} for m in modules]
        channels = modules[1].in_features
        scale = torch.exp(torch.rand(channels, generator=self.generator) * 2 - 1)
        try:
            fold_scale(modules[0], modules[1:], scale)
            change = float((self._run() - self.reference).norm()) / self.norm
        finally:
            for module, params in zip(modules, saved):
                for key, value in params.items():
                    getattr(module, key).copy_(value)
        return change < FOLD_CHECK_TOLERANCE


class _AWQBlockAlgorithm:
    def __init__(self, model, modules: dict[str, nn.Linear], grids: dict[str, WeightGrid], config, ctx, stride: int):
        from compressor.stages.quant_methods import _GPTQBlockAlgorithm

        self.model = model
        self.targets = modules
        self.grids = grids
        self.config = config
        self.ctx = ctx
        self.stride = stride
        self.gptq = _GPTQBlockAlgorithm(model, modules, grids, config, ctx) if config.awq.then == "gptq" else None
        self._reset()

    def _reset(self) -> None:
        self.order: list[str] = []
        self.stash: dict[str, torch.Tensor] = {}
        self.groups: list[_GroupStats] | None = None
        self.probe: tuple[torch.Tensor, dict[str, Any]] | None = None

    # --- statistics pass ------------------------------------------------------------------

    def attach(self, index: int, name: str, block: nn.Module):
        self._reset()
        self.prefix = name + "."
        handles = [block.register_forward_pre_hook(self._grab_probe, with_kwargs=True)]
        for rel, module in block.named_modules():
            if not rel:
                continue
            if next(module.children(), None) is None:
                handles.append(module.register_forward_hook(self._order_hook(rel)))
            if isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(self._input_hook(rel)))
        return handles

    def _grab_probe(self, _module, args, kwargs):
        if self.probe is None:
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            batch = hidden.shape[0]
            self.probe = (hidden[:1].detach().clone(), _first_sample(rest, batch))

    def _order_hook(self, rel: str):
        def hook(_module, _args, _output):
            if self.groups is None and rel not in self.order:
                self.order.append(rel)

        return hook

    def _input_hook(self, rel: str):
        def hook(_module, args, _output):
            self.stash[rel] = args[0].detach()

        return hook

    def _make_groups(self) -> list[_GroupStats]:
        by_input: dict[tuple, list[str]] = defaultdict(list)
        for rel, tensor in self.stash.items():
            by_input[(tensor.data_ptr(), tuple(tensor.shape))].append(rel)
        groups = []
        for members in sorted(by_input.values(), key=lambda g: min(self.order.index(m) for m in g)):
            members = sorted(members, key=self.order.index)
            channels = self.stash[members[0]].shape[-1]
            stats = _GroupStats(members, torch.zeros(channels, dtype=torch.float64))
            if self.gptq is not None and any(self.prefix + m in self.targets for m in members):
                stats.hessian = HessianAccumulator(channels, device=self.stash[members[0]].device)
            groups.append(stats)
        return groups

    def after_chunk(self) -> None:
        if not self.stash:
            return
        if self.groups is None:
            self.groups = self._make_groups()
        for stats in self.groups:
            x = self.stash[stats.members[0]]
            rows = x.reshape(-1, x.shape[-1])
            stats.abs_sum += rows.abs().sum(dim=0, dtype=torch.float64).cpu()
            stats.count += rows.shape[0]
            stats.samples.append(rows[:: self.stride].to("cpu", copy=True))
            if stats.hessian is not None:
                stats.hessian.add(x)
        self.stash.clear()

    # --- compression ----------------------------------------------------------------------

    def _find_producer(self, checker: _FoldChecker, block: nn.Module, members: list[str]) -> str | None:
        channels = block.get_submodule(members[0]).in_features
        first = min(self.order.index(m) for m in members)
        for rel in reversed(self.order[:first]):
            if rel in members or producer_kind(block.get_submodule(rel), channels) is None:
                continue
            if checker.preserves_output(rel, members):
                return rel
        return None

    def compress(self, index: int, name: str, block: nn.Module) -> None:
        if not self.groups or self.probe is None:
            return
        checker = _FoldChecker(block, *self.probe)
        scales: dict[int, torch.Tensor] = {}
        notes: dict[str, dict[str, Any]] = {}
        for position, stats in enumerate(self.groups):
            targets = [m for m in stats.members if self.prefix + m in self.targets]
            if not targets:
                continue
            producer = self._find_producer(checker, block, stats.members)
            note: dict[str, Any] = {"producer": None if producer is None else self.prefix + producer}
            if producer is not None:
                members = [block.get_submodule(m) for m in stats.members]
                result = search_scale(
                    torch.cat(stats.samples),
                    (stats.abs_sum / stats.count).float(),
                    [m.weight.data for m in members],
                    [self.grids.get(self.prefix + m) for m in stats.members],
                    grid_points=self.config.awq.grid,
                    duo_scaling=self.config.awq.duo_scaling,
                )
                note.update(ratio=result.ratio, search_error=min([result.unscaled_error, *result.errors]),
                            unscaled_error=result.unscaled_error, scaled_with=[self.prefix + m for m in stats.members])
                if result.ratio is not None:
                    fold_scale(block.get_submodule(producer), members, result.scale.to(members[0].weight.device))
                    scales[position] = result.scale
            else:
                note["reason"] = "no module before this group can absorb a scale without changing the block's output"
            for member in targets:
                notes[self.prefix + member] = note
            stats.samples.clear()
        self._quantize(scales)
        for module_name, note in notes.items():
            record = self.ctx.records[module_name]
            record.update(method="awq", then=self.config.awq.then, awq=note)
        self.groups = None

    def _quantize(self, scales: dict[int, torch.Tensor]) -> None:
        from compressor.stages.quant_methods import RTNMethod

        assert self.groups is not None
        for position, stats in enumerate(self.groups):
            names = [self.prefix + m for m in stats.members if self.prefix + m in self.targets]
            if not names:
                continue
            if self.gptq is None:
                RTNMethod().quantize(self.model, {n: self.targets[n] for n in names}, self.grids, self.config, self.ctx)
                continue
            assert stats.hessian is not None
            hessian = stats.hessian.hessian
            if position in scales:
                scale = scales[position].to(hessian.device)
                hessian = hessian / torch.outer(scale, scale)
            by_grid: dict[WeightGrid, list[str]] = defaultdict(list)
            for module_name in names:
                by_grid[self.grids[module_name]].append(module_name)
            for grid, group in by_grid.items():
                self.gptq._solve(group, grid, hessian, len(names) > 1)


class AWQMethod:
    calibrated = True
    layer_class = "QuantLinear"

    def quantize(self, model, modules, grids, config, ctx: StageContext) -> None:
        tokens = ctx.calibration()
        stride = max(1, tokens.numel() // config.awq.search_tokens)
        algorithm = _AWQBlockAlgorithm(model, modules, grids, config, ctx, stride)
        run_layerwise(
            model,
            tokens,
            algorithm,
            batch_size=ctx.batch_size,
            device=ctx.device,
            description="awq",
            show_progress=ctx.show_progress,
        )

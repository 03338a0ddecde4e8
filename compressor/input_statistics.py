"""Statistics of the inputs of a block's target layers, one per distinct input tensor.

Layers that read the same tensor (q/k/v after one norm, gate/up after another) share one
statistic: a Hessian for GPTQ, SparseGPT and EoRA, column norms for Wanda. This is the block
algorithm most calibrated methods hand to the layer-by-layer engine (`compressor.layerwise`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
from torch import nn

from compressor.block_io import BlockStatisticsComplete
from compressor.layerwise import run_layerwise
from compressor.stages.base import StageContext


class InputStatisticsAlgorithm:
    """Block algorithm for the layer-by-layer engine: one statistic per distinct input of the
    block's target layers, folded after every chunk, handed to `solve` once per block."""

    def __init__(
        self,
        modules: dict[str, nn.Linear],
        make_statistic: Callable[[int, torch.device], Any],
        solve: Callable[[list[str], Any], None],
        solve_unseen: Callable[[str], None] | None = None,
    ):
        self.modules = modules
        self.make_statistic = make_statistic
        self.solve = solve
        # For a target no calibration input reached (an MoE expert no token was routed to);
        # without it such a layer is left as it is.
        self.solve_unseen = solve_unseen
        self._stash: dict[str, torch.Tensor] = {}
        self._groups: list[list[str]] = []
        self._statistics: list[Any] = []
        self._group_of: dict[str, int] = {}
        self._hooked: list[str] = []
        self._expected = 0

    def targets(self, name: str) -> list[str]:
        prefix = name + "."
        return [n for n in self.modules if n.startswith(prefix)]

    def attach(self, index: int, name: str, block: nn.Module, only: list[str] | None = None, shared_input: bool = False):
        """Hooks on the block's targets (or on `only`). With `shared_input` (the caller knows
        they all read one tensor) the first of them to run records it for all and ends the
        forward, so none of their matmuls is computed."""
        self._stash.clear()
        self._groups, self._statistics, self._group_of = [], [], {}
        hooked = {n: self.modules[n] for n in (self.targets(name) if only is None else only)}
        self._hooked = list(hooked)
        self._expected = len(hooked)
        if shared_input:
            return [m.register_forward_pre_hook(self._shared_hook(list(hooked))) for m in hooked.values()]
        return [m.register_forward_pre_hook(self._hook(n)) for n, m in hooked.items()]

    def _shared_hook(self, module_names: list[str]):
        def hook(_module, args):
            tensor = args[0].detach()
            for module_name in module_names:
                self._stash[module_name] = tensor
            raise BlockStatisticsComplete

        return hook

    def _hook(self, module_name: str):
        # A pre-hook: once every target layer of the block has shown its input, the rest of the
        # block's forward (at least the last layer's matmul) is wasted work, so it is cut short.
        # Blocks whose targets do not all run on every chunk (MoE experts) just run to the end.
        def hook(_module, args):
            self._stash[module_name] = args[0].detach()
            if len(self._stash) == self._expected:
                raise BlockStatisticsComplete

        return hook

    def after_chunk(self) -> None:
        # Groups are found as their layers first run: MoE experts run only on the chunks whose
        # tokens are routed to them, so a later chunk may bring new groups and miss old ones.
        by_input: dict[tuple, list[str]] = defaultdict(list)
        for module_name, tensor in self._stash.items():
            by_input[(tensor.data_ptr(), tuple(tensor.shape))].append(module_name)
        for names in by_input.values():
            index = self._group_of.get(names[0])
            if index is None:
                index = len(self._groups)
                self._groups.append(names)
                inputs = self._stash[names[0]]
                self._statistics.append(self.make_statistic(inputs.shape[-1], inputs.device))
                self._group_of.update((n, index) for n in names)
            self._statistics[index].add(self._stash[names[0]])
        self._stash.clear()

    def compress(self, index: int, name: str, block: nn.Module) -> None:
        for group, statistic in zip(self._groups, self._statistics):
            self.solve(group, statistic)
        if self.solve_unseen is not None:
            for module_name in self._hooked:
                if module_name not in self._group_of:
                    self.solve_unseen(module_name)
        self._groups, self._statistics, self._group_of = [], [], {}


def run_statistics(model: nn.Module, modules, make_statistic, solve, ctx: StageContext, description: str,
                   solve_unseen: Callable[[str], None] | None = None) -> None:
    algorithm = InputStatisticsAlgorithm(modules, make_statistic, solve, solve_unseen)
    run_layerwise(
        model, ctx.calibration(), algorithm, batch_size=ctx.batch_size, device=ctx.device,
        description=description, show_progress=ctx.show_progress,
    )

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

    def __init__(self, modules: dict[str, nn.Linear], make_statistic: Callable[[int, torch.device], Any], solve: Callable[[list[str], Any], None]):
        self.modules = modules
        self.make_statistic = make_statistic
        self.solve = solve
        self._stash: dict[str, torch.Tensor] = {}
        self._groups: list[list[str]] = []
        self._statistics: list[Any] = []
        self._expected = 0

    def targets(self, name: str) -> list[str]:
        prefix = name + "."
        return [n for n in self.modules if n.startswith(prefix)]

    def attach(self, index: int, name: str, block: nn.Module, only: list[str] | None = None, shared_input: bool = False):
        """Hooks on the block's targets (or on `only`). With `shared_input` (the caller knows
        they all read one tensor) the first of them to run records it for all and ends the
        forward, so none of their matmuls is computed."""
        self._stash.clear()
        self._groups, self._statistics = [], []
        hooked = {n: self.modules[n] for n in (self.targets(name) if only is None else only)}
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
        if not self._stash:
            return
        if not self._groups:
            by_input: dict[tuple, list[str]] = defaultdict(list)
            for module_name, tensor in self._stash.items():
                by_input[(tensor.data_ptr(), tuple(tensor.shape))].append(module_name)
            self._groups = list(by_input.values())
            self._statistics = [self.make_statistic(self._stash[g[0]].shape[-1], self._stash[g[0]].device) for g in self._groups]
        for group, statistic in zip(self._groups, self._statistics):
            statistic.add(self._stash[group[0]])
        self._stash.clear()

    def compress(self, index: int, name: str, block: nn.Module) -> None:
        for group, statistic in zip(self._groups, self._statistics):
            self.solve(group, statistic)
        self._groups, self._statistics = [], []


def run_statistics(model: nn.Module, modules, make_statistic, solve, ctx: StageContext, description: str) -> None:
    algorithm = InputStatisticsAlgorithm(modules, make_statistic, solve)
    run_layerwise(
        model, ctx.calibration(), algorithm, batch_size=ctx.batch_size, device=ctx.device,
        description=description, show_progress=ctx.show_progress,
    )

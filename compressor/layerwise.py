"""The layer-by-layer calibration engine shared by every calibrated algorithm.

1. Run the model on the calibration windows until the first decoder block, and keep what
   that block receives (hidden states and keyword arguments such as rotary embeddings).
2. For each block in turn: move it to the compute device, run it on every chunk with the
   algorithm's hooks attached (statistics pass), let the algorithm compress the block, then
   run the compressed block to produce the next block's inputs (propagation pass).
Only one block's activations and statistics are alive at a time, and the next block sees
the outputs of the *compressed* block, so errors do not compound unseen.

An algorithm marked ``sequential`` (GPTQ) gets pre-norm blocks (Llama, Qwen, Mistral) through
`compressor.sequential_block` instead: one pass per block that compresses its layers in the
order they run, each calibrated on the compressed layers before it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from compressor.block_io import BlockInputs, first_output, move_kwargs, statistics_pass
from compressor.errors import CompressionError
from compressor.file_pages import release_file_pages, storage_address
from compressor.offload import compute_device, onload
from compressor.sequential_block import KeptInputs, SequentialBlockPass, follows_layout, match_layout, plan_steps
from compressor.transformers_names import CACHE_NAMES

__all__ = ["BlockAlgorithm", "BlockInputs", "find_decoder_blocks", "run_layerwise"]


class BlockAlgorithm(Protocol):
    """What the engine asks of a calibrated algorithm, block by block."""

    def attach(self, index: int, name: str, block: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Register hooks that gather statistics during the statistics pass."""

    def after_chunk(self) -> None:
        """Called after each chunk of the statistics pass (to fold stashed inputs)."""

    def compress(self, index: int, name: str, block: nn.Module) -> None:
        """Compress the block's modules in place from the gathered statistics."""


class _StopForward(Exception):
    pass


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the one with `num_hidden_layers` entries."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (count is None or len(module) == count):
            return name, module
    raise CompressionError("cannot find the decoder blocks (a ModuleList of num_hidden_layers blocks)")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, tokens: torch.Tensor, batch_size: int) -> BlockInputs:
    """Run the model's head on each chunk of `tokens` and record what the first block receives."""
    captured = BlockInputs()

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        # No KV cache between calibration batches: drop it under either of its names (transformers_names).
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states" and k not in CACHE_NAMES}
        kwargs["use_cache"] = False
        captured.hidden.append(hidden.detach())
        captured.kwargs.append(kwargs)
        raise _StopForward

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    device = compute_device(model)
    try:
        for chunk in tokens.split(batch_size):
            try:
                model(input_ids=chunk.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _propagate(block: nn.Module, inputs: BlockInputs, device: torch.device) -> None:
    for i, hidden in enumerate(inputs.hidden):
        out = first_output(block(hidden.to(device), **move_kwargs(inputs.kwargs[i], device)))
        inputs.hidden[i] = out.to(hidden.device)


def _two_passes(block: nn.Module, name: str, index: int, inputs: BlockInputs, algorithm: BlockAlgorithm, device: torch.device, propagate: bool) -> None:
    """Statistics pass through the dense block, compression, propagation pass."""

    def forward(i: int) -> None:
        block(inputs.hidden[i].to(device), **move_kwargs(inputs.kwargs[i], device))

    statistics_pass(algorithm.attach(index, name, block), len(inputs.hidden), forward, algorithm.after_chunk)
    algorithm.compress(index, name, block)
    if propagate:
        _propagate(block, inputs, device)


class _SequentialPlanner:
    """Decides, block by block, whether the sequential pass applies; the layout check runs
    once per block class (on that class's first block, before it is compressed)."""

    def __init__(self, algorithm) -> None:
        self.algorithm = algorithm
        self.enabled = bool(getattr(algorithm, "sequential", False))
        self.verdicts: dict[type, bool] = {}
        self._store: KeptInputs | None = None

    def store(self, inputs: BlockInputs, device: torch.device) -> KeptInputs:
        """The buffer for kept layer inputs, made on first use and reused by every block."""
        if self._store is None:
            self._store = KeptInputs(inputs, device)
        return self._store

    def plan(self, block: nn.Module, name: str, index: int, inputs: BlockInputs, device: torch.device) -> SequentialBlockPass | None:
        if not self.enabled:
            return None
        parts = match_layout(block)
        steps = plan_steps(parts, name, self.algorithm.targets(name)) if parts is not None else None
        if parts is None or steps is None:
            return None
        kind = type(block)
        if kind not in self.verdicts:
            self.verdicts[kind] = follows_layout(parts, inputs.hidden[0].to(device), move_kwargs(inputs.kwargs[0], device))
        if not self.verdicts[kind]:
            return None
        return SequentialBlockPass(parts, steps, self.algorithm, index, name, device)


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    tokens: torch.Tensor,
    algorithm: BlockAlgorithm,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    description: str = "calibrating",
    show_progress: bool = True,
) -> None:
    """Compress `model` block by block with `algorithm`, calibrated on `tokens` [N, L]."""
    blocks_name, blocks = find_decoder_blocks(model)
    device = torch.device(device) if device is not None else compute_device(blocks[0])
    inputs = capture_block_inputs(model, blocks[0], tokens, batch_size)
    planner = _SequentialPlanner(algorithm)
    progress = tqdm(range(len(blocks)), desc=description, unit="block", disable=not show_progress)
    for index in progress:
        block = blocks[index]
        name = f"{blocks_name}.{index}"
        onload(block)  # a block left on disk by --max-memory is read into memory now, once
        home = compute_device(block)
        block.to(device)
        dense = list(block.parameters())
        propagate = index + 1 < len(blocks)
        sequential = planner.plan(block, name, index, inputs, device)
        if sequential is not None:
            sequential.run(inputs, propagate, planner.store(inputs, device))
        else:
            _two_passes(block, name, index, inputs, algorithm, device, propagate)
        # The weights the algorithm replaced are dead; if they were views of the mapped checkpoint
        # their pages would stay resident to the end of the run.
        kept = {storage_address(p) for p in block.parameters()}
        release_file_pages(p for p in dense if storage_address(p) not in kept)
        del dense
        if propagate:
            bad = next((i for i, h in enumerate(inputs.hidden) if not torch.isfinite(h).all()), None)
            if bad is not None:
                raise CompressionError(f"block {name} produced NaN or Inf after compression (chunk {bad})")
        block.to(home)

"""True-sequential calibration of one pre-norm decoder block (Llama, Mistral, Qwen2/3 and kin).

The generic engine (`compressor.layerwise`) runs every block twice per chunk: a statistics pass
through the dense block, then a propagation pass through the compressed one. Blocks of the
pre-norm shape

    h2  = h  + attention(attention_norm(h))    # the attention ends in its output projection
    out = h2 + mlp(mlp_norm(h2))               # the MLP ends in its down projection

are walked here in the order their layers run, and each group is compressed as soon as its
inputs are known:

1. q/k/v read attention_norm(h) (only the norm runs, not their matmuls);
2. o reads the attention's core output, computed with the compressed q/k/v; that input is kept
   in a buffer as large as the block's inputs (whole, unless the attention is wider);
3. h2 = h + o(kept input) with the compressed o; gate/up read mlp_norm(h2) (only the norm runs);
4. down reads act(gate) * up from the compressed gate/up; kept for as many chunks as fit in
   the same hidden-state-sized buffer, the MLP's first half recomputed for the rest;
5. out = h2 + down(kept input), the next block's input.

Every layer is calibrated on what the compressed layers before it produce, and a block costs
about one forward (plus the MLP's first half for the chunks whose down input was not kept)
instead of two. Whether a block has this shape is checked on its first chunk, by comparing
the decomposed computation with the block's own forward; a block that differs (an extra norm
after the attention, a mixture of experts, ...) goes through the generic engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from compressor.block_io import BlockInputs, BlockStatisticsComplete, first_output, move_kwargs, statistics_pass


class SequentialAlgorithm(Protocol):
    """A block algorithm that can gather statistics and compress one group of layers at a time."""

    def targets(self, name: str) -> list[str]:
        """Full names of the algorithm's target layers inside block `name`."""

    def attach(self, index: int, name: str, block: nn.Module, only: list[str] | None = None, shared_input: bool = False) -> list:
        """Hooks gathering statistics for the layers in `only` (all targets when None); with
        `shared_input` they all read one tensor and the forward may stop at the first."""

    def after_chunk(self) -> None: ...

    def compress(self, index: int, name: str, block: nn.Module) -> None: ...


@dataclass(frozen=True)
class PreNormLayout:
    """Attribute names of a pre-norm decoder block's parts."""

    attention_norm: str
    attention: str
    attention_output: str  # inside `attention`
    mlp_norm: str
    mlp: str
    mlp_output: str  # inside `mlp`


# Tried in order; a block matches the first layout whose attributes it has.
LAYOUTS: tuple[PreNormLayout, ...] = (
    PreNormLayout("input_layernorm", "self_attn", "o_proj", "post_attention_layernorm", "mlp", "down_proj"),
)


@dataclass(frozen=True)
class BlockParts:
    """A block bound to its layout. Layers are looked up on every use, since the algorithm
    replaces them (a Linear becomes a QuantLinear) between the steps."""

    block: nn.Module
    layout: PreNormLayout

    def _get(self, *path: str) -> nn.Module:
        module = self.block
        for attribute in path:
            module = getattr(module, attribute)
        return module

    def attention_norm(self) -> nn.Module:
        return self._get(self.layout.attention_norm)

    def attention(self) -> nn.Module:
        return self._get(self.layout.attention)

    def attention_output(self) -> nn.Module:
        return self._get(self.layout.attention, self.layout.attention_output)

    def mlp_norm(self) -> nn.Module:
        return self._get(self.layout.mlp_norm)

    def mlp(self) -> nn.Module:
        return self._get(self.layout.mlp)

    def mlp_output(self) -> nn.Module:
        return self._get(self.layout.mlp, self.layout.mlp_output)


def match_layout(block: nn.Module) -> BlockParts | None:
    for layout in LAYOUTS:
        parts = BlockParts(block, layout)
        try:
            parts.attention_norm(), parts.attention_output(), parts.mlp_norm(), parts.mlp_output()
        except AttributeError:
            continue
        return parts
    return None


@dataclass(frozen=True)
class Steps:
    """The block's target layers (full names) in the order they are compressed."""

    attention_inputs: list[str]
    attention_output: list[str]
    mlp_inputs: list[str]
    mlp_output: list[str]


def plan_steps(parts: BlockParts, name: str, targets: list[str]) -> Steps | None:
    """Assign every target of block `name` to its step; None when one fits no step."""
    layout = parts.layout
    attention, mlp = f"{name}.{layout.attention}.", f"{name}.{layout.mlp}."
    attention_output, mlp_output = attention + layout.attention_output, mlp + layout.mlp_output
    steps = Steps(
        attention_inputs=[t for t in targets if t.startswith(attention) and t != attention_output],
        attention_output=[t for t in targets if t == attention_output],
        mlp_inputs=[t for t in targets if t.startswith(mlp) and t != mlp_output],
        mlp_output=[t for t in targets if t == mlp_output],
    )
    placed = len(steps.attention_inputs) + len(steps.attention_output) + len(steps.mlp_inputs) + len(steps.mlp_output)
    return steps if placed == len(targets) else None


class _Stop(Exception):
    pass


class _InputCapture:
    """Pre-hooks on one layer: `record` (put first) keeps the input the layer receives, `stop`
    (put last, after any algorithm hooks, which still see the input) ends the forward there."""

    def __init__(self, layer: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handles = [
            layer.register_forward_pre_hook(self._record, prepend=True),
            layer.register_forward_pre_hook(self._stop),
        ]

    def _record(self, _module, args) -> None:
        self.value = args[0].detach()

    @staticmethod
    def _stop(_module, _args) -> None:
        raise _Stop

    def run(self, forward: Callable[[], object]) -> torch.Tensor:
        """Run `forward` up to the layer and return the layer's input."""
        try:
            forward()
        except (_Stop, BlockStatisticsComplete):
            pass
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("the layer whose input was to be kept never ran")
        return value

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _input_of(layer: nn.Module, forward: Callable[[], object]) -> torch.Tensor:
    capture = _InputCapture(layer)
    try:
        return capture.run(forward)
    finally:
        capture.remove()


def _linear_layers(module: nn.Module, skip: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if m is not skip and type(m).__name__.endswith("Linear")]


class _InputRecorder:
    """Which tensor each of some layers reads, to tell whether they all read the same one."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.seen: list[tuple[int, tuple[int, ...]]] = []
        self.handles = [layer.register_forward_pre_hook(self._record) for layer in layers]

    def _record(self, _module, args) -> None:
        self.seen.append((args[0].data_ptr(), tuple(args[0].shape)))

    def one_input(self) -> bool:
        for handle in self.handles:
            handle.remove()
        return len(set(self.seen)) <= 1


@torch.no_grad()
def follows_layout(parts: BlockParts, hidden: torch.Tensor, kwargs: dict) -> bool:
    """Whether the block's own forward equals the decomposed computation on one chunk, and the
    layers before each output projection all read the one normalized input."""
    block_output = first_output(parts.block(hidden, **kwargs))
    attention_inputs = _InputRecorder(_linear_layers(parts.attention(), parts.attention_output()))
    mlp_inputs = _InputRecorder(_linear_layers(parts.mlp(), parts.mlp_output()))
    try:
        attention_input = _input_of(
            parts.attention_output(), lambda: parts.attention()(hidden_states=parts.attention_norm()(hidden), **kwargs)
        )
        mid = hidden + parts.attention_output()(attention_input)
        mlp_input = _input_of(parts.mlp_output(), lambda: parts.mlp()(parts.mlp_norm()(mid)))
        decomposed = mid + parts.mlp_output()(mlp_input)
    except (RuntimeError, TypeError):
        return False
    finally:
        shared = attention_inputs.one_input() & mlp_inputs.one_input()
    same = decomposed.shape == block_output.shape and torch.allclose(decomposed, block_output, rtol=1e-3, atol=1e-5)
    return shared and same


class SequentialBlockPass:
    """Steps 1-5 of the module docstring for one block over every chunk of `inputs`."""

    def __init__(self, parts: BlockParts, steps: Steps, algorithm: SequentialAlgorithm, index: int, name: str, device: torch.device):
        self.parts, self.steps, self.algorithm = parts, steps, algorithm
        self.index, self.name, self.device = index, name, device

    def _gather(self, names: list[str], chunks: int, run: Callable[[int], object]) -> None:
        """Statistics of `names` over every chunk, then compress them. They all read the
        normalized input (`follows_layout` checked it), so each forward stops at the first."""
        if not names:
            return
        handles = self.algorithm.attach(self.index, self.name, self.parts.block, only=names, shared_input=True)
        statistics_pass(handles, chunks, run, self.algorithm.after_chunk)
        self.algorithm.compress(self.index, self.name, self.parts.block)

    def _kept_inputs(
        self, layer: nn.Module, names: list[str], chunks: int, run: Callable[[int], object], store: KeptInputs | None
    ) -> None:
        """Gather the statistics of `names` from the input of `layer` in each chunk, keeping
        those inputs in `store` as far as it has room; then compress them."""
        if not names and store is None:
            return  # nothing to gather and nothing to keep: the forward would be wasted
        handles = self.algorithm.attach(self.index, self.name, self.parts.block, only=names) if names else []
        capture = _InputCapture(layer)
        try:
            for i in range(chunks):
                value = capture.run(lambda: run(i))
                if names:
                    self.algorithm.after_chunk()
                if store is not None:
                    store.put(i, value)
                del value
        finally:
            capture.remove()
            for handle in handles:
                handle.remove()
        if names:
            self.algorithm.compress(self.index, self.name, self.parts.block)

    @staticmethod
    def _add_residual(inputs: BlockInputs, i: int, branch: torch.Tensor) -> None:
        # In place: the block's input is dead once its branch is added, and new hidden states
        # allocated between the chunks' temporaries would fragment the heap.
        inputs.hidden[i].add_(branch.to(inputs.hidden[i].device))

    @torch.no_grad()
    def run(self, inputs: BlockInputs, propagate: bool, store: KeptInputs) -> None:
        """Steps 1-5 over every chunk; `store` holds the kept inputs of o and down in turn."""
        parts, steps, device = self.parts, self.steps, self.device
        chunks = len(inputs.hidden)
        kwargs = [move_kwargs(k, device) for k in inputs.kwargs]

        def hidden(i: int) -> torch.Tensor:
            return inputs.hidden[i].to(device)

        def attention(i: int):
            return parts.attention()(hidden_states=parts.attention_norm()(hidden(i)), **kwargs[i])

        def mlp(i: int):
            return parts.mlp()(parts.mlp_norm()(hidden(i)))

        self._gather(steps.attention_inputs, chunks, attention)
        self._kept_inputs(parts.attention_output(), steps.attention_output, chunks, attention, store)
        for i in range(chunks):
            kept = store.get(i)
            self._add_residual(inputs, i, parts.attention_output()(kept) if kept is not None else first_output(attention(i)))
        store.clear()

        self._gather(steps.mlp_inputs, chunks, mlp)
        self._kept_inputs(parts.mlp_output(), steps.mlp_output, chunks, mlp, store if propagate else None)
        if not propagate:
            return
        for i in range(chunks):
            kept = store.get(i)
            self._add_residual(inputs, i, parts.mlp_output()(kept) if kept is not None else mlp(i))
        store.clear()


class KeptInputs:
    """One preallocated buffer (as many bytes as the block inputs) that holds layer inputs for
    as many chunks as fit; the rest are recomputed. Allocated once per run: a buffer of that size
    is its own memory mapping, and copying into it lets each chunk's tensors be freed at once,
    so the heap does not fragment around long-lived tensors."""

    def __init__(self, inputs: BlockInputs, device: torch.device) -> None:
        size = sum(h.numel() * h.element_size() for h in inputs.hidden)
        self.buffer = torch.empty(size, dtype=torch.uint8, device=device)
        self.used = 0
        self.kept: dict[int, torch.Tensor] = {}

    def put(self, chunk: int, value: torch.Tensor) -> bool:
        size = value.numel() * value.element_size()
        if self.used + size > self.buffer.numel():
            return False
        view = self.buffer[self.used : self.used + size].view(value.dtype).view(value.shape)
        view.copy_(value)
        self.kept[chunk] = view
        self.used += size
        return True

    def get(self, chunk: int) -> torch.Tensor | None:
        return self.kept.get(chunk)

    def clear(self) -> None:
        self.kept.clear()
        self.used = 0

"""`compress finetune --modules-to-save NAME[,NAME]`: peft's ``modules_to_save``, full trained copies
of whole modules (typically ``lm_head`` or ``embed_tokens``) beside the LoRA adapters.

peft wraps each named module in a ``ModulesToSaveWrapper`` holding a trainable copy; the adapter
file stores the copies, and ``PeftModel.from_pretrained`` / ``merge_and_unload`` put them back.

Tied embeddings (SmolLM2, Qwen3-0.6B…: ``lm_head.weight`` is ``embed_tokens.weight``): without
further care peft copies the named module alone, so training ``lm_head`` silently unties the model
(a second vocab × hidden matrix; merging then flips ``tie_word_embeddings`` off) and peft warns
(peft issue #2777). peft 0.21's ``LoraConfig(ensure_weight_tying=True)`` instead trains one copy of
the shared matrix, used by both the embedding and the head (the adapter file holds it under both
names, equal tensors); reloading and merging keep the tie. That is what the base model is (one matrix), so it is what we do when either
tied name is given, and the run says so. peft ties only modules named ``embed_tokens`` / ``lm_head``;
a tied pair named otherwise would come out untied, and is refused after wrapping.

Precision: the copies train in fp32 whatever the base's dtype (``train_copies_in_fp32``).
"""

from __future__ import annotations

from typing import Callable

import torch

from compressor.errors import UserError
from compressor.kernels.quant_linear import QuantLinear

FLAG = "--modules-to-save"
LOW_PRECISION = (torch.bfloat16, torch.float16)


def parse_modules_to_save(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError(f"expected module names such as lm_head or embed_tokens, got {text!r}", where=FLAG)
    return names


def _named(model: torch.nn.Module, name: str) -> list[tuple[str, torch.nn.Module]]:
    return [(full, m) for full, m in model.named_modules() if full == name or full.endswith(f".{name}")]


def _float_weights(module: torch.nn.Module) -> bool:
    """A copy can train: float parameters, none of them packed (QuantLinear codes, NF4 Params4bit)."""
    parameters = list(module.parameters())
    return bool(parameters) and all(p.dtype.is_floating_point and type(p).__name__ != "Params4bit" for p in parameters)


def embeddings_tied(model: torch.nn.Module) -> bool:
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embedding is not None and head.weight is embedding.weight


def check_modules_to_save(model: torch.nn.Module, names: list[str], lora_targets: str | list[str]) -> bool:
    """Refuse names that match nothing, a LoRA target, or a layer without float weights; True when
    one of them is an input/output embedding tied to the other (then peft must keep them tied)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = embeddings_tied(model)
    touches_tie = False
    for name in names:
        matched = _named(model, name)
        if not matched:
            raise UserError(f"no module of the model is named {name} (e.g. lm_head, embed_tokens)", where=FLAG)
        for full, module in matched:
            if isinstance(module, QuantLinear) or not _float_weights(module):
                raise UserError(f"{full} has packed (quantized) weights, so no full copy of it can train; name a float"
                                " module such as lm_head or embed_tokens", where=FLAG)
            if lora_targets != "all-linear" and any(full == t or full.endswith(f".{t}") for t in lora_targets):
                raise UserError(f"{full} already carries a LoRA adapter (--targets); a module is either adapted or"
                                " copied whole", where=FLAG)
            if lora_targets == "all-linear" and isinstance(module, torch.nn.Linear) and module is not head:
                raise UserError(f"{full} already carries a LoRA adapter (--targets all-linear); a module is either"
                                " adapted or copied whole", where=FLAG)
            touches_tie = touches_tie or (tied and (module is head or module is embedding))
    return touches_tie


def _active_weight(module: torch.nn.Module) -> torch.Tensor:
    copies = getattr(module, "modules_to_save", None)
    return copies[module.active_adapter].weight if copies is not None else module.weight


def check_tie_kept(peft_model) -> None:
    """After get_peft_model with ensure_weight_tying: the head must read the embedding's copy."""
    head, embedding = peft_model.get_output_embeddings(), peft_model.get_input_embeddings()
    if _active_weight(head) is not _active_weight(embedding):
        raise UserError("the output head shares its weight with the input embedding here, and peft keeps such a pair tied"
                        " only for modules named embed_tokens / lm_head; training one copy would untie the model",
                        where=FLAG)


def _copies(peft_model) -> list[torch.nn.Module]:
    """The trainable copies peft made (one object per tied pair: its wrappers share the module)."""
    found: dict[int, torch.nn.Module] = {}
    for module in peft_model.modules():
        copies = getattr(module, "modules_to_save", None)
        if isinstance(copies, torch.nn.ModuleDict):
            for copy in copies.values():
                found.setdefault(id(copy), copy)
    return list(found.values())


def train_copies_in_fp32(peft_model) -> Callable[[], None]:
    """Copies of a bf16/fp16 base train in fp32 (master weights), as LoRA's own tensors do: bf16
    has 8 bits of mantissa, so AdamW steps of ~lr on weights of ~0.05 would mostly round away.
    Each upcast copy takes its input in fp32 and hands its output on in its old dtype, so the rest
    of the model sees what it would. Returns the function that casts them back and drops the hooks
    (called before saving: the adapter then holds what the reloaded model computes with)."""
    undo: list[Callable[[], None]] = []
    original: dict[int, torch.dtype] = {}  # a tied pair's two copies share one parameter
    for copy in _copies(peft_model):
        parameters = list(copy.parameters())
        dtypes = [original.get(id(p), p.dtype) for p in parameters]
        if not any(d in LOW_PRECISION for d in dtypes):
            continue
        dtype = next(d for d in dtypes if d in LOW_PRECISION)
        for parameter in parameters:
            if parameter.dtype in LOW_PRECISION:
                original[id(parameter)] = parameter.dtype
                undo.append(lambda p=parameter, d=parameter.dtype: setattr(p, "data", p.data.to(d)))
                parameter.data = parameter.data.float()
        before = copy.register_forward_pre_hook(
            lambda _m, args: tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args))
        after = copy.register_forward_hook(lambda _m, _args, out, d=dtype: out.to(d) if torch.is_tensor(out) else out)
        undo += [before.remove, after.remove]

    def restore() -> None:
        for step in undo:
            step()
        undo.clear()

    return restore


def tie_line(names: list[str]) -> str:
    return (f"{FLAG} {','.join(names)}: lm_head and embed_tokens share one matrix in this model; one full copy of it"
            " trains for both (peft ensure_weight_tying), so the model stays tied")

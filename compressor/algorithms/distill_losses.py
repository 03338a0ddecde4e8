"""Distillation losses: a registry from the recipe's `kind` to a function of (student, teacher) outputs.

Logit losses work on next-token distributions at every position, averaged over tokens.
With temperature T the logits are divided by T and the loss is scaled by T², so the
gradient size does not shrink as T grows (Hinton et al.).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from compressor.registry import Registry


@dataclass(frozen=True)
class LossInputs:
    student_logits: torch.Tensor  # [batch, seq, vocab]
    teacher_logits: torch.Tensor | None
    student_hidden: tuple[torch.Tensor, ...] | None  # embeddings output, then one per block
    teacher_hidden: tuple[torch.Tensor, ...] | None
    input_ids: torch.Tensor  # [batch, seq]


LossFunction = Callable[[LossInputs, Any], torch.Tensor]


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per token, from log-probabilities, averaged over all tokens."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def forward_kl(inputs: LossInputs, spec: Any) -> torch.Tensor:
    """KL(teacher || student): the student covers every mode the teacher puts mass on."""
    t = spec.temperature
    return _kl(_log_probs(inputs.teacher_logits, t), _log_probs(inputs.student_logits, t)) * t * t


def reverse_kl(inputs: LossInputs, spec: Any) -> torch.Tensor:
    """KL(student || teacher): mode-seeking; the student may drop low-probability modes."""
    t = spec.temperature
    return _kl(_log_probs(inputs.student_logits, t), _log_probs(inputs.teacher_logits, t)) * t * t


def generalized_jsd(inputs: LossInputs, spec: Any) -> torch.Tensor:
    """β·KL(teacher || m) + (1-β)·KL(student || m), with m = β·teacher + (1-β)·student (GKD)."""
    t, beta = spec.temperature, spec.beta
    log_t = _log_probs(inputs.teacher_logits, t)
    log_s = _log_probs(inputs.student_logits, t)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1 - beta)]), dim=0)
    return (beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)) * t * t


def cross_entropy(inputs: LossInputs, spec: Any) -> torch.Tensor:
    """Next-token cross-entropy on the data itself (no teacher)."""
    logits = inputs.student_logits[:, :-1].float()
    targets = inputs.input_ids[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _hidden_pairs(inputs: LossInputs, spec: Any):
    assert inputs.student_hidden is not None and inputs.teacher_hidden is not None
    for student_layer, teacher_layer in spec.layers:
        yield inputs.student_hidden[student_layer].float(), inputs.teacher_hidden[teacher_layer].float()


def mse_hidden(inputs: LossInputs, spec: Any) -> torch.Tensor:
    """Mean squared error between chosen hidden states, averaged over the layer pairs."""
    losses = [F.mse_loss(s, t) for s, t in _hidden_pairs(inputs, spec)]
    return torch.stack(losses).mean()


def cosine_hidden(inputs: LossInputs, spec: Any) -> torch.Tensor:
    """1 − cosine similarity per token between chosen hidden states, averaged."""
    losses = [(1 - F.cosine_similarity(s, t, dim=-1)).mean() for s, t in _hidden_pairs(inputs, spec)]
    return torch.stack(losses).mean()


@dataclass(frozen=True)
class LossEntry:
    function: LossFunction
    needs_teacher: bool
    needs_hidden: bool
    uses_temperature: bool


def loss_registry() -> Registry[LossEntry]:
    registry: Registry[LossEntry] = Registry("distillation loss")
    registry.register("kl", LossEntry(forward_kl, True, False, True))
    registry.register("reverse_kl", LossEntry(reverse_kl, True, False, True))
    registry.register("jsd", LossEntry(generalized_jsd, True, False, True))
    registry.register("ce", LossEntry(cross_entropy, False, False, False))
    registry.register("mse_hidden", LossEntry(mse_hidden, True, True, False))
    registry.register("cosine_hidden", LossEntry(cosine_hidden, True, True, False))
    return registry.freeze()

"""Helpers for the pruning tests: tiny models built in memory and a stage runner."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compressor.pipeline import plan_recipe
from compressor.recipe import parse_recipe_text
from compressor.registry import stage_registry
from compressor.stages.base import StageContext
from tests.tiny_models import CONFIGS, VOCAB


def tiny_model(kind: str = "llama", dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    torch.manual_seed(1234)
    settings = {**CONFIGS[kind], **overrides}
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **settings)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def calibration_tokens(samples: int = 8, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (samples, seq_len), generator=generator)


def run_stages(model: torch.nn.Module, recipe_text: str, tokens: torch.Tensor | None = None) -> StageContext:
    recipe = parse_recipe_text(recipe_text, source="r.yaml")
    tokens = calibration_tokens() if tokens is None else tokens
    ctx = StageContext(tokenizer=None, calibration=lambda: tokens, device=torch.device("cpu"), show_progress=False)
    registry = stage_registry()
    for index, spec in enumerate(recipe.stages):
        stage = registry.get(spec.kind).implementation
        plan = stage.plan(model, spec.config, lambda *k, i=index, kind=spec.kind: recipe.where(("stages", i, kind, *k)))
        stage.run(model, spec.config, ctx, plan)
    return ctx


def plan_only(model: torch.nn.Module, recipe_text: str):
    return plan_recipe(model, parse_recipe_text(recipe_text, source="r.yaml"))


def prune_recipe(block: str) -> str:
    return f"name: t\nstages:\n  - prune: {block}\n"

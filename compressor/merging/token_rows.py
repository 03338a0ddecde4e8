"""Rows that `tokens:` names for single tokens (mergekit's `tokenizer.tokens`), checked at plan time.

    "<|im_end|>": {source: org/chat-tune}                                 that model's row of the token
    "<|im_end|>": {source: {kind: model_token, model: org/a, token: "</s>"}}  org/a's row of another token
    "<|im_end|>": {source: {kind: model_token, model: org/a, token_id: 2}}   org/a's row 2
    "<|im_end|>": {source: {kind: zero}}                                   zeros
    force: true                                                            every input takes that row

Without `force`, an input that has the token keeps its own row and the source fills in for the
others (as mergekit does); a token with no `source` follows the usual rule for missing tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from compressor.errors import RecipeError
from compressor.merging.sources import MergeInput
from compressor.stages.merge import ModelTokenRow, TokenRows, ZeroRow

Locate = Callable[..., dict[str, str]]


@dataclass
class ConfiguredRows:
    sources: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # output row -> (input, row); [] zeros
    forced: set[int] = field(default_factory=set)  # output rows every input takes from `sources`


def _input_index(model: str, inputs: list[MergeInput], locate: Locate, *key: str | int) -> int:
    for i, item in enumerate(inputs):
        if item.reference == model:
            return i
    raise RecipeError(
        f"model {model!r} is not one of the merge's inputs ({', '.join(item.reference for item in inputs)})", **locate(*key)
    )


def configured_rows(
    specs: dict[str, TokenRows],
    output_ids: dict[str, int],
    inputs: list[MergeInput],
    vocabularies: list[dict[str, int]],
    rows: list[torch.Tensor],
    input_rows: list[int],
    locate: Locate,
) -> ConfiguredRows:
    """Each configured token's source row, refused (naming its key) where that row does not exist."""
    out = ConfiguredRows()
    for token, spec in specs.items():
        token_id = output_ids[token]
        key = ("tokens", token, "source")
        if token_id >= len(rows[0]):
            raise RecipeError(f"{token!r} has id {token_id}, past the output's {len(rows[0])} embedding rows", **locate("tokens", token))
        source = spec.source
        if source is None:
            continue
        if isinstance(source, ZeroRow):
            out.sources[token_id] = []
        elif isinstance(source, ModelTokenRow):
            i = _input_index(source.model, inputs, locate, *key, "model")
            if source.token is not None:
                row = vocabularies[i].get(source.token)
                if row is None or row >= input_rows[i]:
                    raise RecipeError(f"{source.model} has no row for token {source.token!r}", **locate(*key, "token"))
            else:
                row = source.token_id
                if row is None or row >= input_rows[i]:
                    raise RecipeError(f"token_id {row} is past {source.model}'s {input_rows[i]} rows", **locate(*key, "token_id"))
            out.sources[token_id] = [(i, row)]
        else:
            i = _input_index(source, inputs, locate, *key)
            row = int(rows[i][token_id])
            if row < 0:
                raise RecipeError(
                    f"{source} has no row for {token!r}; name a model that has it, or use"
                    " {kind: model_token, model, token} or {kind: zero}",
                    **locate(*key),
                )
            out.sources[token_id] = [(i, row)]
        if spec.force:
            out.forced.add(token_id)
    return out

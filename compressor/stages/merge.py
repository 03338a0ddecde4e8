"""The `merge` stage: build the model from several checkpoints, mergekit-style.

Recipe block (must be the first stage; the recipe then takes no input MODEL)::

    - merge:
        method: ties                 # see compressor.algorithms.merge_methods
        base: org/base-model         # task-vector methods, slerp and model_stock need it
        models:
          - {model: org/math-tune, weight: 0.6, density: 0.5}
          - {model: org/code-tune+./code-lora, weight: [0.2, 0.8]}   # gradient over the layers
        density: 0.5                 # defaults for every model (weight / density / gamma)
        normalize: true              # method default when left out
        seed: 0                      # DARE's random masks (dare_ties / dare_linear only)
        tokenizer_source: base       # union, or one of the models; needed when vocabularies differ
        tokens:                      # with tokenizer_source: tokens to add, and where their rows come from
          "<|im_end|>": {source: org/math-tune, force: false}   # or {kind: model_token, model, token|token_id}, {kind: zero}
        pad_to_multiple_of: 64       # embedding rows rounded up (the extra rows take the mean token row)
        chat_template: auto          # auto | chatml | llama3 | mistral | alpaca | exaone | a Jinja template
        tie_break: index             # equal magnitudes at a TIES cut: index (streamed) or sort (mergekit's)

The merge streams tensors from disk (see `compressor.merging.engine`); it runs before any model
is loaded, so the stage has no in-memory `plan`/`run` step of its own.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationInfo, field_validator, model_validator

from compressor.algorithms.merge_methods import merge_method_registry
from compressor.merging.params import Setting, numbers_in
from compressor.recipe import StrictModel
from compressor.stages.base import StagePlan

DType = Literal["float32", "bfloat16", "float16", "float64"]


def _check_range(setting: Setting | None, name: str, low: float, high: float, low_open: bool) -> Setting | None:
    for value in numbers_in(setting):
        below = value <= low if low_open else value < low
        if below or value > high:
            bracket = "(" if low_open else "["
            raise ValueError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value:g}")
    return setting


class MergeModel(StrictModel):
    model: str = Field(min_length=1)  # Hub id, local folder, .gguf, or `model+adapter`
    weight: Setting | None = None
    density: Setting | None = None
    gamma: Setting | None = None

    @field_validator("density")
    @classmethod
    def _density(cls, value):
        return _check_range(value, "density", 0.0, 1.0, low_open=True)

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, value):
        return _check_range(value, "gamma", 0.0, 1.0, low_open=False)


class ModelTokenRow(StrictModel):
    """A token's row taken from a model by that model's own token (or id): mergekit's `model_token`."""

    kind: Literal["model_token"]
    model: str = Field(min_length=1)
    token: str | None = None
    token_id: NonNegativeInt | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give one of `token` or `token_id`")
        return self


class ZeroRow(StrictModel):
    kind: Literal["zero"]


class TokenRows(StrictModel):
    """Where one token's embedding and lm_head rows come from (mergekit's `tokenizer.tokens` entry).
    `source` a model: its row of this token; none: the usual rule for a token some model lacks."""

    source: str | ModelTokenRow | ZeroRow | None = None
    force: bool = False  # every input takes the source's row, even one that has the token

    @model_validator(mode="after")
    def _force_needs_source(self):
        if self.force and self.source is None:
            raise ValueError("force: true needs a `source` to take the row from")
        return self


class MergeConfig(StrictModel):
    model_config = ConfigDict(extra="forbid", strict=True, serialize_by_alias=True)

    method: str
    base: str | None = None
    models: list[MergeModel] = Field(min_length=1)
    weight: Setting | None = None
    density: Setting | None = None
    gamma: Setting | None = None
    t: Setting | None = None
    normalize: bool | None = None
    rescale: bool | None = None
    lambda_: float = Field(default=1.0, alias="lambda")
    filter_wise: bool = False
    seed: NonNegativeInt = 0
    dtype: DType | None = None  # dtype the inputs are cast to before merging (mergekit's `dtype`)
    out_dtype: DType | None = None  # dtype written (default: the merge's result dtype)
    tokenizer_source: str | None = None  # "base", "union" or one of `models[].model`
    tokens: dict[str, TokenRows] | None = None  # tokens the output tokenizer gets, and their rows
    pad_to_multiple_of: PositiveInt | None = None  # token-indexed rows rounded up to a multiple of this
    chat_template: str | None = Field(default=None, min_length=1)  # auto, a built-in name, or Jinja
    # Equal magnitudes at a TIES / Breadcrumbs cut: "index" (streamed, lower index first) or
    # "sort" (torch.argsort's order, bit-identical to mergekit, ~20 bytes per entry more memory).
    tie_break: Literal["index", "sort"] = "index"
    max_shard_size: str = "5GB"
    # mergekit's one whole-model slice: must be [0, the models' number of layers] (checked at plan time).
    layer_range: list[NonNegativeInt] | None = Field(default=None, min_length=2, max_length=2)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        registry = merge_method_registry()
        if value not in registry:
            raise ValueError(registry.unknown_message(value))
        return value

    @field_validator("density")
    @classmethod
    def _density(cls, value):
        return _check_range(value, "density", 0.0, 1.0, low_open=True)

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, value):
        return _check_range(value, "gamma", 0.0, 1.0, low_open=False)

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: str) -> str:
        parse_size(value)
        return value

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer_source_known(cls, source: str | None, info: ValidationInfo) -> str | None:
        # A field validator (models and base are validated first), so the error names this key.
        models = [m.model for m in info.data.get("models") or []]
        if source is not None and source not in ("base", "union") and source not in models:
            raise ValueError(f"tokenizer_source must be 'base', 'union' or one of the models, got {source!r}")
        if source == "base" and info.data.get("base") is None:
            raise ValueError("tokenizer_source: base needs a `base` model")
        return source

    @field_validator("tokens", "pad_to_multiple_of")
    @classmethod
    def _needs_tokenizer_source(cls, value, info: ValidationInfo):
        # Both reshape the vocabulary, which only a merge that builds its tokenizer does (as in mergekit).
        if value is not None and info.data.get("tokenizer_source") is None:
            raise ValueError(f"{info.field_name} needs tokenizer_source (base, union or one of the models)")
        return value

    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """"5GB" / "500MB" / "2GiB" / "1000000" → bytes."""
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGIB")
    unit = cleaned[len(number) :]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (write e.g. 5GB or 500MB)") from None
    if unit not in _UNITS or value <= 0:
        raise ValueError(f"not a size: {text!r} (write e.g. 5GB or 500MB)")
    return int(value * _UNITS[unit])


class MergeStage:
    """Runs before the model is loaded (`compressor.merging.recipe_run`); the pipeline skips it."""

    runs_before_load = True

    def needs_calibration(self, config: MergeConfig) -> bool:
        return False

    def plan(self, model, config: MergeConfig, locate) -> StagePlan:
        return StagePlan(kind="merge", method=config.method)

    def run(self, model, config: MergeConfig, ctx, plan: StagePlan):
        return model

"""The `activations:` block, FP8 weights, and the defaults and rules of the W8A8 / FP8 / NF4
methods, checked when the recipe is parsed (before any weight is read).

    activations: {bits: 8, type: int, dynamic: true, strategy: token, symmetric: true}

- ``type: int`` is int8, ``type: float`` FP8 e4m3; always 8 bits, symmetric.
- ``dynamic: true`` (``strategy: token``): one scale per token, computed in ``forward``;
  ``dynamic: false`` (``strategy: tensor``): one scale per layer, calibrated (needs data).
- Layers with quantized activations have 8-bit weights of the same type, one scale per
  output channel (W8A8 int8, or FP8 weights with FP8 activations).

Method defaults (used when the recipe leaves the key out, also keys left out *inside* ``weights:``,
so ``weights: {bits: 8}`` means per-channel here, not the generic group 128):
- ``smoothquant`` / ``smoothquant+gptq``: ``weights: {bits: 8, group_size: null}``, int8
  activations dynamic per token. ``activations: null`` written out means "smooth only":
  the weights stay float for a later stage, which must then quantize activations.
- ``fp8``: ``weights: {type: float, bits: 8}``, FP8 activations dynamic per token
  (``activations: null``: FP8 weight-only).
- ``nf4``: fixed bitsandbytes NF4 blocks of 64; ``weights``/``activations`` are refused.
- any other method with ``activations:`` set: ``weights`` keys left out are ``bits: 8,
  group_size: null`` (the W8A8 form ``weights: {bits: 8}, activations: {bits: 8, dynamic: true}``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from compressor.algorithms.fp8 import float8_supported, float8_unsupported_message
from compressor.extras import missing_extra
from compressor.recipe import StrictModel

SMOOTHING_METHODS = ("smoothquant", "smoothquant+gptq")
ACTIVATION_CAPABLE = ("rtn", "gptq", "smoothquant", "smoothquant+gptq", "fp8")

METHOD_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "smoothquant": {"weights": {"bits": 8, "group_size": None}, "activations": {"type": "int"}},
    "smoothquant+gptq": {"weights": {"bits": 8, "group_size": None}, "activations": {"type": "int"}},
    "fp8": {"weights": {"type": "float", "bits": 8}, "activations": {"type": "float"}},
    "nf4": {"weights": {"bits": 4, "group_size": 64}},  # what recipe.yaml shows; bitsandbytes fixes both
}


class ActivationArgs(StrictModel):
    bits: Literal[8] = 8
    type: Literal["int", "float"] = "int"
    dynamic: bool = True
    strategy: Literal["token", "tensor"] | None = None  # default: token when dynamic, tensor when static
    symmetric: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "ActivationArgs":
        if not self.symmetric:
            raise ValueError("activations are quantized symmetrically (symmetric: true); asymmetric is not supported")
        if self.type == "float" and not float8_supported():
            raise ValueError(float8_unsupported_message())
        expected = "token" if self.dynamic else "tensor"
        if self.strategy is None:
            self.strategy = expected
        elif self.strategy != expected:
            raise ValueError(
                "dynamic activations are quantized per token (strategy: token)" if self.dynamic
                else "static activations use one calibrated scale per tensor (strategy: tensor)"
            )
        return self


def check_float_weights(weights: Any) -> Any:
    """FP8 weights: 8 bits, symmetric, one scale per output channel."""
    if weights.type != "float":
        return weights
    if not float8_supported():
        raise ValueError(float8_unsupported_message())
    if "bits" not in weights.model_fields_set:
        weights.bits = 8
    if weights.bits != 8:
        raise ValueError(f"float weights are FP8 e4m3: bits must be 8, got {weights.bits}")
    if not weights.symmetric:
        raise ValueError("FP8 weights are symmetric (symmetric: true)")
    if "group_size" in weights.model_fields_set and weights.group_size is not None:
        raise ValueError("FP8 weights have one scale per output channel: set group_size: null")
    weights.group_size = None
    if weights.observer == "hqq":
        raise ValueError("FP8 weights take observer: minmax or mse (hqq searches integer scale/zero grids)")
    return weights


def _check_activation_layers(config: Any) -> None:
    weights, acts = config.weights, config.activations
    if config.method not in ACTIVATION_CAPABLE:
        what = "quantized activations" if acts is not None else "FP8 weights"
        raise ValueError(f"method {config.method} cannot produce {what} (methods that can: {', '.join(ACTIVATION_CAPABLE)})")
    if weights.type == "float" and config.method in ("gptq", "smoothquant+gptq"):
        raise ValueError("FP8 weights are cast, not solved: use method fp8, rtn or smoothquant")
    if acts is None:
        return
    if acts.type != weights.type:
        raise ValueError(
            f"activations.type {acts.type} needs weights of the same type (weights.type: {acts.type}): W8A8 is int8 × int8 or FP8 × FP8"
        )
    if weights.type == "int" and (weights.bits != 8 or weights.group_size is not None or not weights.symmetric):
        raise ValueError(
            "quantized activations need 8-bit symmetric weights with one scale per output channel:"
            " weights: {bits: 8, group_size: null, symmetric: true}"
        )


def _differs_from_default(config: Any, key: str, given: set[str]) -> bool:
    """Whether the recipe set `key` to something other than the method's default (a resolved
    recipe.yaml writes every default out, and must parse again)."""
    if key not in given:
        return False
    default = METHOD_DEFAULTS.get(config.method, {}).get(key)
    value = getattr(config, key)
    if default is None or value is None:
        return value != type(config).model_fields[key].default
    reference = (type(config.weights) if key == "weights" else ActivationArgs).model_validate(default)
    return value != reference


# Quantized activations need int8 per-channel weights (or FP8, which fixes both keys itself).
_ACTIVATION_WEIGHT_DEFAULTS: dict[str, Any] = {"bits": 8, "group_size": None}


def _weight_defaults(config: Any) -> dict[str, Any]:
    """What the keys left out of `weights` mean for this method and activation scheme."""
    method_default = METHOD_DEFAULTS.get(config.method, {}).get("weights")
    if method_default is not None:
        return method_default
    return _ACTIVATION_WEIGHT_DEFAULTS if config.activations is not None else {}


def _fill_left_out_weight_keys(config: Any) -> None:
    """Keys written in `weights` stay as written (and are validated again); the others take the
    method's / scheme's default rather than the generic one (4 bits, group 128)."""
    defaults = _weight_defaults(config)
    written = config.weights.model_dump(include=config.weights.model_fields_set)
    if not defaults or all(key in written for key in defaults):
        return
    config.weights = type(config.weights).model_validate({**defaults, **written})


def apply_method_defaults(config: Any) -> Any:
    """Fill a method's default weights/activations and refuse combinations that cannot work."""
    given = set(config.model_fields_set)
    for key, values in METHOD_DEFAULTS.get(config.method, {}).items():
        if key not in given:
            field_type = type(config.weights) if key == "weights" else ActivationArgs
            setattr(config, key, field_type.model_validate(values))
    if config.method == "nf4":
        missing = missing_extra("bitsandbytes", "method nf4")
        if missing is not None:
            raise ValueError(missing)
        for key in ("weights", "activations"):
            if _differs_from_default(config, key, given):
                raise ValueError(f"method nf4 is bitsandbytes NF4 in blocks of 64 (optionally double_quant); remove `{key}`")
        return config
    if config.double_quant:
        raise ValueError(f"double_quant applies to method nf4, not {config.method}")
    _fill_left_out_weight_keys(config)  # not for nf4, whose `weights` is refused whatever it holds
    if config.smoothing_strength != 0.5 and config.method not in SMOOTHING_METHODS:
        raise ValueError(f"smoothing_strength applies to methods {', '.join(SMOOTHING_METHODS)}, not {config.method}")
    if config.method == "fp8" and config.weights.type != "float":
        raise ValueError("method fp8 quantizes weights to FP8: weights.type must be float")
    if config.method in SMOOTHING_METHODS and config.activations is None:
        if _differs_from_default(config, "weights", given):
            raise ValueError(
                "with activations: null, smoothquant only smooths and leaves the weights to a later stage; remove `weights`"
            )
        return config
    if config.activations is not None or config.weights.type == "float":
        _check_activation_layers(config)
    return config


def uses_activation_layers(config: Any) -> bool:
    """Whether the stage builds W8A8Linear layers (or smooths), rather than QuantLinear."""
    return config.method in SMOOTHING_METHODS or config.activations is not None or config.weights.type == "float"


def smooths_only(config: Any) -> bool:
    return config.method in SMOOTHING_METHODS and config.activations is None

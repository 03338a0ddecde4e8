"""The lm-eval options a user sets for a comparison, read the way lm-eval's own CLI reads them.

    --apply-chat-template [NAME]  --fewshot-as-multiturn  --system-instruction TEXT
    --gen-kwargs k=v,k2=v2  --seed N | a,b,c[,d]  --batch-size N|auto|auto:N  --log-samples
    --confirm-run-unsafe-code

Each parser raises ValueError with the words a user needs; the CLI turns that into one argparse
line, the recipe into ``file:line evaluate.<key>: ...``. The values then go to
``lm_eval.simple_evaluate`` unchanged: nothing here reimplements what lm-eval does with them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

# lm-eval's defaults for (python random, numpy, torch, few-shot sampler): lm_eval.defaults,
# the same four its CLI's `--seed` starts from.
DEFAULT_SEEDS: tuple[int | None, ...] = (0, 1234, 1234, 1234)
SEED_SLOTS = ("random", "numpy", "torch", "fewshot")

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_AUTO = re.compile(r"^auto(?::([0-9]+))?$")
# Generation keys lm-eval's HFLM reads itself; the rest go to transformers' generate().
_LM_EVAL_GEN_KEYS = {"until", "max_gen_toks"}


def parse_seed(value: Any) -> tuple[int | None, ...]:
    """lm-eval's `--seed`: one integer for all four generators, or 3 to 4 comma-separated
    integers or `None` (random, numpy, torch, few-shot; a missing few-shot seed is lm-eval's
    default 1234). A YAML recipe may give the same as an integer or a list."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer or 4 comma-separated integers/None, got {value!r}")
    if isinstance(value, int):
        parts: list[Any] = [value]
    elif isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise ValueError(f"expected an integer or 4 comma-separated integers/None, got {value!r}")
    seeds: list[int | None] = []
    for part in parts:
        if part is None or (isinstance(part, str) and part.lower() == "none"):
            seeds.append(None)
        elif isinstance(part, int) and not isinstance(part, bool) and part >= 0:
            seeds.append(part)
        elif isinstance(part, str) and re.fullmatch(r"[0-9]+", part):
            seeds.append(int(part))
        else:  # numpy refuses negative seeds
            raise ValueError(f"seed {part!r} is not an integer ≥ 0 or None")
    if len(seeds) == 1:
        return tuple(seeds * len(SEED_SLOTS))
    if len(seeds) not in (3, 4):
        raise ValueError(
            f"expected one seed or 4 ({', '.join(SEED_SLOTS)}; a 4th left out is {DEFAULT_SEEDS[3]}), got {len(seeds)}"
        )
    return tuple(seeds + list(DEFAULT_SEEDS[len(seeds):]))


def _check_gen_value(key: str, value: Any) -> None:
    if key == "until" and not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
        raise ValueError(f"until must be a string or a list of strings, got {value!r}")
    if key in ("max_gen_toks", "max_new_tokens", "top_k", "num_beams") and not (
        isinstance(value, int) and not isinstance(value, bool) and value > 0
    ):
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if key in ("temperature", "top_p") and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"{key} must be a number ≥ 0, got {value!r}")
    if key == "do_sample" and not isinstance(value, bool):
        raise ValueError(f"do_sample must be true or false, got {value!r}")


def _known_generation_keys() -> set[str]:
    from transformers import GenerationConfig

    return set(GenerationConfig().to_dict()) | _LM_EVAL_GEN_KEYS


def parse_gen_kwargs(value: str | dict[str, Any]) -> dict[str, Any]:
    """lm-eval's `--gen-kwargs`: `key=value,key2=value2` with values typed as lm-eval types them
    (`lm_eval.utils.simple_parse_args_string`), or a mapping; the values lm-eval and transformers
    read (max_gen_toks, temperature, do_sample, until, ...) are type-checked."""
    if isinstance(value, str):
        from lm_eval.utils import simple_parse_args_string

        items = [item for item in value.split(",") if item.strip()]
        if not items:
            raise ValueError("expected key=value pairs separated by commas, got nothing")
        for item in items:
            key, sep, _ = item.partition("=")
            if not sep or not _KEY.match(key.strip()):
                raise ValueError(f"expected key=value pairs separated by commas (temperature=0,max_gen_toks=64), got {item.strip()!r}")
        parsed = {k.strip(): v for k, v in simple_parse_args_string(value).items()}
    elif isinstance(value, dict):
        parsed = dict(value)
    else:
        raise ValueError(f"expected key=value pairs or a mapping, got {value!r}")
    if not parsed:
        raise ValueError("expected at least one key=value pair")
    for key, item in parsed.items():
        _check_gen_value(key, item)
    return parsed


def check_hf_generation_keys(gen_kwargs: dict[str, Any]) -> None:
    """The hf backend hands every key but lm-eval's own to transformers' generate(), which refuses
    unknown ones mid-run: refuse them first (vLLM takes other names; its backend is not checked)."""
    unknown = sorted(set(gen_kwargs) - _known_generation_keys())
    if unknown:
        raise ValueError(f"unknown generation key '{unknown[0]}' (lm-eval's until, max_gen_toks, or a transformers GenerationConfig field)")


def parse_batch_size(value: Any) -> int | str:
    """lm-eval's `--batch_size`: a positive integer, `auto` (largest size that fits, found once)
    or `auto:N` (found again N times over the run)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return value
    elif isinstance(value, str):
        text = value.strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
        match = _AUTO.match(text)
        if match and (match.group(1) is None or int(match.group(1)) > 0):
            return text
    raise ValueError(f"expected a positive integer, auto or auto:N, got {value!r}")


@dataclass(frozen=True)
class LmEvalOptions:
    """Options passed through to `lm_eval.simple_evaluate` (names as its keyword arguments)."""

    apply_chat_template: bool | str = False  # True: the tokenizer's template; a name: one of its named templates
    fewshot_as_multiturn: bool = False  # resolved: lm-eval's CLI turns it on with a chat template
    system_instruction: str | None = None
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int | None, ...] = DEFAULT_SEEDS
    log_samples: bool = False
    confirm_run_unsafe_code: bool = False

    def results_key(self) -> str:
        """What changes the numbers, as canonical JSON: part of the results-cache key."""
        return json.dumps(
            {
                "apply_chat_template": self.apply_chat_template,
                "fewshot_as_multiturn": self.fewshot_as_multiturn,
                "system_instruction": self.system_instruction,
                "gen_kwargs": self.gen_kwargs,
                "seeds": list(self.seeds),
            },
            sort_keys=True,
        )

    def simple_evaluate_kwargs(self) -> dict[str, Any]:
        random_seed, numpy_seed, torch_seed, fewshot_seed = self.seeds
        return {
            "apply_chat_template": self.apply_chat_template,
            "fewshot_as_multiturn": self.fewshot_as_multiturn,
            "system_instruction": self.system_instruction,
            "gen_kwargs": dict(self.gen_kwargs) or None,
            "random_seed": random_seed,
            "numpy_random_seed": numpy_seed,
            "torch_random_seed": torch_seed,
            "fewshot_random_seed": fewshot_seed,
            "log_samples": self.log_samples,
            "confirm_run_unsafe_code": self.confirm_run_unsafe_code,
        }

    def describe(self) -> dict[str, Any]:
        """For report.json: every setting, as given to lm-eval."""
        return {
            "apply_chat_template": self.apply_chat_template,
            "fewshot_as_multiturn": self.fewshot_as_multiturn,
            "system_instruction": self.system_instruction,
            "gen_kwargs": dict(self.gen_kwargs) or None,
            "seed": dict(zip(SEED_SLOTS, self.seeds)),
            "log_samples": self.log_samples,
            "confirm_run_unsafe_code": self.confirm_run_unsafe_code,
        }


def resolve_fewshot_as_multiturn(requested: bool | None, apply_chat_template: bool | str) -> bool:
    """lm-eval's CLI rule: on by default with a chat template; asking for it without one is an error."""
    if requested is None:
        return bool(apply_chat_template)
    if requested and not apply_chat_template:
        raise ValueError("multi-turn few-shot needs a chat template (--apply-chat-template)")
    return requested


# ---------------------------------------------------------------- chat templates

def chat_template_text(tokenizer: Any, choice: bool | str) -> str:
    """The template lm-eval's prompts will use: the tokenizer's own (its `default` where it has
    named ones) or, for a name, that named template. ValueError when there is none to use."""
    templates = getattr(tokenizer, "chat_template", None)
    if not templates:
        raise ValueError("the model's tokenizer has no chat template (chat_template in tokenizer_config.json or chat_template.jinja)")
    if isinstance(templates, dict):
        name = choice if isinstance(choice, str) else "default"
        if name not in templates:
            raise ValueError(f"the tokenizer has no chat template named '{name}' (it has: {', '.join(sorted(templates))})")
        return templates[name]
    if isinstance(choice, str):
        raise ValueError(f"the tokenizer has one chat template, not named ones: use --apply-chat-template without '{choice}'")
    return templates

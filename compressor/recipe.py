"""The recipe: a strict schema for the YAML file, validated with line numbers.

Top-level keys: ``name``, ``description``, ``calibration``, ``stages`` (a list of one-key
mappings, ``- quantize: {...}``), ``evaluate``, ``output``. Each stage block is validated by
the config class its stage kind registers (see ``compressor.registry``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, ValidationInfo, field_validator

from compressor.errors import RecipeError
from compressor.hub_ids import repo_id_problem
from compressor.registry import Registry, StageEntry, stage_registry
from compressor.yaml_lines import LocatedDocument, format_path, load_yaml_with_lines, read_yaml_file


class StrictModel(BaseModel):
    """Base of every recipe block: unknown keys are errors, values are not coerced, and
    numbers are finite (`.inf` as a learning rate or temperature only fails mid-training)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    # Keys other tools use for one of ours (or for behaviour that is fixed here): unknown key → its hint.
    foreign_keys: ClassVar[dict[str, str]] = {}

    def keys_off_default(self) -> set[str]:
        """Keys the input set to something other than their default. A saved recipe.yaml writes
        every key out, defaults included, and must parse and plan again: checks that refuse a key
        the chosen kind or method does not read look at these, not at `model_fields_set`."""
        fields = type(self).model_fields
        return {key for key in self.model_fields_set if getattr(self, key) != fields[key].get_default(call_default_factory=True)}


class CalibrationSpec(StrictModel):
    dataset: str = "builtin:abstracts"
    samples: PositiveInt = 128
    seq_len: PositiveInt = 512
    seed: NonNegativeInt = 0
    text_column: str | None = None
    split: str = "train"
    subset: str | None = None


class EvaluateSpec(StrictModel):
    """lm-eval tasks run after the stages on the compressed model and on the base model
    (whose results are cached). `limit` caps the examples per task (below 1: a fraction of each,
    as lm-eval reads it), and the windows of the quick held-out perplexity printed before and
    after; `num_fewshot` sets lm-eval's few-shot count. The other keys are lm-eval's options of
    the same names (see `compressor.evaluation.options`): `apply_chat_template` (true, or a
    template name), `fewshot_as_multiturn` (default: on with a chat template),
    `system_instruction`, `gen_kwargs` (a mapping, or lm-eval's `k=v,k2=v2` string), `seed` (one
    integer, or a list of 3-4 integers/null: random, numpy, torch, few-shot), `batch_size` (N,
    `auto`, `auto:N`; default: compress's --batch-size), `max_batch_size` (default: lm-eval's 64; on
    the CPU `compressor.evaluation.batch_ceiling`'s), `log_samples` (OUT/eval/samples/),
    `confirm_run_unsafe_code` (checked with the task data before any weight is read:
    `compressor.evaluation.recipe_eval.prepare_recipe_tasks`).

    Task names are checked here, at parse time: built-in offline tasks by name, lm-eval's by
    a cached text scan of its task files (not its 25 s full index; see
    `compressor.evaluation.catalog`)."""

    # validate_default: the default task needs lm-eval as much as a written one.
    tasks: list[str] = Field(default_factory=lambda: ["perplexity"], min_length=1, validate_default=True)
    limit: int | float | None = None  # as lm-eval's --limit: a count, or below 1 a fraction of each task
    num_fewshot: NonNegativeInt | None = None  # None: each task's own default
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool | None = None  # None: lm-eval's rule, on with a chat template
    system_instruction: str | None = None
    gen_kwargs: dict[str, int | float | bool | str | list[str]] | str | None = None
    seed: int | list[int | None] | None = None  # None: lm-eval's 0,1234,1234,1234
    batch_size: int | str | None = None  # N, auto or auto:N (checked below); None: compress's --batch-size
    max_batch_size: PositiveInt | None = None
    log_samples: bool = False
    confirm_run_unsafe_code: bool = False

    @field_validator("apply_chat_template")
    @classmethod
    def _template_choice(cls, choice: bool | str) -> bool | str:
        if isinstance(choice, str) and not choice.strip():
            raise ValueError("must be true, false or a template name, got an empty string")
        return choice

    @field_validator("fewshot_as_multiturn")
    @classmethod
    def _multiturn_needs_template(cls, requested: bool | None, info: ValidationInfo) -> bool | None:
        from compressor.evaluation.options import resolve_fewshot_as_multiturn

        resolve_fewshot_as_multiturn(requested, info.data.get("apply_chat_template", False))  # ValueError: the one line
        return requested

    @field_validator("gen_kwargs")
    @classmethod
    def _generation_settings(cls, value: Any) -> Any:
        if value is not None:
            from compressor.evaluation.options import check_hf_generation_keys, parse_gen_kwargs

            check_hf_generation_keys(parse_gen_kwargs(value))
        return value

    @field_validator("seed")
    @classmethod
    def _seeds(cls, value: Any) -> Any:
        from compressor.evaluation.options import parse_seed

        if value is not None:
            parse_seed(value)
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        from compressor.evaluation.options import parse_batch_size

        return value if value is None else parse_batch_size(value)

    def lm_eval_options(self):
        """These keys as `compressor.evaluation.options.LmEvalOptions` (validated above)."""
        from compressor.evaluation.options import DEFAULT_SEEDS, LmEvalOptions, parse_gen_kwargs, parse_seed, resolve_fewshot_as_multiturn

        return LmEvalOptions(
            apply_chat_template=self.apply_chat_template,
            fewshot_as_multiturn=resolve_fewshot_as_multiturn(self.fewshot_as_multiturn, self.apply_chat_template),
            system_instruction=self.system_instruction,
            gen_kwargs=parse_gen_kwargs(self.gen_kwargs) if self.gen_kwargs is not None else {},
            seeds=parse_seed(self.seed) if self.seed is not None else DEFAULT_SEEDS,
            log_samples=self.log_samples,
            confirm_run_unsafe_code=self.confirm_run_unsafe_code,
        )

    @field_validator("limit")
    @classmethod
    def _count_or_fraction(cls, limit: int | float | None) -> int | float | None:
        if limit is None or (isinstance(limit, int) and limit > 0) or (isinstance(limit, float) and 0 < limit < 1):
            return limit
        raise ValueError(f"must be a positive whole number of examples or a fraction between 0 and 1, got {limit!r}")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        from compressor.errors import UserError
        from compressor.evaluation.catalog import TaskCatalog
        from compressor.extras import missing_extra

        missing = missing_extra("lm_eval", "the evaluate: block")  # every task, built-in ones too, runs through lm-eval
        if missing is not None:
            raise ValueError(missing)
        try:
            TaskCatalog().resolve(tasks)
        except UserError as err:
            raise ValueError(err.message) from None
        if len(set(tasks)) != len(tasks):
            raise ValueError("a task is listed twice")
        return tasks


class OutputSpec(StrictModel):
    format: Literal["compressed-tensors"] = "compressed-tensors"
    push_to_hub: str | None = None  # "org/name": pushed with its model card after the save succeeds

    @field_validator("push_to_hub")
    @classmethod
    def _valid_repo_id(cls, repo_id: str | None) -> str | None:
        problem = repo_id_problem(repo_id) if repo_id is not None else None
        if problem:
            raise ValueError(problem)
        return repo_id


class RecipeHeader(StrictModel):
    """Everything but the stages, which are validated one by one through the registry."""

    name: str | None = None  # DESIGN.md's merge example has none: the file's name stands in (recipe_name)
    description: str = ""
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    stages: list[Any] = Field(min_length=1)
    evaluate: EvaluateSpec | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)


@dataclass(frozen=True)
class StageSpec:
    kind: str
    config: BaseModel


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    calibration: CalibrationSpec
    stages: tuple[StageSpec, ...]
    evaluate: EvaluateSpec | None
    output: OutputSpec
    source: str
    document: LocatedDocument | None = field(default=None, compare=False, repr=False)

    def where(self, path: tuple[Any, ...]) -> dict[str, str]:
        """``{"where": "file:line", "key": "a.b[0]"}`` for a key path, for RecipeError."""
        if self.document is not None:
            return self.document.locate(path)
        return {"where": self.source, "key": format_path(path)}

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (defaults filled in) as plain data, for `recipe.yaml`."""
        return {
            "name": self.name,
            "description": self.description,
            "calibration": self.calibration.model_dump(mode="json"),
            "stages": [{s.kind: s.config.model_dump(mode="json")} for s in self.stages],
            "evaluate": self.evaluate.model_dump(mode="json") if self.evaluate else None,
            "output": self.output.model_dump(mode="json"),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class reached by following `loc` from `model`, if any."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _unwrap_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _unwrap_model(arg)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return annotation


_TYPE_WORDS = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "none_required": "null",
}


def _describe(error: dict[str, Any], model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        hint = parent.foreign_keys.get(str(loc[-1])) if parent is not None and issubclass(parent, StrictModel) else None
        if hint is not None:
            return f"unknown key '{loc[-1]}': {hint}"
        known = ", ".join(parent.model_fields) if parent else ""
        return f"unknown key '{loc[-1]}'" + (f" (known: {known})" if known else "")
    if kind == "missing":
        return "required key missing"
    if kind == "literal_error":
        expected = str(error.get("ctx", {}).get("expected", "")).replace(" or ", ", ")
        return f"must be one of {expected}, got {error['input']!r}"
    if kind in _TYPE_WORDS:
        return f"must be {_TYPE_WORDS[kind]}, got {error['input']!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{error['msg'].lower().replace('input should be', 'must be')}, got {error['input']!r}"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


# Parts of a pydantic error location that name a validator or a union member, not a key.
_UNION_BRANCHES = frozenset({"function-after", "function-before", "tagged-union", "float", "int", "str", "bool", "none"})


def _is_member_tag(part: Any) -> bool:
    return isinstance(part, str) and (part.endswith("]") or part in _UNION_BRANCHES)


def _refuses_type(error: dict[str, Any]) -> bool:
    """A union member that refused the input's type outright (`loss: [...]` for the mapping member)."""
    return error["type"] in _TYPE_WORDS and bool(error["loc"]) and _is_member_tag(error["loc"][-1])


def _union_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A union reports one error per member. The member that matches the input's type has the real
    problem (`loss[1].kind`); the others only say "must be a mapping", so drop them. When every
    member refuses the type, they stay, and the first member's words are reported."""
    def others_got_further(error: dict[str, Any]) -> bool:
        union_at = error["loc"][:-1]
        return any(e["loc"][: len(union_at)] == union_at and not _refuses_type(e) for e in errors)

    return [e for e in errors if not (_refuses_type(e) and others_got_further(e))]


def _raise_validation(
    err: ValidationError, model: type[BaseModel], doc: LocatedDocument, prefix: tuple[Any, ...]
) -> None:
    # A misspelt key also shows up as the real key "missing": report the misspelling.
    errors = sorted(_union_errors(err.errors()), key=lambda e: e["type"] != "extra_forbidden")
    error = errors[0]
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.endswith("]")))
    loc = tuple(p for p in loc if p not in _UNION_BRANCHES)
    path = (*prefix, *loc)
    raise RecipeError(_describe(error, model, loc), **doc.locate(path)) from None


def _validate(model: type[BaseModel], data: Any, doc: LocatedDocument, prefix: tuple[Any, ...]) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        _raise_validation(err, model, doc, prefix)
        raise  # unreachable; keeps type checkers content


def _parse_stage(item: Any, index: int, doc: LocatedDocument, registry: Registry[StageEntry]) -> StageSpec:
    path: tuple[Any, ...] = ("stages", index)
    if not isinstance(item, dict) or len(item) != 1:
        raise RecipeError(
            "each stage must be a mapping with exactly one key, the stage kind (e.g. `- quantize: {...}`)",
            **doc.locate(path),
        )
    ((kind, body),) = item.items()
    if kind not in registry:
        raise RecipeError(registry.unknown_message(kind), **doc.locate((*path, kind)))
    entry = registry.get(kind)
    config = _validate(entry.config_class, {} if body is None else body, doc, (*path, kind))
    return StageSpec(kind=kind, config=config)


def recipe_name(source: str) -> str:
    """The name of a recipe that gives none: its file's stem (`merge.yaml` → `merge`)."""
    stem = Path(source).stem
    return stem if stem and not source.startswith("<") else "recipe"


def parse_recipe(doc: LocatedDocument, registry: Registry[StageEntry] | None = None) -> Recipe:
    registry = registry or stage_registry()
    if not isinstance(doc.data, dict):
        raise RecipeError("a recipe must be a YAML mapping with `stages` (and a `name`)", where=doc.where(()))
    header = _validate(RecipeHeader, doc.data, doc, ())
    assert isinstance(header, RecipeHeader)
    stages = tuple(_parse_stage(item, i, doc, registry) for i, item in enumerate(header.stages))
    return Recipe(
        name=header.name or recipe_name(doc.source),
        description=header.description,
        calibration=header.calibration,
        stages=stages,
        evaluate=header.evaluate,
        output=header.output,
        source=doc.source,
        document=doc,
    )


def builtin_recipe_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("compressor.recipes")))


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(builtin_recipe_dir().glob("*.yaml"))}


def resolve_recipe_path(name_or_path: str) -> Path:
    """A built-in recipe name (`w4a16-gptq`) or a path to a YAML file."""
    builtin = builtin_recipes()
    if name_or_path in builtin:
        return builtin[name_or_path]
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in name_or_path:
        return path
    raise RecipeError(
        f"no built-in recipe '{name_or_path}' and no such file (built-in: {', '.join(builtin)})",
        where="--recipe",
    )


def load_recipe(name_or_path: str, registry: Registry[StageEntry] | None = None) -> Recipe:
    path = resolve_recipe_path(name_or_path)
    return parse_recipe(read_yaml_file(path), registry)


def parse_recipe_text(text: str, source: str = "<recipe>", registry: Registry[StageEntry] | None = None) -> Recipe:
    return parse_recipe(load_yaml_with_lines(text, source), registry)

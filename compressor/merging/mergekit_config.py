"""Read a mergekit YAML config as a one-stage merge recipe, keeping the file's line numbers.

    merge_method: ties                      - merge:
    base_model: org/base                        method: ties
    models:                                     base: org/base
      - model: org/a                  ─▶        models:
        parameters: {weight: 0.5}                 - {model: org/a, weight: 0.5}
    parameters: {normalize: true}               normalize: true
    dtype: bfloat16                             dtype: bfloat16

Supported: the methods our registry has, `models` or one whole-model slice (`slices:` with one slice
whose sources all have `layer_range: [0, number of layers]`; not `modules`), per-model and global
`parameters` (numbers, gradients, filtered values), `dtype`, `out_dtype`, `tokenizer_source`
(`base`, `union` or a model) or the `tokenizer:` block (`source`, default union; `tokens`;
`pad_to_multiple_of`), and `chat_template`. `int8_mask` only changes the dtype mergekit builds its sign
mask in, so it is accepted and has no effect.
"""

from __future__ import annotations

import re
from typing import Any

from compressor.errors import RecipeError
from compressor.recipe import Recipe, parse_recipe
from compressor.yaml_lines import LocatedDocument, format_path

MODEL_PARAMETERS = ("weight", "density", "gamma")
GLOBAL_PARAMETERS = ("weight", "density", "gamma", "t", "normalize", "rescale", "lambda", "filter_wise")
IGNORED_PARAMETERS = ("int8_mask",)
TOP_LEVEL = (
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer",
    "chat_template", "name",
)
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


RENAMED = {"method": "merge_method", "base": "base_model"}
_MERGE_KEY = re.compile(r"stages\[0\]\.merge\.(?:(?P<models>models\[\d+\])\.)?(?P<name>\w+)")


def is_mergekit_config(doc: LocatedDocument) -> bool:
    return isinstance(doc.data, dict) and "merge_method" in doc.data


class _Translation:
    def __init__(self, doc: LocatedDocument):
        self.doc = doc
        self.lines: dict[tuple[Any, ...], int] = {}
        self.keys: dict[str, str] = {}  # recipe key path → the mergekit key it came from, for errors

    def error(self, message: str, path: tuple[Any, ...]) -> RecipeError:
        return RecipeError(message, **self.doc.locate(path))

    def place(self, new: tuple[Any, ...], old: tuple[Any, ...]) -> None:
        line = self.doc.line_of(old)
        if line is not None:
            self.lines[("stages", 0, "merge", *new)] = line
            self.keys[format_path(("stages", 0, "merge", *new))] = format_path(old)

    def mergekit_key(self, key: str | None) -> str | None:
        """The mergekit spelling of a recipe key path (its longest translated prefix swapped)."""
        if key is None:
            return None
        unwritten = _MERGE_KEY.fullmatch(key)  # a key the file leaves out: where mergekit would put it
        if key not in self.keys and unwritten is not None:
            models, name = unwritten.group("models"), unwritten.group("name")
            if models is not None and name in MODEL_PARAMETERS:
                return f"{self.keys.get(f'stages[0].merge.{models}', models)}.parameters.{name}"
            if models is None and name in GLOBAL_PARAMETERS:
                return f"parameters.{name}"
            if models is None and name in RENAMED:
                return RENAMED[name]
        for end in range(len(key), 0, -1):
            if (end == len(key) or key[end] in ".[") and key[:end] in self.keys:
                return self.keys[key[:end]] + key[end:]
        return key

    def parameters(self, block: Any, path: tuple[Any, ...], allowed: tuple[str, ...], new: tuple[Any, ...]) -> dict[str, Any]:
        if block is None:
            return {}
        if not isinstance(block, dict):
            raise self.error("parameters must be a mapping", path)
        out = {}
        for key, value in block.items():
            if key in IGNORED_PARAMETERS:
                continue
            if key not in allowed:
                raise self.error(f"parameter '{key}' is not supported here (supported: {', '.join(allowed)})", (*path, key))
            out[key] = value
            self.place((*new, key), (*path, key))
        return out

    def whole_model_slice(self, merge: dict[str, Any]) -> tuple[list[Any], tuple[Any, ...]]:
        """`slices:` with one slice whose sources all cover the same layers from 0: the same merge as
        `models:` (mergekit's README writes its slerp example so). The range must reach the last
        layer, checked once the models' depth is known (`layer_range` in the merge block)."""
        slices = self.doc.data["slices"]
        if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
            raise self.error("only one slice covering every layer is supported (a whole-model merge); list whole models under `models`", ("slices",))
        unknown = [k for k in slices[0] if k != "sources"]
        if unknown:
            raise self.error(f"slice key '{unknown[0]}' is not supported (known: sources)", ("slices", 0, unknown[0]))
        sources = slices[0].get("sources")
        path = ("slices", 0, "sources")
        if not isinstance(sources, list) or not sources:
            raise self.error("`sources` must be a non-empty list", path)
        ranges = []
        for i, source in enumerate(sources):
            span = source.get("layer_range") if isinstance(source, dict) else None
            if not (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)):
                raise self.error("each source needs `layer_range: [start, end]`", (*path, i))
            ranges.append(span)
        for i, span in enumerate(ranges):
            if span != ranges[0] or span[0] != 0:
                raise self.error(
                    f"layer_range {span}: every source must cover the same layers from 0 (here {ranges[0]}), a whole-model"
                    " merge; frankenmerges that stack or drop layers are not supported",
                    (*path, i, "layer_range"),
                )
        merge["layer_range"] = ranges[0]
        self.place(("layer_range",), (*path, 0, "layer_range"))
        return sources, path

    def tokenizer_block(self, merge: dict[str, Any], legacy_source: Any) -> None:
        """`tokenizer: {source, tokens, pad_to_multiple_of}` → the recipe's tokenizer_source, tokens and
        pad_to_multiple_of; `source` defaults to union, as in mergekit."""
        block = self.doc.data["tokenizer"]
        if legacy_source is not None:
            raise self.error("give `tokenizer` or `tokenizer_source`, not both (as mergekit refuses)", ("tokenizer",))
        if not isinstance(block, dict):
            raise self.error("`tokenizer` must be a mapping (source, tokens, pad_to_multiple_of)", ("tokenizer",))
        for key in block:
            if key not in TOKENIZER_KEYS:
                raise self.error(f"unknown tokenizer key '{key}' (known: {', '.join(TOKENIZER_KEYS)})", ("tokenizer", key))
        merge["tokenizer_source"] = block.get("source", "union")
        self.place(("tokenizer_source",), ("tokenizer", "source") if "source" in block else ("tokenizer",))
        for key in ("tokens", "pad_to_multiple_of"):
            if block.get(key) is not None:
                merge[key] = block[key]
                self.place((key,), ("tokenizer", key))
        self.place_nested(("tokens",), ("tokenizer", "tokens"), block.get("tokens"))

    def place_nested(self, new: tuple[Any, ...], old: tuple[Any, ...], value: Any) -> None:
        """Lines for every key under a mapping copied as it is (`tokens`, whose entries nest)."""
        if isinstance(value, dict):
            for key, child in value.items():
                self.place((*new, key), (*old, key))
                self.place_nested((*new, key), (*old, key), child)

    def translate(self) -> dict[str, Any]:
        data = self.doc.data
        for key in data:
            if key == "modules":
                raise self.error("`modules` configs are not supported; list whole models under `models`", (key,))
            if key not in TOP_LEVEL:
                raise self.error(f"unknown or unsupported mergekit key '{key}' (supported: {', '.join(TOP_LEVEL)})", (key,))
        merge: dict[str, Any] = {"method": data["merge_method"]}
        self.place(("method",), ("merge_method",))
        if data.get("base_model") is not None:
            merge["base"] = data["base_model"]
            self.place(("base",), ("base_model",))
        if data.get("slices") is not None:
            if data.get("models") is not None:
                raise self.error("give `models` or `slices`, not both", ("slices",))
            models, path = self.whole_model_slice(merge)
        else:
            models, path = data.get("models"), ("models",)
            if not isinstance(models, list) or not models:
                raise self.error("`models` must be a non-empty list", path)
        merge["models"] = []
        self.place(("models",), path)
        known = ("model", "parameters") + (("layer_range",) if path != ("models",) else ())
        for i, entry in enumerate(models):
            if not isinstance(entry, dict) or "model" not in entry:
                raise self.error("each model must be a mapping with `model`", (*path, i))
            unknown = [k for k in entry if k not in known]
            if unknown:
                raise self.error(f"unknown key '{unknown[0]}' (known: {', '.join(known)})", (*path, i, unknown[0]))
            item = {"model": entry["model"]}
            self.place(("models", i), (*path, i))
            self.place(("models", i, "model"), (*path, i, "model"))
            item.update(self.parameters(entry.get("parameters"), (*path, i, "parameters"), MODEL_PARAMETERS, ("models", i)))
            merge["models"].append(item)
        merge.update(self.parameters(data.get("parameters"), ("parameters",), GLOBAL_PARAMETERS, ()))
        for key in ("dtype", "out_dtype"):
            if data.get(key) is not None:
                value = data[key]
                merge[key] = DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value
                self.place((key,), (key,))
        source = data.get("tokenizer_source")
        if source is not None:
            merge["tokenizer_source"] = source
            self.place(("tokenizer_source",), ("tokenizer_source",))
        if data.get("tokenizer") is not None:
            self.tokenizer_block(merge, source)
        if data.get("chat_template") is not None:
            merge["chat_template"] = data["chat_template"]
            self.place(("chat_template",), ("chat_template",))
        self.lines[()] = 1
        self.lines[("stages", 0, "merge")] = 1
        return {"name": data.get("name") or f"mergekit-{data['merge_method']}", "stages": [{"merge": merge}]}


class _MergekitDocument(LocatedDocument):
    """The translated recipe, locating keys as the mergekit file spells them, so that errors
    raised after parsing (a model not found, weights summing to zero) name what the user wrote."""

    def __init__(self, translation: _Translation, data: Any):
        super().__init__(data, translation.lines, translation.doc.source)
        self.translation = translation

    def locate(self, path: tuple[Any, ...]) -> dict[str, str]:
        located = super().locate(path)
        return {**located, "key": self.translation.mergekit_key(located["key"]) or located["key"]}


def recipe_from_mergekit(doc: LocatedDocument) -> Recipe:
    """The recipe a mergekit config means; errors point at the mergekit file's lines."""
    translation = _Translation(doc)
    data = translation.translate()
    return parse_recipe(_MergekitDocument(translation, data))  # its errors name the keys the user wrote

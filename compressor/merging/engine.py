"""Plan a merge (every check, no weights read) and run it, streaming one tensor name at a time.

    plan_merge: inputs resolved ─▶ configs compared ─▶ tensor headers compared ─▶ vocabularies
                ─▶ parameters resolved for every tensor (ranges, weights, zero sums checked)
    run_merge:  for each tensor name: read it from every input ─▶ merge ─▶ append to its shard

Inputs are ordered as mergekit orders them: the listed models, then the base when it is not
listed. Peak memory is one tensor per input, the method's intermediates and one output tensor.
"""

from __future__ import annotations

import ctypes
import functools
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from compressor.algorithms.merge_methods import MergeMethod, TensorMerge, merge_method_registry
from compressor.errors import ModelError, RecipeError
from compressor.load_checks import check_weight_names
from compressor.merging.chat_templates import ChosenTemplate, choose_chat_template, write_chat_template
from compressor.merging.params import layer_position, resolve
from compressor.merging.sources import MergeInput, materialize, open_input
from compressor.merging.vocab import VocabAlignment, copy_tokenizer, plan_vocabulary
from compressor.merging.writer import StreamingCheckpointWriter, TensorSlot
from compressor.model_io import skeleton_from_config
from compressor.stages.merge import MergeConfig

Locate = Callable[..., dict[str, str]]
DEFAULT_GAMMA = 0.01
CHUNK_BYTES = 16 * 2**20  # row slices of elementwise merges: about this much output at a time
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class TensorParams:
    weight: tuple[float | None, ...]
    density: tuple[float, ...]
    gamma: tuple[float, ...]
    t: float


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    inputs: list[MergeInput]
    base_index: int | None
    reference_index: int  # whose config, names and (by default) tokenizer the output takes
    slots: list[TensorSlot]
    params: list[TensorParams]
    compute_dtypes: list[torch.dtype]
    tokenizer_index: int
    vocab: VocabAlignment | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    chat_template: ChosenTemplate | None = None

    def record(self) -> dict[str, Any]:
        """What compression.json keeps about the merge (the hub's model card reads it)."""
        base = self.inputs[self.base_index].reference if self.base_index is not None else self.listed_base
        models = []
        for i, item in enumerate(self.inputs):
            entry: dict[str, Any] = {"model": item.reference, "hub_id": item.hub_id}
            if item.adapter:
                entry["adapter"] = item.adapter
            if i < len(self.config.models):
                spec = self.config.models[i]
                entry.update({k: v for k, v in spec.model_dump(mode="json").items() if k != "model" and v is not None})
            models.append(entry)
        record: dict[str, Any] = {
            "method": self.config.method,
            "base": base,
            "models": models,
            "normalize": self.normalize,
            "seed": self.config.seed,
            "tokenizer_source": self.config.tokenizer_source or self._default_tokenizer(),
            "tie_break": self.config.tie_break,
            "tensors": len(self.slots),
        }
        if self.ignored_base is not None:
            record["ignored_base"] = self.ignored_base
        if self.config.tokens:
            record["tokens"] = list(self.config.tokens)
        if self.config.pad_to_multiple_of is not None:
            record["pad_to_multiple_of"] = self.config.pad_to_multiple_of
        if self.chat_template is not None:
            record["chat_template"] = self.chat_template.note
        return record

    def _default_tokenizer(self) -> str:
        # Unset: the base's; for linear (no base role) the first model's, named since it need not be the base.
        return "base" if self.base_index is not None else self.inputs[self.tokenizer_index].reference

    @property
    def listed_base(self) -> str | None:
        """The recipe's `base` when it is one of the inputs (always, for methods that need one)."""
        base = self.config.base
        return base if base is not None and any(i.reference == base for i in self.inputs) else None

    @property
    def ignored_base(self) -> str | None:
        """A `base` that the method does not use (linear, not listed under `models`): never read."""
        return self.config.base if self.config.base is not None and self.listed_base is None else None

    @property
    def normalize(self) -> bool:
        return self.method.default_normalize if self.config.normalize is None else self.config.normalize

    @property
    def rescale(self) -> bool:
        return self.method.default_rescale if self.config.rescale is None else self.config.rescale


def _input_order(config: MergeConfig, method: MergeMethod, locate: Locate) -> tuple[list[str], int | None]:
    references = [m.model for m in config.models]
    for i, reference in enumerate(references):
        if reference in references[:i]:
            raise RecipeError(f"'{reference}' is listed twice", **locate("models", i, "model"))
    if method.base == "required":
        if config.base is None:
            raise RecipeError(f"{method.name} needs a `base` model (the one the task vectors start from)", **locate("method"))
        if config.base not in references:
            references.append(config.base)
        base_index: int | None = references.index(config.base)
    else:
        # An unlisted base is ignored (README): it is not read, and it gives neither weights nor tokenizer.
        if config.base is not None and config.base not in references and config.tokenizer_source == "base":
            raise RecipeError(
                f"{method.name} ignores a `base` that is not listed under `models`, so it has no tokenizer to give:"
                " list the base under `models` with a weight, or name one of the models as tokenizer_source",
                **locate("tokenizer_source"),
            )
        base_index = None
    count = len(references)
    if count < method.min_inputs or (method.max_inputs is not None and count > method.max_inputs):
        raise RecipeError(_count_message(method, count), **locate("models"))
    return references, base_index


def _check_unused_parameters(config: MergeConfig, method: MergeMethod, locate: Locate) -> None:
    """A key the method never reads would be silently ignored (a `density` on task_arithmetic does
    not sparsify anything): refuse it, naming the key and what the method does read. Keys no
    method lists (dtypes, tokenizer, output) apply to every method."""
    used = method.parameters()
    method_keys = {key for name in merge_method_registry() for key in merge_method_registry().get(name).parameters()}
    reads = f"{method.name} reads {', '.join(used) or 'none of them'}"
    # Keys at their defaults pass: a merge output's recipe.yaml writes every key out and must run again.
    set_keys = config.keys_off_default()
    given = ["lambda" if name == "lambda_" else name for name in type(config).model_fields if name in set_keys]
    for key in given:
        if key in method_keys and key not in used:
            raise RecipeError(f"`{key}` has no effect on {method.name} ({reads}); remove it", **locate(key))
    for i, model in enumerate(config.models):
        is_base = method.base == "required" and model.model == config.base
        for key in sorted(model.keys_off_default() - {"model"}):
            if is_base:  # the deltas are measured from it, so no per-model parameter reaches it
                raise RecipeError(f"the base takes no `{key}` in {method.name} (its delta is zero); remove it",
                                  **locate("models", i, key))
            if key not in used:
                raise RecipeError(f"`{key}` has no effect on {method.name} ({reads}); remove it", **locate("models", i, key))


def _count_message(method: MergeMethod, count: int) -> str:
    if method.max_inputs == method.min_inputs == 2:
        return f"{method.name} merges exactly two models, the base and one other (got {count} counting the base)"
    if method.min_inputs > 1:
        return f"{method.name} needs the base and at least {method.min_inputs - 1} other models (got {count} counting the base)"
    return f"{method.name} needs at least {method.min_inputs} model"


def _read_config(item: MergeInput, where: dict[str, str]) -> dict[str, Any]:
    path = item.config_folder / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RecipeError(f"cannot read {path}: {err}", **where) from None


def _check_fits_architecture(item: MergeInput, model_type: str | None, where: dict[str, str]) -> None:
    """The inputs' tensors (the same names and shapes, checked above) must be what their config's
    architecture loads; otherwise the merged checkpoint would load in transformers with random weights."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if item.adapter is not None:
        return  # the LoRA-merged tensors exist only once `materialize` has run; the base was checked as read
    if model_type not in CONFIG_MAPPING_NAMES:
        return  # remote code: transformers has no architecture of its own to compare with
    config = AutoConfig.from_pretrained(str(item.config_folder))
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return  # an encoder merges tensor by tensor; only causal LMs are planned as models
    try:
        check_weight_names(item.folder, skeleton_from_config(config, trust_remote_code=False), item.reference)
    except ModelError as err:
        raise RecipeError(err.message, **where) from None


def _compare_architectures(configs: list[dict[str, Any]], references: list[str], ref: int, where: Callable[[int], dict]) -> None:
    expected = (configs[ref].get("model_type"), configs[ref].get("architectures"))
    for i, config in enumerate(configs):
        found = (config.get("model_type"), config.get("architectures"))
        if found != expected:
            raise RecipeError(
                f"architecture {found[1] or found[0]} differs from {references[ref]}'s {expected[1] or expected[0]}",
                **where(i),
            )
        # Said before the tensor lists are compared, where it would read as a missing lm_head.weight.
        tied, ref_tied = config.get("tie_word_embeddings"), configs[ref].get("tie_word_embeddings")
        if None not in (tied, ref_tied) and tied != ref_tied:
            raise RecipeError(
                f"tie_word_embeddings is {str(tied).lower()} here and {str(ref_tied).lower()} in {references[ref]}:"
                " merging a model whose lm_head is tied to its embeddings with one whose lm_head is its own is not supported",
                **where(i),
            )


def _compare_tensors(plan_inputs: list[MergeInput], ref: int, vocab_names: set[str], where: Callable[[int], dict]) -> None:
    reference = plan_inputs[ref].load()
    for i, item in enumerate(plan_inputs):
        tensors = item.load()
        for name, info in reference.tensors.items():
            other = tensors.tensors.get(name)
            if other is None:
                raise RecipeError(f"has no tensor {name} (present in {plan_inputs[ref].reference})", **where(i))
            if other.shape != info.shape and name not in vocab_names:
                raise RecipeError(
                    f"tensor {name} has shape {list(other.shape)}, but {list(info.shape)} in {plan_inputs[ref].reference}"
                    " (the first tensor that differs)",
                    **where(i),
                )
        extra = [name for name in tensors.tensors if name not in reference.tensors]
        if extra:
            raise RecipeError(f"has tensor {extra[0]} that {plan_inputs[ref].reference} lacks", **where(i))


def _scopes(config: MergeConfig, index: int, key: str) -> list[Any]:
    own = getattr(config.models[index], key) if index < len(config.models) else None
    return [own, getattr(config, key)]


def _resolve_params(
    config: MergeConfig, method: MergeMethod, references: list[str], base_index: int | None, name: str, t: float, locate: Locate
) -> TensorParams:
    weights: list[float | None] = []
    densities: list[float] = []
    gammas: list[float] = []
    for i in range(len(references)):
        is_base = i == base_index
        weight = None if is_base or not method.uses_weight else resolve(_scopes(config, i, "weight"), name, t, None)
        if weight is None and method.uses_weight and not is_base:
            key = ("models", i, "weight") if i < len(config.models) else ("weight",)
            raise RecipeError(f"{method.name} needs a weight for {references[i]} (none applies to {name})", **locate(*key))
        density = resolve(_scopes(config, i, "density"), name, t, 1.0)
        gamma = resolve(_scopes(config, i, "gamma"), name, t, DEFAULT_GAMMA)
        weights.append(weight)
        densities.append(density)  # type: ignore[arg-type]
        gammas.append(gamma)  # type: ignore[arg-type]
    slerp_t = 0.0
    if method.uses_t:
        value = resolve([config.t], name, t, None)
        if value is None:
            raise RecipeError(f"{method.name} needs `t` (0 gives the base, 1 the other model) for {name}", **locate("t"))
        slerp_t = value
    return TensorParams(tuple(weights), tuple(densities), tuple(gammas), slerp_t)


def _check_weight_sum(params: TensorParams, name: str, normalize: bool, locate: Locate) -> None:
    weights = [w for w in params.weight if w is not None]
    if normalize and weights and abs(sum(weights)) < 1e-8:
        raise RecipeError(
            f"the weights sum to zero for {name} and normalize is on (it divides by that sum);"
            " change the weights or set normalize: false",
            **locate("models"),
        )


def plan_merge(config: MergeConfig, locate: Locate, *, allow_pickle: bool = False) -> MergePlan:
    """Every check a merge can make before reading a weight; raises RecipeError naming the key."""
    method = merge_method_registry().get(config.method)
    _check_unused_parameters(config, method, locate)
    references, base_index = _input_order(config, method, locate)

    def where(i: int) -> dict[str, str]:
        return locate("models", i, "model") if i < len(config.models) else locate("base")

    inputs = []
    for i, reference in enumerate(references):
        try:
            inputs.append(open_input(reference, allow_pickle=allow_pickle))
        except ModelError as err:
            # The recipe line names the reference; a file inside it (a corrupt shard) is named here.
            inside = f"{err.where}: " if err.where and err.where != reference else ""
            raise RecipeError(inside + err.message, **where(i)) from None
    reference_index = base_index if base_index is not None else 0
    configs = [_read_config(item, where(i)) for i, item in enumerate(inputs)]
    _compare_architectures(configs, references, reference_index, where)
    tokenizer_index = _tokenizer_index(config, references, reference_index)
    vocab = plan_vocabulary(inputs, tokenizer_index, config, where, locate, base_index)
    _compare_tensors(inputs, reference_index, set(vocab.tensor_names) if vocab else set(), where)
    _check_fits_architecture(inputs[reference_index], configs[reference_index].get("model_type"), where(reference_index))

    num_layers = int(configs[reference_index].get("num_hidden_layers") or 0)
    if config.layer_range is not None and list(config.layer_range) != [0, num_layers]:
        raise RecipeError(
            f"layer_range {list(config.layer_range)} does not cover the models' {num_layers} layers: only whole-model"
            f" slices are supported (layer_range: [0, {num_layers}])",
            **locate("layer_range"),
        )
    normalize = method.default_normalize if config.normalize is None else config.normalize
    reference = inputs[reference_index].load()
    slots, params, compute = [], [], []
    for name, info in reference.tensors.items():
        t = layer_position(name, num_layers)
        tensor_params = _resolve_params(config, method, references, base_index, name, t, locate)
        _check_weight_sum(tensor_params, name, normalize, locate)
        if config.dtype and info.dtype.is_floating_point:
            compute_dtype = DTYPES[config.dtype]
        else:
            compute_dtype = _promoted_dtype(inputs, name, info.dtype)
        out_dtype = DTYPES[config.out_dtype] if config.out_dtype and info.dtype.is_floating_point else compute_dtype
        shape = vocab.output_shape(name, info.shape) if vocab else info.shape
        slots.append(TensorSlot(name, shape, out_dtype))
        params.append(tensor_params)
        compute.append(compute_dtype)
    model_config = dict(configs[reference_index])
    written = _written_dtype(config, reference, slots)
    if written is not None:  # mixed input dtypes promoted the merge: the config says what the weights are
        model_config["torch_dtype" if "torch_dtype" in model_config else "dtype"] = written
    if vocab is not None:
        model_config["vocab_size"] = vocab.size
    chat_template = None
    if config.chat_template is not None:
        folders = [(item.reference, item.config_folder) for item in inputs]
        chat_template = choose_chat_template(config.chat_template, folders, locate("chat_template"))
    return MergePlan(
        config, method, inputs, base_index, reference_index, slots, params, compute, tokenizer_index, vocab, model_config, chat_template
    )


def _promoted_dtype(inputs: list[MergeInput], name: str, own: torch.dtype) -> torch.dtype:
    """The dtype a tensor is merged in without `dtype`: every input's promoted (as mergekit 0.1.5 does),
    so a bfloat16 model merged with a float32 one is merged, and written, in float32. A non-float
    tensor (a buffer) is copied from the reference, in its own dtype."""
    dtypes = [item.load().tensors[name].dtype for item in inputs]
    if not all(dtype.is_floating_point for dtype in dtypes):
        return own
    return functools.reduce(torch.promote_types, dtypes)


def _written_dtype(config: MergeConfig, reference, slots: list[TensorSlot]) -> str | None:
    """The dtype name for config.json when promotion changed the reference's floating dtype."""
    if config.dtype or config.out_dtype:
        return None  # written by _write_model_files
    written = {slot.dtype for slot in slots if slot.dtype.is_floating_point}
    own = {info.dtype for info in reference.tensors.values() if info.dtype.is_floating_point}
    if len(written) != 1 or written == own:
        return None
    return next(name for name, dtype in DTYPES.items() if dtype in written)


def _tokenizer_index(config: MergeConfig, references: list[str], reference_index: int) -> int:
    source = config.tokenizer_source
    if source == "base" and config.base in references:  # linear's listed base need not come first
        return references.index(config.base)
    if source in (None, "base", "union"):  # union: built on the base's tokenizer
        return reference_index
    return references.index(source)


def _generator(seed: int, name: str) -> torch.Generator:
    # Seeded per tensor name, so a tensor's mask does not depend on the order tensors are merged in.
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


@dataclass
class MergeStats:
    tensors: int = 0
    peak_tensor_bytes: int = 0  # inputs of one tensor + its output, the most at any one time
    files: list[str] = field(default_factory=list)


def merge_tensor(plan: MergePlan, index: int, tensors: list[torch.Tensor]) -> torch.Tensor:
    """One output tensor from the same tensor of every input (already cast and aligned)."""
    slot, params = plan.slots[index], plan.params[index]
    if not tensors[0].is_floating_point():
        return tensors[plan.reference_index]
    call = TensorMerge(
        tensors=tuple(tensors),
        base_index=plan.base_index,
        weight=params.weight,
        density=params.density,
        gamma=params.gamma,
        normalize=plan.normalize,
        rescale=plan.rescale,
        lambda_=plan.config.lambda_,
        t=params.t,
        filter_wise=plan.config.filter_wise,
        generator=_generator(plan.config.seed, slot.name) if plan.method.randomized else None,
        tie_break=plan.config.tie_break,
    )
    return plan.method.function(call)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand memory freed by the last tensor back to the OS. glibc keeps freed blocks of tens of
    MB on its heap (its mmap threshold grows after each large free), so without this a streamed
    merge's resident size creeps up by the tensors already written."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _row_chunks(slot: TensorSlot, elementwise: bool) -> list[tuple[int, int | None]]:
    """Row ranges to merge a tensor in: whole (stop None) unless the method is elementwise and
    the tensor is big, in which case slices of about CHUNK_BYTES per input bound the memory."""
    if not elementwise or len(slot.shape) == 0 or slot.nbytes <= CHUNK_BYTES:
        return [(0, None)]
    rows = slot.shape[0]
    step = max(1, rows * CHUNK_BYTES // slot.nbytes)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def run_merge(plan: MergePlan, folder: Path, *, show_progress: bool = False, trust_remote_code: bool = False) -> MergeStats:
    """Stream the merge into `folder`: weights, config.json, generation config, tokenizer."""
    from tqdm.auto import tqdm

    for item in plan.inputs:
        materialize(item, trust_remote_code)
    readers = [item.load() for item in plan.inputs]
    writer = StreamingCheckpointWriter(folder, plan.slots, plan.config.max_shard_bytes())
    stats = MergeStats()
    try:
        for index, slot in enumerate(tqdm(plan.slots, desc=f"merge ({plan.method.name})", disable=not show_progress)):
            aligned = plan.vocab is not None and slot.name in plan.vocab.tensor_names
            for start, stop in _row_chunks(slot, plan.method.elementwise and not aligned):
                if stop is None:
                    tensors = [reader.read(slot.name).to(plan.compute_dtypes[index]) for reader in readers]
                else:
                    tensors = [reader.read_rows(slot.name, start, stop).to(plan.compute_dtypes[index]) for reader in readers]
                if aligned:
                    assert plan.vocab is not None
                    tensors = plan.vocab.align(slot.name, tensors)
                merged = merge_tensor(plan, index, tensors).to(slot.dtype)
                held = sum(t.numel() * t.element_size() for t in tensors) + merged.numel() * merged.element_size()
                stats.peak_tensor_bytes = max(stats.peak_tensor_bytes, held)
                writer.append(slot.name, merged)
                del tensors, merged
                release_freed_memory()
            stats.tensors += 1
        stats.files = writer.finish()
    finally:
        writer.close()
    _write_model_files(plan, folder)
    return stats


def _write_model_files(plan: MergePlan, folder: Path) -> None:
    config = dict(plan.model_config)
    if plan.config.out_dtype or plan.config.dtype:
        dtype = plan.config.out_dtype or plan.config.dtype
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation = plan.inputs[plan.reference_index].config_folder / "generation_config.json"
    if generation.is_file():
        (folder / "generation_config.json").write_bytes(generation.read_bytes())
    if plan.vocab is None or not plan.vocab.save_tokenizer(folder):
        tokenizer_folder = plan.inputs[plan.tokenizer_index].config_folder
        if not copy_tokenizer(tokenizer_folder, folder):
            from transformers import AutoTokenizer  # a tokenizer in some other layout: let transformers write it

            AutoTokenizer.from_pretrained(str(tokenizer_folder)).save_pretrained(str(folder))
    if plan.chat_template is not None and plan.chat_template.template is not None:
        write_chat_template(folder, plan.chat_template.template)

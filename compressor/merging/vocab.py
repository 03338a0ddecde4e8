"""Vocabularies: refuse inputs whose tokenizers differ, or align their embeddings to one tokenizer.

With `tokenizer_source` (``base``, ``union`` or one of the models), the output uses that
tokenizer, and every input's token-indexed tensors (embeddings, lm_head) are re-indexed to it by
token string before merging, as mergekit does: a model that has the token uses its own row; for a
model that lacks it, the row comes from the only model that has it, else from the base when the
base has it, else the average of the models that have it, else zeros. Rows past the tokenizer's
tokens (padding, `pad_to_multiple_of`) take the mean of that model's aligned token rows, as in
mergekit. `tokens` names the rows of single tokens (see `compressor.merging.token_rows`).

``union`` (mergekit's construction): the base's tokenizer (the first model's without a base)
with every other token appended, in input order: first each model's ordinary tokens the base
lacks (as added tokens, so they decode, but, as in mergekit, BPE text does not encode to them),
then the models' added / special tokens it lacks, with their first model's settings.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from compressor.errors import RecipeError
from compressor.merging.sources import MergeInput
from compressor.merging.token_rows import configured_rows
from compressor.stages.merge import MergeConfig

VOCAB_TENSOR_SUFFIXES = (
    "embed_tokens.weight",
    "lm_head.weight",
    "wte.weight",
    "embed_in.weight",
    "embed_out.weight",
    "word_embeddings.weight",
)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_fingerprint(folder: Path) -> str:
    """A hash of the tokenizer files, so identical tokenizers are recognised without parsing."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def copy_tokenizer(source: Path, target: Path) -> list[str]:
    """Copy the tokenizer files as they are (exact, and no tokenizer needs loading)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def read_vocabulary(folder: Path) -> dict[str, int]:
    tokenizer_file = folder / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
    return _loaded_vocabulary(folder)


def _loaded_vocabulary(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def _config_vocab_size(folder: Path) -> int | None:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")


@dataclass
class VocabAlignment:
    size: int  # rows of every token-indexed output tensor
    tensor_names: list[str]
    rows: list[torch.Tensor]  # per input: output row -> input row, -1 where the input lacks the token
    fallbacks: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # output row -> (input, row) to average
    padding: list[int] = field(default_factory=list)  # output rows that hold no token
    tokenizer: Any = None  # a tokenizer built for the output (union, added tokens); None: copy the source's files
    forced: set[int] = field(default_factory=set)  # rows every input takes from `fallbacks` (tokens' `force`)

    def save_tokenizer(self, folder: Path) -> bool:
        if self.tokenizer is None:
            return False
        self.tokenizer.save_pretrained(str(folder))
        return True

    def output_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.size, *shape[1:]) if name in self.tensor_names else shape

    def align(self, name: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        defaults: dict[int, torch.Tensor] = {}
        for row, sources in self.fallbacks.items():
            if sources:
                defaults[row] = torch.stack([tensors[i][r] for i, r in sources]).mean(dim=0)
            else:
                defaults[row] = tensors[0].new_zeros(tensors[0].shape[1:])
        padding = set(self.padding)
        token_rows = [row for row in range(self.size) if row not in padding]
        aligned = []
        for i, tensor in enumerate(tensors):
            rows = self.rows[i]
            out = tensor[rows.clamp(min=0)].clone()
            for row in (rows < 0).nonzero().flatten().tolist():
                if row in defaults:
                    out[row] = defaults[row]
            for row in self.forced:
                out[row] = defaults[row]
            if self.padding:  # mergekit's padding: the mean of this input's aligned token rows
                out[self.padding] = out[token_rows].mean(dim=0)
            aligned.append(out)
        return aligned


def plan_vocabulary(
    inputs: list[MergeInput],
    target: int,
    config: MergeConfig,
    where: Callable[[int], dict[str, str]],
    locate: Callable[..., dict[str, str]],
    base_index: int | None = None,
) -> VocabAlignment | None:
    """None when every input shares the tokenizer and nothing reshapes it; else the alignment
    that `tokenizer_source`, `tokens` and `pad_to_multiple_of` ask for."""
    source, specs = config.tokenizer_source, config.tokens or {}
    reshaped = bool(specs) or config.pad_to_multiple_of is not None
    sizes = [_config_vocab_size(item.config_folder) for item in inputs]
    fingerprints = [tokenizer_fingerprint(item.config_folder) for item in inputs]
    same = all(f == fingerprints[target] for f in fingerprints) and all(s == sizes[target] for s in sizes)
    if same and not reshaped:
        return None  # byte-identical tokenizer files: no need to parse them
    vocabularies = [read_vocabulary(item.config_folder) for item in inputs]
    differing = [i for i in range(len(inputs)) if vocabularies[i] != vocabularies[target] or sizes[i] != sizes[target]]
    if not differing and not reshaped:
        return None
    if source is None:
        i = differing[0]
        raise RecipeError(
            f"vocabulary differs from {inputs[target].reference}'s ({len(vocabularies[i])} tokens, {sizes[i]} rows"
            f" against {len(vocabularies[target])}, {sizes[target]}); set tokenizer_source: base, union or one of the models"
            " to align the embeddings to that tokenizer",
            **where(i),
        )
    reference = inputs[target].load()
    names = [n for n, info in reference.tensors.items() if n.endswith(VOCAB_TENSOR_SUFFIXES) and info.shape[0] == sizes[target]]
    if not names:
        raise RecipeError("found no token embedding tensor to align", **locate("tokenizer_source"))
    input_rows = [item.load().tensors[names[0]].shape[0] if names[0] in item.load().tensors else 0 for item in inputs]
    size = reference.tensors[names[0]].shape[0]
    tokenizer = union_tokenizer([item.config_folder for item in inputs], target, input_rows) if source == "union" else None
    added = [token for token in specs if token not in (tokenizer.get_vocab() if tokenizer else vocabularies[target])]
    if added:  # mergekit adds them as plain added tokens of the output tokenizer
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(inputs[target].config_folder))
        tokenizer.add_tokens(added)
    tokens = tokenizer.get_vocab() if tokenizer is not None else vocabularies[target]
    if tokenizer is not None:
        # The inputs' vocabularies as transformers loads them too, so that a token it adds on load
        # (a default `<|endoftext|>` pad token) is found where a model has a row for it.
        vocabularies = [_loaded_vocabulary(item.config_folder) for item in inputs]
        size = max(size, max(tokens.values()) + 1)
    if config.pad_to_multiple_of is not None:
        size = -(-size // config.pad_to_multiple_of) * config.pad_to_multiple_of
    rows = []
    for vocab, available in zip(vocabularies, input_rows):
        mapping = torch.full((size,), -1, dtype=torch.long)
        for token, token_id in tokens.items():
            if token_id < size and vocab.get(token, available) < available:
                mapping[token_id] = vocab[token]
        rows.append(mapping)
    used = {token_id for token_id in tokens.values() if token_id < size}
    padding = [row for row in range(size) if row not in used]
    fallbacks: dict[int, list[tuple[int, int]]] = {}
    for token, token_id in tokens.items():
        if token_id >= size:
            continue
        present = [i for i in range(len(inputs)) if rows[i][token_id] >= 0]
        if len(present) == len(inputs):
            continue
        if len(present) == 1 or (base_index is not None and base_index in present):
            donor = present[0] if len(present) == 1 else base_index
            fallbacks[token_id] = [(donor, int(rows[donor][token_id]))]
        else:
            fallbacks[token_id] = [(i, int(rows[i][token_id])) for i in present]
    configured = configured_rows(specs, tokens, inputs, vocabularies, rows, input_rows, locate)
    fallbacks.update(configured.sources)
    return VocabAlignment(size, names, rows, fallbacks, padding, tokenizer, configured.forced)


def union_tokenizer(folders: list[Path], first: int, input_rows: list[int]) -> Any:
    """The `first` input's tokenizer extended with every token the others have (see the module doc)."""
    from transformers import AutoTokenizer

    order = [first] + [i for i in range(len(folders)) if i != first]
    loaded = {i: AutoTokenizer.from_pretrained(str(folders[i])) for i in order}
    union = loaded[first]
    present = set(union.get_vocab())
    ordinary: list[str] = []
    special: dict[str, Any] = {}
    for i in order:
        added = {token_id: info for token_id, info in loaded[i].added_tokens_decoder.items() if token_id < input_rows[i]}
        added_text = {info.content for info in added.values()}
        for token, token_id in sorted(loaded[i].get_vocab().items(), key=lambda item: item[1]):
            if token_id < input_rows[i] and token not in added_text and token not in present:
                ordinary.append(token)
                present.add(token)
        for token_id in sorted(added):
            info = added[token_id]
            if info.content not in present and info.content not in special:
                special[info.content] = info
    union.add_tokens(ordinary)
    union.add_tokens(list(special.values()))
    return union

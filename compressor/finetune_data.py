"""Fine-tuning examples: plain text, instruction/chat JSONL, or a Hub dataset → token ids + labels.

A record is one of:
- ``{"text": ...}`` (or a paragraph of a .txt file): the loss covers every token;
- ``{"messages": [{"role", "content"}, ...]}``: rendered with the tokenizer's chat template;
  the loss covers the assistant turns only;
- ``{"instruction"|"prompt": ..., "output"|"response"|"completion": ..., ["input"], ["system"]}``:
  turned into a user/assistant chat, same rule; with a tokenizer that has no chat template, the
  prompt and the answer are joined as plain text and the loss covers the answer only.
The kind is decided from the first record; every later record must have that kind's fields,
and a record that lacks them is named with the missing field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from compressor.data_files import read_jsonl_records, read_utf8
from compressor.errors import DataError, first_line
from compressor.extras import missing_extra

IGNORE_INDEX = -100
PROMPT_FIELDS = ("instruction", "prompt")
ANSWER_FIELDS = ("output", "response", "completion")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    cut: int = 0  # tokens dropped past max_length


def _read_records(dataset: str, split: str) -> tuple[list[dict[str, Any]], str]:
    path = Path(dataset).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError("dataset file not found", where=dataset)
        paragraphs = [p.strip() for p in read_utf8(path, dataset).split("\n\n") if p.strip()]
        return [{"text": p} for p in paragraphs], dataset
    if path.suffix in (".jsonl", ".json"):
        if not path.is_file():
            raise DataError("dataset file not found", where=dataset)
        if path.suffix == ".json":
            return _json_list_records(read_utf8(path, dataset), dataset), dataset
        return read_jsonl_records(path, dataset), dataset
    if path.exists() or dataset.startswith((".", "/", "~")):
        raise DataError("unsupported dataset file (use .txt, .jsonl, .json) or a Hub dataset id", where=dataset)
    missing = missing_extra("datasets", "a Hub dataset")
    if missing is not None:
        raise DataError(missing, where=dataset)
    import datasets
    try:
        return datasets.load_dataset(dataset, split=split).to_list(), dataset
    except Exception as err:  # datasets raises many types for missing/offline sets
        raise DataError(f"cannot load dataset (split {split}): {first_line(err)}", where=dataset) from None


def _json_list_records(text: str, dataset: str) -> list[dict[str, Any]]:
    """The records of a .json dataset: a list of objects (record numbers count from 0, as elsewhere)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON: {err.msg}", where=f"{dataset}:{err.lineno}") from None
    if not isinstance(data, list):
        raise DataError("a .json dataset must be a list of records", where=dataset)
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"record {index} is not a JSON object (it is {type(record).__name__})", where=dataset)
    return data


def _kind(record: dict[str, Any], where: str) -> str:
    if "messages" in record:
        return "chat"
    if any(f in record for f in PROMPT_FIELDS) or any(f in record for f in ANSWER_FIELDS):
        return "instruction"
    if "text" in record:
        return "text"
    raise DataError(
        "records need `text`, `messages`, or an instruction pair (`instruction`/`prompt` with"
        f" `output`/`response`/`completion`); the first record has: {', '.join(record) or 'no fields'}",
        where=where,
    )


def _pick(record: dict[str, Any], fields: tuple[str, ...], index: int, where: str) -> str:
    for name in fields:
        if isinstance(record.get(name), str):
            return record[name]
    raise DataError(f"record {index} lacks the field {' / '.join(fields)} (it has: {', '.join(record)})", where=where)


def _messages(record: dict[str, Any], kind: str, index: int, where: str) -> list[dict[str, str]]:
    if kind == "chat":
        messages = record.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise DataError(f"record {index}: `messages` must be a list of {{role, content}}", where=where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"record {index} has no assistant message to learn from", where=where)
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    system, prompt, answer = _pair(record, index, where)
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _pair(record: dict[str, Any], index: int, where: str) -> tuple[str | None, str, str]:
    """(system or None, prompt with its `input`, answer) of an instruction record."""
    prompt = _pick(record, PROMPT_FIELDS, index, where)
    answer = _pick(record, ANSWER_FIELDS, index, where)
    if isinstance(record.get("input"), str) and record["input"].strip():
        prompt = f"{prompt}\n\n{record['input']}"
    return (record["system"] if isinstance(record.get("system"), str) else None), prompt, answer


def _plain_pair_example(tokenizer, system: str | None, prompt: str, answer: str) -> Example:
    """Prompt then answer as plain text, for a tokenizer without a chat template (TRL's
    prompt-completion format): the answer is tokenized on its own, and only it carries the loss."""
    prompt_ids = tokenizer(f"{system}\n\n{prompt}" if system else prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and (not answer_ids or answer_ids[-1] != tokenizer.eos_token_id):
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    return Example(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids)


def _template_ids(tokenizer, messages, *, generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def _chat_example(tokenizer, messages: list[dict[str, str]]) -> Example:
    """Token ids of the whole chat; labels only on the assistant turns' tokens."""
    ids = _template_ids(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_template_ids(tokenizer, messages[:i], generation_prompt=True))
        end = len(_template_ids(tokenizer, messages[: i + 1], generation_prompt=False))
        labels[start:end] = ids[start:end]
    return Example(ids, labels)


def _text_example(tokenizer, text: str) -> Example:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return Example(ids, list(ids))


def load_examples(dataset: str, tokenizer, *, max_length: int, split: str = "train") -> list[Example]:
    """Tokenized examples, cut to `max_length` (each records what it lost in `cut`); examples
    left with no labelled token are dropped."""
    records, where = _read_records(dataset, split)
    if not records:
        raise DataError("dataset is empty", where=where)
    kind = _kind(records[0], where)
    templated = bool(getattr(tokenizer, "chat_template", None))
    if kind == "chat" and not templated:
        raise DataError("chat (`messages`) records need a tokenizer with a chat template; this one has none", where=where)
    examples = []
    for index, record in enumerate(records):
        if kind == "text":
            example = _text_example(tokenizer, _pick(record, ("text",), index, where))
        elif kind == "instruction" and not templated:
            example = _plain_pair_example(tokenizer, *_pair(record, index, where))
        else:
            example = _chat_example(tokenizer, _messages(record, kind, index, where))
        example = Example(example.input_ids[:max_length], example.labels[:max_length],
                          cut=max(0, len(example.input_ids) - max_length))
        if any(label != IGNORE_INDEX for label in example.labels[1:]):
            examples.append(example)
    if not examples:
        raise DataError(f"no example keeps an answer token within max_length={max_length}", where=where)
    return examples


def embedding_rows(config) -> int | None:
    """How many token ids the model embeds (its text config's vocab_size), None where unstated."""
    return getattr(config.get_text_config(), "vocab_size", None)


def padding_id(tokenizer, embedding_rows: int | None) -> int:
    """The id that fills padded positions. They are masked and carry no label, so any row of the
    embedding serves; the tokenizer's pad (else eos) id is kept where the model has that row. A
    tokenizer can name a pad token the embedding lacks (added and never resized: transformers'
    Qwen2Tokenizer adds `<|endoftext|>` to a vocabulary without it), which would stop the run with
    an index error at the first padded batch."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None and 0 <= candidate and (embedding_rows is None or candidate < embedding_rows):
            return candidate
    return 0


def refuse_ids_beyond_embedding(examples: list[Example], embedding_rows: int | None, dataset: str) -> None:
    """A token id the embedding has no row for fails deep inside the forward pass; name it here."""
    largest = max(max(example.input_ids) for example in examples)
    if embedding_rows is not None and largest >= embedding_rows:
        raise DataError(f"the tokenized data holds token id {largest}, but the model embeds only {embedding_rows} ids: "
                        "the tokenizer has tokens the model was not resized for", where=dataset)


def padded_ids_and_labels(rows: Sequence[Any], pad_id: int) -> tuple[Any, Any]:
    """Rows with `input_ids` and `labels`, right-padded to the longest: pad_id / IGNORE_INDEX."""
    import torch

    width = max(len(row.input_ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row.input_ids)] = torch.tensor(row.input_ids)
        labels[index, : len(row.labels)] = torch.tensor(row.labels)
    return ids, labels


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    import torch

    ids, labels = padded_ids_and_labels(examples, pad_id)
    lengths = torch.tensor([len(example.input_ids) for example in examples])
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}

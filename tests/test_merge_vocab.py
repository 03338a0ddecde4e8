"""Merging models whose tokenizers differ: `tokenizer_source` base (default), union, or a model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from compressor.calibration.corpus import calibration_slice_path, read_abstracts
from compressor.cli import main
from tests.merge_fixtures import recipe_text
from tests.tiny_models import VOCAB, build_tiny_checkpoint

OTHER_VOCAB = 320
TOOL = "<|tool|>"
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def train_other_tokenizer(folder: Path) -> None:
    """A second BPE tokenizer, trained on upper-cased text: shares the byte alphabet and the
    special tokens with the tiny one, has its own merges, and one extra special token."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=OTHER_VOCAB - 1, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator((text.upper() for text in read_abstracts(calibration_slice_path())), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": [TOOL]})
    fast.save_pretrained(str(folder))


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    """`a`: a tiny Qwen2 (untied lm_head) with the tiny tokenizer; `b`: the same network with
    the other tokenizer, rows of shared tokens near a's, its own tokens random."""
    root = tmp_path_factory.mktemp("vocab-models")
    a = build_tiny_checkpoint(root / "a", "qwen2", tiny_tokenizer_dir, dtype=torch.float32)
    b = root / "b"
    b.mkdir()
    train_other_tokenizer(b)
    vocab_a = AutoTokenizer.from_pretrained(str(a)).get_vocab()
    vocab_b = AutoTokenizer.from_pretrained(str(b)).get_vocab()
    assert vocab_b[TOOL] < OTHER_VOCAB  # (transformers appends <|endoftext|> past the rows of both, like padding)
    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for name, tensor in load_file(str(a / "model.safetensors")).items():
        if name in VOCAB_TENSORS:
            rows = torch.randn(OTHER_VOCAB, tensor.shape[1], generator=generator) * tensor.std()
            for token, row in vocab_b.items():
                if row < OTHER_VOCAB and vocab_a.get(token, VOCAB) < VOCAB:
                    rows[row] = tensor[vocab_a[token]] + 0.05 * torch.randn(tensor.shape[1], generator=generator) * tensor.std()
            tensors[name] = rows
        else:
            tensors[name] = tensor + 0.05 * torch.randn(tensor.shape, generator=generator) * (tensor.std() if tensor.numel() > 1 else 1)
    save_file(tensors, str(b / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((a / "config.json").read_text())
    config["vocab_size"] = OTHER_VOCAB
    (b / "config.json").write_text(json.dumps(config))
    shutil.copy2(a / "generation_config.json", b / "generation_config.json")
    return {"a": a, "b": b}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def merge_cli(tmp_path: Path, block: str, name: str) -> Path:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(recipe_text(block))
    out = tmp_path / name
    assert main(["--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    return out


def test_differing_vocabularies_are_refused_without_tokenizer_source(vocab_models, tmp_path, capsys):
    block = f"method: task_arithmetic\nbase: {vocab_models['a']}\nmodels:\n  - {{model: {vocab_models['b']}, weight: 1.0}}"
    (tmp_path / "r.yaml").write_text(recipe_text(block))
    assert main(["--recipe", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "vocabulary differs" in err and "union" in err
    assert not (tmp_path / "out").exists()


def test_union_vocabulary_appends_the_other_models_tokens(vocab_models, tmp_path):
    a, b = vocab_models["a"], vocab_models["b"]
    block = f"method: task_arithmetic\nbase: {a}\nmodels:\n  - {{model: {b}, weight: 1.0}}\ntokenizer_source: union"
    out = merge_cli(tmp_path, block, "union")
    vocab_a = AutoTokenizer.from_pretrained(str(a)).get_vocab()
    tok_b = AutoTokenizer.from_pretrained(str(b))
    vocab_b = tok_b.get_vocab()
    merged_tok = AutoTokenizer.from_pretrained(str(out))
    vocab = merged_tok.get_vocab()

    only_b = sorted((t for t in vocab_b if t not in vocab_a and t != TOOL), key=vocab_b.get)
    assert only_b, "the fixture's tokenizers must differ"
    assert len(vocab) == len(vocab_a) + len(only_b) + 1
    assert all(vocab[t] == i for t, i in vocab_a.items())  # the base's ids are kept
    start = max(vocab_a.values()) + 1
    assert [vocab[t] for t in only_b] == list(range(start, start + len(only_b)))  # then b's, in b's order
    assert vocab[TOOL] == start + len(only_b)  # then the special tokens
    assert merged_tok(TOOL, add_special_tokens=False)["input_ids"] == [vocab[TOOL]]

    merged, wa, wb = weights(out), weights(a), weights(b)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(vocab)
    for name in VOCAB_TENSORS:
        assert merged[name].shape == (len(vocab), wa[name].shape[1])
        shared = [t for t in vocab_a if vocab_a[t] < VOCAB and vocab_b.get(t, OTHER_VOCAB) < OTHER_VOCAB][:50]
        for token in shared:  # base + 1.0 * (b - base) = b's row
            torch.testing.assert_close(merged[name][vocab[token]], wb[name][vocab_b[token]], rtol=1e-5, atol=1e-6)
        for token in only_b + [TOOL]:  # the base lacks it: b's row stands in for the base, b's delta is 0
            torch.testing.assert_close(merged[name][vocab[token]], wb[name][vocab_b[token]], rtol=0, atol=0)
        for token in [t for t in vocab_a if t not in vocab_b][:50]:  # b lacks it: the base's row, unchanged
            torch.testing.assert_close(merged[name][vocab[token]], wa[name][vocab_a[token]], rtol=0, atol=0)
        beyond = [t for t, i in vocab_a.items() if i >= VOCAB and vocab_b.get(t, OTHER_VOCAB) >= OTHER_VOCAB]
        for token in beyond:  # a tokenizer entry past every model's embedding rows: no row anywhere, zeros
            assert not merged[name][vocab[token]].any()

    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([[vocab_a["<s>"], vocab[only_b[0]], vocab[TOOL]]])
    assert torch.isfinite(model(ids).logits).all()
    assert model(ids).logits.shape[-1] == len(vocab)


def test_a_model_as_tokenizer_source_takes_its_tokenizer_and_ids(vocab_models, tmp_path):
    a, b = vocab_models["a"], vocab_models["b"]
    block = f"method: linear\nmodels:\n  - {{model: {a}, weight: 0.5}}\n  - {{model: {b}, weight: 0.5}}\ntokenizer_source: {b}"
    out = merge_cli(tmp_path, block, "from-b")
    assert (out / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    vocab_a = AutoTokenizer.from_pretrained(str(a)).get_vocab()
    vocab_b = AutoTokenizer.from_pretrained(str(b)).get_vocab()
    merged, wa, wb = weights(out), weights(a), weights(b)
    for name in VOCAB_TENSORS:
        assert merged[name].shape[0] == OTHER_VOCAB
        for token, row in vocab_b.items():
            if row >= OTHER_VOCAB:
                continue  # past b's embedding rows: not a row of the output either
            if vocab_a.get(token, VOCAB) < VOCAB:
                expected = 0.5 * wa[name][vocab_a[token]] + 0.5 * wb[name][row]
            else:  # a lacks it (or has no row for it): b's row stands in for a's
                expected = wb[name][row]
            torch.testing.assert_close(merged[name][row], expected, rtol=1e-5, atol=1e-6)


def test_mergekit_union_config_equals_the_native_recipe(vocab_models, tmp_path):
    a, b = vocab_models["a"], vocab_models["b"]
    (tmp_path / "mk.yaml").write_text(
        f"merge_method: task_arithmetic\nbase_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.8}}\n"
        "tokenizer_source: union\n"
    )
    assert main(["merge", str(tmp_path / "mk.yaml"), "-o", str(tmp_path / "mk"), "-q"]) == 0
    native = merge_cli(tmp_path, f"method: task_arithmetic\nbase: {a}\nmodels:\n  - {{model: {b}, weight: 0.8}}\ntokenizer_source: union", "native")
    for name, tensor in weights(native).items():
        torch.testing.assert_close(weights(tmp_path / "mk")[name], tensor, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "mk")).get_vocab() == AutoTokenizer.from_pretrained(str(native)).get_vocab()

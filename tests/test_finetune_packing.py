"""`compress finetune --packing`: packed sequences give every example exactly the per-token loss and
gradient it gets alone (no attention across examples, positions restart), and the CLI path."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from compressor.cli import main
from compressor.errors import UserError
from compressor.finetune_data import IGNORE_INDEX, Example, collate
from compressor.finetune_loop import batch_logits, labelled_tokens
from compressor.finetune_packing import best_fit_decreasing, collate_packed, pack_examples, refuse_unmasked_attention
from tests.cli_runs import assert_one_line_refusal, run_cli
from tests.test_finetune import _titles, _write_jsonl
from tests.tiny_models import build_tiny_checkpoint


def _examples(lengths: list[int], prompt: int = 3) -> list[Example]:
    """Random token ids; the first `prompt` tokens unlabelled (completion-only loss)."""
    generator = torch.Generator().manual_seed(7)
    examples = []
    for n in lengths:
        ids = torch.randint(3, 384, (n,), generator=generator).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * min(prompt, n - 1) + ids[min(prompt, n - 1):]))
    return examples


def _tiny_llama(implementation: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  tie_word_embeddings=True, attn_implementation=implementation)
    return AutoModelForCausalLM.from_config(config).float()


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                                             reduction="none")


def _unpacked(model, examples):
    """Per example: the losses of its positions 1…n-1 (0 where unlabelled), from a padded batch."""
    batch = collate(examples, pad_id=0)
    losses = _token_losses(batch_logits(model, batch), batch["labels"])
    return [losses[row, : len(e.input_ids) - 1] for row, e in enumerate(examples)], losses.sum(), labelled_tokens(batch)


def _packed(model, examples, max_length, **overrides):
    """The same, from packed rows (examples located by their position ids restarting at 0)."""
    rows, _stats = pack_examples(examples, max_length)
    batch = collate_packed(rows, pad_id=0) | overrides
    losses = _token_losses(batch_logits(model, batch), batch["labels"])
    by_ids: dict[tuple, torch.Tensor] = {}
    for row, packed in enumerate(rows):
        start = 0
        for end in [i for i, p in enumerate(packed.position_ids) if p == 0][1:] + [len(packed.input_ids)]:
            # losses[t] predicts token t + 1: an example spanning [start, end) owns losses start … end - 2
            by_ids[tuple(packed.input_ids[start:end])] = losses[row, start : end - 1]
            start = end
    return [by_ids[tuple(e.input_ids)] for e in examples], losses.sum(), labelled_tokens(batch)


LENGTHS = [9, 23, 4, 17, 12, 30, 6, 2, 15]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_losses_and_gradients_equal_unpacked(implementation):
    examples = _examples(LENGTHS)
    model = _tiny_llama(implementation)
    alone, total_alone, tokens_alone = _unpacked(model, examples)
    grads_alone = torch.autograd.grad(total_alone, list(model.parameters()))
    packed, total_packed, tokens_packed = _packed(model, examples, max_length=32)
    grads_packed = torch.autograd.grad(total_packed, list(model.parameters()))

    assert len(pack_examples(examples, 32)[0]) < len(examples)  # several examples do share a row
    assert int(tokens_packed) == int(tokens_alone)  # no label lost or added at a boundary
    for index, (a, p) in enumerate(zip(alone, packed)):
        torch.testing.assert_close(p, a, rtol=1e-5, atol=1e-5, msg=f"example {index} (length {LENGTHS[index]})")
    for (name, _), a, p in zip(model.named_parameters(), grads_alone, grads_packed):
        torch.testing.assert_close(p, a, rtol=1e-4, atol=1e-6, msg=name)


def test_the_equality_check_sees_a_leak():
    """Controls: an all-ones attention mask turns transformers' boundary detection off (examples then
    attend to earlier ones), and positions that do not restart do the same; both are far off."""
    examples = _examples(LENGTHS)
    model = _tiny_llama("sdpa")
    with torch.no_grad():
        alone = torch.cat(_unpacked(model, examples)[0])
        rows, _ = pack_examples(examples, 32)
        width = max(len(r.input_ids) for r in rows)
        leaks = {
            "mask given": {"attention_mask": torch.ones(len(rows), width, dtype=torch.long)},
            "positions run on": {"position_ids": torch.arange(width).expand(len(rows), -1)},
        }
        for name, override in leaks.items():
            packed = torch.cat(_packed(model, examples, 32, **override)[0])
            assert (packed - alone).abs().max() > 1e-2, name


def test_best_fit_decreasing():
    assert best_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    lengths = [len(e.input_ids) for e in _examples(LENGTHS * 5)]
    bins = best_fit_decreasing(lengths, 40)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 40 for b in bins)
    assert len(bins) == -(-sum(lengths) // 40)  # these lengths pack without a wasted sequence


def test_packed_rows_keep_labels_inside_examples():
    rows, stats = pack_examples(_examples([5, 3, 4]), 8)
    assert [r.examples for r in rows] == [2, 1] and stats.sequences == 2 and stats.tokens == 12
    first = rows[0]
    assert first.position_ids == [0, 1, 2, 3, 4, 0, 1, 2]
    assert first.labels[0] == IGNORE_INDEX and first.labels[5] == IGNORE_INDEX  # each example's first token
    batch = collate_packed(rows, pad_id=0)
    assert "attention_mask" not in batch
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # the padding is a segment of its own
    assert batch["labels"][1, 4:].eq(IGNORE_INDEX).all()


def test_unmasked_attention_is_refused():
    for name in ("my_kernel", "flash_attention_2"):  # flash: boundaries from position ids only in a single row
        model = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation=name))
        with pytest.raises(UserError, match=f"'{name}' gets no packed-sequence mask"):
            refuse_unmasked_attention(model)
    refuse_unmasked_attention(_tiny_llama("eager"))
    refuse_unmasked_attention(_tiny_llama("sdpa"))


# ------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def fp32_llama(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("fp32-llama"), "llama", tiny_tokenizer_dir, dtype=torch.float32)


def _run(model: Path, data: Path, out: Path, capsys, *flags: str) -> tuple[dict, str]:
    argv = ["finetune", model, "--dataset", data, "-o", out, "--r", "8", "--alpha", "16", "--log-every", "0",
            "-q", "--dropout", "0", "--max-grad-norm", "0", *flags]
    assert main([str(a) for a in argv]) == 0
    return json.loads((out / "training.json").read_text()), capsys.readouterr().out


@pytest.mark.parametrize("checkpointing", [(), ("--no-gradient-checkpointing",)], ids=["checkpointed", "plain"])
def test_cli_packing_trains_the_same_first_step(checkpointing, fp32_llama, tmp_path, capsys):
    """All examples in one micro-batch, packed or padded: the same tokens and losses, so the same
    held-out loss, gradient and adapter after one step (through peft, accelerate, activation
    checkpointing and our loop)."""
    from safetensors.torch import load_file

    data = _write_jsonl(tmp_path / "d.jsonl", _titles(10))
    common = ("--steps", "1", "--batch-size", "16", "--lr", "0.01", "--eval-dataset", str(data), "--max-length", "64",
              *checkpointing)
    padded, _ = _run(fp32_llama, data, tmp_path / "padded", capsys, *common)
    packed, said = _run(fp32_llama, data, tmp_path / "packed", capsys, *common, "--packing")
    assert "packing: 10 examples into 5 sequences of up to 64 tokens (92% full)" in said
    assert "1 steps of 16 packed sequences" in said
    assert packed["packing"]["examples"] == 10 and packed["packing"]["sequences"] == 5
    assert packed["options"]["packing"] is True and padded["packing"] is None
    assert "| packing | 10 examples in 5 sequences (92% full" in (tmp_path / "packed" / "README.md").read_text()
    assert packed["eval_loss_before"] == pytest.approx(padded["eval_loss_before"], rel=1e-5)
    assert packed["losses"] == pytest.approx(padded["losses"], rel=1e-5)
    assert packed["grad_norms"] == pytest.approx(padded["grad_norms"], rel=1e-4)
    reference = load_file(str(tmp_path / "padded" / "adapter_model.safetensors"))
    for key, value in load_file(str(tmp_path / "packed" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-6, msg=key)


def test_cli_packing_cuts_overlong_examples_and_says_so(fp32_llama, tmp_path, capsys):
    records = [{"instruction": "Title?", "output": w} for w in ("sparse", "fast models", "vision", "attention", "scaling")]
    records.append({"instruction": "Give a title. " * 3, "output": "sparse attention models " * 8})
    data = _write_jsonl(tmp_path / "d.jsonl", records)
    log, said = _run(fp32_llama, data, tmp_path / "o", capsys, "--steps", "2", "--packing", "--max-length", "40",
                     "--no-gradient-checkpointing")
    assert "1 of 6 training examples were longer than --max-length 40 and were cut" in said
    assert log["packing"]["examples"] == 6 and log["packing"]["sequences"] < 6
    assert 0 < log["packing"]["fill"] <= 1


def test_cli_packing_needs_a_masked_attention(fp32_llama, tmp_path, capsys, monkeypatch):
    """As if the model's implementation (sdpa here) were one transformers builds no mask for."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    data = _write_jsonl(tmp_path / "d.jsonl", _titles(4))
    monkeypatch.setattr(ALL_MASK_ATTENTION_FUNCTIONS, "_global_mapping", {"flex_attention": None})
    code, err = run_cli(["finetune", fp32_llama, "--dataset", data, "-o", tmp_path / "o", "--packing", "--steps", "1", "-q"], capsys)
    assert_one_line_refusal(code, err, "--packing", "'sdpa' gets no packed-sequence mask from transformers")
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.work").exists()


def test_help_and_readme_document_packing():
    from compressor.commands.finetune import _parser

    text = _parser().format_help()
    assert "--packing" in text and "--modules-to-save" in text
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "`--packing`" in readme and "`--modules-to-save" in readme

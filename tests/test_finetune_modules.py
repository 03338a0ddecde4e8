"""`compress finetune --modules-to-save`: full trained copies beside the adapters (peft
modules_to_save), a tied lm_head/embed_tokens pair kept tied, reload with plain peft, --resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import compressor.finetune as finetune
from compressor.cli import main
from compressor.errors import ModelError
from tests.cli_runs import assert_one_line_refusal, run_cli
from tests.test_finetune import _titles, _write_jsonl
from tests.test_finetune_options import _InterruptAtStep
from tests.tiny_models import build_tiny_checkpoint

ADAPTER = "adapter_model.safetensors"
IDS = torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2, 44, 301]])


@pytest.fixture(scope="module")
def fp32_llama(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """Tied embeddings (tie_word_embeddings, as SmolLM2)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("fp32-llama"), "llama", tiny_tokenizer_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def untied_llama(fp32_llama, tmp_path_factory) -> Path:
    """The same Llama with its own output head (a perturbed copy of the embedding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(fp32_llama), tie_word_embeddings=False)
    torch.manual_seed(5)
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach() + 0.01 * torch.randn_like(model.lm_head.weight))
    model.config.tie_word_embeddings = False
    folder = tmp_path_factory.mktemp("untied-llama")
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((fp32_llama / name).read_bytes())
    return folder


def _train_keeping_logits(model: Path, data: Path, out: Path, monkeypatch, capsys, *flags: str) -> tuple[torch.Tensor, str]:
    """Train; returns the logits of the trained model in memory (just before it is saved) and stdout."""
    seen: list[torch.Tensor] = []
    save = finetune._save_adapter

    def logits_then_save(peft_model, *args):
        peft_model.eval()
        with torch.no_grad():
            seen.append(peft_model(input_ids=IDS).logits.float())
        save(peft_model, *args)

    monkeypatch.setattr(finetune, "_save_adapter", logits_then_save)
    argv = ["finetune", model, "--dataset", data, "-o", out, "--r", "8", "--alpha", "16", "--log-every", "0", "-q",
            "--no-gradient-checkpointing", "--lr", "0.01", "--steps", "3", "--batch-size", "4", *flags]
    assert main([str(a) for a in argv]) == 0
    return seen[0], capsys.readouterr().out


def _peft_logits(base_path: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_path)), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float(), model


@pytest.mark.parametrize("name", ["lm_head", "embed_tokens"])
def test_tied_pair_trains_one_copy_and_reloads_with_peft(name, fp32_llama, tmp_path, monkeypatch, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", _titles(8))
    ours, said = _train_keeping_logits(fp32_llama, data, tmp_path / "a", monkeypatch, capsys, "--modules-to-save", name)
    assert "lm_head and embed_tokens share one matrix in this model" in said
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] is True and "model.embed_tokens" in config["modules_to_save"]
    tensors = load_file(str(tmp_path / "a" / ADAPTER))
    copies = sorted(k for k in tensors if "lora_" not in k)
    # peft 0.21 writes the one shared copy under both names
    assert copies == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"]
    assert torch.equal(tensors[copies[0]], tensors[copies[1]])
    base = load_file(str(fp32_llama / "model.safetensors"))["model.embed_tokens.weight"]
    assert not torch.allclose(tensors[copies[1]], base)  # it trained

    reloaded, peft_model = _peft_logits(fp32_llama, tmp_path / "a")
    torch.testing.assert_close(reloaded, ours, rtol=1e-5, atol=1e-5)
    head, embedding = peft_model.get_output_embeddings(), peft_model.get_input_embeddings()
    assert head.modules_to_save["default"].weight is embedding.modules_to_save["default"].weight  # still tied
    assert "`model.embed_tokens`" in (tmp_path / "a" / "README.md").read_text()


def test_untied_head_gets_its_own_copy(untied_llama, tmp_path, monkeypatch, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", _titles(8))
    ours, said = _train_keeping_logits(untied_llama, data, tmp_path / "a", monkeypatch, capsys, "--modules-to-save", "lm_head")
    assert "share one matrix" not in said
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"] and not config["ensure_weight_tying"]
    assert [k for k in load_file(str(tmp_path / "a" / ADAPTER)) if "lora_" not in k] == ["base_model.model.lm_head.weight"]
    reloaded, _ = _peft_logits(untied_llama, tmp_path / "a")
    torch.testing.assert_close(reloaded, ours, rtol=1e-5, atol=1e-5)

    from compressor.adapters import apply_adapter
    from transformers import AutoModelForCausalLM

    with pytest.raises(ModelError, match="trained copies of whole modules .lm_head"):
        apply_adapter(AutoModelForCausalLM.from_pretrained(str(untied_llama)), tmp_path / "a")


def test_resume_with_modules_to_save_and_packing(chat_llama, tmp_path, capsys):
    """QLoRA, a tied head trained whole, packed batches: interrupted and resumed, bit-identical."""
    data = _write_jsonl(tmp_path / "train.jsonl", _titles(12))
    flags = ["--qlora", "--steps", "4", "--batch-size", "1", "--save-every", "2", "--dropout", "0.1", "--lr", "0.02",
             "--modules-to-save", "lm_head", "--packing", "--max-length", "64"]
    argv = ["finetune", str(chat_llama), "--dataset", str(data), "--r", "8", "--alpha", "16", "--log-every", "0", "-q",
            "--no-gradient-checkpointing", *flags]
    assert main([*argv, "-o", str(tmp_path / "ref")]) == 0
    with _InterruptAtStep(3):
        assert main([*argv, "-o", str(tmp_path / "a")]) == 130
    capsys.readouterr()
    assert main([*argv, "-o", str(tmp_path / "a"), "--resume"]) == 0
    assert "resume: continuing after step 2" in capsys.readouterr().out
    expected, got = load_file(str(tmp_path / "ref" / ADAPTER)), load_file(str(tmp_path / "a" / ADAPTER))
    assert "base_model.model.model.embed_tokens.weight" in got and got.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []
    ref_log, log = (json.loads((tmp_path / n / "training.json").read_text()) for n in ("ref", "a"))
    assert log["losses"] == ref_log["losses"] and log["resumed_from"] == 2


@pytest.mark.parametrize("value, fragment", [
    ("nosuch", "no module of the model is named nosuch"),
    ("q_proj", "already carries a LoRA adapter (--targets all-linear)"),
    (",", "expected module names such as lm_head"),
])
def test_bad_modules_to_save(value, fragment, fp32_llama, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", _titles(4))
    code, err = run_cli(["finetune", fp32_llama, "--dataset", data, "-o", tmp_path / "o", "--steps", "1", "-q",
                         "--modules-to-save", value], capsys)
    assert_one_line_refusal(code, err, "--modules-to-save", fragment)
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.work").exists()


def test_explicit_target_overlap_is_refused(fp32_llama, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", _titles(4))
    code, err = run_cli(["finetune", fp32_llama, "--dataset", data, "-o", tmp_path / "o", "--steps", "1", "-q",
                         "--targets", "q_proj,v_proj", "--modules-to-save", "v_proj"], capsys)
    assert_one_line_refusal(code, err, "--modules-to-save", "model.layers.0.self_attn.v_proj already carries a LoRA adapter")


def test_merge_carries_the_trained_tied_matrix(fp32_llama, tmp_path):
    """--merge: the merged checkpoint holds the trained copy as its (still tied) embedding and head."""
    from transformers import AutoModelForCausalLM

    data = _write_jsonl(tmp_path / "d.jsonl", _titles(8))
    argv = ["finetune", fp32_llama, "--dataset", data, "-o", tmp_path / "a", "--r", "8", "--log-every", "0", "-q",
            "--no-gradient-checkpointing", "--lr", "0.01", "--steps", "2", "--modules-to-save", "lm_head", "--merge"]
    assert main([str(a) for a in argv]) == 0
    trained = load_file(str(tmp_path / "a" / ADAPTER))["base_model.model.model.embed_tokens.weight"]
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a" / "merged"))
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(merged.model.embed_tokens.weight, trained.to(merged.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("fixture", ["tiny_llama", "untied_llama_bf16"])
def test_copies_of_a_bf16_base_train_in_fp32(fixture, request, tmp_path, monkeypatch, capsys):
    """Master weights: the optimizer steps fp32 copies (bf16 would round most AdamW steps away); the
    adapter holds them in the base's dtype, and the model in memory computes what peft reloads."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    model = request.getfixturevalue(fixture)
    data = _write_jsonl(tmp_path / "d.jsonl", _titles(8))
    stepped: list[set] = []
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, *_: stepped.append({p.dtype for group in optimizer.param_groups for p in group["params"]}))
    try:
        ours, _ = _train_keeping_logits(model, data, tmp_path / "a", monkeypatch, capsys, "--modules-to-save", "lm_head")
    finally:
        handle.remove()
    assert stepped and all(dtypes == {torch.float32} for dtypes in stepped)
    copies = {k: v for k, v in load_file(str(tmp_path / "a" / ADAPTER)).items() if "lora_" not in k}
    assert copies and all(v.dtype == torch.bfloat16 for v in copies.values())
    reloaded, _ = _peft_logits(model, tmp_path / "a")
    torch.testing.assert_close(reloaded, ours, rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def untied_llama_bf16(untied_llama, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("untied-llama-bf16")
    AutoModelForCausalLM.from_pretrained(str(untied_llama), dtype=torch.bfloat16).save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((untied_llama / name).read_bytes())
    return folder

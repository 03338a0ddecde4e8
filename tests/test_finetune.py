"""`compress finetune`: QLoRA on a tiny model, data formats, merge, bad input, accelerate launch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.cli import main
from compressor.finetune_data import IGNORE_INDEX, load_examples
from tests.training_fixtures import StepNorms

def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _titles(n: int, offset: int = 0) -> list[dict]:
    words = ["sparse", "quantized", "models", "attention", "scaling", "language", "vision", "fast"]
    return [
        {"instruction": f"Give a title for abstract {i}.", "output": f"{words[i % 8]} {words[(i * 3) % 8]} {words[(i + 5) % 8]}"}
        for i in range(offset, offset + n)
    ]


def test_chat_labels_cover_only_the_answer(chat_llama, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(chat_llama))
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "Give a title."},
        {"role": "assistant", "content": "Sparse models"},
    ]}])
    (example,) = load_examples(str(path), tokenizer, max_length=256)
    labelled = [t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX]
    assert tokenizer.decode(labelled).strip().startswith("Sparse models")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Give a title."}], tokenize=True, add_generation_prompt=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert all(l == IGNORE_INDEX for l in example.labels[: len(prompt)])
    assert example.labels[len(prompt)] != IGNORE_INDEX


def test_plain_text_labels_everything(chat_llama, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(chat_llama))
    path = tmp_path / "t.txt"
    path.write_text("first paragraph of text\n\nsecond one here")
    examples = load_examples(str(path), tokenizer, max_length=64)
    assert len(examples) == 2 and examples[0].labels == examples[0].input_ids


def test_qlora_loss_goes_down_and_adapter_loads_with_peft(chat_llama, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train = _write_jsonl(tmp_path / "train.jsonl", _titles(16))
    out = tmp_path / "adapter"
    argv = ["finetune", str(chat_llama), "--qlora", "--dataset", str(train), "-o", str(out), "--steps", "15", "--lr", "0.03",
            "--r", "8", "--alpha", "16", "--batch-size", "8", "--eval-dataset", str(train), "--merge", "--log-every", "0"]
    assert main(argv) == 0
    log = json.loads((out / "training.json").read_text())
    assert log["eval_loss_after"] < log["eval_loss_before"] - 0.2  # 6.01 → 5.70 here
    assert sum(log["losses"][-3:]) < sum(log["losses"][:3])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    targets = config["target_modules"]  # all-linear: 7 per layer, lm_head excluded
    assert len(targets) == 14 and not any("lm_head" in t for t in targets)
    base = AutoModelForCausalLM.from_pretrained(str(chat_llama))
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    ids = torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2]])
    with torch.no_grad():
        a = peft_model(input_ids=ids).logits.float()
        b = merged(input_ids=ids).logits.float()
    assert merged.config.to_dict().get("quantization_config") is None
    assert merged.dtype == torch.bfloat16
    assert (a - b).abs().max() < 0.1 * a.abs().max()  # merged bf16 ≈ original base + adapter (NF4 error apart)


@pytest.mark.parametrize(
    "records, fragment",
    [
        ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "record 1 lacks the field output / response / completion"),
        ([{"question": "a", "answer": "b"}], "the first record has: question, answer"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "record 0 has no assistant message"),
    ],
)
def test_dataset_missing_fields_are_named(records, fragment, chat_llama, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", records)
    assert main(["finetune", str(chat_llama), "--dataset", str(data), "-o", str(tmp_path / "o"), "--steps", "1"]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_chat_records_need_a_chat_template(tiny_llama, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    assert main(["finetune", str(tiny_llama), "--dataset", str(data), "-o", str(tmp_path / "o"), "--steps", "1"]) == 2
    assert "chat (`messages`) records need a tokenizer with a chat template" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_prompt_completion_without_a_chat_template_masks_the_prompt(tiny_llama, tmp_path):
    """As TRL's prompt-completion format: plain prompt then completion, loss on the completion only."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    assert not tokenizer.chat_template
    path = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Give a title.", "completion": "Sparse models"},
                                                {"instruction": "Name it", "input": "abstract", "output": "Fast"}])
    first, second = load_examples(str(path), tokenizer, max_length=256)
    prompt = tokenizer("Give a title.")["input_ids"]
    answer = tokenizer("Sparse models", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert first.input_ids == prompt + answer
    assert first.labels == [IGNORE_INDEX] * len(prompt) + answer
    labelled = [t for t, label in zip(second.input_ids, second.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled, skip_special_tokens=True).strip() == "Fast"
    assert "abstract" in tokenizer.decode(second.input_ids)


def test_qlora_refuses_a_project_int4_checkpoint(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\ncalibration: {samples: 4, seq_len: 32}\nstages:\n  - quantize: {method: rtn}\n")
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(tmp_path / "w4"), "-q", "--no-perplexity"]) == 0
    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}])
    assert main(["finetune", str(tmp_path / "w4"), "--qlora", "--dataset", str(data), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "already quantized (compressed-tensors)" in err and "lowrank: {method: lora}" in err


def test_qlora_without_bitsandbytes(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails, as when it is not installed
    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}])
    assert main(["finetune", str(tiny_llama), "--qlora", "--dataset", str(data), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--qlora: QLoRA needs bitsandbytes, which is not installed: pip install 'compressor[nf4]'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_two_process_accelerate_launch_on_cpu(chat_llama, tmp_path):
    """Two CPU processes (gloo) through `accelerate launch`, the command unchanged."""
    train = _write_jsonl(tmp_path / "train.jsonl", _titles(8))
    out = tmp_path / "adapter"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        # `--cpu` alone picks accelerate's single-process (or mpirun) launcher; `--multi_gpu` on a
        # machine without CUDA runs torchrun, and accelerate then uses gloo on the CPU.
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "compressor.cli", "finetune", str(chat_llama), "--qlora",
        "--dataset", str(train), "-o", str(out), "--steps", "2", "--batch-size", "2", "--log-every", "0",
        "--grad-accum", "2", "--save-every", "1",  # the token count and the RNG states are gathered over gloo
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = json.loads((out / "training.json").read_text())
    assert log["processes"] == 2 and len(log["losses"]) == 2
    assert log["effective_batch_size"] == 8 and "2 steps of 8 examples (2 × 2 accumulated × 2 processes)" in result.stdout
    assert "checkpoint after step 1: " in result.stdout and "(2 RNG states)" in result.stdout
    assert not (tmp_path / ".adapter.work").exists()  # removed once the adapter is in place
    assert (out / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------ clipping and warm-up


def _finetune_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", str(model), "--qlora", "--dataset", str(data), "-o", str(out), "--r", "8", "--alpha", "16",
            "--batch-size", "4", "--log-every", "0", *extra]


def test_clipping_bounds_the_gradient_the_optimizer_step_sees(chat_llama, tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", _titles(8))
    clip = 1e-4  # below this model's gradient norms, so (nearly) every step is clipped
    with StepNorms() as seen:
        assert main(_finetune_argv(chat_llama, data, tmp_path / "clipped", "--steps", "4", "--lr", "1", "--max-grad-norm", str(clip))) == 0
    log = json.loads((tmp_path / "clipped" / "training.json").read_text())
    before = log["grad_norms"]  # the unclipped norms, recorded by the loop
    assert len(seen.norms) == len(before) == 4
    assert sum(norm > 2 * clip for norm in before) >= 3, before
    assert all(norm <= clip * 1.001 for norm in seen.norms), seen.norms
    # scaled down to the bound, not zeroed; steps already under it untouched
    assert seen.norms == pytest.approx([min(norm, clip) for norm in before], rel=1e-3)
    assert all(math.isfinite(loss) for loss in log["losses"])

    with StepNorms() as unclipped:
        assert main(_finetune_argv(chat_llama, data, tmp_path / "free", "--steps", "2", "--lr", "1", "--max-grad-norm", "0")) == 0
    free = json.loads((tmp_path / "free" / "training.json").read_text())["grad_norms"]
    assert unclipped.norms == pytest.approx(free, rel=1e-4) and min(unclipped.norms) > 10 * clip


def test_warmup_then_cosine_in_the_training_loop(chat_llama, tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", _titles(8))
    argv = _finetune_argv(chat_llama, data, tmp_path / "o", "--steps", "6", "--warmup-steps", "2", "--lr", "0.01")
    with StepNorms() as seen:
        assert main(argv) == 0
    log = json.loads((tmp_path / "o" / "training.json").read_text())
    expected = [0.0, 0.005, 0.01] + [0.01 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in (3, 4, 5)]
    assert seen.rates == pytest.approx(expected, abs=1e-9)  # what the optimizer used
    assert log["learning_rates"] == pytest.approx(expected, abs=1e-9)  # what the log says
    assert log["warmup_steps"] == 2 and log["options"]["max_grad_norm"] == 0.3


def test_schedule_values_and_default_warmup():
    from compressor.training.stability import default_warmup_steps, warmup_cosine_schedule

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=2e-4)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=10, steps=100)
    rates = []
    for _ in range(101):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.0 and rates[5] == pytest.approx(1e-4) and rates[10] == pytest.approx(2e-4)
    assert rates[55] == pytest.approx(1e-4) and rates[100] == pytest.approx(0.0, abs=1e-12)
    assert max(rates) == pytest.approx(2e-4) and all(b <= a for a, b in zip(rates[10:], rates[11:]))
    assert [default_warmup_steps(n) for n in (1, 10, 17, 100, 200, 300)] == [0, 0, 1, 3, 6, 9]


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--max-grad-norm", "-1"], "--max-grad-norm: expected a finite number ≥ 0, got '-1'"),
        (["--max-grad-norm", "x"], "--max-grad-norm: expected a number ≥ 0, got 'x'"),
        (["--max-grad-norm", "inf"], "expected a finite number ≥ 0"),
        (["--warmup-steps", "-2"], "--warmup-steps: expected an integer ≥ 0, got '-2'"),
        (["--warmup-steps", "1.5"], "--warmup-steps: expected an integer ≥ 0"),
        (["--steps", "10", "--warmup-steps", "10"], "--warmup-steps must be fewer than the steps (10), got 10"),
    ],
)
def test_bad_clipping_and_warmup_flags(flags, fragment, chat_llama, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", _titles(2))
    with pytest.raises(SystemExit) as exit_info:  # argparse's one-line error (compressor.commands.args.Parser)
        main(["finetune", str(chat_llama), "--dataset", str(data), "-o", str(tmp_path / "o"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_bad_warmup_through_the_python_api(chat_llama, tmp_path):
    from compressor.errors import UserError
    from compressor.finetune import FinetuneOptions, run_finetune

    data = _write_jsonl(tmp_path / "d.jsonl", _titles(2))
    options = FinetuneOptions(model=str(chat_llama), dataset=str(data), output=tmp_path / "o", steps=5, warmup_steps=7)
    with pytest.raises(UserError, match="--warmup-steps: must be fewer than the steps"):
        run_finetune(options)
    assert not (tmp_path / "o").exists()


def _nf4_lora_gradients_around_an_evaluation(folder: Path, keep_layout: bool) -> tuple[dict, dict]:
    """LoRA gradients on one batch, before and after a no-grad eval-mode forward (what the held-out
    evaluation does between training steps)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from compressor.finetune import _quantization_config, keep_nf4_trainable_layout

    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=_quantization_config(), device_map={"": "cpu"})
    if keep_layout:
        assert keep_nf4_trainable_layout(model) == 14 or not _cpu_packs_nf4()
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at 0; make it non-zero so A's gradients (through the base layers) count
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    ids = torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2, 44, 100, 17, 3]])

    def gradients() -> dict:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    return before, gradients()


def _cpu_packs_nf4() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def test_held_out_evaluation_leaves_nf4_gradients_intact(chat_llama):
    before, after = _nf4_lora_gradients_around_an_evaluation(chat_llama, keep_layout=True)
    assert len(before) == 28
    for name in before:
        assert torch.allclose(before[name], after[name], rtol=1e-4, atol=1e-7), name
    if _cpu_packs_nf4():  # the hazard keep_nf4_trainable_layout removes is real on this CPU
        before, after = _nf4_lora_gradients_around_an_evaluation(chat_llama, keep_layout=False)
        changed = [n for n in before if not torch.allclose(before[n], after[n], rtol=1e-2, atol=1e-6)]
        assert len(changed) > len(before) // 2


def test_failed_merge_leaves_no_adapter_folder(chat_llama, tmp_path, monkeypatch, capsys):
    """The adapter, its log and the merged copy appear together or not at all."""
    import compressor.finetune as finetune

    def failing_merge(*args, **kwargs):
        raise KeyboardInterrupt  # as if Ctrl-C landed while the merged copy was being written

    monkeypatch.setattr(finetune, "merge_adapter", failing_merge)
    train = _write_jsonl(tmp_path / "train.jsonl", _titles(4))
    out = tmp_path / "adapter"
    argv = ["finetune", str(chat_llama), "--dataset", str(train), "-o", str(out), "--steps", "1", "--merge"]
    assert main(argv) == 130
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"], "a staging folder was left beside OUT"


def test_lora_on_a_compressed_output_trains_through_its_packed_weights(chat_llama, tmp_path):
    """`compress finetune OUT` on our own W4 output (no --qlora): the QuantLinear layers stay packed
    and frozen, gradients pass through them to the adapters; the adapter loads with peft on the
    dequantized OUT, and `--merge` equals it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import compressor
    from compressor.adapters import apply_adapter

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: w4\ncalibration: {samples: 4, seq_len: 32}\nstages:\n"
                      "  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}}\n")
    w4 = tmp_path / "w4"
    assert main([str(chat_llama), "--recipe", str(recipe), "-o", str(w4), "-q", "--no-perplexity"]) == 0
    packed = {p.name: p.read_bytes() for p in w4.iterdir() if p.is_file()}
    train = _write_jsonl(tmp_path / "train.jsonl", _titles(8))
    out = tmp_path / "adapter"
    argv = ["finetune", str(w4), "--dataset", str(train), "-o", str(out), "--steps", "4", "--lr", "0.05", "--r", "8",
            "--alpha", "16", "--batch-size", "8", "--eval-dataset", str(train), "--merge", "--log-every", "0", "-q"]
    assert main(argv) == 0
    assert {p.name: p.read_bytes() for p in w4.iterdir() if p.is_file()} == packed  # OUT untouched
    log = json.loads((out / "training.json").read_text())
    assert log["eval_loss_after"] < log["eval_loss_before"] - 0.1
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(w4)
    assert len(config["target_modules"]) == 14 and not any("lm_head" in t for t in config["target_modules"])

    ids = torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2]])
    dense = AutoModelForCausalLM.from_pretrained(str(w4), quantization_config=CompressedTensorsConfig(dequantize=True))
    ours = compressor.load(w4)
    apply_adapter(ours, out)
    with torch.no_grad():
        base_only = dense.eval()(input_ids=ids).logits.float()
        through_peft = PeftModel.from_pretrained(dense, str(out)).eval()(input_ids=ids).logits.float()
        merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()(input_ids=ids).logits.float()
        through_ours = ours.eval()(input_ids=ids).logits.float()
    scale = through_peft.abs().max()
    assert (through_peft - base_only).abs().max() > 0.1 * scale  # the adapter matters
    assert (merged - through_peft).abs().max() < 0.05 * scale  # W + BA rounded to bf16
    assert (through_ours - through_peft).abs().max() < 0.02 * scale


def test_epochs_count_the_steps_and_rank_is_an_alias_of_r(chat_llama, tmp_path, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", _titles(6))  # 6 examples in batches of 4: 2 steps an epoch
    out = tmp_path / "adapter"
    argv = ["finetune", str(chat_llama), "--dataset", str(train), "-o", str(out), "--epochs", "2", "--batch-size", "4",
            "--rank", "4", "--alpha", "8", "--log-every", "0", "-q", "--no-gradient-checkpointing"]
    assert main(argv) == 0
    log = json.loads((out / "training.json").read_text())
    assert len(log["losses"]) == 4 and log["options"]["steps"] == 4 and log["options"]["epochs"] == 2
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    # a warm-up is checked against the steps the epochs make, before any weight is read
    code = main([*argv[:5], str(tmp_path / "o2"), *argv[6:], "--warmup-steps", "4"])
    assert code == 2 and "--warmup-steps: must be fewer than the steps (4), got 4" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_a_pad_token_the_embedding_lacks_is_not_fed_to_the_model(tiny_qwen2, tmp_path):
    """transformers' Qwen2Tokenizer adds `<|endoftext|>` as the pad token past this tiny vocabulary;
    padding with it stopped the run with an index error at the first padded batch."""
    from transformers import AutoConfig, AutoTokenizer

    from compressor.finetune_data import embedding_rows, padding_id

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2))
    rows = embedding_rows(AutoConfig.from_pretrained(str(tiny_qwen2)))
    assert tokenizer.pad_token_id >= rows  # the trap this test is about
    assert padding_id(tokenizer, rows) == tokenizer.eos_token_id
    train = _write_jsonl(tmp_path / "train.jsonl", _titles(4))  # answers of different lengths: padded batches
    out = tmp_path / "adapter"
    assert main(["finetune", str(tiny_qwen2), "--dataset", str(train), "-o", str(out), "--steps", "2", "--batch-size", "4",
                 "--r", "4", "--log-every", "0", "-q", "--no-gradient-checkpointing"]) == 0
    log = json.loads((out / "training.json").read_text())
    assert len(log["losses"]) == 2 and all(math.isfinite(loss) for loss in log["losses"])


def test_token_ids_the_model_does_not_embed_are_named(tiny_llama, tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    tokenizer.add_tokens(["<brand-new>"])  # added without resizing the model's embedding
    tokenizer.save_pretrained(str(model))
    train = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Give a title <brand-new>.", "completion": "Sparse"}])
    out = tmp_path / "adapter"
    assert main(["finetune", str(model), "--dataset", str(train), "-o", str(out), "--steps", "1", "-q"]) == 2
    err = capsys.readouterr().err
    new_id = tokenizer.convert_tokens_to_ids("<brand-new>")
    assert f"{train}: the tokenized data holds token id {new_id}, but the model embeds only {new_id} ids" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()

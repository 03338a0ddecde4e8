"""`compress finetune` options a peft + bitsandbytes QLoRA user expects: gradient accumulation,
step checkpoints and --resume, DoRA / rsLoRA, --optim (bitsandbytes), --lr-scheduler, and their
refusals before any weight is read."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor.cli import main
from tests.cli_runs import assert_one_line_refusal, compress_into, run_cli
from tests.test_finetune import _titles, _write_jsonl
from tests.tiny_models import build_tiny_checkpoint

ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def fp32_qwen3(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """fp32 weights, so that batches split differently agree to float rounding."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("fp32-qwen3"), "qwen3", tiny_tokenizer_dir, dtype=torch.float32)


def _texts(path: Path, n: int) -> Path:
    """Plain-text examples of very different lengths (3 to ~40 tokens): micro-batches then hold
    different numbers of labelled tokens, which a mean of per-micro-batch means would mis-weight."""
    words = "sparse quantized models attention scaling language vision fast".split()
    records = [{"text": " ".join(words[(i + j) % 8] for j in range(1 + (i * 7) % 13 * 3))} for i in range(n)]
    return _write_jsonl(path, records)


def _train(model: Path, data: Path, out: Path, *flags: str) -> dict:
    argv = ["finetune", str(model), "--dataset", str(data), "-o", str(out), "--r", "8", "--alpha", "16",
            "--log-every", "0", "-q", "--no-gradient-checkpointing", *flags]
    assert main(argv) == 0
    return json.loads((out / "training.json").read_text())


# ------------------------------------------------------------------ gradient accumulation


def test_grad_accum_equals_one_bigger_batch(fp32_qwen3, tmp_path):
    data = _texts(tmp_path / "d.jsonl", 12)
    common = ("--steps", "3", "--lr", "0.01", "--dropout", "0", "--max-grad-norm", "0", "--warmup-steps", "0")
    forwards = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        # The inner Qwen3Model: peft before 0.21 calls the outer model's .forward directly, bypassing its hooks.
        lambda module, *_: forwards.append(1) if type(module).__name__ == "Qwen3Model" else None)
    try:
        whole = _train(fp32_qwen3, data, tmp_path / "whole", "--batch-size", "4", *common)
        counts = [len(forwards)]
        halves = _train(fp32_qwen3, data, tmp_path / "halves", "--batch-size", "2", "--grad-accum", "2", *common)
        counts.append(len(forwards) - sum(counts))
        singles = _train(fp32_qwen3, data, tmp_path / "singles", "--batch-size", "1", "--grad-accum", "4", *common)
        counts.append(len(forwards) - sum(counts))
    finally:
        handle.remove()
    assert counts == [3, 6, 12]  # micro-batches run: same 12 examples, same order
    reference = load_file(str(tmp_path / "whole" / ADAPTER))
    for name in ("halves", "singles"):
        log = halves if name == "halves" else singles
        assert log["losses"] == pytest.approx(whole["losses"], rel=1e-5)
        assert log["grad_norms"] == pytest.approx(whole["grad_norms"], rel=1e-4)
        assert log["options"]["grad_accum"] in (2, 4) and log["effective_batch_size"] == 4
        tensors = load_file(str(tmp_path / name / ADAPTER))
        for key, value in reference.items():
            torch.testing.assert_close(tensors[key], value, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
    assert whole["losses"][2] < whole["losses"][0]  # it trains
    card = (tmp_path / "singles" / "README.md").read_text()
    assert "effective batch 4: 1 × 4 accumulated × 1 processes" in card


def test_epochs_count_accumulated_steps(fp32_qwen3, tmp_path):
    data = _texts(tmp_path / "d.jsonl", 12)  # 12 micro-batches of 1 in groups of 5: 5, 5, 2 → 3 steps an epoch
    log = _train(fp32_qwen3, data, tmp_path / "o", "--epochs", "2", "--batch-size", "1", "--grad-accum", "5")
    assert log["options"]["steps"] == 6 and len(log["losses"]) == 6


# ------------------------------------------------------------------ checkpoints and --resume


class _InterruptAtStep:
    """Ctrl-C as the optimizer is about to take step `step` (a global pre-step hook)."""

    def __init__(self, step: int):
        self.step, self.seen = step, 0

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._handle = register_optimizer_step_pre_hook(self._count)
        return self

    def _count(self, *_):
        self.seen += 1
        if self.seen == self.step:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        self._handle.remove()


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_8bit"])
def test_interrupted_and_resumed_equals_uninterrupted(chat_llama, tmp_path, capsys, optim):
    """QLoRA with dropout, accumulation, a held-out curve and an epoch boundary: interrupted at
    step 5, resumed from the step-3 checkpoint (mid-epoch), the adapter is bit-identical."""
    data = _write_jsonl(tmp_path / "train.jsonl", _titles(6))  # batches of 2 in pairs: 3 micro-batches, 2 steps an epoch
    held_out = _write_jsonl(tmp_path / "held.jsonl", _titles(4, offset=10))
    flags = ["--qlora", "--steps", "6", "--batch-size", "2", "--grad-accum", "2", "--dropout", "0.2", "--lr", "0.02",
             "--eval-dataset", str(held_out), "--eval-every", "2", "--save-every", "3", "--optim", optim, "--r", "32"]
    reference = _train(chat_llama, data, tmp_path / "ref", *flags)
    assert not (tmp_path / ".ref.work").exists()  # the checkpoints go once the adapter is in place

    out = tmp_path / "adapter"
    argv = ["finetune", str(chat_llama), "--dataset", str(data), "-o", str(out), "--r", "8", "--alpha", "16",
            "--log-every", "0", "-q", "--no-gradient-checkpointing", *flags]
    capsys.readouterr()
    with _InterruptAtStep(5):
        assert main(argv) == 130
    assert not out.exists(), "an interrupted run left an adapter folder"
    work = tmp_path / ".adapter.work"
    assert "--resume" in capsys.readouterr().err
    assert json.loads((work / "finetune" / "state.json").read_text())["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter")) == [".adapter.work"]

    assert main([*argv, "--resume"]) == 0
    assert "resume: continuing after step 3" in capsys.readouterr().out
    resumed = json.loads((out / "training.json").read_text())
    assert resumed["resumed_from"] == 3 and not work.exists()
    expected = load_file(str(tmp_path / "ref" / ADAPTER))
    got = load_file(str(out / ADAPTER))
    assert got.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []
    for key in ("losses", "grad_norms", "learning_rates", "eval_curve", "eval_loss_before", "eval_loss_after"):
        assert resumed[key] == reference[key], key
    assert "after step 3 (from a `--save-every` checkpoint)" in (out / "README.md").read_text()


def test_resume_with_other_options_starts_over(chat_llama, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "train.jsonl", _titles(4))
    argv = ["finetune", str(chat_llama), "--dataset", str(data), "-o", str(tmp_path / "a"), "--steps", "3", "--save-every", "1",
            "--batch-size", "2", "--log-every", "0", "-q", "--no-gradient-checkpointing"]
    assert main([*argv[:5], str(tmp_path / "fresh"), *argv[6:], "--resume"]) == 0  # nothing to resume: a notice, step 1
    assert "resume: no step checkpoint in " in capsys.readouterr().out
    assert json.loads((tmp_path / "fresh" / "training.json").read_text())["resumed_from"] == 0
    with _InterruptAtStep(3):
        assert main(argv) == 130
    assert json.loads((tmp_path / ".a.work" / "finetune" / "state.json").read_text())["step"] == 2
    capsys.readouterr()
    assert main([*argv, "--lr", "0.001", "--resume"]) == 0
    assert "was made with other options, model or data; starting over" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "training.json").read_text())["resumed_from"] == 0


# ------------------------------------------------------------------ DoRA and rsLoRA


def test_dora_rslora_on_nf4_merge_and_card(chat_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from compressor.adapters import apply_adapter
    from compressor.errors import ModelError
    from compressor.finetune import _quantization_config, keep_nf4_trainable_layout

    data = _write_jsonl(tmp_path / "train.jsonl", _titles(8))
    out = tmp_path / "dora"
    log = _train(chat_llama, data, out, "--qlora", "--use-dora", "--use-rslora", "--steps", "4", "--lr", "0.02",
                 "--batch-size", "4", "--merge")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    assert log["options"]["use_dora"] is True and log["options"]["use_rslora"] is True
    magnitudes = [k for k in load_file(str(out / ADAPTER)) if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 14  # one per adapted layer, trained and saved
    card = (out / "README.md").read_text()
    assert "DoRA (weight-decomposed" in card and "alpha/√r (rank-stabilized" in card
    assert "- dora" in card and "- rslora" in card

    ids = torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2]])
    nf4 = AutoModelForCausalLM.from_pretrained(str(chat_llama), quantization_config=_quantization_config(), device_map={"": "cpu"})
    # Else bitsandbytes repacks the NF4 weights at the first no-grad forward, and peft's DoRA,
    # which dequantizes them for its weight norm, reads the repacked bytes (~12 % off here).
    keep_nf4_trainable_layout(nf4)
    with torch.no_grad():
        trained = PeftModel.from_pretrained(nf4, str(out)).eval()(input_ids=ids).logits.float()
        merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()(input_ids=ids).logits.float()
        base = AutoModelForCausalLM.from_pretrained(str(chat_llama)).eval()(input_ids=ids).logits.float()
    scale = trained.abs().max()
    assert (trained - base).abs().max() > 0.02 * scale  # the adapter matters
    assert (merged - trained).abs().max() < 0.02 * scale  # merged into the dequantized NF4 base: what was trained

    with pytest.raises(ModelError, match="a DoRA adapter .use_dora. is no added low-rank term"):
        apply_adapter(AutoModelForCausalLM.from_pretrained(str(chat_llama)), out)


def test_rslora_adapter_through_apply_adapter_equals_peft(fp32_qwen3, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from compressor.adapters import apply_adapter

    data = _texts(tmp_path / "d.jsonl", 8)
    out = tmp_path / "rs"
    _train(fp32_qwen3, data, out, "--use-rslora", "--steps", "3", "--lr", "0.05", "--r", "16", "--alpha", "8")
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is True
    ids = torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2]])
    ours = AutoModelForCausalLM.from_pretrained(str(fp32_qwen3)).eval()
    assert apply_adapter(ours, out) == 14
    with torch.no_grad():
        through_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(fp32_qwen3)), str(out)).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(fp32_qwen3)).eval()(input_ids=ids).logits
        through_ours = ours(input_ids=ids).logits
    assert (through_peft - base).abs().max() > 1e-3  # trained away from the base
    torch.testing.assert_close(through_ours, through_peft, rtol=1e-4, atol=1e-5)  # alpha/sqrt(r), not alpha/r


# ------------------------------------------------------------------ optimizers and schedules


def test_adamw_8bit_is_bitsandbytes_with_8bit_state(fp32_qwen3, tmp_path):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    data = _texts(tmp_path / "d.jsonl", 8)
    seen: list[tuple[str, set]] = []

    def record(optimizer, *_):
        seen.append((type(optimizer).__module__ + "." + type(optimizer).__name__,
                     {v.dtype for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)}))

    handle = register_optimizer_step_post_hook(record)
    try:  # r 64: lora_A of down_proj has 64 × 128 elements, over bitsandbytes' 4096 minimum for 8-bit state
        log = _train(fp32_qwen3, data, tmp_path / "o", "--optim", "adamw_8bit", "--steps", "4", "--lr", "0.01",
                     "--r", "64", "--weight-decay", "0.01", "--batch-size", "4")
    finally:
        handle.remove()
    assert len(seen) == 4 and all(name == "bitsandbytes.optim.adamw.AdamW8bit" for name, _ in seen), seen
    assert torch.uint8 in seen[-1][1] and torch.float32 in seen[-1][1]
    assert log["losses"][-1] < log["losses"][0]
    assert log["options"]["optim"] == "adamw_8bit" and log["options"]["weight_decay"] == 0.01
    assert "AdamW, 8-bit state (bitsandbytes AdamW8bit), weight decay 0.01" in (tmp_path / "o" / "README.md").read_text()


@pytest.mark.parametrize("schedule, factors", [("linear", [0.0, 1.0, 2 / 3, 1 / 3]), ("constant", [0.0, 1.0, 1.0, 1.0])])
def test_lr_scheduler(schedule, factors, fp32_qwen3, tmp_path):
    data = _texts(tmp_path / "d.jsonl", 4)
    log = _train(fp32_qwen3, data, tmp_path / "o", "--steps", "4", "--warmup-steps", "1", "--lr", "0.01", "--lr-scheduler", schedule)
    assert log["learning_rates"] == pytest.approx([0.01 * f for f in factors], abs=1e-12)
    assert f"{schedule} schedule" in (tmp_path / "o" / "README.md").read_text()


# ------------------------------------------------------------------ refusals before any weight is read


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--grad-accum", "0"], ["--grad-accum"]),
        (["--save-every", "-1"], ["--save-every"]),
        (["--weight-decay", "-0.1"], ["--weight-decay"]),
        (["--lr-scheduler", "cosine_restarts"], ["--lr-scheduler", "invalid choice"]),
        (["--optim", "sgd"], ["--optim", "invalid choice", "paged_adamw_8bit"]),
        (["--optim", "paged_adamw_8bit"], ["--optim: paged_adamw_8bit pages its state through CUDA unified memory",
                                           "adamw_8bit is the same optimizer without paging"]),
    ],
)
def test_bad_flags_are_one_line_before_loading(flags, fragments, chat_llama, tmp_path, capsys, monkeypatch):
    import compressor.finetune as finetune

    monkeypatch.setattr(finetune, "_load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # paged optimizers: as on this machine
    data = _write_jsonl(tmp_path / "d.jsonl", _titles(2))
    code, err = run_cli(["finetune", chat_llama, "--dataset", data, "-o", tmp_path / "o", *flags], capsys)
    assert_one_line_refusal(code, err, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # no output, no work folder


def test_dora_on_packed_layers_is_refused_before_loading(chat_llama, tmp_path, capsys, monkeypatch):
    import compressor.finetune as finetune

    w4 = compress_into(chat_llama, "name: w4\ncalibration: {samples: 4, seq_len: 32}\nstages:\n  - quantize: {method: rtn}\n", tmp_path)
    monkeypatch.setattr(finetune, "_load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    data = _write_jsonl(tmp_path / "d.jsonl", _titles(2))
    code, err = run_cli(["finetune", w4, "--use-dora", "--dataset", data, "-o", tmp_path / "o"], capsys)
    assert_one_line_refusal(code, err, "--use-dora", "packed layers have no float weight")
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.work").exists()


def test_optimizer_registry_runs_every_unpaged_choice_here():
    """Every name this machine accepts builds bitsandbytes' (or torch's) class and steps on CPU."""
    from compressor.training.optimizers import OPTIMIZERS, build_optimizer, optimizer_problem

    runnable = [name for name in OPTIMIZERS if optimizer_problem(name, cuda_available=False, has_bitsandbytes=True) is None]
    assert sorted(runnable) == ["adamw_8bit", "adamw_bnb_8bit", "adamw_torch", "lion_32bit", "lion_8bit"]
    for name in runnable:
        parameter = torch.nn.Parameter(torch.ones(8, 1024))
        optimizer = build_optimizer(name, [parameter], lr=0.1, weight_decay=0.0)
        parameter.grad = torch.ones_like(parameter)
        optimizer.step()
        assert torch.all(parameter < 1) and math.isfinite(float(parameter.sum())), name


def test_interrupt_while_merging_keeps_the_checkpoint_for_resume(chat_llama, tmp_path, capsys, monkeypatch):
    import compressor.finetune as finetune

    real_merge = finetune.merge_adapter

    def interrupted_merge(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the merged copy is written

    monkeypatch.setattr(finetune, "merge_adapter", interrupted_merge)
    data = _write_jsonl(tmp_path / "train.jsonl", _titles(4))
    out = tmp_path / "adapter"
    argv = ["finetune", str(chat_llama), "--dataset", str(data), "-o", str(out), "--steps", "3", "--save-every", "2",
            "--batch-size", "2", "--log-every", "0", "-q", "--no-gradient-checkpointing", "--merge"]
    assert main(argv) == 130
    assert not out.exists()
    assert "the checkpoint after step 2 is kept there; repeat the command with --resume" in capsys.readouterr().err
    monkeypatch.setattr(finetune, "merge_adapter", real_merge)
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "training.json").read_text())["resumed_from"] == 2 and (out / "merged" / "config.json").is_file()

"""`--resume` continues from the last completed stage and gives byte-identical output.

The main test kills a real `compress` process (SIGKILL) as it starts stage 3 of a
gptq → rtn → distill recipe, resumes, and compares the sha256 of every output file with two
uninterrupted runs (which must agree with each other too). The other tests interrupt
in-process right after a stage checkpoint was written (the KeyboardInterrupt that SIGINT
raises) to check a changed recipe, a prune stage's module attributes, and the fallbacks
when a state cannot be reloaded exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.cli import main
from compressor.registry import Registry
from compressor.resume import LoopState, StageCheckpoints
from compressor.stages.base import StageContext

THREE_STAGES = """name: three-stage
calibration: {samples: 16, seq_len: 64}
stages:
  - quantize: {method: gptq, weights: {bits: 4, group_size: 32}, targets: ["re:.*mlp.*"]}
  - quantize: {method: rtn, weights: {bits: 8, group_size: null}, targets: ["re:.*self_attn.*"]}
  - distill: {loss: {kind: kl}, steps: 4, lr: 1.0e-3, batch_size: 4, train: scales, checkpoint_every: 2}
"""

PRUNE_THEN_QUANTIZE = """name: prune-then-rtn
calibration: {samples: 4, seq_len: 32}
stages:
  - prune: {method: magnitude, sparsity: "2:4", targets: ["re:.*mlp.*"]}
  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}, targets: ["re:.*self_attn.*"]}
"""

TWO_RTN = """name: two-rtn
calibration: {samples: 4, seq_len: 32}
stages:
  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}, targets: ["re:.*mlp.*"]}
  - quantize: {method: rtn, weights: {bits: BITS, group_size: null}, targets: ["re:.*self_attn.*"]}
"""

# Everything in OUT but the two files that record the run itself (command line, timings).
RUN_RECORDS = {"compression.json", "README.md"}


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.name not in RUN_RECORDS}


def compress(model: Path, recipe: Path, out: Path, *extra: str) -> int:
    return main([str(model), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity", *extra])


def workdir(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def write_recipe(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    recipe = tmp_path / name
    recipe.write_text(text)
    return recipe


def resumed(model: Path, recipe: Path, out: Path, capsys) -> str:
    """What `compress ... --resume` printed (earlier output dropped); asserts that it succeeded."""
    capsys.readouterr()
    assert compress(model, recipe, out, "--resume") == 0
    return capsys.readouterr().out


@pytest.fixture
def interrupted_run(monkeypatch):
    """`interrupted_run(model, recipe, out, *flags)`: run `compress`, stopped like Ctrl-C right
    after stage 1's checkpoint was written, and assert exit 130. Runs after it are not interrupted."""
    original, armed = StageCheckpoints.save, {"now": False}

    def save_then_interrupt(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == 0 and armed["now"]:
            raise KeyboardInterrupt

    monkeypatch.setattr(StageCheckpoints, "save", save_then_interrupt)

    def run(model: Path, recipe: Path, out: Path, *flags: str) -> None:
        armed["now"] = True
        try:
            assert compress(model, recipe, out, *flags) == 130
        finally:
            armed["now"] = False

    return run


def test_killed_run_resumes_byte_identical(tiny_llama, tmp_path, capsys):
    recipe = write_recipe(tmp_path, THREE_STAGES)
    reference = []
    for name in ("a", "b"):  # determinism: two uninterrupted runs agree
        assert compress(tiny_llama, recipe, tmp_path / name) == 0
        reference.append(digests(tmp_path / name))
    assert reference[0] == reference[1]
    assert "model.safetensors" in reference[0] and "config.json" in reference[0]
    capsys.readouterr()

    out = tmp_path / "runs" / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "compressor.cli", str(tiny_llama), "-r", str(recipe), "-o", str(out), "-q", "--no-perplexity"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("stage 3/3"):  # stage 2's checkpoint is in place before this line
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=300)
    assert process.returncode == -signal.SIGKILL and not out.exists()
    kept = sorted(p.name for p in workdir(out).iterdir() if p.name.startswith("stage-"))
    assert "stage-2" in kept and "stage-1" not in kept, kept  # only the newest checkpoint is kept

    printed = resumed(tiny_llama, recipe, out, capsys)
    assert "resume: stages 1-2 of 3 restored" in printed
    assert "stage 1/3: quantize skipped" in printed and "stage 2/3: quantize skipped" in printed
    assert "stage 1/3: quantize (gptq)" not in printed and "stage 3/3: distill (kl)" in printed
    assert digests(out) == reference[0]
    assert not workdir(out).exists()


def test_prune_attributes_survive_resume(tiny_llama, tmp_path, capsys, interrupted_run):
    recipe = write_recipe(tmp_path, PRUNE_THEN_QUANTIZE)
    assert compress(tiny_llama, recipe, tmp_path / "ref") == 0
    out = tmp_path / "out"
    interrupted_run(tiny_llama, recipe, out)
    attributes = (workdir(out) / "stage-1" / "run-state" / "attributes.json").read_text()
    assert "sparsity_structure" in attributes  # dense pruned layers keep what the final save packs by
    assert "resume: stages 1-1 of 2 restored" in resumed(tiny_llama, recipe, out, capsys)
    assert digests(out) == digests(tmp_path / "ref")
    assert any("weight_bitmask" in name for name in _tensor_names(out))


def _tensor_names(out: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


def test_changed_recipe_starts_over(tiny_llama, tmp_path, capsys, interrupted_run):
    recipe = write_recipe(tmp_path, TWO_RTN.replace("BITS", "8"))
    out = tmp_path / "out"
    interrupted_run(tiny_llama, recipe, out)
    assert (workdir(out) / "stage-1" / "done.json").is_file()
    recipe.write_text(TWO_RTN.replace("BITS", "4"))
    printed = resumed(tiny_llama, recipe, out, capsys)
    assert "made by a different recipe, model or calibration data; starting over" in printed
    assert "stage 1/2: quantize (rtn)" in printed and "skipped" not in printed
    assert compress(tiny_llama, recipe, tmp_path / "ref") == 0
    assert digests(out) == digests(tmp_path / "ref")


def test_without_checkpoints_resume_reruns_everything(tiny_llama, tmp_path, capsys, interrupted_run):
    recipe = write_recipe(tmp_path, TWO_RTN.replace("BITS", "8"))
    out = tmp_path / "out"
    interrupted_run(tiny_llama, recipe, out, "--no-stage-checkpoints")
    assert not workdir(out).exists()
    printed = resumed(tiny_llama, recipe, out, capsys)
    assert "no completed stage to continue from; running every stage" in printed
    assert "stage 1/2: quantize (rtn)" in printed


def _no_builders() -> Registry:
    return Registry("compressed-tensors format").freeze()


def test_format_without_builder_is_never_checkpointed(tiny_llama, tmp_path, capsys, monkeypatch, interrupted_run):
    recipe = write_recipe(tmp_path, TWO_RTN.replace("BITS", "8"))
    assert compress(tiny_llama, recipe, tmp_path / "ref") == 0
    monkeypatch.setattr("compressor.runtime.format_builders", _no_builders)
    out = tmp_path / "out"
    capsys.readouterr()
    interrupted_run(tiny_llama, recipe, out)
    notice = capsys.readouterr().out
    assert "checkpoint: no stage checkpoint after stage 1 (cannot be reloaded" in notice and "pack-quantized" in notice
    assert not list(workdir(out).glob("stage-1*"))
    assert "running every stage" in resumed(tiny_llama, recipe, out, capsys)
    assert digests(out) == digests(tmp_path / "ref")


def test_builder_gone_at_resume_reruns_from_start(tiny_llama, tmp_path, capsys, monkeypatch, interrupted_run):
    recipe = write_recipe(tmp_path, TWO_RTN.replace("BITS", "8"))
    out = tmp_path / "out"
    interrupted_run(tiny_llama, recipe, out)
    monkeypatch.setattr("compressor.runtime.format_builders", _no_builders)  # no builder for the saved format
    printed = resumed(tiny_llama, recipe, out, capsys)
    assert "resume: stage-1 cannot be reloaded" in printed and "running every stage" in printed
    assert "stage 1/2: quantize (rtn)" in printed


def _checkpoints(tmp_path: Path, lines: list[str]) -> StageCheckpoints:
    return StageCheckpoints(tmp_path / "work", {"k": 1}, ["prune", "quantize"], enabled=True, resume=True, echo=lines.append)


def test_unsaved_module_state_refuses_the_checkpoint(tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    model.model.layers[0].mlp.up_proj.calibration_cache = {"rows": torch.zeros(2)}  # not in any saved file
    lines: list[str] = []
    ctx = StageContext(tokenizer=None, calibration=lambda: torch.zeros(1), device=torch.device("cpu"))
    checkpoints = _checkpoints(tmp_path, lines)
    checkpoints.save(0, model, ctx, LoopState([], [], []))
    assert lines == ["checkpoint: no stage checkpoint after stage 1 (model.layers.0.mlp.up_proj.calibration_cache (dict) is not saved); --resume re-runs it"]
    assert not list((tmp_path / "work").iterdir())
    restored, first = checkpoints.restore(model, ctx, LoopState([], [], []))
    assert restored is model and first == 0


def test_restore_brings_back_attributes_flags_and_records(tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    model.model.layers[1].mlp.down_proj.sparsity_structure = "2:4"
    model.lm_head.weight.requires_grad_(False)
    ctx = StageContext(tokenizer=None, calibration=lambda: torch.zeros(1), device=torch.device("cpu"))
    ctx.records["model.layers.1.mlp.down_proj"] = {"stage": "prune"}
    lines: list[str] = []
    checkpoints = _checkpoints(tmp_path, lines)
    checkpoints.save(0, model, ctx, LoopState([{"kind": "prune"}], [1.5], []))
    assert lines == [] and (tmp_path / "work" / "stage-1" / "done.json").is_file()
    fresh_ctx = StageContext(tokenizer=None, calibration=lambda: torch.zeros(1), device=torch.device("cpu"))
    loop = LoopState([], [], [])
    restored, first = checkpoints.restore(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), fresh_ctx, loop)
    assert first == 1 and restored is not model
    assert restored.model.layers[1].mlp.down_proj.sparsity_structure == "2:4"
    assert not restored.lm_head.weight.requires_grad and restored.model.embed_tokens.weight.requires_grad is False
    assert fresh_ctx.records == ctx.records and loop.stage_log == [{"kind": "prune"}] and loop.stage_seconds == [1.5]
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, restored.state_dict()[key]), key
    shutil.rmtree(tmp_path / "work")


QUANTIZE_THEN_DISTILL = """name: rtn-rtn-distill
calibration: {samples: 8, seq_len: 32}
stages:
  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}, targets: ["re:.*mlp.*"]}
  - quantize: {method: rtn, weights: {bits: 8, group_size: null}, targets: ["re:.*self_attn.*"]}
  - distill: {loss: {kind: kl}, steps: 4, lr: 1.0e-3, batch_size: 4, train: scales, checkpoint_every: 2}
"""


def test_interrupted_inside_distill_resumes_stage_and_training(tiny_llama, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the distill stage's first training checkpoint: --resume restores stage 2's
    model, then the training continues from step 2; the result equals an uninterrupted run."""
    import compressor.training.distill_loop as loop_module

    recipe = write_recipe(tmp_path, QUANTIZE_THEN_DISTILL)
    assert compress(tiny_llama, recipe, tmp_path / "ref") == 0
    original = loop_module.save_training_checkpoint

    def save_then_interrupt(folder, *args, **kwargs):
        original(folder, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "save_training_checkpoint", save_then_interrupt)
    out = tmp_path / "out"
    assert compress(tiny_llama, recipe, out) == 130
    assert {"stage-2", "stage-3-distill"} <= {p.name for p in workdir(out).iterdir()}
    monkeypatch.setattr(loop_module, "save_training_checkpoint", original)
    assert "resume: stages 1-2 of 3 restored" in resumed(tiny_llama, recipe, out, capsys)
    record = json.loads((out / "compression.json").read_text())["training"]["stage-3-distill"]
    assert record["resumed_from"] == 2 and record["steps"] == 4
    log = json.loads((out / "stage-3-distill.json").read_text())  # the training log records the resume
    assert log["resumed_from_step"] == 2 and log["curve"] == json.loads((tmp_path / "ref" / "stage-3-distill.json").read_text())["curve"]
    after_resume, reference = digests(out), digests(tmp_path / "ref")
    del after_resume["stage-3-distill.json"], reference["stage-3-distill.json"]
    assert after_resume == reference and "model.safetensors" in after_resume


def test_interrupt_while_saving_a_stage_checkpoint_leaves_no_partial_folder(tiny_llama, tmp_path, capsys, monkeypatch):
    import compressor.resume as resume

    recipe = write_recipe(tmp_path, TWO_RTN.replace("BITS", "8"))

    def interrupted_save(model, folder):
        (folder / "model.safetensors").write_bytes(b"half")  # the save had begun
        raise KeyboardInterrupt

    monkeypatch.setattr(resume, "save_model_files", interrupted_save)
    out = tmp_path / "out"
    assert compress(tiny_llama, recipe, out) == 130
    assert not out.exists()
    assert not list(workdir(out).glob("stage-*")), "a half-written stage checkpoint was left"
    assert capsys.readouterr().err.strip() == "interrupted: the output was not written"  # nothing kept: no note


def test_interrupt_after_a_checkpoint_says_what_is_kept(tiny_llama, tmp_path, capsys, interrupted_run):
    recipe = write_recipe(tmp_path, TWO_RTN.replace("BITS", "8"))
    out = tmp_path / "out"
    capsys.readouterr()
    interrupted_run(tiny_llama, recipe, out)
    note, last = capsys.readouterr().err.strip().splitlines()
    assert note == f"{workdir(out).resolve()}: stages 1-1 are kept there; repeat the command with --resume to continue from stage 2"
    assert last == "interrupted: the output was not written"


MOE_PRUNE_THEN_QUANTIZE = """name: moe-prune-then-rtn
calibration: {samples: 4, seq_len: 32}
stages:
  - prune: {method: magnitude, sparsity: "2:4", storage: dense}
  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}}
"""


def test_pruned_moe_experts_resume_byte_identical(tiny_qwen2_moe, tmp_path, capsys, interrupted_run):
    # The prune stage splits the fused experts into Linears; a dense checkpoint of them loads fused,
    # so the checkpoint is split again on reload (before: "module tree differs", no checkpoint).
    recipe = write_recipe(tmp_path, MOE_PRUNE_THEN_QUANTIZE)
    assert compress(tiny_qwen2_moe, recipe, tmp_path / "ref") == 0
    out = tmp_path / "out"
    interrupted_run(tiny_qwen2_moe, recipe, out)
    assert (workdir(out) / "stage-1" / "done.json").is_file(), capsys.readouterr().out
    assert "resume: stages 1-1 of 2 restored" in resumed(tiny_qwen2_moe, recipe, out, capsys)
    assert digests(out) == digests(tmp_path / "ref")


def test_edited_calibration_file_starts_over(tiny_llama, tmp_path, capsys, interrupted_run):
    # The recipe names the file, not its contents: stage 1 calibrated on the old text must not be
    # combined with stage 2 on the new one.
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": f"old text number {i} about pruning"}) + "\n" for i in range(60)))
    recipe = write_recipe(tmp_path, f"name: t\ncalibration: {{dataset: {data}, samples: 4, seq_len: 32}}\nstages:\n"
                                    "  - prune: {method: wanda, sparsity: 0.5, targets: ['re:.*mlp.*']}\n"
                                    "  - prune: {method: wanda, sparsity: 0.5, targets: ['re:.*self_attn.*']}\n")
    out = tmp_path / "out"
    interrupted_run(tiny_llama, recipe, out)
    data.write_text("".join(json.dumps({"text": f"new words, {i} other tokens entirely!"}) + "\n" for i in range(80)))
    assert "calibration data; starting over" in resumed(tiny_llama, recipe, out, capsys)
    assert compress(tiny_llama, recipe, tmp_path / "ref") == 0
    assert digests(out) == digests(tmp_path / "ref")

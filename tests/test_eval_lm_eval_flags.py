"""`compress eval` with lm-eval's own options: --apply-chat-template, --fewshot-as-multiturn,
--system-instruction, --gen-kwargs, --seed, --batch-size auto, --log-samples,
--confirm-run-unsafe-code; the same keys in a recipe's `evaluate:` block; the results cache
keyed on each of them.

lm-eval runs on tiny random models with a handful of documents; --log-samples shows the
prompts lm-eval built, which is how the chat template, the system instruction and the seeds
are checked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from compressor.cli import main
from compressor.evaluation.options import LmEvalOptions, parse_batch_size, parse_gen_kwargs, parse_seed
from tests.cli_runs import assert_one_line_refusal, run_cli

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TERSE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"


def _with_chat_template(source: Path, folder: Path, template) -> Path:
    shutil.copytree(source, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def chat_model(tiny_llama, tmp_path_factory) -> Path:
    return _with_chat_template(tiny_llama, tmp_path_factory.mktemp("chat") / "m", CHATML)


@pytest.fixture(scope="module")
def named_templates_model(tiny_llama, tmp_path_factory) -> Path:
    return _with_chat_template(tiny_llama, tmp_path_factory.mktemp("named") / "m", {"default": CHATML, "terse": TERSE})


def _count_loads(monkeypatch) -> list[str]:
    from compressor.evaluation import loading

    loads: list[str] = []
    load_named = loading.load_named
    monkeypatch.setattr(loading, "load_named", lambda name, reference, **kw: loads.append(name) or load_named(name, reference, **kw))
    return loads


def _samples(out: Path, name: str, task: str) -> list[dict]:
    files = sorted((out / "samples" / name).glob(f"samples_{task}_*.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def _prompts(records: list[dict]) -> list[str]:
    """The context lm-eval built for each document (its first request's first argument)."""
    return [r["arguments"]["gen_args_0"]["arg_0"] for r in sorted(records, key=lambda r: r["doc_id"])]


# ---------------------------------------------------------------- bad values: one line, nothing loaded

@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--gen-kwargs", "temperature"], ["--gen-kwargs", "expected key=value pairs", "'temperature'"]),
        (["--gen-kwargs", "max_gen_toks=abc"], ["--gen-kwargs", "max_gen_toks must be a positive integer"]),
        (["--gen-kwargs", "do_sample=maybe"], ["--gen-kwargs", "do_sample must be true or false"]),
        (["--gen-kwargs", "temprature=0"], ["--gen-kwargs", "unknown generation key 'temprature'"]),
        (["--seed", "1,2,3,4,5"], ["--seed", "expected one seed or 4", "got 5"]),
        (["--seed", "x"], ["--seed", "'x' is not an integer"]),
        (["--seed", "-1"], ["--seed", "'-1' is not an integer ≥ 0"]),
        (["--batch-size", "foo"], ["--batch-size", "auto or auto:N, got 'foo'"]),
        (["--batch-size", "auto:0"], ["--batch-size", "got 'auto:0'"]),
        (["--batch-size", "0"], ["--batch-size", "got '0'"]),
        (["--fewshot-as-multiturn"], ["--fewshot-as-multiturn", "needs a chat template"]),
        (["--gen_kwargs=temperature=0"], ["unrecognized arguments: --gen_kwargs", "this command spells it --gen-kwargs"]),
    ],
)
def test_bad_lm_eval_flags_are_one_line_before_any_work(tiny_llama, tmp_path, capsys, monkeypatch, flags, fragments):
    loads = _count_loads(monkeypatch)
    code, err = run_cli(["eval", f"a={tiny_llama}", "--tasks", "perplexity", "-o", tmp_path / "o", *flags], capsys)
    assert_one_line_refusal(code, err, *fragments)
    assert loads == [] and list(tmp_path.iterdir()) == []


def test_a_chat_template_the_tokenizer_lacks_is_refused_before_any_model_loads(tiny_llama, chat_model, named_templates_model,
                                                                               tmp_path, capsys, monkeypatch):
    loads = _count_loads(monkeypatch)
    argv = ["eval", f"chat={chat_model}", f"plain={tiny_llama}", "--tasks", "perplexity", "-o", tmp_path / "o"]
    code, err = run_cli(argv + ["--apply-chat-template"], capsys)
    assert_one_line_refusal(code, err, "--apply-chat-template: model 'plain'", "tokenizer has no chat template")
    code, err = run_cli(["eval", f"m={named_templates_model}", "--tasks", "perplexity", "-o", tmp_path / "o",
                         "--apply-chat-template", "nosuch"], capsys)
    assert_one_line_refusal(code, err, "no chat template named 'nosuch'", "default, terse")
    code, err = run_cli(["eval", f"m={chat_model}", "--tasks", "perplexity", "-o", tmp_path / "o", "--apply-chat-template", "terse"], capsys)
    assert_one_line_refusal(code, err, "one chat template, not named ones")
    assert loads == [] and list(tmp_path.iterdir()) == []


def test_option_parsers_read_values_as_lm_eval_does():
    assert parse_seed("42") == (42, 42, 42, 42)  # one value seeds all four, as lm-eval's --seed
    assert parse_seed("0,None,8,52") == (0, None, 8, 52)
    assert parse_seed("1,2,3") == (1, 2, 3, 1234)  # lm-eval fills the few-shot seed with its default
    assert parse_seed([5, None, 6, 7]) == (5, None, 6, 7)
    assert parse_gen_kwargs("temperature=0,max_gen_toks=64,do_sample=false,until='Q:'") == {
        "temperature": 0, "max_gen_toks": 64, "do_sample": False, "until": "Q:"
    }
    assert parse_batch_size("auto") == "auto" and parse_batch_size("auto:4") == "auto:4" and parse_batch_size("16") == 16


# ---------------------------------------------------------------- prompts as lm-eval builds them

def test_chat_template_system_instruction_and_multiturn_shape_the_prompts(chat_model, tmp_path):
    argv = ["eval", f"m={chat_model}", "--tasks", "abstracts_match", "--limit", "2", "--num-fewshot", "1", "--log-samples",
            "--system-instruction", "Be brief.", "-q", "--no-cache"]
    assert main(argv + ["--apply-chat-template", "-o", str(tmp_path / "multi")]) == 0
    records = _samples(tmp_path / "multi", "m", "abstracts_match")
    assert len(records) == 2
    for prompt in _prompts(records):
        assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAbstract: ")
        # the few-shot example is a user turn and an assistant turn, then the question's user turn
        assert prompt.count("<|im_start|>user\n") == 2 and prompt.count("<|im_start|>assistant\n") == 2
    report = json.loads((tmp_path / "multi" / "report.json").read_text())
    assert report["settings"]["apply_chat_template"] is True and report["settings"]["fewshot_as_multiturn"] is True
    assert report["settings"]["system_instruction"] == "Be brief."
    legend = (tmp_path / "multi" / "report.md").read_text()
    assert "the tokenizer's chat template, few-shot as multi-turn" in legend and 'system instruction "Be brief."' in legend
    lm_eval_run = json.loads(next((tmp_path / "multi" / "samples" / "m").glob("results_*.json")).read_text())
    assert lm_eval_run["chat_template"] == CHATML and lm_eval_run["system_instruction"] == "Be brief."

    assert main(argv + ["--apply-chat-template", "--no-fewshot-as-multiturn", "-o", str(tmp_path / "single")]) == 0
    for prompt in _prompts(_samples(tmp_path / "single", "m", "abstracts_match")):
        assert prompt.count("<|im_start|>user\n") == 1 and prompt.count("<|im_start|>assistant\n") == 1

    assert main(argv + ["-o", str(tmp_path / "plain")]) == 0  # no template: lm-eval puts the instruction before the text
    for prompt in _prompts(_samples(tmp_path / "plain", "m", "abstracts_match")):
        assert "<|im_start|>" not in prompt and prompt.startswith("Be brief.")
    assert "no chat template" in (tmp_path / "plain" / "report.md").read_text()


def test_a_named_chat_template_is_the_one_used(named_templates_model, tmp_path):
    argv = ["eval", f"m={named_templates_model}", "--tasks", "abstracts_match", "--limit", "1", "--log-samples", "-q", "--no-cache"]
    assert main(argv + ["--apply-chat-template", "terse", "-o", str(tmp_path / "terse")]) == 0
    assert _prompts(_samples(tmp_path / "terse", "m", "abstracts_match"))[0].startswith("[user] Abstract: ")
    assert main(argv + ["--apply-chat-template", "-o", str(tmp_path / "default")]) == 0
    assert _prompts(_samples(tmp_path / "default", "m", "abstracts_match"))[0].startswith("<|im_start|>user\nAbstract: ")


def test_log_samples_writes_each_model_and_task_even_when_results_are_cached(tiny_llama, tmp_path, capsys):
    model = tmp_path / "copy"
    shutil.copytree(tiny_llama, model)
    flags = ["--tasks", "perplexity,abstracts_match", "--limit", "3", "-q"]
    assert main(["eval", f"a={model}", *flags, "-o", str(tmp_path / "first")]) == 0
    assert not (tmp_path / "first" / "samples").exists()
    capsys.readouterr()
    assert main(["eval", f"a={model}", f"b={model}", *flags, "--log-samples", "-o", str(tmp_path / "logged")]) == 0
    printed = capsys.readouterr().out
    assert "from the results cache" not in printed  # the cache keeps no samples: both models run again
    for name in ("a", "b"):
        for task in ("perplexity", "abstracts_match"):
            records = _samples(tmp_path / "logged", name, task)
            assert len(records) == 3 and sorted(r["doc_id"] for r in records) == [0, 1, 2]
        assert len(list((tmp_path / "logged" / "samples" / name).glob("results_*.json"))) == 1
    match = _samples(tmp_path / "logged", "a", "abstracts_match")
    assert all(len(r["arguments"]) == 4 for r in match)  # one loglikelihood request per choice
    assert json.loads((tmp_path / "logged" / "report.json").read_text())["settings"]["log_samples"] is True


# ---------------------------------------------------------------- seeds, generation, batch size

def test_the_few_shot_seed_fixes_which_examples_are_drawn(tiny_llama, tmp_path):
    argv = ["eval", f"m={tiny_llama}", "--tasks", "abstracts_match", "--limit", "3", "--num-fewshot", "2", "--log-samples", "-q", "--no-cache"]
    prompts = {}
    for run, seed in (("a", "7"), ("b", "7"), ("c", "1,2,3")):
        assert main(argv + ["--seed", seed, "-o", str(tmp_path / run)]) == 0
        prompts[run] = _prompts(_samples(tmp_path / run, "m", "abstracts_match"))
    assert prompts["a"] == prompts["b"]
    assert prompts["a"] != prompts["c"]
    config = json.loads((tmp_path / "c" / "lm_eval_results" / "m.json").read_text())["config"]
    assert (config["random_seed"], config["numpy_seed"], config["torch_seed"], config["fewshot_seed"]) == (1, 2, 3, 1234)
    assert json.loads((tmp_path / "c" / "report.json").read_text())["settings"]["seed"]["fewshot"] == 1234


def _generation_task(folder: Path) -> Path:
    folder.mkdir()
    data = folder / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"Say {word}.", "a": word}) + "\n" for word in ("yes", "no", "maybe")))
    (folder / "say.yaml").write_text(
        f"task: say_word\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\noutput_type: generate_until\n"
        'test_split: test\ndoc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n'
        'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 16\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def test_gen_kwargs_reach_generate_until_tasks(tiny_llama, tmp_path):
    tasks = _generation_task(tmp_path / "tasks")
    argv = ["eval", f"m={tiny_llama}", "--tasks", "say_word", "--include-path", str(tasks), "--log-samples", "-q", "--no-cache"]
    assert main(argv + ["--gen-kwargs", "max_gen_toks=2,do_sample=false,temperature=0", "-o", str(tmp_path / "short")]) == 0
    raw = json.loads((tmp_path / "short" / "lm_eval_results" / "m.json").read_text())
    generation = raw["configs"]["say_word"]["generation_kwargs"]
    assert generation["max_gen_toks"] == 2 and generation["do_sample"] is False and generation["until"] == ["\n\n"]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    short = [r["resps"][0][0] for r in _samples(tmp_path / "short", "m", "say_word")]
    assert len(short) == 3 and all(len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 2 for text in short)
    assert json.loads((tmp_path / "short" / "report.json").read_text())["settings"]["gen_kwargs"]["max_gen_toks"] == 2

    assert main(argv + ["-o", str(tmp_path / "task")]) == 0  # without the flag: the task's own 16 tokens
    task_own = [r["resps"][0][0] for r in _samples(tmp_path / "task", "m", "say_word")]
    assert max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in task_own) > 2


def test_batch_size_auto_is_lm_evals(tiny_llama, tmp_path):
    argv = ["eval", f"m={tiny_llama}", "--tasks", "abstracts_match", "--limit", "2", "-q", "--no-cache"]
    assert main(argv + ["--batch-size", "auto", "--max-batch-size", "4", "-o", str(tmp_path / "r")]) == 0
    raw = json.loads((tmp_path / "r" / "lm_eval_results" / "m.json").read_text())
    assert raw["config"]["batch_size"] == "auto" and raw["config"]["batch_sizes"] == [4]  # no OOM on the CPU: the ceiling
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["settings"]["batch_size"] == "auto" and report["models"][0]["batch_sizes"] == [4]
    assert "batch size auto" in (tmp_path / "r" / "report.md").read_text()


def test_a_task_that_runs_model_code_needs_confirmation_before_any_model_loads(tiny_llama, tmp_path, capsys, monkeypatch):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "d.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i}?", "label": i % 2}) + "\n" for i in range(3)))
    (tasks / "unsafe.yaml").write_text(
        f"task: runs_code\nunsafe_code: true\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'output_type: multiple_choice\ntest_split: test\ndoc_to_text: "{{q}}"\ndoc_to_choice: ["a", "b"]\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    loads = _count_loads(monkeypatch)
    argv = ["eval", f"m={tiny_llama}", "--tasks", "runs_code", "--include-path", tasks, "--limit", "2", "-q", "--no-cache"]
    code, err = run_cli(argv + ["-o", tmp_path / "refused"], capsys)
    assert_one_line_refusal(code, err, "--tasks: task 'runs_code' runs code the model writes", "--confirm-run-unsafe-code")
    assert loads == [] and not (tmp_path / "refused").exists()
    assert main([str(a) for a in argv] + ["--confirm-run-unsafe-code", "-o", str(tmp_path / "ok")]) == 0
    assert "runs_code" in json.loads((tmp_path / "ok" / "report.json").read_text())["models"][0]["metrics"]


# ---------------------------------------------------------------- the results cache

def test_each_result_changing_option_is_in_the_cache_key():
    base = LmEvalOptions()
    variants = [
        LmEvalOptions(apply_chat_template=True, fewshot_as_multiturn=True),
        LmEvalOptions(apply_chat_template=True, fewshot_as_multiturn=False),
        LmEvalOptions(apply_chat_template="terse", fewshot_as_multiturn=True),
        LmEvalOptions(system_instruction="Be brief."),
        LmEvalOptions(gen_kwargs={"max_gen_toks": 8}),
        LmEvalOptions(seeds=(0, 1234, 1234, 7)),
    ]
    keys = {base.results_key(), *(v.results_key() for v in variants)}
    assert len(keys) == len(variants) + 1
    # samples and the unsafe-code confirmation change what is written or allowed, not the numbers
    assert LmEvalOptions(log_samples=True, confirm_run_unsafe_code=True).results_key() == base.results_key()


def test_results_without_a_chat_template_are_never_served_to_a_run_with_one(chat_model, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(chat_model, model)
    argv = ["eval", f"m={model}", "--tasks", "abstracts_match", "--limit", "1", "-q"]

    def evaluate(*flags: str) -> str:
        out = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        assert main(argv + list(flags) + ["-o", str(out)]) == 0
        return capsys.readouterr().out

    assert "m: running" in evaluate()
    assert "from the results cache" in evaluate()
    assert "m: running" in evaluate("--apply-chat-template")
    assert "from the results cache" in evaluate("--apply-chat-template")
    assert "m: running" in evaluate("--apply-chat-template", "--seed", "5")
    assert "m: running" in evaluate("--seed", "0,1234,1234,None")  # an unseeded few-shot draw is never cached...
    assert "m: running" in evaluate("--seed", "0,1234,1234,None")  # ...nor served
    # the template's text is in the key: the weights' identity does not cover tokenizer files
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    tokenizer.chat_template = CHATML.replace("<|im_start|>", "<|turn|>")
    tokenizer.save_pretrained(str(model))
    assert "m: running" in evaluate("--apply-chat-template")


# ---------------------------------------------------------------- the recipe's evaluate: block

RECIPE = "name: t\ncalibration: {samples: 4, seq_len: 64}\nstages:\n  - quantize: {method: rtn, ignore: [lm_head]}\nevaluate:\n  tasks: [abstracts_match]\n  limit: 2\n  %s\n"


def test_recipe_evaluate_takes_lm_eval_options_and_refuses_bad_values():
    from compressor.errors import RecipeError
    from compressor.recipe import parse_recipe_text

    body = ("apply_chat_template: true\n  system_instruction: Be brief.\n  gen_kwargs: {max_gen_toks: 8, until: ['Q:']}\n"
            "  seed: [1, null, 3, 4]\n  batch_size: auto:2\n  max_batch_size: 16\n  log_samples: true")
    spec = parse_recipe_text(RECIPE % body, source="r.yaml").evaluate
    options = spec.lm_eval_options()
    assert options.apply_chat_template is True and options.fewshot_as_multiturn is True  # lm-eval's default with a template
    assert options.gen_kwargs == {"max_gen_toks": 8, "until": ["Q:"]} and options.seeds == (1, None, 3, 4)
    assert spec.batch_size == "auto:2" and options.log_samples and options.system_instruction == "Be brief."
    assert parse_recipe_text(RECIPE % "gen_kwargs: temperature=0,max_gen_toks=4", source="r.yaml").evaluate.lm_eval_options(
    ).gen_kwargs == {"temperature": 0, "max_gen_toks": 4}
    assert parse_recipe_text(RECIPE % "seed: 9", source="r.yaml").evaluate.lm_eval_options().seeds == (9, 9, 9, 9)
    for bad, key, words in (
        ("seed: [1, 2, 3, 4, 5]", "seed", "got 5"),
        ("seed: true", "seed", "must be an integer"),
        ("gen_kwargs: temperature", "gen_kwargs", "key=value"),
        ("gen_kwargs: {max_gen_toks: 0}", "gen_kwargs", "positive integer"),
        ("gen_kwargs: {temprature: 0}", "gen_kwargs", "unknown generation key"),
        ("batch_size: foo", "batch_size", "auto:N"),
        ("batch_size: 0", "batch_size", ""),
        ("fewshot_as_multiturn: true", "fewshot_as_multiturn", "needs a chat template"),
        ("apply_chat_template: ''", "apply_chat_template", "template name"),
        ("log_samples: 'yes'", "log_samples", "true or false"),
        ("chat_template: true", "chat_template", "unknown key"),
    ):
        with pytest.raises(RecipeError) as info:
            parse_recipe_text(RECIPE % bad, source="r.yaml")
        assert info.value.format().startswith(f"r.yaml:8 evaluate.{key}:"), info.value.format()
        assert words in info.value.format(), info.value.format()


def test_recipe_chat_template_missing_from_the_tokenizer_is_refused_at_its_key(tiny_llama, tmp_path, capsys, monkeypatch):
    from compressor import pipeline

    loads = []
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: loads.append(a))
    (tmp_path / "r.yaml").write_text(RECIPE % "apply_chat_template: true")
    for extra in (["--dry-run"], []):
        code, err = run_cli([tiny_llama, "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "out", "-q", "--no-perplexity", *extra], capsys)
        assert_one_line_refusal(code, err, "r.yaml:8 evaluate.apply_chat_template:", "no chat template")
    assert loads == [] and not (tmp_path / "out").exists()


def test_recipe_evaluate_applies_the_template_and_logs_samples(chat_model, tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE % "apply_chat_template: true\n  log_samples: true\n  seed: 3")
    out = tmp_path / "out"
    assert main([str(chat_model), "--recipe", str(tmp_path / "r.yaml"), "-o", str(out), "-q", "--no-perplexity"]) == 0
    for name in ("base", "t"):
        prompts = _prompts(_samples(out / "eval", name, "abstracts_match"))
        assert len(prompts) == 2 and all(p.startswith("<|im_start|>user\nAbstract: ") for p in prompts)
    settings = json.loads((out / "eval" / "report.json").read_text())["settings"]
    assert settings["apply_chat_template"] is True and settings["seed"]["fewshot"] == 3 and settings["batch_size"] == 8


# ---------------------------------------------------------------- model code from the model's folder

def _custom_code_model(source: Path, folder: Path) -> Path:
    """The tiny Llama under a model type whose classes live in the checkpoint folder (`auto_map`)."""
    shutil.copytree(source, folder)
    (folder / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyCustomConfig(LlamaConfig):\n    model_type = 'tiny_custom'\n"
    )
    (folder / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyCustomConfig\n\n\n"
        "class TinyCustomForCausalLM(LlamaForCausalLM):\n    config_class = TinyCustomConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tiny_custom", architectures=["TinyCustomForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny.TinyCustomConfig", "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"
    })
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_model_code_in_the_checkpoint_needs_trust_remote_code_before_any_work(tiny_llama, tmp_path, capsys, monkeypatch):
    model = _custom_code_model(tiny_llama, tmp_path / "custom")
    loads = _count_loads(monkeypatch)
    argv = ["eval", f"m={model}", "--tasks", "perplexity", "--limit", "1", "-q", "--no-cache"]
    code, err = run_cli(argv + ["-o", tmp_path / "refused"], capsys)
    assert_one_line_refusal(code, err, "model 'm': this model's code lives in its repository; pass --trust-remote-code")
    assert loads == [] and not (tmp_path / "refused").exists()
    assert main(argv + ["--trust-remote-code", "-o", str(tmp_path / "ok")]) == 0
    assert loads == ["m"]
    assert json.loads((tmp_path / "ok" / "report.json").read_text())["models"][0]["metrics"]["perplexity"]

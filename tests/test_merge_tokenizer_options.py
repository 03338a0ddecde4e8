"""mergekit's `tokenizer:` block (source, tokens, pad_to_multiple_of) and `chat_template`, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from compressor.cli import main
from compressor.merging.chat_templates import BUILTIN_CHAT_TEMPLATES
from tests.merge_fixtures import perturbed_copy, recipe_text
from tests.tiny_models import VOCAB, build_tiny_checkpoint

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    """Three float32 tiny Qwen2 models (untied lm_head) sharing the tiny tokenizer."""
    root = tmp_path_factory.mktemp("tokenizer-options")
    a = build_tiny_checkpoint(root / "a", "qwen2", tiny_tokenizer_dir, dtype=torch.float32)
    return {"a": a, "b": perturbed_copy(a, root / "b", seed=1, scale=0.5), "c": perturbed_copy(a, root / "c", seed=2, scale=0.5)}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def mergekit(tmp_path: Path, text: str, name: str = "out") -> Path:
    (tmp_path / f"{name}.yml").write_text(text)
    assert main(["merge", str(tmp_path / f"{name}.yml"), str(tmp_path / name), "-q"]) == 0
    return tmp_path / name


def linear(m: dict[str, Path], *keys: str) -> str:
    listed = "".join(f"  - model: {m[k]}\n    parameters: {{weight: 1.0}}\n" for k in keys)
    return f"merge_method: linear\nmodels:\n{listed}"


def refused(tmp_path: Path, capsys, text: str, *fragments: str, native: bool = False) -> None:
    path = tmp_path / ("recipe.yaml" if native else "merge.yml")
    path.write_text(text)
    argv = ["--recipe", str(path)] if native else ["merge", str(path)]
    code = main([*argv, "-o", str(tmp_path / "refused"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "refused").exists()


def test_tokens_add_rows_from_a_model_token_zeros_and_pad(models, tmp_path):
    """New tokens join the output tokenizer; their rows come from where `tokens` says, the vocabulary
    is padded to a multiple of 64 with the mean token row, and config.json's vocab_size follows."""
    text = linear(models, "a", "b") + (
        f"tokenizer:\n  source: {models['a']}\n  pad_to_multiple_of: 64\n  tokens:\n"
        f'    "<|im_end|>": {{source: {{kind: model_token, model: {models["b"]}, token: "</s>"}}}}\n'
        '    "<|pad|>": {source: {kind: zero}}\n'
        f'    "</s>": {{source: {models["b"]}, force: true}}\n'
    )
    out = mergekit(tmp_path, text)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    vocab = tokenizer.get_vocab()
    im_end, pad = vocab["<|im_end|>"], vocab["<|pad|>"]
    assert VOCAB <= im_end and pad == im_end + 1 == len(vocab) - 1  # appended in the order written
    assert tokenizer("x<|im_end|>", add_special_tokens=False)["input_ids"][-1] == im_end
    rows = 448  # the tokens rounded up to a multiple of 64
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    merged, a, b = weights(out), weights(models["a"]), weights(models["b"])
    eos = vocab["</s>"]
    for name in VOCAB_TENSORS:
        assert merged[name].shape == (rows, a[name].shape[1])
        # Each input aligned to the output's tokens: its own rows, the forced and added rows, zeros elsewhere.
        aligned = []
        for own in (a[name], b[name]):
            rows_of = torch.zeros(len(vocab), own.shape[1])
            rows_of[:VOCAB] = own
            rows_of[eos] = b[name][eos]  # forced: every input takes b's row
            rows_of[im_end] = b[name][eos]  # model_token: b's row of </s>
            aligned.append(torch.cat([rows_of, rows_of.mean(dim=0).expand(rows - len(vocab), -1)]))  # padding: mean token row
        torch.testing.assert_close(merged[name], (aligned[0] + aligned[1]) / 2)
        torch.testing.assert_close(merged[name][eos], b[name][eos], rtol=0, atol=0)
        assert not merged[name][pad].any()
    record = json.loads((out / "compression.json").read_text())["merge"]
    assert record["tokens"] == ["<|im_end|>", "<|pad|>", "</s>"] and record["pad_to_multiple_of"] == 64
    assert main(["--recipe", str(out / "recipe.yaml"), "--dry-run", "-q"]) == 0  # the output's recipe plans again


def test_tokenizer_block_defaults_to_union_and_pads_without_other_changes(models, tmp_path):
    out = mergekit(tmp_path, linear(models, "a", "b") + "tokenizer:\n  pad_to_multiple_of: 100\n")
    record = json.loads((out / "compression.json").read_text())["merge"]
    assert record["tokenizer_source"] == "union"
    assert weights(out)["lm_head.weight"].shape[0] == 400
    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == AutoTokenizer.from_pretrained(str(models["a"])).get_vocab()


def test_tokenizer_block_errors_name_the_mergekit_line(models, tmp_path, capsys):
    both = linear(models, "a", "b") + "tokenizer_source: base\ntokenizer:\n  source: base\n"
    refused(tmp_path, capsys, both, "merge.yml:8", "not both")
    unknown = linear(models, "a", "b") + "tokenizer:\n  sauce: base\n"
    refused(tmp_path, capsys, unknown, "merge.yml:8", "tokenizer.sauce", "unknown tokenizer key")
    stranger = linear(models, "a", "b") + f'tokenizer:\n  tokens:\n    "<|x|>":\n      source: {models["c"]}\n'
    refused(tmp_path, capsys, stranger, "merge.yml:10", "tokenizer.tokens", "is not one of the merge's inputs")
    lacking = linear(models, "a", "b") + f'tokenizer:\n  tokens:\n    "<|x|>": {{source: {models["a"]}}}\n'
    refused(tmp_path, capsys, lacking, "merge.yml:9", "has no row for '<|x|>'")
    far = linear(models, "a", "b") + (
        f'tokenizer:\n  tokens:\n    "<|x|>":\n      source: {{kind: model_token, model: {models["a"]},\n        token_id: 999}}\n'
    )
    refused(tmp_path, capsys, far, "merge.yml:11", "token_id 999 is past")
    native = f"method: linear\nmodels:\n  - {{model: {models['a']}, weight: 1.0}}\npad_to_multiple_of: 64"
    refused(tmp_path, capsys, recipe_text(native), "recipe.yaml:7", "pad_to_multiple_of needs tokenizer_source", native=True)


@pytest.mark.parametrize("name", sorted(BUILTIN_CHAT_TEMPLATES))
def test_builtin_chat_templates_render_their_format(name, tmp_path, tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    text = tokenizer.apply_chat_template(CONVERSATION, chat_template=BUILTIN_CHAT_TEMPLATES[name], tokenize=False,
                                         add_generation_prompt=False)
    expected = {
        "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n",
        "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>"
                  "\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>",
        "mistral": "<s> [INST] Be brief.\n\nHi [/INST] Hello.</s>",
        "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello.",
        "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]Hi\n[|assistant|]Hello.[|endofturn|]\n",
    }[name]
    assert text == expected


def with_template(source: Path, target: Path, template: str | None) -> Path:
    perturbed_copy(source, target, seed=3, scale=0.0)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def test_chat_template_auto_name_and_jinja(models, tmp_path):
    one = "{% for m in messages %}ONE {{ m['content'] }}{% endfor %}"
    two = "{% for m in messages %}TWO {{ m['content'] }}{% endfor %}"
    x = with_template(models["a"], tmp_path / "x", two)
    y = with_template(models["b"], tmp_path / "y", one)
    z = with_template(models["c"], tmp_path / "z", one)
    listed = "".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in (x, y, z))
    config = f"merge_method: linear\nmodels:\n{listed}"

    auto = mergekit(tmp_path, config + "chat_template: auto\n", "auto")
    assert AutoTokenizer.from_pretrained(str(auto)).chat_template == one  # two of three inputs have it
    assert json.loads((auto / "compression.json").read_text())["merge"]["chat_template"] == f"auto: {y}'s (2 of 3 inputs)"

    named = mergekit(tmp_path, config + "chat_template: chatml\n", "named")
    tokenizer = AutoTokenizer.from_pretrained(str(named))
    assert tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False) == "<|im_start|>user\nHi<|im_end|>\n"

    custom = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    verbatim = mergekit(tmp_path, config + f"chat_template: {json.dumps(custom)}\n", "verbatim")
    assert AutoTokenizer.from_pretrained(str(verbatim)).chat_template == custom

    # A native recipe takes the same key.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(f"method: linear\nmodels:\n  - {{model: {x}, weight: 1.0}}\nchat_template: llama3"))
    assert main(["--recipe", str(recipe), "-o", str(tmp_path / "native"), "-q"]) == 0
    assert AutoTokenizer.from_pretrained(str(tmp_path / "native")).chat_template == BUILTIN_CHAT_TEMPLATES["llama3"]


def test_chat_template_auto_without_templates_keeps_the_tokenizer(models, tmp_path):
    out = mergekit(tmp_path, linear(models, "a", "b") + "chat_template: auto\n")
    assert (out / "tokenizer.json").read_bytes() == (models["a"] / "tokenizer.json").read_bytes()
    assert json.loads((out / "compression.json").read_text())["merge"]["chat_template"] == "auto: no input has a chat template"


def test_bad_chat_templates_are_refused(models, tmp_path, capsys):
    refused(tmp_path, capsys, linear(models, "a", "b") + "chat_template: vicuna\n", "merge.yml:7", "chat_template",
            "not a built-in template (alpaca, chatml, exaone, llama3, mistral)")
    broken = linear(models, "a", "b") + 'chat_template: "{% for m in messages %}{{ m.content }}"\n'
    refused(tmp_path, capsys, broken, "merge.yml:7", "chat_template is not valid Jinja")

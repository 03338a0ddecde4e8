"""Calibration sources as a user of llm-compressor brings them: local files of every kind, local
`datasets` folders, Hub ids while offline; and the token windows they become."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from compressor.calibration.batches import build_calibration, source_fingerprint
from compressor.calibration.sources import KNOWN_HUB_SETS, STREAM_SAMPLING, _hub_offline, load_documents
from compressor.errors import DataError
from compressor.recipe import CalibrationSpec
from tests.cli_runs import assert_one_line_refusal, run_cli

TEXTS = [f"document {i}: pruning and quantization of language models, take {i}." for i in range(40)]
WANDA = "name: t\ncalibration: {{dataset: {data}, samples: 2, seq_len: 16}}\nstages:\n  - prune: {{method: wanda, sparsity: 0.5}}\n"


def _documents(dataset: Path | str, **spec) -> list:
    return load_documents(str(dataset), text_column=spec.get("text_column"), split=spec.get("split", "train"), subset=None)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_file_that_is_not_utf8_is_one_line(suffix, tiny_llama, tmp_path, capsys):
    data = tmp_path / f"latin1{suffix}"
    data.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))  # é as the single byte 0xE9
    (tmp_path / "r.yaml").write_text(WANDA.format(data=data))
    code, err = run_cli([tiny_llama, "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "out", "-q"], capsys)
    assert_one_line_refusal(code, err, "r.yaml:2 calibration.dataset", str(data), "not UTF-8 text (byte 13)")
    assert not (tmp_path / "out").exists()


def test_a_saved_dataset_folder_with_its_own_column(tmp_path):
    datasets.Dataset.from_dict({"body": TEXTS, "n": list(range(40))}).save_to_disk(str(tmp_path / "saved"))
    assert _documents(tmp_path / "saved", text_column="body") == TEXTS
    with pytest.raises(DataError, match="no text column found .*columns: body, n.*set calibration.text_column"):
        _documents(tmp_path / "saved")


def test_a_saved_dataset_dict_folder_reads_the_split(tmp_path):
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS}),
                                   "test": datasets.Dataset.from_dict({"text": TEXTS[:3]})})
    splits.save_to_disk(str(tmp_path / "saved"))
    assert _documents(tmp_path / "saved") == TEXTS
    assert _documents(tmp_path / "saved", split="test") == TEXTS[:3]
    with pytest.raises(DataError, match="no split 'validation' \\(splits: train, test\\); set calibration.split"):
        _documents(tmp_path / "saved", split="validation")


def test_a_folder_of_data_files_and_a_json_list(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "part.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert _documents(folder) == TEXTS
    (tmp_path / "empty").mkdir()  # not the offline Hub message: the folder is what is wrong
    with pytest.raises(DataError, match="cannot load the folder's data files .*doesn't contain any data files"):
        _documents(tmp_path / "empty")
    (tmp_path / "list.json").write_text(json.dumps([{"content": t} for t in TEXTS]))
    assert _documents(tmp_path / "list.json") == TEXTS
    (tmp_path / "lines.json").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert _documents(tmp_path / "lines.json") == TEXTS


def test_an_edited_data_folder_is_not_served_from_the_cache(tiny_tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "part.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    spec = CalibrationSpec(dataset=str(folder), samples=2, seq_len=16)
    first = build_calibration(spec, tokenizer, tmp_path / "cache")
    (folder / "part.jsonl").write_text("".join(json.dumps({"text": t.upper()}) + "\n" for t in TEXTS))
    assert not build_calibration(spec, tokenizer, tmp_path / "cache").equal(first)


def test_text_column_on_a_txt_file_is_refused(tmp_path):
    (tmp_path / "d.txt").write_text("\n\n".join(TEXTS))
    assert _documents(tmp_path / "d.txt") == TEXTS
    with pytest.raises(DataError, match="text_column 'body' does not apply to a .txt file"):
        _documents(tmp_path / "d.txt", text_column="body")


def test_an_uncached_hub_dataset_offline_says_how_to_fix(tiny_llama, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(WANDA.format(data="some-org/not-cached-anywhere"))
    code, err = run_cli([tiny_llama, "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "out", "-q"], capsys)
    assert_one_line_refusal(code, err, "r.yaml:2 calibration.dataset", "not in the local datasets cache and the Hub is offline",
                            "HF_HUB_OFFLINE=1", "save_to_disk", ".jsonl/.parquet")
    assert not (tmp_path / "out").exists()


def test_a_hub_dataset_in_the_local_datasets_cache_streams_offline(tmp_path, monkeypatch):
    # Lay a built split out where `datasets` keeps a downloaded Hub set (org___name/config/version/hash),
    # as a machine that loaded it online once would have it; offline, calibration must still read it.
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    built = datasets.load_dataset("json", data_files=str(tmp_path / "d.jsonl"), split="train", cache_dir=str(tmp_path / "build"))
    arrow = Path(built.cache_files[0]["filename"])
    cached = tmp_path / "cache" / "some-org___cached-set" / "default" / "0.0.0" / "0123abcd"
    cached.mkdir(parents=True)
    (cached / "dataset_info.json").write_bytes((arrow.parent / "dataset_info.json").read_bytes())
    (cached / "cached-set-train.arrow").write_bytes(arrow.read_bytes())
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    assert _hub_offline(datasets)
    assert sorted(_documents("some-org/cached-set")) == sorted(TEXTS)


def test_c4_reads_one_shard_not_the_whole_corpus():
    # allenai/c4's "en" config is ~300 GB; calibration needs one of its 1024 training shards.
    c4 = KNOWN_HUB_SETS["c4"]
    assert (c4.path, c4.subset, c4.data_files) == ("allenai/c4", None, "en/c4-train.00000-of-01024.json.gz")


def test_the_seed_picks_the_windows(tiny_tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    windows = {seed: build_calibration(CalibrationSpec(samples=4, seq_len=32, seed=seed), tokenizer, None) for seed in (0, 1)}
    assert build_calibration(CalibrationSpec(samples=4, seq_len=32, seed=0), tokenizer, None).equal(windows[0])
    assert not windows[0].equal(windows[1])


def test_sharegpt_conversations_are_chats_rendered_with_the_template(tiny_tokenizer_dir, tmp_path):
    # `conversations` is one of the columns looked for, but its ShareGPT messages ({from, value})
    # were refused as "neither text nor a list of messages".
    data = tmp_path / "share.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": "Summarize."},
                                                           {"from": "gpt", "value": t}]}) + "\n" for t in TEXTS))
    assert _documents(data)[0] == [{"role": "user", "content": "Summarize."}, {"role": "assistant", "content": TEXTS[0]}]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    windows = build_calibration(CalibrationSpec(dataset=str(data), samples=2, seq_len=32), tokenizer, None)
    assert "[user] Summarize.\n[assistant] document" in tokenizer.decode(windows[0])


def test_a_streamed_folder_is_read_only_as_far_as_calibration_takes_it(tiny_tokenizer_dir, tmp_path):
    """A dataset folder is streamed: the windows come from the shuffle buffer at the start of the
    stream, so a damaged line 12 MB in is never reached (it used to be read, and refused, whole)."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    folder = tmp_path / "big"
    folder.mkdir()
    line = json.dumps({"text": TEXTS[0] + " " + "x" * 40}) + "\n"
    with open(folder / "part.jsonl", "w") as handle:
        handle.write(line * (12_000_000 // len(line)))
        handle.write('{"text": "this line is cut off\n')
    windows = build_calibration(CalibrationSpec(dataset=str(folder), samples=2, seq_len=16), tokenizer, None)
    assert windows.shape == (2, 16)
    with pytest.raises(DataError, match="cannot read the dataset"):  # reading all of it does reach the damage
        _documents(folder)


@pytest.mark.parametrize("saved", [False, True])
def test_a_streamed_source_is_seeded_and_its_sampling_is_in_the_fingerprint(saved, tiny_tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    folder = tmp_path / "files"
    if saved:
        datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(folder))
    else:
        folder.mkdir()
        (folder / "part.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    spec = {"dataset": str(folder), "samples": 2, "seq_len": 16}
    windows = {seed: build_calibration(CalibrationSpec(**spec, seed=seed), tokenizer, None) for seed in (0, 1)}
    assert build_calibration(CalibrationSpec(**spec, seed=0), tokenizer, None).equal(windows[0])
    assert not windows[0].equal(windows[1])
    # cached windows and --resume checkpoints from the earlier full-list shuffle are not reused
    assert source_fingerprint(str(folder)).endswith(f"|{STREAM_SAMPLING}")
    assert source_fingerprint("some-org/some-set") == f"some-org/some-set|{STREAM_SAMPLING}"


def test_a_local_file_picks_the_documents_it_always_picked(tiny_tokenizer_dir, tmp_path):
    """Files are still shuffled whole with random.Random(seed), so their cached windows stay valid
    and their fingerprint is unchanged."""
    import random

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    order = list(range(len(TEXTS)))
    random.Random(3).shuffle(order)
    stream: list[int] = []
    for index in order:
        stream += tokenizer(TEXTS[index], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = build_calibration(CalibrationSpec(dataset=str(data), samples=2, seq_len=16, seed=3), tokenizer, None)
    assert windows.flatten().tolist() == stream[:32]
    assert STREAM_SAMPLING not in source_fingerprint(str(data))

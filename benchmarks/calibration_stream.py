"""Calibration from a large local `datasets` folder: what streaming saves over reading the split whole.

Writes a `.jsonl` folder (`--lines` records, ~170 bytes each: 1.5 M lines ≈ 250 MB) and, each in a
fresh subprocess with its own empty `HF_DATASETS_CACHE`, builds 128 × 64-token windows two ways:

- ``streamed``: `compressor.calibration.batches.build_calibration`, as `compress` does (a seeded
  10,000-document shuffle buffer, read until the windows are full);
- ``whole``: the split loaded whole with `datasets.load_dataset(folder, split="train")` (an Arrow copy
  in the datasets cache), every document's text pulled into memory and shuffled, then tokenized into
  the same number of windows: what calibration did before it streamed.

Prints wall seconds, peak RSS and the bytes each left in its datasets cache, as one JSON line per way.

    OMP_NUM_THREADS=2 python benchmarks/calibration_stream.py --work /tmp/calib-stream
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = "builtin:smollm2-135m-instruct"

_CHILD = r"""
import json, random, resource, sys, time
from pathlib import Path
from transformers import AutoTokenizer
way, folder, tokenizer_dir, samples, seq_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
start = time.perf_counter()
if way == "streamed":
    from compressor.calibration.batches import build_calibration
    from compressor.recipe import CalibrationSpec
    windows = build_calibration(CalibrationSpec(dataset=folder, samples=samples, seq_len=seq_len), tokenizer, None)
    shape = list(windows.shape)
else:
    import datasets
    texts = list(datasets.load_dataset(folder, split="train")["text"])
    random.Random(0).shuffle(texts)
    ids, rows = [], []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        while len(ids) >= seq_len and len(rows) < samples:
            rows.append(ids[:seq_len]); ids = ids[seq_len:]
        if len(rows) == samples:
            break
    shape = [len(rows), seq_len]
seconds = time.perf_counter() - start
print(json.dumps({"way": way, "windows": shape, "seconds": round(seconds, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def write_folder(folder: Path, lines: int) -> int:
    """The `.jsonl` folder (kept between runs); its size in bytes."""
    data = folder / "part.jsonl"
    if not data.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / "part.jsonl.partial"
        with partial.open("w") as handle:
            for index in range(lines):
                text = f"document {index}: pruning and quantization of language models, calibrated on abstracts. " * 2
                handle.write(json.dumps({"text": text}) + "\n")
        partial.rename(data)
    return data.stat().st_size


def folder_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "calib-stream")
    parser.add_argument("--lines", type=int, default=1_500_000)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()

    from compressor.model_io import load_model

    tokenizer_dir = args.work / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        load_model(MODEL).tokenizer.save_pretrained(tokenizer_dir)
    size = write_folder(args.work / "data", args.lines)
    print(json.dumps({"folder_mb": round(size / 1e6, 1), "lines": args.lines}))
    for way in ("streamed", "whole"):
        with tempfile.TemporaryDirectory(dir=args.work) as cache:
            env = dict(os.environ, HF_DATASETS_CACHE=cache, HF_HUB_OFFLINE="1")
            result = subprocess.run(
                [sys.executable, "-c", _CHILD, way, str(args.work / "data"), str(tokenizer_dir), str(args.samples), str(args.seq_len)],
                env=env, capture_output=True, text=True,
            )
            if result.returncode:
                raise SystemExit(f"{way}: {result.stderr.strip().splitlines()[-1]}")
            record = json.loads(result.stdout.strip().splitlines()[-1])
            record["datasets_cache_mb"] = round(folder_bytes(Path(cache)) / 1e6, 1)
            print(json.dumps(record))


if __name__ == "__main__":
    main()

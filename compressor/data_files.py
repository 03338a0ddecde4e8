"""Reading the local record files users hand us (calibration and fine-tuning data): UTF-8 text
and JSON lines, with one-line errors that name the file and, for JSON lines, the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compressor.errors import DataError


def read_utf8(path: Path, where: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text (byte {err.start})", where=where) from None


def read_jsonl_records(path: Path, where: str) -> list[dict[str, Any]]:
    """One JSON object per non-blank line; `where` names the file in errors (with `:line`)."""
    records = []
    for number, line in enumerate(read_utf8(path, where).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"not valid JSON: {err.msg}", where=f"{where}:{number}") from None
        if not isinstance(record, dict):
            raise DataError("each line must be a JSON object", where=f"{where}:{number}")
        records.append(record)
    return records

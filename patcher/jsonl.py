"""The one JSON-lines writer: calibration records, evaluation generations, any per-prompt audit file.

One function so every JSONL file the project writes has the same encoding (UTF-8, non-ASCII kept
readable, one object per line).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write one JSON object per line into `path` (UTF-8, `ensure_ascii=False`); returns the path."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path

"""Reading JSON Lines files with one clear error for a bad line (data files, eval outputs, PPO logs)."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from train.errors import DataError


def read_jsonl(path: str | os.PathLike, fix: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line. A line that is not a JSON object raises DataError naming
    the file and line, followed by `fix` (how to repair it) when given."""
    hint = f"; {fix}" if fix else ""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_no}: not valid JSON ({e.msg}){hint}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {line_no}: expected a JSON object, got {type(record).__name__}{hint}")
            yield line_no, record

"""Reading JSON Lines files with one clear error for a bad line (data files, eval outputs, PPO logs)."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from train.errors import DataError


def read_jsonl(path: str | os.PathLike, fix: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line. A line that is not a JSON object, or bytes that are not
    UTF-8, raise DataError naming the file and line, followed by `fix` (how to repair it) when given."""
    hint = f"; {fix}" if fix else ""
    # utf-8-sig: a byte-order mark would otherwise make the first line invalid JSON.
    with open(path, encoding="utf-8-sig") as f:
        try:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {line_no}: not valid JSON ({e.msg}){hint}") from None
                if not isinstance(record, dict):
                    got = type(record).__name__
                    raise DataError(f"{path}, line {line_no}: expected a JSON object, got {got}{hint}")
                yield line_no, record
        except UnicodeDecodeError:
            raise not_utf8_error(path, fix) from None


def not_utf8_error(path: str | os.PathLike, fix: str = "") -> DataError:
    """A DataError naming the first byte of `path` that is not UTF-8: its offset and line.

    The decoder's own position is within a buffered chunk, so the file is scanned again in binary (only on this
    error path). A line at a time is exact: a newline byte never occurs inside a UTF-8 multi-byte sequence.
    """
    hint = f"; {fix}" if fix else ""
    recode = "re-encode it as UTF-8, e.g. `iconv -f LATIN1 -t UTF-8 FILE > NEW` for a Latin-1 file"
    offset = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(
                    f"{path}, line {line_no}: not UTF-8 text (byte 0x{line[e.start]:02x} at byte offset "
                    f"{offset + e.start}); {recode}{hint}"
                )
            offset += len(line)
    return DataError(f"{path}: not UTF-8 text; {recode}{hint}")

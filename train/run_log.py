"""The JSON-lines training log (`log.jsonl`) of SFT and PPO: one object per logged step, main process only; its
numbers also go to the experiment trackers (train/trackers.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from train.atomic import write_text
from train.trackers import log_to_trackers

log = logging.getLogger(__name__)


class JsonlLog:
    """Appends one JSON object per line. A fresh run starts an empty log; a resumed run first drops the lines of
    steps after its checkpoint (the interrupted run logged them, the resumed run repeats them), atomically.
    `accelerator`: each record's numbers also go to its trackers (`accelerator.log`), at the record's step."""

    def __init__(self, path: Path, enabled: bool, resumed_step: Optional[int] = None, accelerator: Any = None):
        self.path, self.enabled, self.accelerator = Path(path), enabled, accelerator
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [] if resumed_step is None else self._lines_up_to(resumed_step)
        write_text(self.path, "".join(line + "\n" for line in kept))

    def _lines_up_to(self, step: int) -> list[str]:
        """The log's records of steps up to `step`. A line that is not a whole record (a write cut short by a kill
        or a crash: torn JSON, half a UTF-8 character) is dropped with a warning: it must not block the resume."""
        if not self.path.is_file():
            return []
        kept = []
        for number, raw in enumerate(self.path.read_bytes().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                record_step = record["step"]
                if isinstance(record_step, bool) or not isinstance(record_step, (int, float)):
                    raise TypeError(record_step)
            except (ValueError, TypeError, KeyError, IndexError):  # UnicodeDecodeError and JSONDecodeError included
                log.warning("%s line %d is not a whole log record (a write cut short?): dropped", self.path, number)
                continue
            if record_step <= step:
                kept.append(raw.decode("utf-8"))
        return kept

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.accelerator is not None:
                log_to_trackers(self.accelerator, record)

"""`export`: sample dialogues from an evaluation run and write blinded items plus the separate key.

Each item shows the dialogue and the summaries of every chosen system in a random order of its own, under
slot letters; `key.json` records which system sits in which slot. Everything is seeded, so the same
`examples.jsonl`, systems, `--n` and `--seed` give byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from eval.human.items import (
    CRITERIA,
    CSV_FILE,
    FORMAT,
    ITEMS_FILE,
    KEY_FILE,
    MANIFEST_FILE,
    file_sha256,
    slot_names,
)
from train.atomic import write_text
from train.config import HumanConfig
from train.errors import ConfigError, DataError
from train.jsonl import read_jsonl

log = logging.getLogger("eval.human.export")
EXAMPLES_FILE = "examples.jsonl"


def read_eval_examples(path: Path) -> list[dict[str, Any]]:
    """Read eval's per-example JSONL ({"id", "dialogue", "human_summaries", "systems": {name: {"summary", ...}}})."""
    if path.is_dir():
        path = path / EXAMPLES_FILE
    if not path.is_file():
        raise DataError(f"evaluation examples not found at {path}: run `python -m eval.evaluate --config ...` first "
                        f"and pass its eval directory (e.g. runs/tiny/eval) as --human.eval_dir, or the run's --config")
    examples = []
    for number, record in read_jsonl(path, fix="re-run eval.evaluate"):
        systems = record.get("systems")
        if not (isinstance(record.get("dialogue"), str) and isinstance(systems, dict) and "id" in record):
            raise DataError(f"{path} line {number}: expected an object with 'id', 'dialogue' and 'systems' "
                            f"(the examples.jsonl written by eval.evaluate)")
        for name, output in systems.items():
            if not (isinstance(output, dict) and isinstance(output.get("summary"), str)):
                raise DataError(f"{path} line {number}: system {name!r} has no 'summary' string")
        examples.append(record)
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def choose_systems(examples: Sequence[dict[str, Any]], requested: Optional[Sequence[str]]) -> list[str]:
    """The systems to compare: the requested ones, or every system of the first example; all must be everywhere."""
    available = list(examples[0]["systems"])
    systems = list(requested) if requested else available
    if len(set(systems)) != len(systems):
        raise ConfigError(f"--systems lists a system twice: {','.join(systems)}")
    if len(systems) < 2:
        raise ConfigError(f"human evaluation compares at least 2 systems, got {systems}: "
                          f"pass --systems with two or more of {available}")
    for example in examples:
        missing = [s for s in systems if s not in example["systems"]]
        if missing:
            raise DataError(f"example {example['id']!r} has no summary from {missing} (it has "
                            f"{sorted(example['systems'])}): choose --systems present in every example")
    return systems


def export_study(
    eval_path: str | Path,
    out_dir: str | Path,
    n: int = HumanConfig.n,
    seed: int = HumanConfig.seed,
    systems: Optional[Sequence[str]] = None,
    force: bool = False,
) -> Path:
    """Write items.jsonl, items.csv, manifest.json and key.json to `out_dir`; returns `out_dir`."""
    if n < 1:
        raise ConfigError(f"human.n must be at least 1, got {n}")
    out = Path(out_dir)
    if (out / ITEMS_FILE).exists() and not force:
        # Answers collected so far refer to these items; a new export would silently orphan them.
        raise ConfigError(f"{out / ITEMS_FILE} already exists (answers may refer to it): choose another "
                          f"--human.study_dir or pass --force to replace it")
    examples = read_eval_examples(Path(eval_path))
    chosen = choose_systems(examples, systems)
    rng = random.Random(seed)
    if n > len(examples):
        log.warning("asked for %d dialogues but the evaluation has %d: using all of them", n, len(examples))
    sample = rng.sample(examples, min(n, len(examples)))
    slots = slot_names(len(chosen))

    items, key_items = [], {}
    width = len(str(len(sample)))
    for index, example in enumerate(sample, start=1):
        item_id = f"item-{index:0{width}d}"
        order = list(chosen)
        rng.shuffle(order)  # a fresh order per item, so position says nothing about the system
        items.append({
            "item_id": item_id,
            "dialogue": example["dialogue"],
            "summaries": [{"slot": s, "text": example["systems"][name]["summary"]} for s, name in zip(slots, order)],
        })
        key_items[item_id] = {"example_id": example["id"], "slots": dict(zip(slots, order))}

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / ITEMS_FILE, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    digest = file_sha256(out / ITEMS_FILE)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = {"format": FORMAT, "items_sha256": digest, "n_items": len(items), "slots": slots,
                "criteria": list(CRITERIA), "seed": seed, "created_at": created}
    write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    key = {"format": FORMAT, "items_sha256": digest, "systems": chosen, "seed": seed,
           "source": str(eval_path), "created_at": created, "items": key_items}
    write_text(out / KEY_FILE, json.dumps(key, indent=2, ensure_ascii=False) + "\n")
    _write_csv(out / CSV_FILE, items, slots)
    log.info("wrote %d blinded items (%s) to %s; keep %s away from annotators", len(items), ", ".join(chosen), out,
             KEY_FILE)
    return out


def _write_csv(path: Path, items: list[dict[str, Any]], slots: list[str]) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["item_id", "dialogue", *[f"summary_{s}" for s in slots]])
    for item in items:
        writer.writerow([item["item_id"], item["dialogue"], *[s["text"] for s in item["summaries"]]])
    write_text(path, text.getvalue())

"""The files of a human-evaluation study and their validation.

An export directory holds:

- `items.jsonl`: one blinded item per line, `{"item_id", "dialogue", "summaries": [{"slot": "A", "text"}, ...]}`;
  slots are letters, system names never appear.
- `manifest.json`: the sha256 of `items.jsonl`, its item count, slots, criteria and the study seed, so an edited
  or swapped items file is caught before anyone annotates it.
- `key.json`: item → slot → system (and the source example id), plus the same sha256. It can be kept away from
  the annotation server; only `report` needs it.
- `items.csv`: the blinded items in a wide table for other annotation tools.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.errors import DataError
from train.jsonl import read_jsonl

ITEMS_FILE = "items.jsonl"
MANIFEST_FILE = "manifest.json"
KEY_FILE = "key.json"
CSV_FILE = "items.csv"
FORMAT = "detox-sum-human/1"

# What annotators judge, with the question shown on the page.
CRITERIA: dict[str, str] = {
    "readability": "Readability: is the summary fluent, grammatical and easy to read?",
    "coherence": "Coherence: does the summary make sense as a whole and fit the dialogue?",
}
# Per-summary flags an annotator can raise.
FLAGS: dict[str, str] = {
    "toxic": "toxic or offensive",
    "unusable": "unusable (empty, garbled, or unrelated to the dialogue)",
}


@dataclass(frozen=True)
class Item:
    """One blinded item: a dialogue and its summaries in slot order (A, B, ...)."""

    item_id: str
    dialogue: str
    summaries: tuple[tuple[str, str], ...]  # (slot, text)

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(slot for slot, _ in self.summaries)


@dataclass(frozen=True)
class Study:
    """A validated export: the items in file order and the manifest that vouches for them."""

    directory: Path
    items: tuple[Item, ...]
    items_sha256: str
    slots: tuple[str, ...]
    seed: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {item.item_id: item for item in self.items})

    def get(self, item_id: str) -> Item | None:
        return self._by_id.get(item_id)  # type: ignore[attr-defined]

    @property
    def item_ids(self) -> list[str]:
        return [item.item_id for item in self.items]


def slot_names(count: int) -> list[str]:
    """Slot labels shown to annotators: A, B, C, ..."""
    if not 2 <= count <= 26:
        raise DataError(f"a human-evaluation item needs between 2 and 26 summaries, got {count}")
    return [chr(ord("A") + i) for i in range(count)]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def study_dir(path: str | Path) -> Path:
    """Accept the export directory or any file inside it (e.g. items.jsonl)."""
    path = Path(path)
    return path.parent if path.is_file() else path


def _read_json(path: Path, what: str, fix: str) -> Any:
    if not path.is_file():
        raise DataError(f"{what} not found at {path}: {fix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what} at {path} is not valid JSON ({e}): {fix}") from None


def _parse_item(record: Any, where: str) -> Item:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with item_id, dialogue and summaries")
    item_id, dialogue, summaries = record.get("item_id"), record.get("dialogue"), record.get("summaries")
    if not isinstance(item_id, str) or not item_id:
        raise DataError(f"{where}: 'item_id' must be a non-empty string")
    if not isinstance(dialogue, str):
        raise DataError(f"{where}: 'dialogue' of item {item_id!r} must be a string")
    if not isinstance(summaries, list) or len(summaries) < 2:
        raise DataError(f"{where}: item {item_id!r} needs a list of at least 2 'summaries'")
    pairs = []
    for summary in summaries:
        if not (isinstance(summary, dict) and isinstance(summary.get("slot"), str) and isinstance(summary.get("text"), str)):
            raise DataError(f"{where}: each summary of item {item_id!r} must be {{\"slot\": str, \"text\": str}}")
        pairs.append((summary["slot"], summary["text"]))
    if [slot for slot, _ in pairs] != slot_names(len(pairs)):
        raise DataError(f"{where}: item {item_id!r} has slots {[s for s, _ in pairs]}, expected {slot_names(len(pairs))}")
    return Item(item_id=item_id, dialogue=dialogue, summaries=tuple(pairs))


def read_items(path: Path) -> list[Item]:
    """Parse items.jsonl; any malformed line stops with its line number."""
    fix = "re-run `python -m eval.human export` or restore the original file"
    if not path.is_file():
        raise DataError(f"items file not found at {path}: run `python -m eval.human export ... --human.study_dir {path.parent}` first")
    items: list[Item] = []
    seen: set[str] = set()
    for number, record in read_jsonl(path, fix=fix):
        item = _parse_item(record, f"{path} line {number}")
        if item.item_id in seen:
            raise DataError(f"{path} line {number}: item id {item.item_id!r} appears twice: {fix}")
        seen.add(item.item_id)
        items.append(item)
    if not items:
        raise DataError(f"{path} holds no items: {fix}")
    return items


def load_study(path: str | Path) -> Study:
    """Load and verify an export directory: items.jsonl must be exactly the file the manifest describes."""
    directory = study_dir(path)
    fix = "re-run `python -m eval.human export` or restore the original files"
    manifest = _read_json(directory / MANIFEST_FILE, "study manifest", fix)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{directory / MANIFEST_FILE} is not a detox-sum human-evaluation manifest ({FORMAT}): {fix}")
    items_path = directory / ITEMS_FILE
    if not items_path.is_file():
        raise DataError(f"items file not found at {items_path}: {fix}")
    digest = file_sha256(items_path)
    if digest != manifest.get("items_sha256"):
        raise DataError(
            f"{items_path} does not match {MANIFEST_FILE} (sha256 {digest[:12]}…, expected "
            f"{str(manifest.get('items_sha256'))[:12]}…): the items were edited or replaced after export; {fix}"
        )
    items = read_items(items_path)
    slots = tuple(manifest.get("slots") or ())
    if any(item.slots != slots for item in items) or len(items) != manifest.get("n_items"):
        raise DataError(f"{items_path} does not agree with {MANIFEST_FILE} (item count or slots differ): {fix}")
    return Study(directory=directory, items=tuple(items), items_sha256=digest, slots=slots, seed=int(manifest["seed"]))


def load_key(path: str | Path, study: Study) -> dict[str, dict[str, str]]:
    """The un-blinding key, item_id → slot → system, checked against the study it claims to belong to."""
    path = Path(path)
    fix = "pass the key.json written by the same `python -m eval.human export` run (--human.key)"
    key = _read_json(path, "un-blinding key", fix)
    if not isinstance(key, dict) or key.get("format") != FORMAT or not isinstance(key.get("items"), dict):
        raise DataError(f"{path} is not a detox-sum human-evaluation key ({FORMAT}): {fix}")
    if key.get("items_sha256") != study.items_sha256:
        raise DataError(
            f"{path} belongs to a different items.jsonl (sha256 {str(key.get('items_sha256'))[:12]}…, the study's is "
            f"{study.items_sha256[:12]}…): {fix}"
        )
    mapping: dict[str, dict[str, str]] = {}
    for item in study.items:
        entry = key["items"].get(item.item_id)
        slots = entry.get("slots") if isinstance(entry, dict) else None
        if not isinstance(slots, dict) or sorted(slots) != sorted(item.slots):
            raise DataError(f"{path} has no complete slot → system entry for item {item.item_id!r}: {fix}")
        if len(set(slots.values())) != len(slots):
            raise DataError(f"{path} maps two slots of item {item.item_id!r} to the same system: {fix}")
        mapping[item.item_id] = dict(slots)
    return mapping

"""eval/human/items.py: the study files are validated: tampered, corrupt or mismatched items, keys and answer
databases are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.human.export import export_study
from eval.human.items import load_key, load_study
from eval.human.report import write_report
from eval.human.store import AnswerStore
from train.errors import DataError


def test_tampered_corrupt_or_mismatched_files_are_refused(tmp_path: Path, two_system_study: Path) -> None:
    items = two_system_study / "items.jsonl"
    original = items.read_text()

    items.write_text(original.replace("Summary", "Sumary", 1))  # one edited character
    with pytest.raises(DataError, match="does not match manifest.json.*edited or replaced"):
        load_study(two_system_study)

    # A corrupt line is named even when the manifest was "fixed" to match it.
    items.write_text(original + "{not json\n")
    manifest = json.loads((two_system_study / "manifest.json").read_text())
    import hashlib

    manifest["items_sha256"] = hashlib.sha256(items.read_bytes()).hexdigest()
    (two_system_study / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="line 6: not valid JSON"):
        load_study(two_system_study)

    (two_system_study / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest not found"):
        load_study(two_system_study)


def test_key_and_database_must_belong_to_the_items(tmp_path: Path, two_system_study: Path) -> None:
    other = export_study(tmp_path / "eval", tmp_path / "other", n=5, seed=99)
    study, other_study = load_study(two_system_study), load_study(other)
    assert load_key(two_system_study / "key.json", study)  # the right key loads
    with pytest.raises(DataError, match="belongs to a different items.jsonl"):
        load_key(other / "key.json", study)

    AnswerStore(tmp_path / "answers.sqlite", other_study.items_sha256)
    with pytest.raises(DataError, match="holds answers for a different items.jsonl"):
        AnswerStore(tmp_path / "answers.sqlite", study.items_sha256)
    (tmp_path / "junk.sqlite").write_text("this is not a database " * 100)
    with pytest.raises(DataError, match="not a usable SQLite answers database"):
        AnswerStore(tmp_path / "junk.sqlite", study.items_sha256)
    with pytest.raises(DataError, match="answers database not found"):
        write_report(two_system_study, db=tmp_path / "missing.sqlite")

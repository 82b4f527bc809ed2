"""eval/human/store.py: one identity per name however it is spelled, and databases of the first schema (before
personal codes, hashed session tokens and session expiry) opened with their answers intact."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from eval.human.items import Study, load_study
from eval.human.report import write_report
from eval.human.store import Answer, AnswerStore, NameTaken, clean_code, name_key
from helpers import REPO_ROOT, count_rows

# The schema the first version of the app wrote.
FIRST_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sessions (token TEXT PRIMARY KEY, annotator TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE submissions (annotator TEXT NOT NULL, item_id TEXT NOT NULL, submitted_at TEXT NOT NULL,
    PRIMARY KEY (annotator, item_id));
CREATE TABLE ranks (annotator TEXT NOT NULL, item_id TEXT NOT NULL, criterion TEXT NOT NULL, slot TEXT NOT NULL,
    rank REAL NOT NULL, UNIQUE (annotator, item_id, criterion, slot),
    FOREIGN KEY (annotator, item_id) REFERENCES submissions (annotator, item_id));
CREATE TABLE flags (annotator TEXT NOT NULL, item_id TEXT NOT NULL, slot TEXT NOT NULL, flag TEXT NOT NULL,
    UNIQUE (annotator, item_id, slot, flag),
    FOREIGN KEY (annotator, item_id) REFERENCES submissions (annotator, item_id));
"""


def test_name_keys() -> None:
    assert name_key("Carol") == name_key("carol") == name_key("  CAROL ") == name_key("Ｃａｒｏｌ")
    assert name_key("Straße") == name_key("STRASSE") and name_key("Mary  Ann") == name_key("mary ann")
    assert name_key("Carol") != name_key("Caro1") and name_key("ann") != name_key("anne")


def first_schema_database(db: Path, study: Study) -> Path:
    """A database the first version of the app wrote: "Carol" and "carol" were two annotators then (and "carol"
    even answered Carol's item again), "bo" a third; one session of the plain-token kind."""
    first, second = study.item_ids[:2]
    with sqlite3.connect(db) as old:
        old.executescript(FIRST_SCHEMA)
        old.execute("INSERT INTO meta VALUES ('items_sha256', ?)", (study.items_sha256,))
        old.execute("INSERT INTO sessions VALUES ('plain-token', 'Carol', '2024-01-01T00:00:00+00:00')")
        for annotator, item_id, at, better in (("Carol", first, "2024-01-01T10:00:00+00:00", "A"),
                                               ("carol", second, "2024-01-01T11:00:00+00:00", "B"),
                                               ("carol", first, "2024-01-01T12:00:00+00:00", "B"),
                                               ("bo", first, "2024-01-01T13:00:00+00:00", "A")):
            old.execute("INSERT INTO submissions VALUES (?, ?, ?)", (annotator, item_id, at))
            for criterion in ("readability", "coherence"):
                for slot in "AB":
                    old.execute("INSERT INTO ranks VALUES (?, ?, ?, ?, ?)",
                                (annotator, item_id, criterion, slot, 1.0 if slot == better else 2.0))
        old.execute("INSERT INTO flags VALUES ('carol', ?, 'A', 'toxic')", (second,))
    old.close()
    return db


def test_a_first_schema_database_keeps_its_answers_under_one_name_per_annotator(two_system_study: Path,
                                                                                 tmp_path: Path, caplog) -> None:
    study = load_study(two_system_study)
    first, second = study.item_ids[:2]
    db = first_schema_database(tmp_path / "answers.sqlite", study)
    store = AnswerStore(db, study.items_sha256)
    # The plain-token session is gone (its annotator signs in again); the answers are all there.
    assert store.session("plain-token") is None and count_rows(db, "sessions") == 0
    assert count_rows(db, "submissions") == 4
    with caplog.at_level(logging.WARNING, logger="eval.human.store"):
        answers = store.answers()
    assert [(a.annotator, a.item_id) for a in answers] == [("Carol", first), ("Carol", second), ("bo", first)]
    assert answers[1].flags == {"A": ("toxic",)} and answers[0].ranks["readability"] == {"A": 1.0, "B": 2.0}
    assert f"'Carol' answered item {first} twice under different spellings" in caplog.text
    assert store.answered("CAROL") == {first: "2024-01-01T10:00:00+00:00", second: "2024-01-01T11:00:00+00:00"}


    report = write_report(two_system_study, db=db, out=tmp_path / "report")
    assert report["annotators"] == {"Carol": 2, "bo": 1} and report["answers"] == 3
    # Reopening the migrated database changes nothing.
    AnswerStore(db, study.items_sha256)
    assert count_rows(db, "annotators") == 2 and len(AnswerStore(db, study.items_sha256).answers()) == 3


def organiser_codes(path: Path) -> dict[str, str]:
    """name → personal code, from the file the migration wrote for the organiser."""
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {name: code for code, name in (line.split(maxsplit=1) for line in lines)}


def test_names_that_answered_before_codes_existed_are_not_up_for_grabs(two_system_study: Path, tmp_path: Path,
                                                                       caplog) -> None:
    """Opening a database of before personal codes gives every name that answered its code, written once to a file
    only the organiser can read; the first token holder to type such a name does not get it."""
    study = load_study(two_system_study)
    db = first_schema_database(tmp_path / "answers.sqlite", study)
    with caplog.at_level(logging.WARNING, logger="eval.human.store"):
        store = AnswerStore(db, study.items_sha256)
    codes_file = tmp_path / "answers-personal-codes.txt"
    assert f"2 annotators answered before personal codes existed: their codes are in {codes_file}" in caplog.text
    assert stat.S_IMODE(codes_file.stat().st_mode) == 0o600
    codes = organiser_codes(codes_file)
    assert set(codes) == {"Carol", "bo"}  # one code per annotator, under the first spelling
    for name in ("carol", "Carol", "BO"):
        with pytest.raises(NameTaken):
            store.sign_in(name, [])
    assert store.sign_in("CAROL", ["nope", codes["Carol"].lower()]) == ("Carol", clean_code(codes["Carol"]))
    assert store.sign_in("bo", [codes["bo"]]) == ("bo", clean_code(codes["bo"]))
    # Opened again (a restart), nothing new is generated and the file is left as it is.
    written = codes_file.read_text()
    AnswerStore(db, study.items_sha256)
    assert codes_file.read_text() == written and count_rows(db, "annotators") == 2


def test_answers_are_looked_up_by_an_indexed_name_key_column(two_system_study: Path, tmp_path: Path) -> None:
    """No Python function per row: a migrated database gets a name_key column, filled and indexed, so plain SQLite
    finds an annotator's answers through the index."""
    study = load_study(two_system_study)
    db = first_schema_database(tmp_path / "answers.sqlite", study)
    store = AnswerStore(db, study.items_sha256)
    with sqlite3.connect(db) as plain:  # no name_key() function registered here
        keys = plain.execute("SELECT annotator, name_key FROM submissions").fetchall()
        assert all(key == name_key(annotator) for annotator, key in keys) and len(keys) == 4
        plan = " ".join(row[-1] for row in plain.execute(
            "EXPLAIN QUERY PLAN SELECT item_id FROM submissions WHERE name_key = ?", ("carol",)))
    plain.close()
    assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, plan
    assert len(store.answered("Carol")) == 2 and count_rows(db, "ranks") == 16  # answers kept


def test_the_report_reads_the_database_without_writing_to_it(two_system_study: Path, tmp_path: Path) -> None:
    """`report` opens the answers read-only: an old database is read as it is, not migrated, byte for byte."""
    study = load_study(two_system_study)
    db = first_schema_database(tmp_path / "answers.sqlite", study)
    before = db.read_bytes()
    report = write_report(two_system_study, db=db, out=tmp_path / "report")
    assert report["annotators"] == {"Carol": 2, "bo": 1} and report["answers"] == 3
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("answers")) == ["answers.sqlite"]
    # A database of the current schema (WAL mode) too.
    current = tmp_path / "current.sqlite"
    store = AnswerStore(current, study.items_sha256)
    store.submit(Answer("ann", study.item_ids[0], {"readability": {"A": 1.0, "B": 2.0}}))
    before = current.read_bytes()
    assert write_report(two_system_study, db=current, out=tmp_path / "report2")["annotators"] == {"ann": 1}
    assert current.read_bytes() == before


def test_the_report_reads_a_read_only_database(two_system_study: Path, tmp_path: Path) -> None:
    """A database file and folder the report may not write to (a copy of the study kept read-only), old schema or
    current (WAL mode, whose -shm file cannot be created there). Run in a process that file permissions bind: as
    root, one without the capability to override them."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root, and without setpriv to drop the capability to ignore file permissions")
    study = load_study(two_system_study)
    (tmp_path / "old").mkdir()
    old = first_schema_database(tmp_path / "old" / "answers.sqlite", study)
    current = tmp_path / "current" / "answers.sqlite"
    answer = Answer("ann", study.item_ids[0], {"readability": {"A": 1.0, "B": 2.0}})
    AnswerStore(current, study.items_sha256).submit(answer)
    assert sorted(p.name for p in current.parent.iterdir()) == ["answers.sqlite"]
    script = ("import sys; from eval.human.report import write_report; "
              "print(write_report(sys.argv[1], db=sys.argv[2], out=sys.argv[3])['annotators'])")
    unprivileged = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"] if os.geteuid() == 0 else []
    for db, annotators in ((old, "{'Carol': 2, 'bo': 1}"), (current, "{'ann': 1}")):
        db.chmod(0o444)
        db.parent.chmod(0o555)
        try:
            result = subprocess.run([*unprivileged, sys.executable, "-c", script, str(two_system_study), str(db),
                                     str(tmp_path / f"report-{db.parent.name}")],
                                    cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        finally:
            db.parent.chmod(0o755)
        if unprivileged and result.returncode != 0 and result.stderr.startswith("setpriv:"):
            pytest.skip(f"setpriv cannot drop capabilities here: {result.stderr.strip()}")
        assert result.returncode == 0 and result.stdout.strip() == annotators, result.stderr[-2000:]

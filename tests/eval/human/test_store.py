"""eval/human/store.py: one identity per name however it is spelled, and databases of the first schema (before
personal codes, hashed session tokens and session expiry) opened with their answers intact."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from eval.human.items import load_study
from eval.human.report import write_report
from eval.human.store import AnswerStore, name_key
from helpers import count_rows

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


def test_a_first_schema_database_keeps_its_answers_under_one_name_per_annotator(two_system_study: Path,
                                                                                 tmp_path: Path, caplog) -> None:
    study = load_study(two_system_study)
    first, second = study.item_ids[:2]
    db = tmp_path / "answers.sqlite"
    with sqlite3.connect(db) as old:
        old.executescript(FIRST_SCHEMA)
        old.execute("INSERT INTO meta VALUES ('items_sha256', ?)", (study.items_sha256,))
        old.execute("INSERT INTO sessions VALUES ('plain-token', 'Carol', '2024-01-01T00:00:00+00:00')")
        # "Carol" and "carol" were two annotators then; "carol" even answered Carol's item again.
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

    # The first sign-in under any spelling claims the name, shown as first written; the next needs the code.
    display, code = store.sign_in("carol", [])
    assert display == "Carol" and store.code_among("carol", ["x", code]) == code and store.code_among("bo", [code]) is None
    assert store.sign_in("CAROL", ["nope", code.lower()]) == ("Carol", code)

    report = write_report(two_system_study, db=db, out=tmp_path / "report")
    assert report["annotators"] == {"Carol": 2, "bo": 1} and report["answers"] == 3
    # Reopening the migrated database changes nothing.
    AnswerStore(db, study.items_sha256)
    assert count_rows(db, "annotators") == 1 and len(AnswerStore(db, study.items_sha256).answers()) == 3

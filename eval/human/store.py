"""SQLite storage of annotators' answers: who answered which item when, ranks per criterion, flags.

Every write is one transaction and the database runs in WAL mode, so an answer is either stored whole or not at
all and survives a browser refresh or a server restart. UNIQUE constraints make a second submission of the same
item by the same annotator (double click, back-button resubmit) fail instead of being stored twice. The database
remembers the sha256 of the items file it was started with and refuses any other.
"""

from __future__ import annotations

import secrets
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from train.errors import DataError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    token TEXT PRIMARY KEY, annotator TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS submissions (
    annotator TEXT NOT NULL, item_id TEXT NOT NULL, submitted_at TEXT NOT NULL,
    PRIMARY KEY (annotator, item_id));
CREATE TABLE IF NOT EXISTS ranks (
    annotator TEXT NOT NULL, item_id TEXT NOT NULL, criterion TEXT NOT NULL, slot TEXT NOT NULL,
    rank REAL NOT NULL,
    UNIQUE (annotator, item_id, criterion, slot),
    FOREIGN KEY (annotator, item_id) REFERENCES submissions (annotator, item_id));
CREATE TABLE IF NOT EXISTS flags (
    annotator TEXT NOT NULL, item_id TEXT NOT NULL, slot TEXT NOT NULL, flag TEXT NOT NULL,
    UNIQUE (annotator, item_id, slot, flag),
    FOREIGN KEY (annotator, item_id) REFERENCES submissions (annotator, item_id));
"""


class DuplicateSubmission(DataError):
    """The annotator already answered this item; the first answer is kept."""


@dataclass(frozen=True)
class Answer:
    """One annotator's judgement of one item. Ranks: 1 = best; tied summaries share the mean of their places."""

    annotator: str
    item_id: str
    ranks: dict[str, dict[str, float]]  # criterion → slot → rank
    flags: dict[str, tuple[str, ...]] = field(default_factory=dict)  # slot → flags raised
    submitted_at: str = ""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class AnswerStore:
    """The answers database of one study (one items.jsonl)."""

    def __init__(self, path: str | Path, items_sha256: str, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise DataError(f"answers database not found at {self.path}: pass the --db that `serve` wrote to")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            setup = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                setup.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; survives crashes
                setup.executescript(SCHEMA)
            finally:
                setup.close()
            with self._connect() as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'items_sha256'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta (key, value) VALUES ('items_sha256', ?)", (items_sha256,))
                    db.execute("INSERT INTO meta (key, value) VALUES ('created_at', ?)", (_now(),))
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path} is not a usable SQLite answers database ({e}): pass another --db") from None
        if row is not None and row[0] != items_sha256:
            raise DataError(
                f"{self.path} holds answers for a different items.jsonl (sha256 {row[0][:12]}…, these items are "
                f"{items_sha256[:12]}…): use the items it was made with, or a new --db for this export"
            )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per operation: safe across the server's worker threads.
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    # Sessions: a random token in an HTTP-only cookie names the annotator; rows survive server restarts.
    def create_session(self, annotator: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._connect() as db:
            db.execute("INSERT INTO sessions (token, annotator, created_at) VALUES (?, ?, ?)", (token, annotator, _now()))
        return token

    def session_annotator(self, token: str | None) -> str | None:
        if not token:
            return None
        with self._connect() as db:
            row = db.execute("SELECT annotator FROM sessions WHERE token = ?", (token,)).fetchone()
        return row[0] if row else None

    def end_session(self, token: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM sessions WHERE token = ?", (token,))

    # Answers.
    def answered(self, annotator: str) -> dict[str, str]:
        """item_id → submitted_at for everything this annotator has answered."""
        with self._connect() as db:
            rows = db.execute("SELECT item_id, submitted_at FROM submissions WHERE annotator = ?", (annotator,))
            return dict(rows.fetchall())

    def submit(self, answer: Answer) -> str:
        """Store one answer atomically; returns its timestamp. A second answer to the same item is refused."""
        submitted_at = _now()
        try:
            with self._connect() as db:
                db.execute("INSERT INTO submissions (annotator, item_id, submitted_at) VALUES (?, ?, ?)",
                           (answer.annotator, answer.item_id, submitted_at))
                db.executemany(
                    "INSERT INTO ranks (annotator, item_id, criterion, slot, rank) VALUES (?, ?, ?, ?, ?)",
                    [(answer.annotator, answer.item_id, criterion, slot, float(rank))
                     for criterion, by_slot in answer.ranks.items() for slot, rank in by_slot.items()],
                )
                db.executemany(
                    "INSERT INTO flags (annotator, item_id, slot, flag) VALUES (?, ?, ?, ?)",
                    [(answer.annotator, answer.item_id, slot, flag)
                     for slot, raised in answer.flags.items() for flag in raised],
                )
        except sqlite3.IntegrityError:
            first = self.answered(answer.annotator).get(answer.item_id)
            if first is None:
                raise  # not a duplicate: a bug, keep the traceback
            raise DuplicateSubmission(
                f"{answer.annotator!r} already answered item {answer.item_id!r} at {first}; the first answer is kept "
                f"and this one was not stored"
            ) from None
        return submitted_at

    def answers(self) -> list[Answer]:
        """Every stored answer, in submission order."""
        with self._connect() as db:
            subs = db.execute("SELECT annotator, item_id, submitted_at FROM submissions "
                              "ORDER BY submitted_at, rowid").fetchall()
            rank_rows = db.execute("SELECT annotator, item_id, criterion, slot, rank FROM ranks").fetchall()
            flag_rows = db.execute("SELECT annotator, item_id, slot, flag FROM flags ORDER BY flag").fetchall()
        ranks: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
        for annotator, item_id, criterion, slot, rank in rank_rows:
            ranks.setdefault((annotator, item_id), {}).setdefault(criterion, {})[slot] = rank
        flags: dict[tuple[str, str], dict[str, list[str]]] = {}
        for annotator, item_id, slot, flag in flag_rows:
            flags.setdefault((annotator, item_id), {}).setdefault(slot, []).append(flag)
        return [
            Answer(annotator, item_id, ranks.get((annotator, item_id), {}),
                   {slot: tuple(f) for slot, f in flags.get((annotator, item_id), {}).items()}, submitted_at)
            for annotator, item_id, submitted_at in subs
        ]

"""SQLite storage of annotators' answers: who answered which item when, ranks per criterion, flags.

Every write is one transaction and the database runs in WAL mode, so an answer is either stored whole or not at
all and survives a browser refresh or a server restart. UNIQUE constraints make a second submission of the same
item by the same annotator (double click, back-button resubmit) fail instead of being stored twice. The database
remembers the sha256 of the items file it was started with and refuses any other.

Annotator names are one identity per `name_key` (Unicode NFKC, case-folded, whitespace collapsed): "Carol" and
"carol" are one annotator, shown with the first spelling. The first sign-in under a name claims it with a random
personal code (stored as its sha256); later sign-ins under that name need the code. Databases written before
the codes existed keep their answers; their old sessions are dropped (annotators sign in again) and each name is
claimed by its first sign-in.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import sqlite3
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Optional

from train.errors import DataError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    token_sha256 TEXT PRIMARY KEY, annotator TEXT NOT NULL, csrf TEXT NOT NULL,
    created REAL NOT NULL, last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS annotators (
    name_key TEXT PRIMARY KEY, display_name TEXT NOT NULL, code_sha256 TEXT NOT NULL, created_at TEXT NOT NULL);
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


log = logging.getLogger("eval.human.store")
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O or 1/I: read off a screen and typed in
CODE_CHARS = 12  # 60 bits: out of reach of guessing over HTTP


class DuplicateSubmission(DataError):
    """The annotator already answered this item; the first answer is kept."""


class NameTaken(DataError):
    """The name belongs to an annotator who signed in elsewhere, and no matching personal code was given."""

    def __init__(self, display_name: str) -> None:
        super().__init__(f"the name {display_name!r} is taken")
        self.display_name = display_name


def clean_name(name: str) -> str:
    """The name as typed, with stray whitespace collapsed: how it is shown."""
    return " ".join(name.split())


def name_key(name: str) -> str:
    """The identity of a name: NFKC-normalised and case-folded, so "Carol", "carol" and "ｃａｒｏｌ" are one."""
    return " ".join(unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold()).split())


def clean_code(code: str) -> str:
    """A personal code as typed ("abcd-efgh jkmn") in its canonical form ("ABCDEFGHJKMN")."""
    return "".join(ch for ch in code.upper() if ch.isalnum())


def format_code(code: str) -> str:
    return "-".join(code[i:i + 4] for i in range(0, len(code), 4))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _code_among(codes: Iterable[str], code_sha256: str) -> Optional[str]:
    for code in {clean_code(c) for c in codes} - {""}:
        if hmac.compare_digest(_sha256(code), code_sha256):
            return code
    return None


@dataclass(frozen=True)
class Session:
    """A signed-in browser: whose it is, its CSRF token, and when it began and was last used (epoch seconds)."""

    annotator: str
    csrf: str
    created: float
    last_seen: float


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
                columns = [r[1] for r in setup.execute("PRAGMA table_info(sessions)")]
                if "token" in columns:
                    # Sessions of the first schema (plain tokens, no CSRF token, no expiry): drop them, so their
                    # annotators sign in again; the answers are untouched.
                    setup.execute("DROP TABLE sessions")
                setup.executescript(SCHEMA)
            finally:
                setup.close()
            with self._connect() as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'items_sha256'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta (key, value) VALUES ('items_sha256', ?)", (items_sha256,))
                    db.execute("INSERT INTO meta (key, value) VALUES ('created_at', ?)", (_now(),))
                # The key that signs the sign-in form's CSRF tokens; kept here so a restart keeps open forms valid.
                secret = db.execute("SELECT value FROM meta WHERE key = 'form_secret'").fetchone()
                if secret is None:
                    secret = (secrets.token_hex(32),)
                    db.execute("INSERT INTO meta (key, value) VALUES ('form_secret', ?)", secret)
                self.form_secret = bytes.fromhex(secret[0])
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
            db.create_function("name_key", 1, name_key, deterministic=True)
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

    # Annotators: a name is claimed by its first sign-in, with a personal code only its owner knows.
    @staticmethod
    def _display_name(db: sqlite3.Connection, key: str) -> Optional[str]:
        row = db.execute("SELECT display_name FROM annotators WHERE name_key = ?", (key,)).fetchone()
        if row is None:  # a name that answered before names were claimed (an older database)
            row = db.execute("SELECT annotator FROM submissions WHERE name_key(annotator) = ? "
                             "ORDER BY submitted_at, rowid LIMIT 1", (key,)).fetchone()
        return row[0] if row else None

    def sign_in(self, name: str, codes: Iterable[str]) -> tuple[str, str]:
        """(display name, personal code) of the annotator `name`: claims the name when nobody has, else needs one
        of `codes` to be its code; raises NameTaken otherwise."""
        key = name_key(name)
        with self._connect() as db:  # one transaction: two first sign-ins under one name cannot both claim it
            row = db.execute("SELECT display_name, code_sha256 FROM annotators WHERE name_key = ?", (key,)).fetchone()
            if row is not None:
                display, stored = row
                code = _code_among(codes, stored)
                if code is None:
                    raise NameTaken(display)
                return display, code
            display = self._display_name(db, key) or clean_name(name)
            code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_CHARS))
            db.execute("INSERT INTO annotators (name_key, display_name, code_sha256, created_at) VALUES (?, ?, ?, ?)",
                       (key, display, _sha256(code), _now()))
        return display, code

    def code_among(self, annotator: str, codes: Iterable[str]) -> Optional[str]:
        """The one of `codes` that is the personal code of `annotator`, if any."""
        with self._connect() as db:
            row = db.execute("SELECT code_sha256 FROM annotators WHERE name_key = ?", (name_key(annotator),)).fetchone()
        return None if row is None else _code_among(codes, row[0])

    # Sessions: a random token in an HTTP-only cookie names the annotator; only its sha256 is stored, so the database
    # alone does not let anyone act as an annotator. Rows survive server restarts.
    def create_session(self, annotator: str, now: float) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(annotator, secrets.token_urlsafe(32), now, now)
        with self._connect() as db:
            db.execute("INSERT INTO sessions (token_sha256, annotator, csrf, created, last_seen) VALUES (?, ?, ?, ?, ?)",
                       (_sha256(token), annotator, session.csrf, now, now))
        return token, session

    def session(self, token: str | None) -> Optional[Session]:
        if not token:
            return None
        with self._connect() as db:
            row = db.execute("SELECT annotator, csrf, created, last_seen FROM sessions WHERE token_sha256 = ?",
                             (_sha256(token),)).fetchone()
        return Session(*row) if row else None

    def touch_session(self, token: str, now: float) -> None:
        with self._connect() as db:
            db.execute("UPDATE sessions SET last_seen = ? WHERE token_sha256 = ?", (now, _sha256(token)))

    def end_session(self, token: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM sessions WHERE token_sha256 = ?", (_sha256(token),))

    def forget_sessions(self, idle_before: float, created_before: float) -> None:
        """Delete the sessions that expired: unused since `idle_before` or begun before `created_before`."""
        with self._connect() as db:
            db.execute("DELETE FROM sessions WHERE last_seen < ? OR created < ?", (idle_before, created_before))

    # Answers.
    def answered(self, annotator: str) -> dict[str, str]:
        """item_id → submitted_at for everything this annotator has answered."""
        with self._connect() as db:
            rows = db.execute("SELECT item_id, submitted_at FROM submissions WHERE name_key(annotator) = ? "
                              "ORDER BY submitted_at DESC, rowid DESC", (name_key(annotator),))
            return dict(rows.fetchall())  # the first answer's time wins when an older database holds two spellings

    def submit(self, answer: Answer) -> str:
        """Store one answer atomically; returns its timestamp. A second answer to the same item is refused."""
        submitted_at = _now()
        try:
            with self._connect() as db:
                # Under any spelling of the name: the primary key only compares them byte for byte.
                if db.execute("SELECT 1 FROM submissions WHERE name_key(annotator) = ? AND item_id = ?",
                              (name_key(answer.annotator), answer.item_id)).fetchone():
                    raise sqlite3.IntegrityError("answered under another spelling")
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
        """Every stored answer, in submission order, under each annotator's first spelling (see one_spelling)."""
        with self._connect() as db:
            claimed = dict(db.execute("SELECT name_key, display_name FROM annotators").fetchall())
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
        return one_spelling([
            Answer(annotator, item_id, ranks.get((annotator, item_id), {}),
                   {slot: tuple(f) for slot, f in flags.get((annotator, item_id), {}).items()}, submitted_at)
            for annotator, item_id, submitted_at in subs
        ], claimed)


def one_spelling(answers: list[Answer], names: Optional[dict[str, str]] = None) -> list[Answer]:
    """The answers with every spelling of a name ("Carol", "carol") under one name: `names` (name_key → display
    name) where given, else the first spelling met. An annotator's second answer to an item under another spelling
    (possible only in databases written before names were compared this way) is dropped: the first one counts."""
    names = dict(names or {})
    seen: set[tuple[str, str]] = set()
    out = []
    for answer in answers:
        key = name_key(answer.annotator)
        display = names.setdefault(key, answer.annotator)
        if (key, answer.item_id) in seen:
            log.warning("%r answered item %s twice under different spellings; only the first answer counts",
                        display, answer.item_id)
            continue
        seen.add((key, answer.item_id))
        out.append(answer if answer.annotator == display else replace(answer, annotator=display))
    return out

"""SQLite storage of annotators' answers: who answered which item when, ranks per criterion, flags.

Every write is one transaction and the database runs in WAL mode, so an answer is either stored whole or not at
all and survives a browser refresh or a server restart. UNIQUE constraints make a second submission of the same
item by the same annotator (double click, back-button resubmit) fail instead of being stored twice. The database
remembers the sha256 of the items file it was started with and refuses any other.

Annotator names are one identity per `name_key` (Unicode NFKC, case-folded, whitespace collapsed): "Carol" and
"carol" are one annotator, shown with the first spelling; submissions store the key in an indexed column. The
first sign-in under a name claims it with a random personal code (stored as its sha256); later sign-ins under that
name need the code. Databases written before the codes existed keep their answers; their old sessions are dropped
(annotators sign in again), and every name that answered gets a code at once, written for the organiser to a file
next to the database (`<db stem>-personal-codes.txt`, mode 0600), so no token holder can claim it by typing it.
`AnswerStore.read_only` (for `report`) reads any of these schemas as it is and never writes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Optional

import regex
from fontTools.unicodedata import script_extension, script_name

from train.errors import DataError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    token_sha256 TEXT PRIMARY KEY, annotator TEXT NOT NULL, csrf TEXT NOT NULL,
    created REAL NOT NULL, last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS annotators (
    name_key TEXT PRIMARY KEY, display_name TEXT NOT NULL, code_sha256 TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS submissions (
    annotator TEXT NOT NULL, item_id TEXT NOT NULL, submitted_at TEXT NOT NULL, name_key TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (annotator, item_id));
CREATE TABLE IF NOT EXISTS used_signin_forms (nonce_sha256 TEXT PRIMARY KEY, used REAL NOT NULL);
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


# Indexed so that an annotator's answers are found without reading every row. Not UNIQUE with item_id: databases
# of before name keys may hold one annotator's two answers to an item under two spellings (the first one counts).
INDEX = "CREATE INDEX IF NOT EXISTS submissions_by_name_key ON submissions (name_key, item_id)"


log = logging.getLogger("eval.human.store")
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O or 1/I: read off a screen and typed in
CODE_CHARS = 12  # 60 bits: out of reach of guessing over HTTP
CODES_FILE_SUFFIX = "-personal-codes.txt"
MAX_NAME_CHARS = 64
# Characters a name may not hold because they show as nothing: Unicode's default-ignorable code points (zero-width
# characters, fillers, variation selectors, soft hyphen...) and a few printable blanks that are not among them.
_INVISIBLE = regex.compile(r"[\p{Default_Ignorable_Code_Point}\u2800]")
_NO_SCRIPT = {"Zyyy", "Zinh", "Zzzz"}  # common (digits, punctuation), inherited (combining marks), unknown
# Scripts written together in one language (UTS #39's augmented script sets): Japanese, Korean, Chinese with Bopomofo.
_AUGMENTED = {"Hani": {"Hanb", "Jpan", "Kore"}, "Hira": {"Jpan"}, "Kana": {"Jpan"}, "Hang": {"Kore"}, "Bopo": {"Hanb"}}


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


def name_problem(name: str) -> Optional[str]:
    """Why `name` (as cleaned by clean_name) cannot be an annotator's name, as one sentence for the sign-in page, or
    None. Refused besides empty and overlong names: characters that show as nothing, and names mixing scripts (a
    Cyrillic "а" among Latin letters), since either makes a new annotator who looks like an existing one on every
    page and in the report."""
    if not name or len(name) > MAX_NAME_CHARS:
        return f"Enter your name (1 to {MAX_NAME_CHARS} characters); it identifies your answers."
    found = _INVISIBLE.search(name)
    hidden = found.group() if found else next((ch for ch in name if not ch.isprintable()), None)
    if hidden is not None:
        described = unicodedata.name(hidden, "a control or unassigned character")
        return (f"Your name contains an invisible character (U+{ord(hidden):04X} {described}), so it could look "
                "like another name: type it with visible characters only.")
    letters = [scripts for ch in unicodedata.normalize("NFKC", name)
               if (scripts := set(script_extension(ch)) - _NO_SCRIPT)]
    shared = set.intersection(*({a for s in scripts for a in (s, *_AUGMENTED.get(s, ()))} for scripts in letters)) \
        if letters else {"Zyyy"}
    if shared:
        return None
    named = sorted({script_name(min(scripts)) for scripts in letters})
    return (f"Your name mixes letters of different scripts ({', '.join(named[:-1])} and {named[-1]}), so it could "
            "look like another name: type it in one script.")


def clean_code(code: str) -> str:
    """A personal code as typed ("abcd-efgh jkmn") in its canonical form ("ABCDEFGHJKMN")."""
    return "".join(ch for ch in code.upper() if ch.isalnum())


def format_code(code: str) -> str:
    return "-".join(code[i:i + 4] for i in range(0, len(code), 4))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _new_code() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_CHARS))


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
    """The answers database of one study (one items.jsonl). `AnswerStore(path, sha)` opens it for the server,
    creating or migrating it; `AnswerStore.read_only(path, sha)` for reading only."""

    def __init__(self, path: str | Path, items_sha256: str, create: bool = True) -> None:
        self.path = Path(path)
        self._read_only = ""  # for read_only: the URI parameters of its connections
        if not create and not self.path.is_file():
            raise DataError(f"answers database not found at {self.path}: pass the --db that `serve` wrote to")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._migrate()
            with self._connect() as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'items_sha256'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta (key, value) VALUES ('items_sha256', ?)", (items_sha256,))
                    db.execute("INSERT INTO meta (key, value) VALUES ('created_at', ?)", (_now(),))
                # The key that signs the sign-in forms' pre-session cookies and tokens; kept here so a restart keeps
                # open sign-in forms valid.
                secret = db.execute("SELECT value FROM meta WHERE key = 'form_secret'").fetchone()
                if secret is None:
                    secret = (secrets.token_hex(32),)
                    db.execute("INSERT INTO meta (key, value) VALUES ('form_secret', ?)", secret)
                self.form_secret = bytes.fromhex(secret[0])
            self._check_items(row, items_sha256)
            self._claim_names_that_answered()
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path} is not a usable SQLite answers database ({e}): pass another --db") from None

    @classmethod
    def read_only(cls, path: str | Path, items_sha256: str) -> "AnswerStore":
        """The database at `path` opened for reading only: nothing is created, migrated or written, so a read-only
        file, or one of an older schema, is read as it is."""
        self = cls.__new__(cls)
        self.path, self._read_only, self.form_secret = Path(path), "mode=ro", b""
        if not self.path.is_file():
            raise DataError(f"answers database not found at {self.path}: pass the --db that `serve` wrote to")
        wal = self.path.with_name(self.path.name + "-wal")
        for attempt in range(2):
            try:
                with self._connect() as db:
                    row = db.execute("SELECT value FROM meta WHERE key = 'items_sha256'").fetchone()
                break
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):
                    raise DataError(f"{self.path} is not an answers database ({e}): pass another --db") from None
                # A WAL database needs its -shm file, which SQLite cannot create in a read-only folder. With no
                # -wal file left, every answer is in the database file itself: read it as immutable.
                if attempt or (wal.exists() and wal.stat().st_size):
                    raise DataError(f"cannot read {self.path} ({e}): copy it, with its -wal file if any, to a "
                                    f"writable folder and pass that --db") from None
                self._read_only = "mode=ro&immutable=1"
            except sqlite3.DatabaseError as e:
                raise DataError(f"{self.path} is not an SQLite answers database ({e}): pass another --db") from None
        self._check_items(row, items_sha256)
        return self

    def _check_items(self, row: Optional[tuple[str]], items_sha256: str) -> None:
        if row is not None and row[0] != items_sha256:
            raise DataError(
                f"{self.path} holds answers for a different items.jsonl (sha256 {row[0][:12]}…, these items are "
                f"{items_sha256[:12]}…): use the items it was made with, or a new --db for this export"
            )

    def _migrate(self) -> None:
        """Create the tables, or bring those of an older schema up to date (answers kept)."""
        setup = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            setup.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; survives crashes
            setup.execute("BEGIN IMMEDIATE")  # two servers started at once do not both migrate
            columns = [r[1] for r in setup.execute("PRAGMA table_info(sessions)")]
            if "token" in columns:
                # Sessions of the first schema (plain tokens, no CSRF token, no expiry): drop them, so their
                # annotators sign in again; the answers are untouched.
                setup.execute("DROP TABLE sessions")
            had_submissions = bool(setup.execute("PRAGMA table_info(submissions)").fetchall())
            for statement in SCHEMA.split(";"):  # executescript would commit the transaction
                if statement.strip():
                    setup.execute(statement)
            if had_submissions and "name_key" not in [r[1] for r in setup.execute("PRAGMA table_info(submissions)")]:
                setup.execute("ALTER TABLE submissions ADD COLUMN name_key TEXT NOT NULL DEFAULT ''")
            rows = setup.execute("SELECT rowid, annotator FROM submissions WHERE name_key = ''").fetchall()
            setup.executemany("UPDATE submissions SET name_key = ? WHERE rowid = ?",
                              [(name_key(annotator), rowid) for rowid, annotator in rows])
            setup.execute(INDEX)
            setup.execute("COMMIT")
        except BaseException:
            if setup.in_transaction:
                setup.execute("ROLLBACK")
            raise
        finally:
            setup.close()

    def _claim_names_that_answered(self) -> None:
        """Give every name that answered without a personal code (before codes existed) one, so that it is not up
        for grabs, and write them to a file only the organiser can read, who hands each annotator their own. The
        file is written before the codes are stored: if it cannot be, no code is stored that nobody knows."""
        codes_file = self.path.with_name(self.path.stem + CODES_FILE_SUFFIX)
        with self._connect() as db:
            unclaimed: dict[str, str] = {}
            for key, annotator in db.execute(
                    "SELECT name_key, annotator FROM submissions "
                    "WHERE name_key NOT IN (SELECT name_key FROM annotators) ORDER BY submitted_at, rowid"):
                unclaimed.setdefault(key, annotator)  # shown as first written
            if not unclaimed:
                return
            codes = {key: _new_code() for key in unclaimed}
            lines = [f"# Personal codes of the annotators who answered before codes existed ({self.path}, {_now()}).",
                     "# Give each annotator their own code privately: they type it in with their name to sign in.",
                     *(f"{format_code(codes[key])}  {display if display.isprintable() else ascii(display)}"
                       for key, display in unclaimed.items())]
            try:
                fd = os.open(codes_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                with os.fdopen(fd, "a", encoding="utf-8") as out:
                    os.fchmod(out.fileno(), 0o600)
                    out.write("\n".join(lines) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as e:
                raise DataError(f"cannot write the personal codes of the annotators of {self.path} to {codes_file} "
                                f"({e.strerror}): make its folder writable") from None
            db.executemany(
                "INSERT INTO annotators (name_key, display_name, code_sha256, created_at) VALUES (?, ?, ?, ?)",
                [(key, display, _sha256(codes[key]), _now()) for key, display in unclaimed.items()])
        log.warning("%d annotators answered before personal codes existed: their codes are in %s (readable by you "
                    "only); give each annotator their own, who types it in with their name to sign in",
                    len(unclaimed), codes_file)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per operation: safe across the server's worker threads.
        if self._read_only:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?{self._read_only}", timeout=30, isolation_level=None,
                                 uri=True)
        else:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("BEGIN" if self._read_only else "BEGIN IMMEDIATE")  # IMMEDIATE: a write lock up front
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def _has_table(self, db: sqlite3.Connection, table: str) -> bool:
        found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
        return found is not None

    # Annotators: a name is claimed by its first sign-in, with a personal code only its owner knows.
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
            display, code = clean_name(name), _new_code()
            db.execute("INSERT INTO annotators (name_key, display_name, code_sha256, created_at) VALUES (?, ?, ?, ?)",
                       (key, display, _sha256(code), _now()))
        return display, code

    def code_among(self, annotator: str, codes: Iterable[str]) -> Optional[str]:
        """The one of `codes` that is the personal code of `annotator`, if any."""
        with self._connect() as db:
            row = db.execute("SELECT code_sha256 FROM annotators WHERE name_key = ?", (name_key(annotator),)).fetchone()
        return None if row is None else _code_among(codes, row[0])

    # Sign-in forms: each pre-session nonce signs in once.
    def use_signin_nonce(self, nonce: str, now: float, forget_before: float) -> bool:
        """Record that the sign-in form of `nonce` was used; False when it already was. Nonces used before
        `forget_before` are forgotten: their forms have expired anyway."""
        with self._connect() as db:
            db.execute("DELETE FROM used_signin_forms WHERE used < ?", (forget_before,))
            try:
                db.execute("INSERT INTO used_signin_forms (nonce_sha256, used) VALUES (?, ?)", (_sha256(nonce), now))
            except sqlite3.IntegrityError:
                return False
        return True

    def signin_nonce_used(self, nonce: str) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM used_signin_forms WHERE nonce_sha256 = ?",
                              (_sha256(nonce),)).fetchone() is not None

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
            rows = db.execute("SELECT item_id, submitted_at FROM submissions WHERE name_key = ? "
                              "ORDER BY submitted_at DESC, rowid DESC", (name_key(annotator),))
            return dict(rows.fetchall())  # the first answer's time wins when an older database holds two spellings

    def submit(self, answer: Answer) -> str:
        """Store one answer atomically; returns its timestamp. A second answer to the same item is refused."""
        submitted_at = _now()
        try:
            with self._connect() as db:
                # Under any spelling of the name: the primary key only compares them byte for byte.
                key = name_key(answer.annotator)
                if db.execute("SELECT 1 FROM submissions WHERE name_key = ? AND item_id = ?",
                              (key, answer.item_id)).fetchone():
                    raise sqlite3.IntegrityError("answered under another spelling")
                db.execute("INSERT INTO submissions (annotator, item_id, submitted_at, name_key) VALUES (?, ?, ?, ?)",
                           (answer.annotator, answer.item_id, submitted_at, key))
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
            claimed = (dict(db.execute("SELECT name_key, display_name FROM annotators").fetchall())
                       if self._has_table(db, "annotators") else {})  # not in a database of before codes
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

"""The store on one SQLite file, the embedded default: its schema, connection settings, retention and copies."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aggregator.store import Store, StoreError

# WITHOUT ROWID: slots keyed (slot, unit) ingest time-ordered batches about 5x faster than (unit, slot)
# and read one day for all units in one range scan; readings are looked up per unit, so (unit, at).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    unit TEXT NOT NULL, at BIGINT NOT NULL, meter TEXT NOT NULL,
    fwd BIGINT, rev BIGINT, e1 INTEGER NOT NULL, coef INTEGER NOT NULL, digits INTEGER NOT NULL,
    flags INTEGER NOT NULL DEFAULT 0, seq BIGINT NOT NULL, sent BIGINT NOT NULL, received BIGINT NOT NULL,
    PRIMARY KEY (unit, at)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slots (
    slot BIGINT NOT NULL, unit TEXT NOT NULL,
    imp BIGINT, imp_q TEXT, imp_flags INTEGER NOT NULL DEFAULT 0,
    exp BIGINT, exp_q TEXT, exp_flags INTEGER NOT NULL DEFAULT 0,
    meter TEXT, e1 INTEGER, coef INTEGER,
    PRIMARY KEY (slot, unit)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, customer TEXT NOT NULL, day TEXT NOT NULL, at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT, received BIGINT NOT NULL, topic TEXT NOT NULL, unit TEXT,
    reason TEXT NOT NULL, detail TEXT NOT NULL, payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS quarantine_reason ON quarantine (reason, id);
CREATE INDEX IF NOT EXISTS quarantine_unit ON quarantine (unit, id);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, channel TEXT NOT NULL, payload BLOB NOT NULL,
    created REAL NOT NULL, next_try REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    sent REAL, given_up REAL, last_error TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_try) WHERE sent IS NULL AND given_up IS NULL;
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY, customer TEXT NOT NULL, name TEXT NOT NULL, hash TEXT NOT NULL, created BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS operators (name TEXT PRIMARY KEY, hash TEXT NOT NULL, created BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS web_sessions (
    id TEXT PRIMARY KEY, operator TEXT NOT NULL, csrf TEXT NOT NULL, created BIGINT NOT NULL, seen BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS downloads (
    customer TEXT NOT NULL, file TEXT NOT NULL, at BIGINT NOT NULL, via TEXT NOT NULL, who TEXT NOT NULL,
    count BIGINT NOT NULL, PRIMARY KEY (customer, file)) WITHOUT ROWID;
"""


def sqlite_path(url: str) -> Path:
    """The file of a `sqlite:///path` URL (relative paths allowed: `sqlite:///data/smame.db`)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError(f"not a sqlite:/// URL: {url!r}")
    return Path(url[len(prefix) :])


def file_identity(path: Path) -> tuple[int, int] | None:
    """Device and inode of the file at `path` (None when there is none): a store deleted or replaced under a
    running smame shows as another identity."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class SqliteStore(Store):
    """The store on an SQLite file, in write-ahead-log mode."""

    errors = (sqlite3.OperationalError,)

    def __init__(self, path: Path, synchronous: str = "FULL", cache_mib: int = 8) -> None:
        super().__init__(f"sqlite:///{path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

        def connect_and_set_up() -> None:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._setup(synchronous, cache_mib)

        self._open(str(path), sqlite3.Error, connect_and_set_up)
        self.identity = file_identity(path)

    def check_identity(self) -> None:
        """Raise StoreError when the file at `path` is no longer the one this store has open: what it commits
        would be lost with the deleted file, so nothing may be acknowledged on its word."""
        if file_identity(self.path) != self.identity:
            raise StoreError(f"the database file {self.path} was deleted or replaced while open; restart smame")

    def _setup(self, synchronous: str, cache_mib: int) -> None:
        self.db.execute("PRAGMA busy_timeout=10000")
        self._wal()
        # FULL: a committed batch survives power loss too, and acks are sent only after it.
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        # A batch of thousands of units dirties a page per unit; checkpointing every 1,000 pages (the default)
        # would copy the WAL back after nearly every batch.
        self.db.execute("PRAGMA wal_autocheckpoint=10000")
        # Each connection's page cache fills up to its size with a large fleet, in every process that has one.
        # Ingest drained a 600,000-telegram backlog as fast with 16 MiB as with 64 (the pages it misses are in
        # the OS's cache); connections that scan (export, report) gain nothing from more than a few.
        self.db.execute(f"PRAGMA cache_size={-1024 * int(cache_mib)}")
        self.db.executescript(_SCHEMA)
        self._stamp_schema(str(self.path))

    def _wal(self, patience: float = 10.0) -> None:
        # Switching a new database to WAL takes an exclusive lock and fails at once, without the busy timeout,
        # while another process (a second ingest worker, a command) is opening it too.
        deadline = time.monotonic() + patience
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Run one statement."""
        return self.db.execute(sql, args)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement for each row of arguments."""
        self.db.executemany(sql, rows)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit of work: committed on success, rolled back on any error. IMMEDIATE: the write lock
        is taken at the start, so two writers never both read and then fail to write."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _close(self) -> None:
        self.db.close()

    def prune(self, before: int, chunk: int = 500) -> tuple[int, int]:
        """Delete readings and slots older than `before` (epoch); return how many of each.

        Readings are keyed (unit, at), so they are deleted unit by unit, a few hundred units per
        transaction: ingest never waits long for the write lock. The units to visit are those with
        expiring slots, a cheap range of the (slot, unit) key.
        """
        units = [u for (u,) in self.db.execute("SELECT DISTINCT unit FROM slots WHERE slot < ?", (before,))]
        readings = 0
        for i in range(0, len(units), chunk):
            with self.transaction():
                for unit in units[i : i + chunk]:
                    readings += self.db.execute(
                        "DELETE FROM readings WHERE unit = ? AND at < ?", (unit, before)
                    ).rowcount
        with self.transaction():
            slots = self.db.execute("DELETE FROM slots WHERE slot < ?", (before,)).rowcount
            self.db.execute("DELETE FROM changes WHERE at < ?", (before,))
            self.db.execute("DELETE FROM downloads WHERE at < ?", (before,))
        return readings, slots

    def backup(self, target: Path) -> None:
        """A consistent copy of the database while it is in use (SQLite's online backup), written atomically."""
        live = self.path.resolve()
        if target.resolve() in (live, live.with_name(live.name + "-wal"), live.with_name(live.name + "-shm")):
            raise StoreError(f"{target} is the live database itself: give the copy another name")
        tmp = target.with_name(target.name + ".tmp")
        tmp.unlink(missing_ok=True)
        copy = sqlite3.connect(tmp)
        try:
            self.db.backup(copy, pages=4096)  # in steps, so ingest is held up only briefly at a time
        finally:
            copy.close()
        os.replace(tmp, target)


def check_copy(path: Path) -> dict[str, int]:
    """Open a copy read-only and prove it whole (SQLite's integrity check) and smame's (its schema); return the
    rows of its main tables. Raises StoreError saying what is wrong."""
    if not path.is_file():
        raise StoreError(f"{path}: no such file")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            verdict = db.execute("PRAGMA integrity_check").fetchone()[0]
            if verdict != "ok":
                raise StoreError(f"{path}: damaged: {verdict}")
            if db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() is None:
                raise StoreError(f"{path}: not a smame database (no schema version)")
            return {
                t: int(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
                for t in ("readings", "slots", "quarantine", "outbox")
            }
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: not a usable smame database: {exc}") from None


def restore_copy(copy: Path, live: Path) -> None:
    """Put a checked copy in place of the database at `live` (smame must be stopped): written beside it and
    renamed, after the old one's write-ahead log, which would otherwise be applied to the copy."""
    check_copy(copy)
    tmp = live.with_name(live.name + ".restore")
    shutil.copyfile(copy, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    for leftover in (live.with_name(live.name + "-wal"), live.with_name(live.name + "-shm")):
        leftover.unlink(missing_ok=True)
    os.replace(tmp, live)

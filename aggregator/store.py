"""The SQLite store: readings (the durable truth), slots (derived), changes, quarantine, the outbox, meta.

The schema of every table is here, and the queries of all but the outbox (`monitoring.outbox_table`):
a narrow interface of small synchronous operations over one connection. In the smame process every
transaction runs on the store's own thread (`Store.call`), so the event loop never waits on disk; the
writer process (`aggregator.writer`) commits each batch of readings with its slots and change log in
one transaction on a connection of its own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from aggregator.slots import Point
from kernel.reading import Refused

T = TypeVar("T")
SCHEMA_VERSION = 1
REGISTERS = ("fwd", "rev")  # column names; `imp`/`exp` on the slot side

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
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, channel TEXT NOT NULL, payload BLOB NOT NULL,
    created REAL NOT NULL, next_try REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    sent REAL, given_up REAL, last_error TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_try) WHERE sent IS NULL AND given_up IS NULL;
"""

_READING_COLUMNS = "unit, at, meter, fwd, rev, e1, coef, digits, flags, seq, sent, received"
_SLOT_SET = {
    "imp": "imp = excluded.imp, imp_q = excluded.imp_q, imp_flags = excluded.imp_flags",
    "exp": "exp = excluded.exp, exp_q = excluded.exp_q, exp_flags = excluded.exp_flags",
}


class SlotRow(msgspec.Struct, frozen=True, gc=False):
    """A stored slot of one unit, both registers, as every query of slots returns it. A Struct: a daily
    report reads millions of them (built about ten times faster than a dataclass)."""

    slot: int
    unit: str
    imp: int | None
    imp_q: str | None
    imp_flags: int
    exp: int | None
    exp_q: str | None
    exp_flags: int
    meter: str | None
    e1: int | None
    coef: int | None


_SLOT_COLUMNS = ", ".join(SlotRow.__struct_fields__)


@dataclass(frozen=True, slots=True)
class QuarantineRow(Refused):
    """A refused telegram or reading as the quarantine keeps it, under its id."""

    id: int


class StoreError(OSError):
    """The store cannot be opened; the message names the file and SQLite's reason."""


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


class Store:
    """SQLite storage; synchronous methods, each meant to run on the store thread."""

    def __init__(self, path: Path, synchronous: str = "FULL", cache_mib: int = 8) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._setup(synchronous, cache_mib)
        except sqlite3.Error as exc:
            self._pool.shutdown()
            raise StoreError(f"cannot open the store {path}: {exc}") from exc
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
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES ('schema', ?) ON CONFLICT(key) DO NOTHING", (str(SCHEMA_VERSION),)
        )

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

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the store thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (after the thread's last call)."""
        self._pool.submit(self.db.close).result()
        self._pool.shutdown()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit of work: committed on success, rolled back on any error."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- readings -------------------------------------------------------------------------------

    def insert_readings(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Insert new readings (tuples in `_READING_COLUMNS` order); the caller knows they are new."""
        self.db.executemany(f"INSERT INTO readings ({_READING_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)

    def reading(self, unit: str, at: int) -> tuple[Any, ...] | None:
        """The stored reading at `(unit, at)` as (meter, fwd, rev, e1, coef, digits, flags)."""
        row: tuple[Any, ...] | None = self.db.execute(
            "SELECT meter, fwd, rev, e1, coef, digits, flags FROM readings WHERE unit = ? AND at = ?", (unit, at)
        ).fetchone()
        return row

    def last_at(self, unit: str) -> int | None:
        """Time of the unit's newest reading."""
        row = self.db.execute("SELECT max(at) FROM readings WHERE unit = ?", (unit,)).fetchone()
        return None if row[0] is None else int(row[0])

    def first_at(self, unit: str) -> int | None:
        """Time of the unit's oldest reading still stored."""
        row = self.db.execute("SELECT min(at) FROM readings WHERE unit = ?", (unit,)).fetchone()
        return None if row[0] is None else int(row[0])

    def add_reading_flags(self, unit: str, at: int, flags: int) -> None:
        """Set flags on a stored reading (e.g. a conflicting copy arrived)."""
        self.db.execute("UPDATE readings SET flags = flags | ? WHERE unit = ? AND at = ?", (flags, unit, at))

    def neighbour(self, unit: str, at: int, register: str, before: bool) -> Point | None:
        """The nearest point of one register strictly before (or after) `at`."""
        assert register in REGISTERS
        op, order = ("<", "DESC") if before else (">", "ASC")
        row = self.db.execute(
            f"SELECT at, {register}, meter, digits, e1, coef, flags FROM readings "
            f"WHERE unit = ? AND at {op} ? AND {register} IS NOT NULL ORDER BY at {order} LIMIT 1",
            (unit, at),
        ).fetchone()
        return None if row is None else Point(*row)

    def reading_count(self) -> int:
        """Number of stored readings."""
        return int(self.db.execute("SELECT count(*) FROM readings").fetchone()[0])

    # --- slots ----------------------------------------------------------------------------------

    def upsert_slots(self, registers: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        """Write slots of the given registers (`imp`, `exp` or both).

        Rows hold (slot, unit, values..., meter, e1, coef)."""
        cols = ["slot", "unit"]
        for r in registers:
            cols += [r, f"{r}_q", f"{r}_flags"]
        cols += ["meter", "e1", "coef"]
        sets = ", ".join(_SLOT_SET[r] for r in registers)
        self.db.executemany(
            f"INSERT INTO slots ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
            f"ON CONFLICT (slot, unit) DO UPDATE SET {sets}, "
            "meter = excluded.meter, e1 = excluded.e1, coef = excluded.coef",
            rows,
        )

    def slots(self, unit: str, after: int, until: int) -> list[SlotRow]:
        """Stored slots of a unit with `after < slot <= until`."""
        rows = self.db.execute(
            f"SELECT {_SLOT_COLUMNS} FROM slots WHERE slot > ? AND slot <= ? AND unit = ? ORDER BY slot",
            (after, until, unit),
        ).fetchall()
        return [SlotRow(*r) for r in rows]

    def units_slots(self, ends: list[int], first: str, last: str) -> list[SlotRow]:
        """The slots ending at `ends` of the units from `first` to `last` (by id): one index range per slot
        end, so a share of a large fleet costs its own rows only."""
        marks = ",".join("?" * len(ends))
        rows = self.db.execute(
            f"SELECT {_SLOT_COLUMNS} FROM slots WHERE slot IN ({marks}) AND unit >= ? AND unit <= ?",
            (*ends, first, last),
        )
        return [SlotRow(*r) for r in rows]

    def last_readings(self, units: Iterable[str]) -> dict[str, int | None]:
        """Time of each unit's newest reading (None: never heard of)."""
        return {u: self.last_at(u) for u in units}

    def quarantine_between(self, start: int, end: int) -> tuple[dict[str, int], list[str]]:
        """Quarantined items received in [start, end): counts by reason, and the unknown units that tried."""
        counts = {
            r: int(n)
            for r, n in self.db.execute(
                "SELECT reason, count(*) FROM quarantine WHERE received >= ? AND received < ? GROUP BY reason",
                (start, end),
            )
        }
        unknown = [
            u
            for (u,) in self.db.execute(
                "SELECT DISTINCT unit FROM quarantine WHERE reason = 'unknown_unit' AND received >= ? AND received < ? "
                "ORDER BY unit",
                (start, end),
            )
        ]
        return counts, unknown

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

    # --- meta -----------------------------------------------------------------------------------

    def get_meta(self, key: str, default: str = "") -> str:
        """A value the services keep across restarts (e.g. the exporter's cursor)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Store such a value."""
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # --- changes and quarantine ----------------------------------------------------------------

    def add_changes(self, pairs: Iterable[tuple[str, str]], at: int) -> None:
        """Record that these (customer, local day) pairs changed."""
        self.db.executemany("INSERT INTO changes (customer, day, at) VALUES (?, ?, ?)", [(c, d, at) for c, d in pairs])

    def changes_since(self, after_id: int) -> tuple[int, set[tuple[str, str]]]:
        """The (customer, day) pairs changed after a change id, and the newest id."""
        rows = self.db.execute("SELECT id, customer, day FROM changes WHERE id > ? ORDER BY id", (after_id,)).fetchall()
        last = rows[-1][0] if rows else after_id
        return last, {(c, d) for _, c, d in rows}

    def add_quarantine(self, rows: Iterable[tuple[int, str, str | None, str, str, bytes]]) -> None:
        """Keep refused input: (received, topic, unit, reason, detail, payload)."""
        self.db.executemany(
            "INSERT INTO quarantine (received, topic, unit, reason, detail, payload) VALUES (?, ?, ?, ?, ?, ?)", rows
        )

    def quarantine(self, reason: str | None = None, limit: int = 100) -> list[QuarantineRow]:
        """Newest quarantined items first, optionally of one reason."""
        sql = "SELECT received, topic, unit, reason, detail, payload, id FROM quarantine"
        args: tuple[Any, ...] = ()
        if reason:
            sql += " WHERE reason = ?"
            args = (reason,)
        rows = self.db.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [QuarantineRow(*r) for r in rows]

    def prune_quarantine(self, before: int) -> int:
        """Forget refused input received before `before` (epoch); return how many rows went."""
        with self.transaction():
            return int(self.db.execute("DELETE FROM quarantine WHERE received < ?", (before,)).rowcount)

    def quarantine_after(self, reason: str, after_id: int, limit: int = 1000) -> list[QuarantineRow]:
        """Quarantined items of one reason with ids above `after_id`, oldest first."""
        rows = self.db.execute(
            "SELECT received, topic, unit, reason, detail, payload, id FROM quarantine "
            "WHERE reason = ? AND id > ? ORDER BY id LIMIT ?",
            (reason, after_id, limit),
        ).fetchall()
        return [QuarantineRow(*r) for r in rows]

    def quarantine_counts(self) -> dict[str, int]:
        """Number of quarantined items per reason."""
        rows = self.db.execute("SELECT reason, count(*) FROM quarantine GROUP BY reason").fetchall()
        return {r: int(n) for r, n in rows}

    # --- what the monitor watches ---------------------------------------------------------------

    def slot_quality_counts(self, after: int, until: int) -> dict[str, int]:
        """Stored import slots with `after < slot <= until`, counted by quality."""
        rows = self.db.execute(
            "SELECT coalesce(imp_q, 'M'), count(*) FROM slots WHERE slot > ? AND slot <= ? GROUP BY 1", (after, until)
        ).fetchall()
        return {str(q): int(n) for q, n in rows}


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

"""The store on one SQLite file, the embedded default: its schema, connection settings, retention and copies."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aggregator.slots import Point
from aggregator.store import OPERATOR_EXTRA, PURGED_BY_UNIT, REGISTERS, TOKEN_EXTRA, Store, StoreError
from kernel.timegrid import SLOT

log = logging.getLogger("smame.store")
_PROBES = 96  # half-hour ends looked up a statement when a unit's neighbouring reading is searched for
_UNITS = 500  # units a statement when spans are read

# WITHOUT ROWID, keyed by time first: a batch of the fleet's telegrams appends at the tree's right edge. Keyed by
# unit, each telegram landed in another unit's page in the middle of the tree, and with weeks stored a commit
# cost about ten times as much (docs/performance.md). What is asked per unit comes from `reading_span`, kept in
# the same transaction, and from key look-ups on the unit's half-hour ends.
_V1_COLUMNS = "unit, at, meter, fwd, rev, e1, coef, digits, flags, seq, sent, received"  # schema 1's readings
_READINGS = """
CREATE TABLE IF NOT EXISTS readings (
    unit TEXT NOT NULL, at BIGINT NOT NULL, meter TEXT NOT NULL,
    fwd BIGINT, rev BIGINT, e1 INTEGER NOT NULL, coef INTEGER NOT NULL, digits INTEGER NOT NULL,
    flags INTEGER NOT NULL DEFAULT 0, seq BIGINT NOT NULL, sent BIGINT NOT NULL, received BIGINT NOT NULL,
    diag BLOB, PRIMARY KEY (at, unit)) WITHOUT ROWID"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
{_READINGS};
CREATE TABLE IF NOT EXISTS reading_span (
    unit TEXT PRIMARY KEY, first_at BIGINT NOT NULL, last_at BIGINT NOT NULL,
    first_fwd BIGINT, last_fwd BIGINT, first_rev BIGINT, last_rev BIGINT) WITHOUT ROWID;
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
    reason TEXT NOT NULL, detail TEXT NOT NULL, payload BLOB NOT NULL, concerns BIGINT);
CREATE INDEX IF NOT EXISTS quarantine_reason ON quarantine (reason, id);
CREATE INDEX IF NOT EXISTS quarantine_unit ON quarantine (unit, id);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, channel TEXT NOT NULL, payload BLOB NOT NULL,
    created REAL NOT NULL, next_try REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    sent REAL, given_up REAL, last_error TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_try) WHERE sent IS NULL AND given_up IS NULL;
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY, customer TEXT NOT NULL, name TEXT NOT NULL, hash TEXT NOT NULL, created BIGINT NOT NULL,
    {", ".join(f"{c} {kind}" for c, kind in TOKEN_EXTRA)});
CREATE TABLE IF NOT EXISTS operators (
    name TEXT PRIMARY KEY, hash TEXT NOT NULL, created BIGINT NOT NULL,
    {", ".join(f"{c} {kind}" for c, kind in OPERATOR_EXTRA)});
CREATE TABLE IF NOT EXISTS web_sessions (
    id TEXT PRIMARY KEY, operator TEXT NOT NULL, csrf TEXT NOT NULL, created BIGINT NOT NULL, seen BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS alert_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
    text TEXT NOT NULL, node TEXT NOT NULL, who TEXT NOT NULL, told BOOLEAN NOT NULL);
CREATE INDEX IF NOT EXISTS alert_log_at ON alert_log (at);
CREATE TABLE IF NOT EXISTS nodes (node TEXT PRIMARY KEY, beat REAL NOT NULL, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS unit_health (
    day BIGINT NOT NULL, unit TEXT NOT NULL,
    readings BIGINT NOT NULL, late BIGINT NOT NULL, delay_p50 BIGINT, delay_max BIGINT, seq_gaps BIGINT NOT NULL,
    restarts BIGINT NOT NULL, clock_offset BIGINT, no_data BIGINT NOT NULL, rsrp REAL, rsrp_min BIGINT,
    rsrq REAL, sinr REAL, ce BIGINT, reboots BIGINT, vsup_min BIGINT, attaches BIGINT, fw TEXT, cell TEXT,
    diag_dropped BIGINT NOT NULL, disconnects BIGINT NOT NULL,
    PRIMARY KEY (day, unit)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS unit_health_unit ON unit_health (unit, day);
CREATE TABLE IF NOT EXISTS unit_risk (
    day BIGINT NOT NULL, unit TEXT NOT NULL, risk REAL NOT NULL, reasons TEXT NOT NULL,
    PRIMARY KEY (day, unit)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS unit_risk_unit ON unit_risk (unit, day);
CREATE TABLE IF NOT EXISTS health_events (
    day BIGINT NOT NULL, scope TEXT NOT NULL, signal TEXT NOT NULL, units BIGINT NOT NULL,
    evaluated BIGINT NOT NULL, words TEXT NOT NULL, PRIMARY KEY (day, scope, signal)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS risk_days (
    day BIGINT PRIMARY KEY, evaluated BIGINT NOT NULL, at_risk BIGINT NOT NULL, assessed BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS unit_status (unit TEXT PRIMARY KEY, online BOOLEAN NOT NULL, since BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS connection_events (
    id INTEGER PRIMARY KEY, unit TEXT NOT NULL, at BIGINT NOT NULL, online BOOLEAN NOT NULL);
CREATE INDEX IF NOT EXISTS connection_events_unit ON connection_events (unit, at);
CREATE INDEX IF NOT EXISTS connection_events_at ON connection_events (at);
CREATE TABLE IF NOT EXISTS bans (
    address TEXT PRIMARY KEY, door TEXT NOT NULL, since REAL NOT NULL, until REAL NOT NULL, node TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS downloads (
    customer TEXT NOT NULL, file TEXT NOT NULL, at BIGINT NOT NULL, via TEXT NOT NULL, who TEXT NOT NULL,
    count BIGINT NOT NULL, PRIMARY KEY (customer, file)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY, unit TEXT NOT NULL, op TEXT NOT NULL, args TEXT NOT NULL, created BIGINT NOT NULL,
    expires BIGINT NOT NULL, who TEXT NOT NULL, origin TEXT NOT NULL, state TEXT NOT NULL, changed BIGINT NOT NULL,
    next_try BIGINT NOT NULL, tries INTEGER NOT NULL, detail TEXT NOT NULL, answer TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS commands_unit ON commands (unit, created);
CREATE INDEX IF NOT EXISTS commands_created ON commands (created);
CREATE INDEX IF NOT EXISTS commands_due ON commands (next_try) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS commands_open ON commands (expires) WHERE state IN ('queued', 'sent');
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at BIGINT NOT NULL, who TEXT NOT NULL, origin TEXT NOT NULL,
    action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
CREATE TABLE IF NOT EXISTS repairs (
    unit TEXT NOT NULL, first_at BIGINT NOT NULL, last_at BIGINT NOT NULL, slots INTEGER NOT NULL,
    command TEXT NOT NULL, asked BIGINT NOT NULL, PRIMARY KEY (unit, first_at)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS repairs_asked ON repairs (asked);
CREATE TABLE IF NOT EXISTS desired (
    scope TEXT NOT NULL, target TEXT NOT NULL, config TEXT NOT NULL, who TEXT NOT NULL, origin TEXT NOT NULL,
    at BIGINT NOT NULL, PRIMARY KEY (scope, target)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reported (unit TEXT PRIMARY KEY, config TEXT NOT NULL, at BIGINT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS config_tries (
    unit TEXT PRIMARY KEY, wanted TEXT NOT NULL, at BIGINT NOT NULL, command TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS firmware (
    version TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size BIGINT NOT NULL, added BIGINT NOT NULL,
    who TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS firmware_chunks (
    version TEXT NOT NULL, n INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (version, n)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS campaigns (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL,
    size BIGINT NOT NULL, target TEXT NOT NULL, plan TEXT NOT NULL, phase TEXT NOT NULL, secret TEXT NOT NULL,
    created BIGINT NOT NULL, who TEXT NOT NULL, origin TEXT NOT NULL, changed BIGINT NOT NULL,
    detail TEXT NOT NULL, total BIGINT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS campaign_units (
    campaign TEXT NOT NULL, seq BIGINT NOT NULL, unit TEXT NOT NULL, step TEXT NOT NULL,
    command TEXT NOT NULL, started BIGINT NOT NULL, changed BIGINT NOT NULL, stage TEXT NOT NULL,
    detail TEXT NOT NULL, probe TEXT NOT NULL, PRIMARY KEY (campaign, seq)) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS campaign_units_unit ON campaign_units (campaign, unit);
CREATE INDEX IF NOT EXISTS campaign_units_open ON campaign_units (campaign, seq) WHERE step IN ('sent', 'updating');
CREATE INDEX IF NOT EXISTS campaign_units_pending ON campaign_units (campaign, seq) WHERE step = 'pending';
CREATE INDEX IF NOT EXISTS slots_unfilled ON slots (slot) WHERE imp_q IN ('E', 'M');
"""


def _span_of(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """The span of one reading (a row in `READING_COLUMNS` order): its time, and for each register with a value."""
    unit, at, _, fwd, rev = row[:5]
    fwd_at, rev_at = (None if fwd is None else at), (None if rev is None else at)
    return unit, at, at, fwd_at, fwd_at, rev_at, rev_at


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
    unit_tables = (*PURGED_BY_UNIT, "reading_span")
    # 2: readings keyed by time, each unit's span of readings beside them; 3: quarantine.concerns; 4: readings.diag;
    # 5: operators' roles and second factors; 6: tokens' expiry and scope
    schema_version = 6

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

    def _migrate(self, found: int) -> None:
        """Schema 1 kept readings keyed (unit, at): rebuild them keyed by time, and their units' spans. Schema
        2 did not note which time a quarantined item is about, schema 3 no unit's diagnostics, schema 4 no operator's
        role or second factor (operators from before keep every power they had: admin), schema 5 no token's expiry
        or scope (tokens from before never expire and read all they could)."""
        if found < 2:
            log.warning(
                "migrating the store %s to schema 2 (readings keyed by time); a large store takes minutes", self.path
            )
            self.db.execute("ALTER TABLE readings RENAME TO readings_v1")
            self.db.execute(_READINGS)  # not executescript(), which would commit the migration's transaction
            self.db.execute(
                f"INSERT INTO readings ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM readings_v1 ORDER BY at, unit"
            )
            self.db.execute("DROP TABLE readings_v1")
            self.db.execute("DELETE FROM reading_span")
            self.db.execute(
                "INSERT INTO reading_span SELECT unit, min(at), max(at), "
                "min(CASE WHEN fwd IS NOT NULL THEN at END), max(CASE WHEN fwd IS NOT NULL THEN at END), "
                "min(CASE WHEN rev IS NOT NULL THEN at END), max(CASE WHEN rev IS NOT NULL THEN at END) "
                "FROM readings GROUP BY unit"
            )
        for table, column, kind in (
            ("quarantine", "concerns", "BIGINT"),
            ("readings", "diag", "BLOB"),
            *(("operators", column, kind) for column, kind in OPERATOR_EXTRA),
            *(("api_tokens", column, kind) for column, kind in TOKEN_EXTRA),
        ):
            # (a table made by this code's schema at opening, or by the migration above, has it already)
            if column not in {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    # --- readings: keyed by time, a unit's span beside them -------------------------------------------

    def insert_readings(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Insert new readings (tuples in `READING_COLUMNS` order), and widen their units' spans."""
        rows = list(rows)
        super().insert_readings(rows)
        self._widen_spans(rows)

    def append_readings(self, rows: list[tuple[Any, ...]]) -> None:
        """Insert new readings each newer than any of its unit's, with both registers, and move their spans' ends.
        Moving an end costs about two thirds of widening a span; should a unit have no span, one ending later (what
        the caller took for its last reading was not) or a register without values, the batch's spans are widened
        as `insert_readings` does."""
        super().insert_readings(rows)
        before = self.db.total_changes
        self.executemany(
            "UPDATE reading_span SET last_at = ?1, last_fwd = ?1, last_rev = ?1 "
            "WHERE unit = ?2 AND last_at < ?1 AND first_fwd IS NOT NULL AND first_rev IS NOT NULL",
            [(row[1], row[0]) for row in rows],
        )
        if self.db.total_changes - before != len(rows):
            self._widen_spans(rows)  # a span already widened is unchanged by widening it again

    def _widen_spans(self, rows: list[tuple[Any, ...]]) -> None:
        # SQLite's min() and max() of several arguments are NULL when one is: a register's first value is kept
        self.executemany(
            "INSERT INTO reading_span VALUES (?,?,?,?,?,?,?) ON CONFLICT (unit) DO UPDATE SET "
            "first_at = min(first_at, excluded.first_at), last_at = max(last_at, excluded.last_at), "
            "first_fwd = coalesce(min(first_fwd, excluded.first_fwd), first_fwd, excluded.first_fwd), "
            "last_fwd = coalesce(max(last_fwd, excluded.last_fwd), last_fwd, excluded.last_fwd), "
            "first_rev = coalesce(min(first_rev, excluded.first_rev), first_rev, excluded.first_rev), "
            "last_rev = coalesce(max(last_rev, excluded.last_rev), last_rev, excluded.last_rev)",
            map(_span_of, rows),
        )

    def _spans(self, units: Iterable[str]) -> dict[str, tuple[Any, ...]]:
        """The stored spans of these units: (first_at, last_at, first_fwd, last_fwd, first_rev, last_rev)."""
        units = list(units)
        out: dict[str, tuple[Any, ...]] = {}
        for i in range(0, len(units), _UNITS):
            part = units[i : i + _UNITS]
            sql = f"SELECT * FROM reading_span WHERE unit IN ({','.join('?' * len(part))})"
            out.update((row[0], tuple(row[1:])) for row in self.execute(sql, part))
        return out

    def last_at(self, unit: str) -> int | None:
        """Time of the unit's newest reading."""
        span = self._spans([unit]).get(unit)
        return None if span is None else int(span[1])

    def first_at(self, unit: str) -> int | None:
        """Time of the unit's oldest reading still stored."""
        span = self._spans([unit]).get(unit)
        return None if span is None else int(span[0])

    def last_readings(self, units: Iterable[str]) -> dict[str, int | None]:
        """Time of each unit's newest reading (None: never heard of)."""
        units = list(units)
        spans = self._spans(units)
        return {u: None if (s := spans.get(u)) is None else int(s[1]) for u in units}

    def first_readings(self, units: Iterable[str]) -> dict[str, int | None]:
        """Time of each unit's oldest reading kept (None: never heard of)."""
        units = list(units)
        spans = self._spans(units)
        return {u: None if (s := spans.get(u)) is None else int(s[0]) for u in units}

    def last_points(self, units: list[str]) -> dict[str, tuple[int | None, Point | None, Point | None]]:
        """Of each unit: its newest reading's time, and the newest point of each register (`REGISTERS`)."""
        spans = self._spans(units)
        out: dict[str, tuple[int | None, Point | None, Point | None]] = {}
        for unit in units:
            span = spans.get(unit)
            if span is None:
                out[unit] = (None, None, None)
                continue
            fwd, rev = (
                None if at is None else self._point(unit, int(at), reg)
                for at, reg in zip((span[3], span[5]), REGISTERS, strict=True)
            )
            out[unit] = (int(span[1]), fwd, rev)
        return out

    def _point(self, unit: str, at: int, register: str) -> Point | None:
        row = self.execute(
            f"SELECT at, {register}, meter, digits, e1, coef, flags FROM readings WHERE at = ? AND unit = ?", (at, unit)
        ).fetchone()
        return None if row is None or row[1] is None else Point(*row)

    def neighbour(self, unit: str, at: int, register: str, before: bool) -> Point | None:
        """The nearest point of one register strictly before (or after) `at`: key look-ups on the unit's half-hour
        ends from `at` outward, within the span of that register's values (a register never sent costs none).

        A unit's readings lie on one zone's half-hour grid, whose UTC offset changes (daylight saving) by whole half
        hours, so they are a whole number of half hours apart: the ends probed are those of the span's own."""
        assert register in REGISTERS
        span = self._spans([unit]).get(unit)
        if span is None:
            return None
        first, last = span[2:4] if register == "fwd" else span[4:6]
        row = None if first is None else self._probe(unit, at, int(first), int(last), before, register)
        return None if row is None else Point(*row)

    def _probe(self, unit: str, at: int, first: int, last: int, before: bool, register: str | None) -> Any:
        """The unit's nearest reading strictly before (or after) `at` among its half-hour ends from `first` to
        `last` (a reading there), with a value of `register` unless None: (at, value, meter, digits, e1, coef,
        flags), or None."""
        if before:
            ends = range(min(at - 1 - (at - 1 - first) % SLOT, last), first - 1, -SLOT)
        else:
            ends = range(max(at + 1 + (first - at - 1) % SLOT, first), last + 1, SLOT)
        value, has_value = (register, f"AND {register} IS NOT NULL") if register else ("NULL", "")
        for i in range(0, len(ends), _PROBES):
            part = ends[i : i + _PROBES]
            row = self.execute(
                f"SELECT at, {value}, meter, digits, e1, coef, flags FROM readings "
                f"WHERE unit = ? AND at IN ({','.join('?' * len(part))}) {has_value} "
                f"ORDER BY at {'DESC' if before else 'ASC'} LIMIT 1",
                (unit, *part),
            ).fetchone()
            if row is not None:
                return row
        return None

    def prune(
        self, before: int, stopping: Callable[[], bool] = lambda: False, chunk: int = 2 * SLOT
    ) -> tuple[int, int]:
        """Delete readings and slots older than `before` (epoch); return how many of each. When `stopping()`
        says so after a transaction, return what went so far.

        Readings are keyed by time: deleted an hour of them per transaction, so ingest never waits long for
        the write lock. The spans of units that lost readings are then narrowed to what is left. Until then (and
        after a stop in between, until the next prune) a unit's span may begin before its oldest reading kept:
        `first_at` says that older time, and the neighbours' look-ups find nothing there."""
        readings = 0
        oldest = self.execute("SELECT min(at) FROM readings").fetchone()[0]
        while oldest is not None and oldest < before:
            step = min(oldest + chunk, before)
            with self.transaction():
                readings += self.db.execute("DELETE FROM readings WHERE at < ?", (step,)).rowcount
            oldest = step
            if stopping():
                return readings, 0
        while True:  # a few hundred units' spans a transaction
            with self.transaction():
                self.db.execute("DELETE FROM reading_span WHERE last_at < ?", (before,))
                narrowed = self.db.execute(
                    "SELECT * FROM reading_span WHERE first_at < ? LIMIT ?", (before, _UNITS)
                ).fetchall()
                for unit, *span in narrowed:
                    self.db.execute(
                        "UPDATE reading_span SET first_at = ?, first_fwd = ?, first_rev = ? WHERE unit = ?",
                        (*self._firsts(unit, before, span), unit),
                    )
            if len(narrowed) < _UNITS:
                break
            if stopping():
                return readings, 0
        with self.transaction():
            slots = self.db.execute("DELETE FROM slots WHERE slot < ?", (before,)).rowcount
            self.prune_kept(before)
        return readings, slots

    def _firsts(self, unit: str, before: int, span: list[Any]) -> tuple[int | None, int | None, int | None]:
        """A unit's oldest reading at or after `before`, of any register and of each, once older ones are gone."""
        first_at, last_at, first_fwd, last_fwd, first_rev, last_rev = span
        out: list[int | None] = []
        for register, first, last in (
            (None, first_at, last_at),
            ("fwd", first_fwd, last_fwd),
            ("rev", first_rev, last_rev),
        ):
            if first is None or last < before:
                out.append(None)
            elif first >= before:
                out.append(first)
            else:
                row = self._probe(unit, before - 1, first, last, False, register)
                out.append(last if row is None else int(row[0]))  # `last` is a reading kept, whatever the probe saw
        return out[0], out[1], out[2]

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
            foreign = _foreign_objects(db)
            if foreign:
                raise StoreError(f"{path}: not smame's schema: {'; '.join(foreign[:5])}")
            return {
                t: int(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
                for t in ("readings", "slots", "quarantine", "outbox")
            }
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: not a usable smame database: {exc}") from None


def _foreign_objects(db: sqlite3.Connection) -> list[str]:
    """What a copy's schema has that this version's has not, or has otherwise: a trigger, a view, a table or an
    index of its own, or one of smame's defined differently (a trigger in a copy would run inside smame's own
    commits once restored). A copy of an older schema is compared by its tables' and indexes' names only; the
    migration at start redefines them."""

    def objects(conn: sqlite3.Connection) -> dict[tuple[str, str], str]:
        rows = conn.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        return {(str(t), str(n)): " ".join(str(s or "").split()) for t, n, s in rows}

    ours_db = sqlite3.connect(":memory:")
    try:
        ours_db.executescript(_SCHEMA)
        ours = objects(ours_db)
    finally:
        ours_db.close()
    theirs = objects(db)
    current = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0] == str(SqliteStore.schema_version)
    out = []
    for (kind, name), sql in sorted(theirs.items()):
        if kind not in ("table", "index") or (kind, name) not in ours:
            out.append(f"a {kind} {name} that smame does not make")
        elif current and sql != ours[(kind, name)]:
            out.append(f"the {kind} {name} defined otherwise than smame's")
    return out


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

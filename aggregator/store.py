"""The store: readings (the durable truth), slots (derived), changes, quarantine, the outbox, the web's API
tokens, operators and their sessions, meta.

`Store` holds the queries of every table but the outbox's (`monitoring.outbox_table`) and the web's
(`web.access`), written once in SQL
that SQLite and PostgreSQL both run (placeholders `?`); a backend (`aggregator.sqlite`) opens the connection,
creates its schema and does what only it can (retention, backups). It is a narrow interface of small
synchronous operations over one connection. In the smame process every transaction runs on the store's own
thread (`Store.call`), so the event loop never waits on disk; the writer process (`aggregator.writer`)
commits each batch of readings with its slots and change log in one transaction on a connection of its own.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, Self, TypeVar

import msgspec

from aggregator.slots import Point
from kernel.commands import ANSWERABLE, FINAL, Answer, State, reported_config
from kernel.reading import Refused, Status
from kernel.timegrid import SLOT

T = TypeVar("T")
REGISTERS = ("fwd", "rev")  # column names; `imp`/`exp` on the slot side
TABLES = (
    *("meta", "readings", "slots", "changes", "quarantine", "outbox"),
    *("api_tokens", "operators", "web_sessions", "downloads"),
)

# operators' columns since schema 5; an operator from before is given the defaults: every power it had, one factor
OPERATOR_EXTRA = (
    ("role", "TEXT NOT NULL DEFAULT 'admin'"),  # viewer, operator or admin (web.access.ROLES)
    ("totp", "TEXT"),  # the base32 secret of its authenticator (RFC 6238), None while it has none
    ("totp_step", "BIGINT NOT NULL DEFAULT 0"),  # the newest time step a code was taken for: none is taken twice
    ("recovery", "TEXT NOT NULL DEFAULT ''"),  # SHA-256 of each unused recovery code, separated by spaces
)
# API tokens' columns since schema 6; a token from before never expires and reads everything it could
TOKEN_EXTRA = (
    ("expires", "BIGINT"),  # epoch seconds it is refused from; None: never
    ("scope", "TEXT NOT NULL DEFAULT 'units files emissions'"),  # what it reads (web.access.SCOPES), by spaces
)
# The tables that hold a unit's rows (by `unit`) and a customer's (by `customer`): what a purge empties.
PURGED_BY_UNIT = (
    *("readings", "slots", "quarantine", "unit_health", "unit_risk", "unit_status"),
    *("connection_events", "commands", "repairs", "reported", "config_tries", "campaign_units"),
)
PURGED_BY_CUSTOMER = ("changes", "api_tokens", "downloads")
PURGE_CHUNK = 500  # units a statement
READING_COLUMNS = "unit, at, meter, fwd, rev, e1, coef, digits, flags, seq, sent, received, diag"
_SLOT_SET = {
    "imp": "imp = excluded.imp, imp_q = excluded.imp_q, imp_flags = excluded.imp_flags",
    "exp": "exp = excluded.exp, exp_q = excluded.exp_q, exp_flags = excluded.exp_flags",
}


def slot_upsert(registers: tuple[str, ...]) -> tuple[list[str], str]:
    """The columns of a slot row that writes `registers` (`imp`, `exp` or both), and the ON CONFLICT clause that
    updates those registers of a stored slot and leaves the others."""
    cols = ["slot", "unit"]
    for r in registers:
        cols += [r, f"{r}_q", f"{r}_flags"]
    cols += ["meter", "e1", "coef"]
    sets = ", ".join(_SLOT_SET[r] for r in registers)
    also = "meter = excluded.meter, e1 = excluded.e1, coef = excluded.coef"
    return cols, f"ON CONFLICT (slot, unit) DO UPDATE SET {sets}, {also}"


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


SLOT_COLUMNS = ", ".join(SlotRow.__struct_fields__)
# what is kept as long as the slots besides readings and slots: table -> the column of its time
KEPT_WITH_SLOTS = {
    "changes": "at",
    "downloads": "at",
    "connection_events": "at",
    "unit_health": "day",
    "unit_risk": "day",
    "health_events": "day",
    "risk_days": "day",
    "repairs": "last_at",
}
# a unit's day of health after its day and unit (monitoring.health.RECORD says what each holds)
HEALTH_COLUMNS = (
    "readings", "late", "delay_p50", "delay_max", "seq_gaps", "restarts", "clock_offset", "no_data", "rsrp",
    "rsrp_min", "rsrq", "sinr", "ce", "reboots", "vsup_min", "attaches", "fw", "cell", "diag_dropped", "disconnects",
)  # fmt: skip


class CommandRow(msgspec.Struct, frozen=True, gc=False):
    """A command to a unit as the store keeps it (`kernel.commands`): `args` and `answer` are JSON texts (the
    answer's `state` as the unit sent it, "" before it answered with one), times are epoch seconds, `origin` where
    it was asked from (the CLI on a host, a console address)."""

    id: str
    unit: str
    op: str
    args: str
    created: int
    expires: int
    who: str
    origin: str
    state: str
    changed: int
    next_try: int  # while queued: when it is (sent) again
    tries: int  # times it was published
    detail: str  # the unit's words, or why it waits or lapsed
    answer: str


COMMAND_COLUMNS = ", ".join(CommandRow.__struct_fields__)


class CampaignRow(msgspec.Struct, frozen=True, gc=False):
    """A firmware campaign as the store keeps it (`kernel.firmware`): `target` and `plan` JSON texts, `secret`
    what its units' download URLs are made with, `total` its units."""

    id: str
    name: str
    version: str
    sha256: str
    size: int
    target: str
    plan: str
    phase: str
    secret: str
    created: int
    who: str
    origin: str
    changed: int
    detail: str
    total: int


CAMPAIGN_COLUMNS = ", ".join(CampaignRow.__struct_fields__)
FIRMWARE_CHUNK = 1024 * 1024  # bytes of an image a row: every node reads an image from the store


class OpenUnit(msgspec.Struct, frozen=True, gc=False):
    """A started unit of a campaign with its `fw` command's state (and its version probe's, if one was sent)."""

    seq: int
    unit: str
    step: str
    started: int
    command: str
    state: str  # "" once the command is forgotten
    detail: str
    answer: str
    probe: str
    probe_state: str


AUDIT_COLUMNS = "at, who, origin, action, target, detail"
_LOOKUPS = 5000  # slot ends a statement (well under SQLite's 32,766 parameters)
# A range of units: from the first (included) to the second (excluded), in the order of their ids' bytes (both
# engines compare units so); None leaves that end open.
UnitRange = tuple[str | None, str | None]


def _in_range(units: UnitRange) -> tuple[str, tuple[str, ...]]:
    """The condition (" AND ...", or "") on `unit` that keeps the units of the range, and its parameters."""
    low, high = units
    where = (" AND unit >= ?" if low is not None else "") + (" AND unit < ?" if high is not None else "")
    return where, tuple(u for u in units if u is not None)


def new_command(
    unit: str, op: str, args: str, now: int, expires: int, who: str, origin: str, due: int | None = None
) -> CommandRow:
    """A command to queue: a new id (128 random bits), queued at `now`, published first at `due` (default now)."""
    due = now if due is None else due
    return CommandRow(uuid.uuid4().hex, unit, op, args, now, expires, who, origin, State.QUEUED, now, due, 0, "", "")


def asked(c: CommandRow) -> tuple[int, str, str, str, str, str]:
    """The audit entry saying who asked for a command, and from where."""
    return (c.created, c.who, c.origin, f"command {c.op}", c.unit, f"{c.id} {c.args}")


@dataclass(frozen=True, slots=True)
class QuarantineRow(Refused):
    """A refused telegram or reading as the quarantine keeps it, under its id (always given: the default only
    follows the fields with one)."""

    id: int = 0


class StoreError(OSError):
    """The store cannot be opened or used; the message names the database and the reason."""


class Deposed(Exception):
    """This node no longer leads (`aggregator.leadership`): it may neither commit nor acknowledge."""


class Rows(Protocol):
    """What a statement returns, in both backends' drivers."""

    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Store(ABC):
    """The tables' queries over one connection; synchronous methods, each meant to run on the store thread."""

    unit_tables: tuple[str, ...] = PURGED_BY_UNIT  # the tables with rows by `unit` (a purge empties them of a unit)

    # appended to a SELECT whose rows the transaction claims (outbox leases): SQLite's BEGIN IMMEDIATE already
    # keeps every other writer out; PostgreSQL's row locks are taken here
    claim_rows = ""
    # appended to a SELECT of a row that another transaction must not change before this one commits (the
    # epoch): SQLite's BEGIN IMMEDIATE already does; PostgreSQL takes a share lock
    share_rows = ""
    # the driver's errors that say the database is busy or unreachable for now: worth trying again later
    errors: tuple[type[Exception], ...] = ()
    # each backend's own, so one backend's change of tables does not make the other's stores migrate
    schema_version = 1

    def __init__(self, url: str) -> None:
        self.url = url  # the storage URL it was opened from: what another process opens to read the same
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")

    # --- what a backend provides ----------------------------------------------------------------------

    @abstractmethod
    def execute(self, sql: str, args: Sequence[Any] = ()) -> Rows:
        """Run one statement (placeholders `?`)."""

    @abstractmethod
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement for each row of arguments."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """One atomic unit of work: committed on success, rolled back on any error."""

    @abstractmethod
    def _close(self) -> None:
        """Close the connection."""

    @abstractmethod
    def prune(self, before: int, stopping: Callable[[], bool] = lambda: False) -> tuple[int, int]:
        """Delete readings and slots older than `before` (epoch), and the change log's entries, a transaction at
        a time; return how many readings and slots went. When `stopping()` says so after a transaction, return
        what went so far: the next call goes on from there."""

    def prune_kept(self, before: int, skip: Container[str] = ()) -> None:
        """In a transaction: delete what is kept as long as the slots (KEPT_WITH_SLOTS), older than `before`;
        `skip`: tables a backend prunes otherwise."""
        for table, column in KEPT_WITH_SLOTS.items():
            if table not in skip:
                self.execute(f"DELETE FROM {table} WHERE {column} < ?", (before,))

    def check_identity(self) -> None:
        """Raise StoreError when what was committed may not be where the store said: nothing may then be
        acknowledged on its word. Nothing to check unless a backend says otherwise."""
        return None

    def _open(self, shown: str, driver_error: type[Exception], connect_and_set_up: Callable[[], None]) -> None:
        """Run a backend's opening: on any failure, close what it opened and the store's thread, and say in a
        StoreError naming `shown` what the driver found wrong."""
        try:
            connect_and_set_up()
        except BaseException as exc:
            if hasattr(self, "db"):  # connected, then the setup failed
                self._close()
            self._pool.shutdown()
            if isinstance(exc, driver_error):
                raise StoreError(f"cannot open the store {shown}: {str(exc).strip()}") from exc
            raise

    def _stamp_schema(self, shown: str) -> None:
        """Record this code's schema version in a new store; refuse a store whose version is newer: it may hold
        what this code would misread or overwrite. `shown` names the store in the message."""
        version = self.schema_version
        self.execute("INSERT INTO meta(key, value) VALUES ('schema', ?) ON CONFLICT(key) DO NOTHING", (str(version),))
        found = self.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        if int(found) > version:
            raise StoreError(f"the store {shown} has schema {found}, newer than this smame's {version}: upgrade smame")
        if int(found) < version:
            with self.transaction():  # another process opening the same store may have migrated it meanwhile
                found = self.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
                if int(found) < version:
                    self._migrate(int(found))
                    self.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(version),))

    def _migrate(self, found: int) -> None:
        """In a transaction: bring a store of schema `found` to this code's. Nothing to do unless a backend
        says otherwise."""
        return None

    def after_copy(self) -> None:
        """Make rows written with their ids (`aggregator.copy`) count for the ids given next."""
        return None

    # --- the connection's thread ------------------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the store thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (after the thread's last call)."""
        self._pool.submit(self._close).result()
        self._pool.shutdown()

    def check_epoch(self, epoch: int) -> None:
        """In a transaction: raise Deposed unless `epoch` is the store's, and keep it so until the commit."""
        row = self.execute("SELECT value FROM meta WHERE key = 'epoch'" + self.share_rows).fetchone()
        if row is None or int(row[0]) != epoch:
            raise Deposed(f"elected in epoch {epoch}, but the store is in epoch {None if row is None else row[0]}")

    # --- readings -------------------------------------------------------------------------------

    def insert_readings(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Insert new readings (tuples in `READING_COLUMNS` order); the caller knows they are new."""
        self.executemany(f"INSERT INTO readings ({READING_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)

    def append_readings(self, rows: list[tuple[Any, ...]]) -> None:
        """Insert new readings, each newer than any of its unit's and with both registers (`Ingestor.plan`'s)."""
        self.insert_readings(rows)

    def reading(self, unit: str, at: int) -> tuple[Any, ...] | None:
        """The stored reading at `(unit, at)` as (meter, fwd, rev, e1, coef, digits, flags)."""
        row: tuple[Any, ...] | None = self.execute(
            "SELECT meter, fwd, rev, e1, coef, digits, flags FROM readings WHERE unit = ? AND at = ?", (unit, at)
        ).fetchone()
        return row

    def last_at(self, unit: str) -> int | None:
        """Time of the unit's newest reading."""
        row = self.execute("SELECT max(at) FROM readings WHERE unit = ?", (unit,)).fetchone()
        return None if row[0] is None else int(row[0])

    def last_points(self, units: list[str]) -> dict[str, tuple[int | None, Point | None, Point | None]]:
        """Of each unit: its newest reading's time, and the newest point of each register (`REGISTERS`)."""
        out = {}
        for unit in units:
            last_at = self.last_at(unit)
            fwd, rev = (
                None if last_at is None else self.neighbour(unit, last_at + 1, reg, before=True) for reg in REGISTERS
            )
            out[unit] = (last_at, fwd, rev)
        return out

    def first_at(self, unit: str) -> int | None:
        """Time of the unit's oldest reading still stored."""
        row = self.execute("SELECT min(at) FROM readings WHERE unit = ?", (unit,)).fetchone()
        return None if row[0] is None else int(row[0])

    def add_reading_flags(self, unit: str, at: int, flags: int) -> None:
        """Set flags on a stored reading (e.g. a conflicting copy arrived)."""
        self.execute("UPDATE readings SET flags = flags | ? WHERE unit = ? AND at = ?", (flags, unit, at))

    def neighbour(self, unit: str, at: int, register: str, before: bool) -> Point | None:
        """The nearest point of one register strictly before (or after) `at`."""
        assert register in REGISTERS
        op, order = ("<", "DESC") if before else (">", "ASC")
        row = self.execute(
            f"SELECT at, {register}, meter, digits, e1, coef, flags FROM readings "
            f"WHERE unit = ? AND at {op} ? AND {register} IS NOT NULL ORDER BY at {order} LIMIT 1",
            (unit, at),
        ).fetchone()
        return None if row is None else Point(*row)

    def reading_count(self) -> int:
        """Number of stored readings."""
        return int(self.execute("SELECT count(*) FROM readings").fetchone()[0])

    # --- slots ----------------------------------------------------------------------------------

    def upsert_slots(self, registers: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        """Write slots of the given registers (`imp`, `exp` or both).

        Rows hold (slot, unit, values..., meter, e1, coef)."""
        cols, on_conflict = slot_upsert(registers)
        self.executemany(
            f"INSERT INTO slots ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) {on_conflict}", rows
        )

    def insert_slots(self, rows: list[tuple[Any, ...]]) -> None:
        """Write slots of both registers that the caller believes new (the live case), rows as `upsert_slots`
        takes them; a slot that exists after all is updated as `upsert_slots` would. Here that is the same
        statement."""
        self.upsert_slots(("imp", "exp"), rows)

    def slots(self, unit: str, after: int, until: int) -> list[SlotRow]:
        """Stored slots of a unit with `after < slot <= until`."""
        rows = self.execute(
            f"SELECT {SLOT_COLUMNS} FROM slots WHERE slot > ? AND slot <= ? AND unit = ? ORDER BY slot",
            (after, until, unit),
        ).fetchall()
        return [SlotRow(*r) for r in rows]

    def slots_at(self, unit: str, ends: list[int]) -> list[SlotRow]:
        """Stored slots of a unit at these slot ends, in time order: one key look-up each, so the cost does not
        grow with the fleet (slots are keyed by time first: a range of time holds every unit's slots)."""
        out: list[SlotRow] = []
        for i in range(0, len(ends), _LOOKUPS):
            part = ends[i : i + _LOOKUPS]
            marks = ",".join("?" * len(part))
            sql = f"SELECT {SLOT_COLUMNS} FROM slots WHERE unit = ? AND slot IN ({marks}) ORDER BY slot"
            out += [SlotRow(*r) for r in self.execute(sql, (unit, *part))]
        return out

    def qualities_at(self, units: list[str], ends: list[int]) -> list[tuple[str, int, str | None]]:
        """(unit, slot end, import quality) of the stored slots of these units at these ends: key look-ups, as
        `slots_at`; a slot not stored is missing."""
        out: list[tuple[str, int, str | None]] = []
        step = max(1, _LOOKUPS // max(1, len(units)))
        unit_marks = ",".join("?" * len(units))
        for i in range(0, len(ends) if units else 0, step):
            part = ends[i : i + step]
            marks = ",".join("?" * len(part))
            sql = f"SELECT unit, slot, imp_q FROM slots WHERE slot IN ({marks}) AND unit IN ({unit_marks})"
            out += self.execute(sql, (*part, *units)).fetchall()
        return out

    def units_slots(self, ends: list[int], first: str, last: str) -> list[SlotRow]:
        """The slots ending at `ends` of the units from `first` to `last` (by id): one index range per slot
        end, so a share of a large fleet costs its own rows only."""
        marks = ",".join("?" * len(ends))
        rows = self.execute(
            f"SELECT {SLOT_COLUMNS} FROM slots WHERE slot IN ({marks}) AND unit >= ? AND unit <= ?",
            (*ends, first, last),
        )
        return [SlotRow(*r) for r in rows]

    def first_readings(self, units: Iterable[str]) -> dict[str, int | None]:
        """Time of each unit's oldest reading kept (None: never heard of)."""
        return {u: self.first_at(u) for u in units}

    def last_readings(self, units: Iterable[str]) -> dict[str, int | None]:
        """Time of each unit's newest reading (None: never heard of)."""
        return {u: self.last_at(u) for u in units}

    def quarantine_between(self, start: int, end: int) -> tuple[dict[str, int], dict[str, int], list[str]]:
        """Quarantined items of [start, end): counts by reason of those received then, and of those about a
        reading (or telegram) of then whenever they came; and the unknown units that tried to send then."""
        counts, about = (
            {
                r: int(n)
                for r, n in self.execute(
                    f"SELECT reason, count(*) FROM quarantine WHERE {column} >= ? AND {column} < ? GROUP BY reason",
                    (start, end),
                )
            }
            for column in ("received", "concerns")
        )
        unknown = [
            u
            for (u,) in self.execute(
                "SELECT DISTINCT unit FROM quarantine WHERE reason = 'unknown_unit' AND received >= ? AND received < ? "
                "ORDER BY unit",
                (start, end),
            )
        ]
        return counts, about, unknown

    # --- nodes ----------------------------------------------------------------------------------

    def nodes(self) -> list[tuple[str, float, dict[str, object]]]:
        """Each node's row as it last wrote it (`aggregator.leadership`): its name, its last beat (the store's
        clock) and its state (role, epoch, fault, clock offset, export and reload, version)."""
        out = []
        for node, beat, state in self.execute("SELECT node, beat, state FROM nodes ORDER BY node").fetchall():
            try:
                found = json.loads(state)
            except ValueError:
                found = {}
            out.append((str(node), float(beat), found if isinstance(found, dict) else {}))
        return out

    def forget_nodes(self, before: float) -> int:
        """Drop the rows of nodes that have not beaten since `before` (the store's clock); returns how many."""
        return int(self.execute("DELETE FROM nodes WHERE beat < ?", (before,)).rowcount or 0)

    # --- meta -----------------------------------------------------------------------------------

    def get_meta(self, key: str, default: str = "") -> str:
        """A value the services keep across restarts (e.g. the exporter's cursor)."""
        row = self.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Store such a value."""
        self.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # --- changes and quarantine ----------------------------------------------------------------

    def add_changes(self, pairs: Iterable[tuple[str, str]], at: int) -> None:
        """Record that these (customer, local day) pairs changed."""
        self.executemany("INSERT INTO changes (customer, day, at) VALUES (?, ?, ?)", [(c, d, at) for c, d in pairs])

    def changes_since(self, after_id: int) -> tuple[int, set[tuple[str, str]]]:
        """The (customer, day) pairs changed after a change id, and the newest id. An id beyond the store's newest
        change (the store was restored from an older copy under files rendered from a newer one) counts from
        the start: every change the store holds."""
        if after_id > int(self.execute("SELECT coalesce(max(id), 0) FROM changes").fetchone()[0]):
            after_id = 0
        rows = self.execute("SELECT id, customer, day FROM changes WHERE id > ? ORDER BY id", (after_id,)).fetchall()
        last = rows[-1][0] if rows else after_id
        return last, {(c, d) for _, c, d in rows}

    def add_quarantine(self, rows: Iterable[tuple[int, str, str | None, str, str, bytes, int | None]]) -> None:
        """Keep refused input: (received, topic, unit, reason, detail, payload, concerns)."""
        self.executemany(
            "INSERT INTO quarantine (received, topic, unit, reason, detail, payload, concerns) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def quarantine(self, reason: str | None = None, limit: int = 100) -> list[QuarantineRow]:
        """Newest quarantined items first, optionally of one reason."""
        sql = "SELECT received, topic, unit, reason, detail, payload, concerns, id FROM quarantine"
        args: tuple[Any, ...] = ()
        if reason:
            sql += " WHERE reason = ?"
            args = (reason,)
        rows = self.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [QuarantineRow(*r) for r in rows]

    def prune_quarantine(self, before: int) -> int:
        """Forget refused input received before `before` (epoch); return how many rows went."""
        with self.transaction():
            return int(self.execute("DELETE FROM quarantine WHERE received < ?", (before,)).rowcount)

    def unit_quarantine(self, unit: str, limit: int = 20) -> list[QuarantineRow]:
        """A unit's newest quarantined items first."""
        rows = self.execute(
            "SELECT received, topic, unit, reason, detail, payload, concerns, id FROM quarantine WHERE unit = ? "
            "ORDER BY id DESC LIMIT ?",
            (unit, limit),
        ).fetchall()
        return [QuarantineRow(*r) for r in rows]

    def quarantine_after(self, reason: str, after_id: int, limit: int = 1000) -> list[QuarantineRow]:
        """Quarantined items of one reason with ids above `after_id`, oldest first."""
        rows = self.execute(
            "SELECT received, topic, unit, reason, detail, payload, concerns, id FROM quarantine "
            "WHERE reason = ? AND id > ? ORDER BY id LIMIT ?",
            (reason, after_id, limit),
        ).fetchall()
        return [QuarantineRow(*r) for r in rows]

    def quarantine_counts(self) -> dict[str, int]:
        """Number of quarantined items per reason."""
        rows = self.execute("SELECT reason, count(*) FROM quarantine GROUP BY reason").fetchall()
        return {r: int(n) for r, n in rows}

    # --- downloads -------------------------------------------------------------------------------

    def record_downloads(self, rows: Iterable[tuple[str, str, int, str, str, int]]) -> None:
        """Note downloads: (customer, file, at, via, who, count); a file keeps its latest download and its total."""
        with self.transaction():
            self.executemany(
                "INSERT INTO downloads (customer, file, at, via, who, count) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (customer, file) DO UPDATE SET count = downloads.count + excluded.count, "
                + ", ".join(
                    f"{c} = CASE WHEN excluded.at >= downloads.at THEN excluded.{c} ELSE downloads.{c} END"
                    for c in ("at", "via", "who")
                ),
                rows,
            )

    def downloads(self, customer: str) -> dict[str, tuple[int, str, str, int]]:
        """A customer's files' latest downloads: file -> (at, via, who, count)."""
        rows = self.execute("SELECT file, at, via, who, count FROM downloads WHERE customer = ?", (customer,))
        return {str(f): (int(at), str(via), str(who), int(n)) for f, at, via, who, n in rows}

    # --- units' health (monitoring.health) -----------------------------------------------------------------

    def health_rows(self, start: int, end: int, units: UnitRange = (None, None)) -> list[tuple[Any, ...]]:
        """The readings with `start <= at < end` (`start` a half-hour boundary: readings are on them) of the units
        in the range `units`, as the health record reads them: (unit, at, seq, sent, received, import register
        without value, diag)."""
        # each half hour sought with the unit range: one range of the key (at, unit) a half hour, not the whole
        # day's rows for each range of units (on PostgreSQL, a range of (unit, at) in the day's partition)
        ats = list(range(start, end, SLOT))
        where, bound = _in_range(units)
        return self.execute(
            "SELECT unit, at, seq, sent, received, fwd IS NULL, diag FROM readings "
            f"WHERE at IN ({','.join('?' * len(ats))}){where}",
            (*ats, *bound),
        ).fetchall()

    def has_readings(self, start: int, end: int) -> bool:
        """Whether any reading has `start <= at < end`."""
        found = self.execute("SELECT 1 FROM readings WHERE at >= ? AND at < ? LIMIT 1", (start, end)).fetchone()
        return found is not None

    def disconnects(self, start: int, end: int) -> dict[str, int]:
        """Units' times offline (their status topic) with `start <= at < end`, by unit."""
        rows = self.execute(
            "SELECT unit, count(*) FROM connection_events WHERE at >= ? AND at < ? AND NOT online GROUP BY unit",
            (start, end),
        )
        return {str(u): int(n) for u, n in rows.fetchall()}

    def keep_health(
        self, day: int, columns: Sequence[str], rows: Iterable[Sequence[Any]], units: UnitRange = (None, None)
    ) -> None:
        """Keep a day's health records (`day`: the day's start, epoch) of the units in the range `units`, replacing
        the day's earlier ones of that range."""
        where, bound = _in_range(units)
        with self.transaction():
            self.execute(f"DELETE FROM unit_health WHERE day = ?{where}", (day, *bound))
            names = ", ".join(["day", *columns])
            marks = ", ".join("?" * (len(columns) + 1))
            self.executemany(f"INSERT INTO unit_health ({names}) VALUES ({marks})", ((day, *r) for r in rows))

    def unit_health(self, unit: str, since: int) -> list[dict[str, Any]]:
        """A unit's health records from the day starting at `since` on, oldest first."""
        cursor = self.execute("SELECT * FROM unit_health WHERE unit = ? AND day >= ? ORDER BY day", (unit, since))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def insert_rows(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        """Insert rows of a table as they are (a copy of another store's)."""
        marks = ",".join("?" * len(columns))
        self.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    def health_records(self, since: int, until: int, columns: Sequence[str]) -> Iterator[tuple[Any, ...]]:
        """The health records of the days starting from `since` to `until` (both included): (day, unit,
        *columns), read as they are taken (weeks of a fleet's records as Python tuples at once would be
        gigabytes)."""
        names = ", ".join(["day", "unit", *columns])
        return iter(self.execute(f"SELECT {names} FROM unit_health WHERE day >= ? AND day <= ?", (since, until)))

    def newest_health(
        self, since: int
    ) -> list[tuple[str, int, str | None, float | None, float | None, int | None, int | None]]:
        """Each unit's newest health record with readings from the day starting at `since` on: (unit, day,
        firmware, median RSRP, median SINR, coverage level, reboots or else restarts). The days are read as a
        range of the primary key (a few days of the fleet), the newest of each unit kept."""
        rows = self.execute(
            "SELECT unit, day, fw, rsrp, sinr, ce, coalesce(reboots, restarts) FROM unit_health "
            "WHERE day >= ? AND readings > 0 ORDER BY day",
            (since,),
        ).fetchall()
        newest = {str(r[0]): r for r in rows}  # later days overwrite earlier ones
        return [(u, int(d), f, r, s, c, b) for u, (_, d, f, r, s, c, b) in sorted(newest.items())]

    def health_days(self, since: int) -> list[tuple[int, int, int]]:
        """Each day's (start, units with a record, readings received of the day) from `since` on."""
        rows = self.execute(
            "SELECT day, count(*), sum(readings) FROM unit_health WHERE day >= ? GROUP BY day ORDER BY day", (since,)
        ).fetchall()
        return [(int(d), int(n), int(r or 0)) for d, n, r in rows]

    def telegrams_by_hour(self, since: int) -> list[tuple[int, int]]:
        """Telegrams received an hour from `since` on that carry readings of the day before `since` or later
        (a telegram: a unit's readings received together under one `seq`; the readings are read by their time,
        so an older backlog is not counted): (the hour's start, telegrams)."""
        rows = self.execute(
            "SELECT received / 3600 * 3600 AS hour, count(*) FROM "
            "(SELECT DISTINCT unit, seq, received FROM readings WHERE at >= ? AND received >= ?) t "
            "GROUP BY hour ORDER BY hour",
            (since - 86400, since),
        ).fetchall()
        return [(int(h), int(n)) for h, n in rows]

    def keep_risk(
        self,
        day: int,
        evaluated: int,
        at_risk: Iterable[tuple[str, float, str]],
        events: Iterable[tuple[str, str, int, int, str]],
        at: int,
    ) -> None:
        """Keep a day's risk (`day`: its start), replacing what the day had: the units evaluated, the at-risk
        units (unit, risk, reasons as JSON), the events of the fleet or a cell (scope, signal, units, of them
        evaluated, words), and when it was assessed."""
        at_risk, events = list(at_risk), list(events)
        with self.transaction():
            for table in ("unit_risk", "health_events", "risk_days"):
                self.execute(f"DELETE FROM {table} WHERE day = ?", (day,))
            self.execute(
                "INSERT INTO risk_days (day, evaluated, at_risk, assessed) VALUES (?, ?, ?, ?)",
                (day, evaluated, len(at_risk), at),
            )
            self.executemany(
                "INSERT INTO unit_risk (day, unit, risk, reasons) VALUES (?, ?, ?, ?)", ((day, *r) for r in at_risk)
            )
            self.executemany(
                "INSERT INTO health_events (day, scope, signal, units, evaluated, words) VALUES (?, ?, ?, ?, ?, ?)",
                ((day, *e) for e in events),
            )

    def at_risk(self, since: int, unit: str | None = None) -> list[tuple[int, str, float, str]]:
        """The at-risk units of the days from `since` on (of one unit, if given): (day, unit, risk, reasons),
        by day, riskiest first."""
        args: tuple[Any, ...]
        if unit is None:
            sql, args = "SELECT day, unit, risk, reasons FROM unit_risk WHERE day >= ?", (since,)
        else:
            sql, args = "SELECT day, unit, risk, reasons FROM unit_risk WHERE unit = ? AND day >= ?", (unit, since)
        rows = self.execute(sql + " ORDER BY day, risk DESC, unit", args).fetchall()
        return [(int(d), str(u), float(r), str(w)) for d, u, r, w in rows]

    def risk_days(self, since: int) -> list[tuple[int, int, int, int]]:
        """Each assessed day from `since` on: (day, units evaluated, units at risk, when assessed)."""
        sql = "SELECT day, evaluated, at_risk, assessed FROM risk_days WHERE day >= ? ORDER BY day"
        rows = self.execute(sql, (since,))
        return [(int(d), int(e), int(a), int(t)) for d, e, a, t in rows.fetchall()]

    def last_assessed(self) -> int:
        """When the newest risk assessment was kept (epoch; 0 before the first)."""
        return int(self.execute("SELECT coalesce(max(assessed), 0) FROM risk_days").fetchone()[0])

    def health_events(self, since: int) -> list[tuple[int, str, str, int, int, str]]:
        """The fleet's and cells' events of the days from `since` on: (day, scope, signal, units, evaluated,
        words)."""
        rows = self.execute(
            "SELECT day, scope, signal, units, evaluated, words FROM health_events WHERE day >= ? "
            "ORDER BY day, scope, signal",
            (since,),
        )
        return [(int(d), str(s), str(g), int(u), int(e), str(w)) for d, s, g, u, e, w in rows.fetchall()]

    # --- units' connections (their status topic) ---------------------------------------------------------

    def record_statuses(self, statuses: Iterable[Status]) -> int:
        """Take units' status messages in order: each that changes a unit's connection (or is its first) is
        kept as an event and becomes its state; one that says again what holds (the retained message at each
        subscription, or one delivered again after a restart) changes nothing. Return the events kept."""
        events = 0
        for s in statuses:
            row = self.execute("SELECT online FROM unit_status WHERE unit = ?", (s.unit,)).fetchone()
            if row is not None and bool(row[0]) == s.online:
                continue
            self.execute(
                "INSERT INTO unit_status (unit, online, since) VALUES (?, ?, ?) ON CONFLICT (unit) DO UPDATE "
                "SET online = excluded.online, since = excluded.since",
                (s.unit, s.online, s.at),
            )
            self.execute("INSERT INTO connection_events (unit, at, online) VALUES (?, ?, ?)", (s.unit, s.at, s.online))
            events += 1
        return events

    def connection_events(self, unit: str, after: int, until: int) -> list[tuple[int, bool]]:
        """A unit's connection events with `after < at <= until`: (at, online), oldest first."""
        rows = self.execute(
            "SELECT at, online FROM connection_events WHERE unit = ? AND at > ? AND at <= ? ORDER BY at, id",
            (unit, after, until),
        )
        return [(int(at), bool(online)) for at, online in rows.fetchall()]

    # --- bans --------------------------------------------------------------------------------------

    def keep_bans(self, rows: Iterable[tuple[str, str, float, float, str]]) -> None:
        """Keep bans (address, door, since, until, node) on the nodes' shared list; a longer one wins."""
        with self.transaction():
            self.executemany(
                "INSERT INTO bans (address, door, since, until, node) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (address) DO UPDATE SET "
                + ", ".join(
                    f"{c} = CASE WHEN excluded.until > bans.until THEN excluded.{c} ELSE bans.{c} END"
                    for c in ("door", "since", "until", "node")
                ),
                rows,
            )

    def bans(self, now: float) -> list[tuple[str, str, float, float, str]]:
        """The bans in force at `now` (address, door, since, until, node), oldest first; older ones forgotten."""
        with self.transaction():
            self.execute("DELETE FROM bans WHERE until <= ?", (now,))
            rows = self.execute("SELECT address, door, since, until, node FROM bans ORDER BY since, address")
            return [(str(a), str(d), float(s), float(u), str(n)) for a, d, s, u, n in rows.fetchall()]

    def lift_ban(self, address: str) -> bool:
        """Lift an address's ban (each node lets it in again at its next look); False when it was not banned."""
        with self.transaction():
            return self.execute("DELETE FROM bans WHERE address = ?", (address,)).rowcount > 0

    # --- what the monitor watches ---------------------------------------------------------------

    def unit_quality_counts(self, after: int, until: int) -> list[tuple[str, str | None, int]]:
        """(unit, import quality, count) of the stored slots with `after < slot <= until`."""
        rows = self.execute(
            "SELECT unit, imp_q, count(*) FROM slots WHERE slot > ? AND slot <= ? GROUP BY unit, imp_q", (after, until)
        ).fetchall()
        return [(str(u), q, int(n)) for u, q, n in rows]

    def slot_quality_counts(self, after: int, until: int) -> dict[str, int]:
        """Stored import slots with `after < slot <= until`, counted by quality."""
        rows = self.execute(
            "SELECT coalesce(imp_q, 'M'), count(*) FROM slots WHERE slot > ? AND slot <= ? GROUP BY 1", (after, until)
        ).fetchall()
        return {str(q): int(n) for q, n in rows}

    # --- commands to units and the audit log ---------------------------------------------------------

    def add_commands(self, rows: Sequence[CommandRow], audit: Sequence[tuple[int, str, str, str, str, str]]) -> None:
        """Keep new commands (queued) and the audit entries that say who asked for them, in one transaction."""
        with self.transaction():
            self._insert_commands(rows)
            self._audit(audit)

    def queue_commands(
        self, op: str, args: str, units: Sequence[str], now: int, expires: int, who: str, origin: str
    ) -> list[CommandRow]:
        """Queue one command a unit (`args` its JSON text, already checked) with an audit entry each saying who
        asked and from where, in one transaction; the rows kept."""
        rows = [new_command(u, op, args, now, expires, who, origin) for u in units]
        self.add_commands(rows, [asked(r) for r in rows])
        return rows

    def _command_rows(self, where: str, args: Sequence[Any]) -> list[CommandRow]:
        rows = self.execute(f"SELECT {COMMAND_COLUMNS} FROM commands {where}", args).fetchall()
        return [CommandRow(*r) for r in rows]

    def due_commands(self, now: int, limit: int) -> list[CommandRow]:
        """Queued commands due to be published at `now` and not expired, the longest waiting first."""
        return self._command_rows(
            "WHERE state = 'queued' AND next_try <= ? AND expires > ? ORDER BY next_try, id LIMIT ?", (now, now, limit)
        )

    def commands_published(self, results: Sequence[tuple[str, bool, str, int]], now: int) -> None:
        """Note queued commands published (id, taken, detail, next_try): `taken` by the broker for the unit's
        session, they are sent; not taken (no session subscribed), they stay queued until `next_try`, with
        `detail` saying why. One transaction."""
        with self.transaction():
            for command_id, taken, detail, next_try in results:
                if taken:
                    self.execute(
                        "UPDATE commands SET state = ?, changed = ?, tries = tries + 1, detail = ? "
                        "WHERE id = ? AND state = ?",
                        (State.SENT, now, detail, command_id, State.QUEUED),
                    )
                else:
                    self.execute(
                        "UPDATE commands SET next_try = ?, tries = tries + 1, detail = ? WHERE id = ? AND state = ?",
                        (next_try, detail, command_id, State.QUEUED),
                    )
            self._audit([(now, "smame", "", "command sent", i, "") for i, taken, _, _ in results if taken])

    def answer_commands(self, answers: Sequence[Answer], now: int) -> list[bool]:
        """Apply units' answers, each to its command when it is the unit's and its state allows
        (`kernel.commands.ANSWERABLE`); whether each was applied, in order. One transaction."""
        out = []
        with self.transaction():
            for a in answers:
                allowed = ANSWERABLE[a.status]
                marks = ", ".join("?" * len(allowed))
                applied = (
                    self.execute(
                        f"UPDATE commands SET state = ?, changed = ?, detail = ?, "
                        f"answer = CASE WHEN ? = '' THEN answer ELSE ? END "
                        f"WHERE id = ? AND unit = ? AND state IN ({marks})",
                        (a.status, now, a.detail, a.state, a.state, a.id, a.unit, *allowed),
                    ).rowcount
                    > 0
                )
                out.append(applied)
                if applied:
                    self._audit([(now, f"unit {a.unit}", "", f"command {a.status}", a.id, a.detail)])
                config = reported_config(a.state) if applied else None
                if config is not None:  # what it said now over what it said before (a set's answer has no fw)
                    before = self.reported_of(a.unit)
                    config = {**(json.loads(before[0]) if before else {}), **config}
                    self.execute(
                        "INSERT INTO reported (unit, config, at) VALUES (?, ?, ?) ON CONFLICT (unit) DO UPDATE "
                        "SET config = excluded.config, at = excluded.at",
                        (a.unit, json.dumps(config, sort_keys=True, separators=(",", ":")), now),
                    )
        return out

    def expire_commands(self, now: int) -> list[str]:
        """Commands not yet taken by their unit whose expiry has passed are expired; their ids. Looked for before
        any write: most looks find none, and take no write lock."""
        # the states written out, not bound: the partial index commands_open is used only so
        look = "SELECT id FROM commands WHERE state IN ('queued', 'sent') AND expires <= ?"
        if self.execute(look + " LIMIT 1", (now,)).fetchone() is None:
            return []
        with self.transaction():
            ids = [str(i) for (i,) in self.execute(look, (now,)).fetchall()]
            self.executemany(
                "UPDATE commands SET state = ?, changed = ?, detail = ? WHERE id = ? AND state IN ('queued', 'sent')",
                [(State.EXPIRED, now, "no answer from the unit before the command's expiry", i) for i in ids],
            )
            self._audit([(now, "smame", "", "command expired", i, "") for i in ids])
        return ids

    def cancel_command(self, command_id: str, now: int, who: str, origin: str) -> bool:
        """Withdraw a command still queued (one already sent may be in the unit's hands); False when it is not."""
        with self.transaction():
            done = (
                self.execute(
                    "UPDATE commands SET state = ?, changed = ?, detail = ? WHERE id = ? AND state = ?",
                    (State.CANCELLED, now, f"cancelled by {who}", command_id, State.QUEUED),
                ).rowcount
                > 0
            )
            if done:
                self._audit([(now, who, origin, "command cancelled", command_id, "")])
            return done

    def command(self, command_id: str) -> CommandRow | None:
        """One command, by its id."""
        rows = self._command_rows("WHERE id = ?", (command_id,))
        return rows[0] if rows else None

    def commands(self, unit: str | None = None, limit: int = 100, state: str | None = None) -> list[CommandRow]:
        """The newest commands (of one unit, or of all; in one state, or in any), newest first."""
        where: list[str] = []
        args: list[Any] = []
        if unit is not None:
            where.append("unit = ?")
            args.append(unit)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        return self._command_rows(f"{clause}ORDER BY created DESC, id LIMIT ?", (*args, limit))

    def prune_commands(self, before: int) -> tuple[int, int]:
        """Forget the commands that ended (FINAL) before `before` and the audit entries older than it:
        (commands, entries) deleted."""
        final = ", ".join(f"'{s}'" for s in sorted(FINAL))
        with self.transaction():
            commands = self.execute(
                f"DELETE FROM commands WHERE created < ? AND changed < ? AND state IN ({final})", (before, before)
            )
            entries = self.execute("DELETE FROM audit WHERE at < ?", (before,))
            return commands.rowcount, entries.rowcount

    def purge_customer(self, customer: str, units: Sequence[str]) -> dict[str, int]:
        """Delete every row of a customer and of its units, in one transaction: the tables of `unit_tables` and
        PURGED_BY_CUSTOMER, and the desired configuration of the customer and of each unit. Returns the rows
        deleted by table. The audit log and the alerts' history, records of what was done and told, are kept."""

        def by_units(sql: str) -> int:  # `sql` with {marks} for a chunk of the units; the rows it deleted
            deleted = 0
            for i in range(0, len(units), PURGE_CHUNK):
                chunk = list(units[i : i + PURGE_CHUNK])
                deleted += self.execute(sql.format(marks=", ".join("?" * len(chunk))), chunk).rowcount
            return deleted

        counts: dict[str, int] = {}
        with self.transaction():
            for table in self.unit_tables:
                counts[table] = by_units(f"DELETE FROM {table} WHERE unit IN ({{marks}})")
            for table in PURGED_BY_CUSTOMER:
                counts[table] = self.execute(f"DELETE FROM {table} WHERE customer = ?", (customer,)).rowcount
            desired = self.execute("DELETE FROM desired WHERE scope = 'customer' AND target = ?", (customer,)).rowcount
            counts["desired"] = desired + by_units("DELETE FROM desired WHERE scope = 'unit' AND target IN ({marks})")
        return counts

    def tokens_expiring(self, before: float) -> list[tuple[str, str, str, int]]:
        """(id, customer, name, expires) of the API tokens that expire before `before` (expired ones too),
        soonest first."""
        rows = self.execute(
            "SELECT id, customer, name, expires FROM api_tokens WHERE expires IS NOT NULL AND expires < ? "
            "ORDER BY expires, id",
            (int(before),),
        ).fetchall()
        return [(str(i), str(c), str(n), int(e)) for i, c, n, e in rows]

    def record_audit(self, at: int, who: str, origin: str, action: str, target: str, detail: str = "") -> None:
        """Keep one entry of the audit log: an operator's action that changes nothing else in the store (an
        acknowledgement, a silence, a lifted ban) or one told here after it was done elsewhere."""
        with self.transaction():
            self._audit([(at, who, origin, action, target, detail)])

    # --- gap repair ------------------------------------------------------------------------------

    def unfilled_slots(self, after: int, until: int) -> list[tuple[str, int]]:
        """(unit, slot) of the import slots estimated or missing with `after < slot <= until`, by unit and slot:
        read through the partial index slots_unfilled, so the fleet's actual slots are never touched."""
        rows = self.execute(
            "SELECT unit, slot FROM slots WHERE imp_q IN ('E', 'M') AND slot > ? AND slot <= ? ORDER BY unit, slot",
            (after, until),
        ).fetchall()
        return [(str(u), int(t)) for u, t in rows]

    def repair_covers(self, unit: str, first_at: int, last_at: int) -> bool:
        """Whether a gap repair was asked of `unit` for a range holding `first_at`..`last_at`."""
        row = self.execute(
            "SELECT 1 FROM repairs WHERE unit = ? AND first_at <= ? AND last_at >= ? LIMIT 1", (unit, first_at, last_at)
        ).fetchone()
        return row is not None

    def add_repairs(self, repairs: Sequence[tuple[str, int, int, int]], commands: Sequence[CommandRow]) -> int:
        """Keep gap repairs (unit, first_at, last_at, slots), each with its `resend` command (same order) and
        its audit entry, in one transaction; a gap asked for already (by another leader meanwhile) is skipped
        with its command. Returns the repairs kept."""
        kept = 0
        with self.transaction():
            for (unit, first_at, last_at, slots), c in zip(repairs, commands, strict=True):
                added = self.execute(
                    "INSERT INTO repairs (unit, first_at, last_at, slots, command, asked) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (unit, first_at) DO NOTHING",
                    (unit, first_at, last_at, slots, c.id, c.created),
                ).rowcount
                if added:
                    self._insert_commands([c])
                    self._audit([asked(c)])
                    kept += 1
        return kept

    def repairs(self, since: int, until: int) -> list[tuple[str, int, int, int, str]]:
        """The gap repairs asked for with `since <= asked < until`: (unit, first_at, last_at, slots, the state
        of its command: "" once the command is forgotten), by unit."""
        rows = self.execute(
            "SELECT r.unit, r.first_at, r.last_at, r.slots, coalesce(c.state, '') FROM repairs r "
            "LEFT JOIN commands c ON c.id = r.command WHERE r.asked >= ? AND r.asked < ? ORDER BY r.unit, r.first_at",
            (since, until),
        ).fetchall()
        return [(str(u), int(f), int(t), int(n), str(st)) for u, f, t, n, st in rows]

    # --- desired and reported configuration ----------------------------------------------------------

    def desired(self) -> list[tuple[str, str, str, str, str, int]]:
        """Every desired configuration: (scope, target, config as JSON, who, origin, at), by scope and target."""
        rows = self.execute("SELECT scope, target, config, who, origin, at FROM desired ORDER BY scope, target")
        return [(str(s), str(t), str(c), str(w), str(o), int(a)) for s, t, c, w, o, a in rows.fetchall()]

    def want(self, scope: str, target: str, config: dict[str, Any] | None, who: str, origin: str, now: int) -> None:
        """Merge `config` into the desired configuration of `scope` `target` (None: forget it), with the audit
        entry, in one transaction."""
        with self.transaction():
            row = self.execute("SELECT config FROM desired WHERE scope = ? AND target = ?", (scope, target)).fetchone()
            if config is None:
                self.execute("DELETE FROM desired WHERE scope = ? AND target = ?", (scope, target))
                self._audit([(now, who, origin, "configuration cleared", f"{scope} {target}".strip(), "")])
                return
            merged = {**(json.loads(row[0]) if row else {}), **config}
            text = json.dumps(merged, sort_keys=True, separators=(",", ":"))
            self.execute(
                "INSERT INTO desired (scope, target, config, who, origin, at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (scope, target) DO UPDATE SET config = excluded.config, who = excluded.who, "
                "origin = excluded.origin, at = excluded.at",
                (scope, target, text, who, origin, now),
            )
            self._audit([(now, who, origin, "configuration wanted", f"{scope} {target}".strip(), text)])

    def reported(self) -> dict[str, tuple[str, int]]:
        """Each unit's configuration as it last reported it: unit -> (config as JSON, when)."""
        return {str(u): (str(c), int(a)) for u, c, a in self.execute("SELECT unit, config, at FROM reported")}

    def reported_of(self, unit: str) -> tuple[str, int] | None:
        """One unit's configuration as it last reported it: (config as JSON, when), or None."""
        row = self.execute("SELECT config, at FROM reported WHERE unit = ?", (unit,)).fetchone()
        return None if row is None else (str(row[0]), int(row[1]))

    def config_tries(self) -> dict[str, tuple[str, int, str, str]]:
        """The last `set` smame sent each unit to bring it in step: unit -> (the configuration wanted then, when,
        the command, its state now: "" once forgotten)."""
        rows = self.execute(
            "SELECT t.unit, t.wanted, t.at, t.command, coalesce(c.state, '') FROM config_tries t "
            "LEFT JOIN commands c ON c.id = t.command"
        ).fetchall()
        return {str(u): (str(w), int(a), str(i), str(st)) for u, w, a, i, st in rows}

    def came_online(self) -> dict[str, int]:
        """The units online now, with since when."""
        rows = self.execute("SELECT unit, since FROM unit_status WHERE online").fetchall()
        return {str(u): int(since) for u, since in rows}

    def add_config_sets(self, commands: Sequence[CommandRow], wanted: Sequence[str]) -> None:
        """Queue `set` commands that bring units in step, each with the configuration wanted (same order),
        kept as the unit's last try, and their audit entries: one transaction."""
        with self.transaction():
            self._insert_commands(commands)
            self.executemany(
                "INSERT INTO config_tries (unit, wanted, at, command) VALUES (?, ?, ?, ?) ON CONFLICT (unit) "
                "DO UPDATE SET wanted = excluded.wanted, at = excluded.at, command = excluded.command",
                [(c.unit, w, c.created, c.id) for c, w in zip(commands, wanted, strict=True)],
            )
            self._audit([asked(c) for c in commands])

    # --- firmware images and campaigns ------------------------------------------------------------------

    def add_firmware(self, version: str, sha256: str, data: bytes, at: int, who: str, origin: str) -> None:
        """Keep a firmware image (its bytes in chunks, so that every node's web server can serve it) with its
        audit entry, in one transaction. StoreError when the version is kept already (with other bytes or the
        same: a version names one image)."""
        with self.transaction():
            if self.execute("SELECT 1 FROM firmware WHERE version = ?", (version,)).fetchone() is not None:
                raise StoreError(f"firmware {version} is kept already: a version names one image")
            self.execute(
                "INSERT INTO firmware (version, sha256, size, added, who) VALUES (?, ?, ?, ?, ?)",
                (version, sha256, len(data), at, who),
            )
            self.executemany(
                "INSERT INTO firmware_chunks (version, n, data) VALUES (?, ?, ?)",
                [(version, n, data[i : i + FIRMWARE_CHUNK]) for n, i in enumerate(range(0, len(data), FIRMWARE_CHUNK))],
            )
            self._audit([(at, who, origin, "firmware added", version, f"{len(data)} bytes sha256 {sha256}")])

    def firmwares(self) -> list[tuple[str, str, int, int, str]]:
        """The firmware images kept: (version, sha256, size, added, who), newest first."""
        rows = self.execute("SELECT version, sha256, size, added, who FROM firmware ORDER BY added DESC, version")
        return [(str(v), str(h), int(n), int(a), str(w)) for v, h, n, a, w in rows.fetchall()]

    def firmware_image(self, version: str) -> bytes | None:
        """A firmware image's bytes, or None."""
        if self.execute("SELECT 1 FROM firmware WHERE version = ?", (version,)).fetchone() is None:
            return None
        rows = self.execute("SELECT data FROM firmware_chunks WHERE version = ? ORDER BY n", (version,)).fetchall()
        return b"".join(bytes(r[0]) for r in rows)

    def add_campaign(self, c: CampaignRow, units: Sequence[str]) -> None:
        """Keep a new campaign with its units, all pending, in their order, and its audit entry."""
        with self.transaction():
            marks = ", ".join("?" * len(CampaignRow.__struct_fields__))
            self.execute(f"INSERT INTO campaigns ({CAMPAIGN_COLUMNS}) VALUES ({marks})", msgspec.structs.astuple(c))
            self.executemany(
                "INSERT INTO campaign_units (campaign, seq, unit, step, command, started, changed, stage, detail, "
                "probe) VALUES (?, ?, ?, 'pending', '', 0, ?, '', '', '')",
                [(c.id, i, u, c.created) for i, u in enumerate(units)],
            )
            self._audit([(c.created, c.who, c.origin, "campaign started", c.id, f"{c.version} {c.target} {c.plan}")])

    def campaigns(self, limit: int = 100) -> list[CampaignRow]:
        """The newest campaigns, newest first."""
        rows = self.execute(f"SELECT {CAMPAIGN_COLUMNS} FROM campaigns ORDER BY created DESC, id LIMIT ?", (limit,))
        return [CampaignRow(*r) for r in rows.fetchall()]

    def campaign(self, campaign_id: str) -> CampaignRow | None:
        row = self.execute(f"SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = ?", (campaign_id,)).fetchone()
        return None if row is None else CampaignRow(*row)

    def running_campaigns(self) -> list[CampaignRow]:
        """The campaigns not ended (running or paused)."""
        rows = self.execute(f"SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE phase IN ('running', 'paused')")
        return [CampaignRow(*r) for r in rows.fetchall()]

    def campaigns_ended(self, since: int) -> list[CampaignRow]:
        """The campaigns that ended by themselves (aborted or done) at `since` or later, oldest first."""
        rows = self.execute(
            f"SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE phase IN ('aborted', 'done') AND changed >= ? "
            "ORDER BY changed, id",
            (since,),
        )
        return [CampaignRow(*r) for r in rows.fetchall()]

    def campaign_counts(self, campaign_id: str) -> dict[str, int]:
        """A campaign's units by step."""
        rows = self.execute(
            "SELECT step, count(*) FROM campaign_units WHERE campaign = ? GROUP BY step", (campaign_id,)
        )
        return {str(s): int(n) for s, n in rows.fetchall()}

    def campaign_span_counts(self, campaign_id: str, first: int, end: int) -> dict[str, int]:
        """The units of a campaign with `first <= seq < end` (a wave), by step: a range of the key."""
        rows = self.execute(
            "SELECT step, count(*) FROM campaign_units WHERE campaign = ? AND seq >= ? AND seq < ? GROUP BY step",
            (campaign_id, first, end),
        )
        return {str(s): int(n) for s, n in rows.fetchall()}

    def campaign_open(self, campaign_id: str) -> list[OpenUnit]:
        """A campaign's started units that have not ended, with their commands' states, in order."""
        rows = self.execute(
            "SELECT u.seq, u.unit, u.step, u.started, u.command, coalesce(c.state, ''), coalesce(c.detail, ''), "
            "coalesce(c.answer, ''), u.probe, coalesce(p.state, '') FROM campaign_units u "
            "LEFT JOIN commands c ON c.id = u.command LEFT JOIN commands p ON p.id = u.probe "
            "WHERE u.campaign = ? AND u.step IN ('sent', 'updating') ORDER BY u.seq",
            (campaign_id,),
        ).fetchall()
        return [OpenUnit(*r) for r in rows]

    def campaign_pending(self, campaign_id: str, limit: int) -> list[tuple[int, str]]:
        """The next pending units of a campaign: (seq, unit), in order."""
        rows = self.execute(
            "SELECT seq, unit FROM campaign_units WHERE campaign = ? AND step = 'pending' ORDER BY seq LIMIT ?",
            (campaign_id, limit),
        ).fetchall()
        return [(int(q), str(u)) for q, u in rows]

    def campaign_started_since(self, campaign_id: str, since: int) -> int:
        """How many of a campaign's units were started at `since` or later."""
        row = self.execute(
            "SELECT count(*) FROM campaign_units WHERE campaign = ? AND step <> 'pending' AND started >= ?",
            (campaign_id, since),
        ).fetchone()
        return int(row[0])

    def campaign_units(
        self, campaign_id: str, step: str | None = None, limit: int = 1000
    ) -> list[tuple[int, str, str, int, int, str, str]]:
        """A campaign's units (in one step, if given), in order: (seq, unit, step, started, changed, stage,
        detail)."""
        sql = "SELECT seq, unit, step, started, changed, stage, detail FROM campaign_units WHERE campaign = ?"
        args: tuple[Any, ...] = (campaign_id,)
        if step is not None:
            sql, args = sql + " AND step = ?", (*args, step)
        rows = self.execute(sql + " ORDER BY seq LIMIT ?", (*args, limit)).fetchall()
        return [(int(q), str(u), str(st), int(a), int(c), str(g), str(d)) for q, u, st, a, c, g, d in rows]

    def campaign_step_of(self, campaign_id: str, unit: str) -> str | None:
        """Where one unit of a campaign stands, or None when the campaign has no such unit."""
        row = self.execute(
            "SELECT step FROM campaign_units WHERE campaign = ? AND unit = ?", (campaign_id, unit)
        ).fetchone()
        return None if row is None else str(row[0])

    def start_campaign_units(self, campaign_id: str, started: Sequence[tuple[int, CommandRow]]) -> None:
        """Start units of a campaign: each (seq, its `fw` command) queued and the unit `sent`, in one
        transaction with the audit entries."""
        with self.transaction():
            self._insert_commands([c for _, c in started])
            self.executemany(
                "UPDATE campaign_units SET step = 'sent', command = ?, started = ?, changed = ? "
                "WHERE campaign = ? AND seq = ? AND step = 'pending'",
                [(c.id, c.created, c.created, campaign_id, seq) for seq, c in started],
            )
            self._audit([asked(c) for _, c in started])

    def campaign_steps(self, campaign_id: str, steps: Sequence[tuple[int, str, str, str]], now: int) -> None:
        """Move started units of a campaign on: (seq, step, stage, detail)."""
        with self.transaction():
            self.executemany(
                "UPDATE campaign_units SET step = ?, stage = ?, detail = ?, changed = ? WHERE campaign = ? AND seq = ?",
                [(step, stage, detail, now, campaign_id, seq) for seq, step, stage, detail in steps],
            )

    def probe_campaign_unit(self, campaign_id: str, seq: int, probe: CommandRow) -> None:
        """Ask a unit of a campaign its version (a `ping`), its answer lost or late: one transaction."""
        with self.transaction():
            self._insert_commands([probe])
            self.execute(
                "UPDATE campaign_units SET probe = ?, changed = ? WHERE campaign = ? AND seq = ?",
                (probe.id, probe.created, campaign_id, seq),
            )
            self._audit([asked(probe)])

    def set_campaign_phase(
        self, campaign_id: str, phase: str, allowed: Sequence[str], now: int, detail: str, who: str, origin: str
    ) -> bool:
        """Move a campaign to `phase` from one of `allowed`; when it ends (cancelled, aborted), its pending units
        are skipped and its `fw` commands still queued are withdrawn (their units skipped too). False when its
        phase was not one of `allowed`. One transaction, with the audit entry."""
        marks = ", ".join("?" * len(allowed))
        with self.transaction():
            changed = self.execute(
                f"UPDATE campaigns SET phase = ?, changed = ?, detail = ? WHERE id = ? AND phase IN ({marks})",
                (phase, now, detail, campaign_id, *allowed),
            ).rowcount
            if not changed:
                return False
            if phase in ("cancelled", "aborted"):
                queued = [
                    str(c)
                    for (c,) in self.execute(
                        "SELECT u.command FROM campaign_units u JOIN commands c ON c.id = u.command "
                        "WHERE u.campaign = ? AND u.step = 'sent' AND c.state = 'queued'",
                        (campaign_id,),
                    ).fetchall()
                ]
                self.executemany(
                    "UPDATE commands SET state = ?, changed = ?, detail = ? WHERE id = ? AND state = ?",
                    [(State.CANCELLED, now, f"campaign {phase}", c, State.QUEUED) for c in queued],
                )
                self.executemany(
                    "UPDATE campaign_units SET step = 'skipped', changed = ?, detail = ? WHERE campaign = ? "
                    "AND command = ?",
                    [(now, f"campaign {phase} before it was sent", campaign_id, c) for c in queued],
                )
                self.execute(
                    "UPDATE campaign_units SET step = 'skipped', changed = ?, detail = ? WHERE campaign = ? "
                    "AND step = 'pending'",
                    (now, f"campaign {phase}", campaign_id),
                )
            self._audit([(now, who, origin, f"campaign {phase}", campaign_id, detail)])
            return True

    def _insert_commands(self, rows: Sequence[CommandRow]) -> None:
        """Insert new commands (inside the caller's transaction)."""
        marks = ", ".join("?" * len(CommandRow.__struct_fields__))
        self.executemany(
            f"INSERT INTO commands ({COMMAND_COLUMNS}) VALUES ({marks})", [msgspec.structs.astuple(r) for r in rows]
        )

    def _audit(self, entries: Sequence[tuple[int, str, str, str, str, str]]) -> None:
        self.executemany(f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", entries)

    def audit_after(
        self, after_id: int, actions: Sequence[str], limit: int = 200
    ) -> list[tuple[int, int, str, str, str, str, str]]:
        """Audit entries (id, at, who, origin, action, target, detail) of these actions after `after_id`, oldest
        first, at most `limit`."""
        marks = ", ".join("?" * len(actions))
        rows = self.execute(
            f"SELECT id, {AUDIT_COLUMNS} FROM audit WHERE id > ? AND action IN ({marks}) ORDER BY id LIMIT ?",
            (after_id, *actions, limit),
        )
        return [(int(i), int(at), str(w), str(o), str(a), str(t), str(d)) for i, at, w, o, a, t, d in rows.fetchall()]

    def audit_newest(self) -> int:
        """The newest audit entry's id (0 when there is none)."""
        return int(self.execute("SELECT coalesce(max(id), 0) FROM audit").fetchone()[0])

    def audit(
        self, limit: int = 200, before_id: int | None = None, about: str = ""
    ) -> list[tuple[int, int, str, str, str, str, str]]:
        """Audit entries (id, at, who, origin, action, target, detail), newest first, before `before_id` if
        given; with `about`, only those whose who, action or target is it, or whose detail starts with it."""
        where: list[str] = []
        args: list[Any] = []
        if before_id is not None:
            where.append("id < ?")
            args.append(before_id)
        if about:
            where.append("(who = ? OR action = ? OR target = ? OR substr(detail, 1, ?) = ?)")
            args += [about, about, about, len(about), about]
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self.execute(f"SELECT id, {AUDIT_COLUMNS} FROM audit {clause}ORDER BY id DESC LIMIT ?", (*args, limit))
        return [(int(i), int(at), str(w), str(o), str(a), str(t), str(d)) for i, at, w, o, a, t, d in rows.fetchall()]

"""Copying a whole store into another, empty one (SQLite to PostgreSQL, say), and proving the copy equal."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

from aggregator.store import (
    CAMPAIGN_COLUMNS,
    COMMAND_COLUMNS,
    HEALTH_COLUMNS,
    OPERATOR_EXTRA,
    READING_COLUMNS,
    SLOT_COLUMNS,
    TOKEN_EXTRA,
    Store,
    StoreError,
)

CHUNK = 20_000  # rows a transaction
# every table but meta, with the columns copied and the key whose order makes two stores' rows comparable
_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "readings": (READING_COLUMNS, ("at", "unit")),
    "slots": (SLOT_COLUMNS, ("slot", "unit")),
    "changes": ("id, customer, day, at", ("id",)),
    "quarantine": ("id, received, topic, unit, reason, detail, payload, concerns", ("id",)),
    "outbox": ("id, key, channel, payload, created, next_try, attempts, sent, given_up, last_error", ("id",)),
    "api_tokens": ("id, customer, name, hash, created, " + ", ".join(c for c, _ in TOKEN_EXTRA), ("id",)),
    "operators": ("name, hash, created, " + ", ".join(c for c, _ in OPERATOR_EXTRA), ("name",)),
    "web_sessions": ("id, operator, csrf, created, seen", ("id",)),
    "downloads": ("customer, file, at, via, who, count", ("customer", "file")),
    "unit_status": ("unit, online, since", ("unit",)),
    "connection_events": ("id, unit, at, online", ("id",)),
    "unit_health": ("day, unit, " + ", ".join(HEALTH_COLUMNS), ("day", "unit")),
    "unit_risk": ("day, unit, risk, reasons", ("day", "unit")),
    "risk_days": ("day, evaluated, at_risk, assessed", ("day",)),
    "health_events": ("day, scope, signal, units, evaluated, words", ("day", "scope", "signal")),
    "commands": (COMMAND_COLUMNS, ("id",)),
    "audit": ("id, at, who, origin, action, target, detail", ("id",)),
    "repairs": ("unit, first_at, last_at, slots, command, asked", ("unit", "first_at")),
    "desired": ("scope, target, config, who, origin, at", ("scope", "target")),
    "reported": ("unit, config, at", ("unit",)),
    "config_tries": ("unit, wanted, at, command", ("unit",)),
    "firmware": ("version, sha256, size, added, who", ("version",)),
    "firmware_chunks": ("version, n, data", ("version", "n")),
    "campaigns": (CAMPAIGN_COLUMNS, ("id",)),
    "campaign_units": (
        "campaign, seq, unit, step, command, started, changed, stage, detail, probe",
        ("campaign", "seq"),
    ),
}
_BOOLEANS = {"online"}  # the columns copied that hold a boolean


def _rows(store: Store, table: str) -> Iterator[tuple[Any, ...]]:
    """Every row of a table in its comparable order, read a chunk at a time (keyset paging on the order)."""
    columns, keys = _TABLES[table]
    order = ", ".join(keys)
    at = [columns.split(", ").index(k) for k in keys]
    flags = {i for i, c in enumerate(columns.split(", ")) if c in _BOOLEANS}
    last: tuple[Any, ...] | None = None
    args: tuple[Any, ...]
    while True:
        if last is None:
            where, args = "", ()
        else:  # keyset paging: the rows after the last one, in the order's terms (a row value comparison)
            where, args = f" WHERE ({order}) > ({', '.join('?' * len(keys))})", last
        rows = store.execute(f"SELECT {columns} FROM {table}{where} ORDER BY {order} LIMIT {CHUNK}", args).fetchall()
        if not rows:
            return
        if flags:  # SQLite keeps a boolean as 0 or 1: as a boolean for PostgreSQL, and for the fingerprint
            rows = [tuple(bool(v) if i in flags else v for i, v in enumerate(r)) for r in rows]
        yield from (tuple(r) for r in rows)
        last = tuple(rows[-1][i] for i in at)


def copy_store(
    source: Store, target: Store, progress: Callable[[str, int], None] = lambda t, n: None
) -> dict[str, int]:
    """Copy every row of `source` into `target`, which must hold no readings yet; keep ids (the export's and the
    monitor's cursors point at them) and the services' saved state (meta). Returns the rows copied per table."""
    if target.reading_count() or target.execute("SELECT count(*) FROM slots").fetchone()[0]:
        raise StoreError("the target store holds data already: migrate into an empty one")
    counts = {}
    for table, (columns, _) in _TABLES.items():
        n = 0
        batch: list[tuple[Any, ...]] = []
        for row in _rows(source, table):
            batch.append(row)
            if len(batch) == CHUNK:
                n += _write(target, table, columns, batch)
                progress(table, n)
                batch = []
        n += _write(target, table, columns, batch)
        counts[table] = n
        progress(table, n)
    with target.transaction():
        for key, value in source.execute("SELECT key, value FROM meta WHERE key <> 'schema'").fetchall():
            target.set_meta(key, value)
        target.after_copy()
    return counts


def _write(target: Store, table: str, columns: str, rows: list[tuple[Any, ...]]) -> int:
    if not rows:
        return 0
    with target.transaction():
        if table == "readings":
            target.insert_readings(rows)
        elif table == "slots":
            target.upsert_slots(("imp", "exp"), rows)
        else:
            target.insert_rows(table, columns.split(", "), rows)
    return len(rows)


def fingerprint(store: Store, table: str = "slots") -> tuple[int, str]:
    """Rows of a table and a SHA-256 over them in their comparable order: equal for equal contents in any
    backend."""
    digest, n = hashlib.sha256(), 0
    for row in _rows(store, table):
        digest.update(repr(row).encode())
        n += 1
    return n, digest.hexdigest()

"""Writing whole days of files, in export worker processes.

A worker reads a day's slots from SQLite straight into Arrow columns (ADBC), renders every
customer's file of that day and writes those whose bytes changed. It runs in a process of its
own for two reasons: the ADBC driver carries its own copy of SQLite, and two copies of SQLite in
one process break each other's POSIX locks (sqlite.org, "How To Corrupt An SQLite Database File",
2.2.1), while the service's own connections use Python's sqlite3; and rendering then never takes
the interpreter lock from ingest. Days go to workers in parallel.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import adbc_driver_manager as adbc
import adbc_driver_postgresql
import adbc_driver_sqlite
import polars as pl

from aggregator.backends import is_postgres
from aggregator.sqlite import sqlite_path
from csv_export.co2 import totals_bytes
from csv_export.files import path_of, write_if_changed
from csv_export.jobs import DayJob, totals_path
from csv_export.render import SLOT_SCHEMA, render_with_totals
from kernel.child import become_child
from kernel.heap import trim_heap
from kernel.timegrid import SLOT

# Every column typed in every row: the driver infers a column's type from its first rows, and a day whose
# first rows have no value would fail on the first real one. Energies are never negative, so -1 is free.
# Qualities cross as their letter's code point: a column of strings costs the driver about twice an integer one.
_QUERY = (
    "SELECT slot, unit, coalesce(imp, -1) AS imp, coalesce({code}(imp_q), -1) AS imp_q, coalesce(exp, -1) AS exp, "
    "coalesce({code}(exp_q), -1) AS exp_q, coalesce(meter, '') AS meter, coalesce(e1, -1) AS e1, "
    "coalesce(coef, -1) AS coef "
    "FROM slots WHERE slot IN (%s) AND unit IN (%s)"
)
_LETTERS = {ord(q): q for q in ("A", "E", "M")}
_CODED = SLOT_SCHEMA | {"imp_q": pl.Int64, "exp_q": pl.Int64}


def worker_init() -> None:
    """In an export worker (`kernel.child.become_child`): idle workers wait on a queue that they hold both ends
    of, so they would never see it close."""
    become_child("smame-export")


def slots_query(after: int, until: int, units: Iterable[str], code: str = "unicode") -> str:
    """The statement that reads the stored slots of `units` with `after < slot <= until` (`code`: the function
    that gives a character's code point in the store's SQL)."""
    # ADBC's low-level API hands polars an Arrow C stream: no pyarrow (170 MB) needed. Binding parameters
    # would need Arrow arrays, so the slot ends are formatted in (integers: nothing else can get in), and the
    # units as SQL literals (the registry allows letters, digits, _ and - only; quotes are doubled all the same).
    # Each slot end and each unit named, not a range of slots: the key (slot, unit) is then sought for each pair,
    # so a job reads its own rows only. With `slot > a AND slot <= b` the key gave a range over every unit's rows
    # of the day, and a fleet ten times larger meant ten times the jobs each reading ten times the rows.
    ends = ",".join(str(end) for end in range(int(after) + SLOT, int(until) + 1, SLOT))
    listed = ",".join("'" + u.replace("'", "''") + "'" for u in units)
    return _QUERY.format(code=code) % (ends or "NULL", listed)


def read_slots(store: str, after: int, until: int, units: Iterable[str]) -> pl.DataFrame:
    """Stored slots of `units` with `after < slot <= until` in the store at the URL `store`, as columns in
    `SLOT_SCHEMA` (missing values null)."""
    if is_postgres(store):  # the character code of a quality letter: each engine names it its own way
        database, code = adbc_driver_postgresql.connect(store), "ascii"
    else:
        database, code = adbc_driver_sqlite.connect(str(sqlite_path(store))), "unicode"
    with (
        database,
        adbc.AdbcConnection(database) as conn,
        adbc.AdbcStatement(conn) as stmt,
    ):
        stmt.set_sql_query(slots_query(after, until, units, code))
        stream, _ = stmt.execute_query()
        frame = pl.DataFrame(stream)
    # typed first: a day with no rows comes without types
    frame = frame.rename(dict(zip(frame.columns, SLOT_SCHEMA, strict=True))).cast(_CODED)  # type: ignore[arg-type]
    return frame.with_columns(
        *[pl.when(pl.col(c) == -1).then(None).otherwise(pl.col(c)).alias(c) for c in ("imp", "exp", "e1", "coef")],
        *[pl.col(c).replace_strict(_LETTERS, default=None, return_dtype=pl.String) for c in ("imp_q", "exp_q")],
        pl.when(pl.col("meter") == "").then(None).otherwise(pl.col("meter")).alias("meter"),
    )


def write_day(job: DayJob) -> tuple[list[Path], int]:
    """Render and write the job's files; returns the files written and how many were already right. Then the
    memory the job freed goes back to the system: an idle worker would hold its last job's peak."""
    try:
        return _write_day(job)
    finally:
        trim_heap()


def _write_day(job: DayJob) -> tuple[list[Path], int]:
    if job.labels:
        units = (u for c in job.customers for u, _ in c.units)
        slots = read_slots(job.store, job.labels[0][0] - SLOT, job.labels[-1][0], units)
    else:  # today, before its first slot has closed: header-only files
        slots = pl.DataFrame(schema=SLOT_SCHEMA)
    # Each customer's rows apart, once: rendering each file against the whole day costs 4x more.
    owners = pl.DataFrame(
        {
            "unit": [u for c in job.customers for u, _ in c.units],
            "customer": [c.customer for c in job.customers for _ in c.units],
        },
        schema={"unit": pl.String, "customer": pl.String},
    )
    parts = slots.join(owners, on="unit", how="inner").partition_by("customer", as_dict=True, include_key=False)
    empty = slots.clear()
    # A file is written and fsynced while the next one renders: the disk and the CPU work at once.
    root = Path(job.root)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="export-write") as disk:
        pending: list[tuple[Path | None, Future[bool]]] = []
        for c in job.customers:
            path = path_of(root, c.customer, job.day)
            data, totals = render_with_totals(job.day, job.labels, c.units, parts.get((c.customer,), empty), c.layout)
            if totals is not None and c.layout.co2 is not None:  # kept for the month's summary, before the file
                kept = totals_path(root, c.customer, job.day)
                pending.append((None, disk.submit(write_if_changed, kept, totals_bytes(totals, c.layout.co2), False)))
            if job.files:
                pending.append((path, disk.submit(write_if_changed, path, data)))
        changed = [(path, f.result()) for path, f in pending]  # the first failure (disk full) is raised here
    files = [(path, wrote) for path, wrote in changed if path is not None]  # the totals are not customers' files
    return [path for path, wrote in files if wrote], sum(1 for _, wrote in files if not wrote)

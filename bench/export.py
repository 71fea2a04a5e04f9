"""CSV export: one day of 10,000 units (480,000 rows, long layout) and a 45-day re-export.

Baseline in the same run: fetching the same rows from SQLite into Python (sqlite3) and nothing else,
the floor of an export that goes through Python objects. smame's export reads into Arrow instead
(in its worker processes) and renders with polars; with --workers it renders days in parallel.

    .venv/bin/python -m bench.export --units 10000 --days 45
    .venv/bin/python -m bench.export --units 10000 --days 3 --co2    # every customer with CO2 columns
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

from aggregator.sqlite import SqliteStore
from aggregator.store import Store
from csv_export.exporter import Exporter
from kernel.emissions import Factors, Published
from kernel.registry import Customer, Registry, Unit
from kernel.timegrid import Grid
from tests.helpers import children, memory_mb, process_name


def fill(store: Store, grid: Grid, ids: list[str], first: date, days: int) -> int:
    """Slots of every unit for `days` days from `first`, and each unit's first reading (no file is written for
    a day before a customer's first reading)."""
    rnd = random.Random(1)
    start = grid.day_start(first)
    store.db.execute("BEGIN")
    store.insert_readings((unit, start, f"SM-{unit}", 0, 0, 1, 1, 6, 0, 0, start, start, None) for unit in ids)
    store.db.execute("COMMIT")
    n = 0
    for d in range(days):
        store.db.execute("BEGIN")
        for end in grid.day_slots(first + timedelta(days=d)):  # a half hour at a time: a million units' day is 48M rows
            rows = []
            for unit in ids:
                q = "A" if rnd.random() > 0.01 else "E"
                rows.append((end, unit, rnd.randrange(40), q, 0, rnd.randrange(5), q, 0, f"SM-{unit}", 1, 1))
            store.db.executemany("INSERT INTO slots VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            n += len(rows)
        store.db.execute("COMMIT")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=10_000)
    ap.add_argument("--customers", type=int, default=20)
    ap.add_argument("--days", type=int, default=45)
    ap.add_argument("--workers", type=int, default=2, help="export.workers")
    ap.add_argument("--co2", action="store_true", help="every customer with CO2 columns and a monthly summary")
    args = ap.parse_args()
    grid = Grid("Asia/Tokyo")
    today = date(2026, 11, 23)
    now = grid.day_start(today + timedelta(days=1)) + 300.0  # every slot of "today" closed
    first = today - timedelta(days=args.days - 1)
    units = {f"U{u:06d}": Unit(f"U{u:06d}", f"C{u % args.customers:03d}", f"SM-U{u:06d}") for u in range(args.units)}
    co2 = {"supplier": "S", "menu": "M", "co2_columns": True} if args.co2 else {}
    factors = Factors(
        {
            ("national", "average", 2026): Published(Decimal("0.000423"), Decimal("0.000423"), date(2025, 12, 20)),
            ("S", "M", 2026): Published(Decimal("0.00045"), Decimal("0.000381"), date(2025, 12, 20)),
        }
    )
    customers = {c: Customer(id=c, **co2) for c in {u.customer for u in units.values()}}
    registry = Registry(units, customers, factors=factors)
    with tempfile.TemporaryDirectory(prefix="smame-export-") as tmp:
        store = SqliteStore(Path(tmp) / "smame.db", "NORMAL")
        started = time.perf_counter()
        rows = fill(store, grid, list(units), first, args.days)
        print(
            f"store: {rows:,} slots ({args.units:,} units x {args.days} days) filled in "
            f"{time.perf_counter() - started:.0f} s"
        )
        exporter = Exporter(store, lambda: registry, grid, Path(tmp) / "export", 45, 120, workers=args.workers)
        customers = sorted(registry.customers)
        # a running service has its workers started: start them outside the timings (an empty day)
        exporter.export([(c, first - timedelta(days=1 + k)) for c in customers for k in range(args.workers)], now)

        t = time.perf_counter()
        day_rows = store.db.execute(  # the bare fetch: tuples, as SQLite hands them out
            "SELECT * FROM slots WHERE slot > ? AND slot <= ?", (grid.day_start(today), grid.day_slots(today)[-1])
        ).fetchall()
        fetch = time.perf_counter() - t
        t = time.perf_counter()
        result = exporter.export([(c, today) for c in customers], now)
        one_day = time.perf_counter() - t
        daily = [p for p in result.written if not p.name.endswith("_co2.csv")]
        if len(daily) != len(customers):
            raise SystemExit(f"the export wrote {len(daily)} files, not {len(customers)}: nothing to time")
        size = sum(p.stat().st_size for p in daily)
        t = time.perf_counter()
        again = exporter.export([(c, today) for c in customers], now)
        unchanged = time.perf_counter() - t
        t = time.perf_counter()
        window = [(c, first + timedelta(days=d)) for d in range(args.days) for c in customers]
        full = exporter.export(window, now)
        everything = time.perf_counter() - t
        peaks = [memory_mb(w)[1] for w in children(os.getpid()) if process_name(w) == "smame-export"]
        exporter.close()
    n_day = len(day_rows)
    print(f"baseline, fetch one day's {n_day:,} rows from SQLite: {fetch:6.2f} s")
    print(
        f"export one day ({len(daily)} files{' with CO2 and their months' if args.co2 else ''}, {n_day:,} rows, "
        f"{size / 1e6:.1f} MB): {one_day:6.2f} s "
        f"({n_day / one_day:,.0f} rows/s, x{one_day / fetch:.2f} the fetch)"
    )
    print(f"same day again, nothing changed ({again.unchanged} files compared):  {unchanged:6.2f} s")
    print(f"export workers' peak resident memory: {', '.join(f'{p:.0f} MB' for p in peaks)}")
    print(
        f"re-export {args.days} days with {args.workers} workers ({len(full.written) + full.unchanged} files, "
        f"{rows:,} rows): {everything:6.2f} s "
        f"({rows / everything:,.0f} rows/s)"
    )


if __name__ == "__main__":
    main()

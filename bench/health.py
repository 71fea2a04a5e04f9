"""Failure prediction measured: a simulated fleet's health over weeks, the daily risk pass, and the truth.

Each unit's telegrams (their `seq`, delay, clock, no-data registers and `diag`) and link drops come from the
health simulator (`simulators.health`): a share of units fail with a precursor, others die suddenly or only
look unwell, and fleet-wide outages touch everyone. Each day's readings become the day's health records
(`monitoring.health`, as the monitor makes them) and, at the end of each day, the risk pass
(`monitoring.risk`) flags units. Printed: recall of predictable failures flagged at least 24 h before their
silence, the median lead time, precision (a flagged unit fails or is degrading within 7 days), the confusion
counts by kind, and the time and peak memory of the daily pass (the day's records and the risk), for the
fleet and for ten times it (its units copied under other names: the pass's cost depends on rows, not values).

    .venv/bin/python -m bench.health                  # 10,000 units, 30 days (a few minutes)
    .venv/bin/python -m bench.health --units 300 --days 16

With `--store N`, instead: the monitor's hourly pass as smame runs it (`monitoring.health_pass`), on an SQLite
store holding N units' readings (each with a `diag`) of yesterday and of today until noon and their health
records of the 28 days before: its time and peak memory, in a process of its own, beside the same for a tenth
of the fleet (`--store-baseline` to choose).

    .venv/bin/python -m bench.health --store 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import msgspec
import polars as pl

from aggregator.sqlite import SqliteStore
from aggregator.store import HEALTH_COLUMNS
from kernel.reading import Diag
from kernel.timegrid import SLOT, Grid
from monitoring.health import ROW_SCHEMA, day_records, rows_frame
from monitoring.health_pass import HEALTH_CHUNK_UNITS
from monitoring.risk import assess
from simulators.health import DAY, LOOKALIKES, PRECURSORS, HealthMix, degrading, fleet_days

WARM_DAYS = 7  # days of records before the first pass (a baseline to compare with)


@dataclass
class Outcome:
    """What the passes flagged, judged against the truth."""

    units: int
    days: int
    predictable: int = 0  # units failing with a precursor within the run
    caught: int = 0  # of them, flagged at least 24 h before their silence
    late: int = 0  # flagged, but less than 24 h before
    missed: int = 0  # never flagged
    leads_h: list[float] = field(default_factory=list)
    flagged: int = 0  # units flagged at least once
    true: int = 0  # of them, failing or degrading within 7 days of their first flag
    false_by_kind: Counter[str] = field(default_factory=Counter)
    flagged_by_kind: Counter[str] = field(default_factory=Counter)
    events: list[str] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.caught / self.predictable if self.predictable else 1.0

    @property
    def precision(self) -> float:
        return self.true / self.flagged if self.flagged else 1.0

    @property
    def median_lead_h(self) -> float:
        return statistics.median(self.leads_h) if self.leads_h else 0.0


def run(units: int, days: int, seed: int, mix: HealthMix, fleet_outages: int, keep: Path | None) -> Outcome:
    """Simulate, make the records, pass every day after the warm-up, and judge the flags."""
    start = int(time.time()) // DAY * DAY - days * DAY
    conditions, stream = fleet_days(units, days, seed, start, mix, fleet_outages)
    by_unit = {c.unit: c for c in conditions}
    records: list[pl.DataFrame] = []
    first_flag: dict[str, int] = {}
    out = Outcome(units, days)
    for d, (day, raw, offline) in enumerate(stream):
        rows = rows_frame(raw)
        disconnects = {unit: len(times) for unit, times in offline.items()}
        records.append(day_records(rows, disconnects).with_columns(day=pl.lit(day, pl.Int64)))
        if keep is not None and d == days - 1:  # as the store gives them: the pass decodes the diags
            pl.DataFrame(raw, schema=ROW_SCHEMA, orient="row").write_parquet(keep / "rows.parquet")
            pl.DataFrame({"unit": list(disconnects), "n": list(disconnects.values())}).write_parquet(
                keep / "disconnects.parquet"
            )
        records = records[-29:]
        if d < WARM_DAYS:
            continue
        assessment = assess(pl.concat(records), day)
        flag_at = day + DAY
        for unit in assessment.at_risk:
            first_flag.setdefault(unit.unit, flag_at)
        out.events += [f"{_date(day)} {e.scope} {e.signal}: {e.words}" for e in assessment.events]
    if keep is not None:
        pl.concat(records).write_parquet(keep / "records.parquet")
    end = start + days * DAY
    for c in conditions:
        if c.kind in PRECURSORS and c.failure is not None and c.failure <= end:
            out.predictable += 1
            flagged = first_flag.get(c.unit)
            if flagged is None or flagged > c.failure:
                out.missed += 1
            elif c.failure - flagged >= DAY:
                out.caught += 1
                out.leads_h.append((c.failure - flagged) / 3600)
            else:
                out.late += 1
    for unit, at in first_flag.items():
        condition = by_unit.get(unit)
        kind = condition.kind if condition else "healthy"
        out.flagged += 1
        out.flagged_by_kind[kind] += 1
        if degrading(condition, at):
            out.true += 1
        else:
            out.false_by_kind[kind] += 1
    return out


def _date(epoch: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def daily_pass(keep: Path, copies: int) -> dict[str, float]:
    """Time the last day's pass (its records from its readings as the store gives them, then the risk) with
    the fleet `copies` times over; in this process, so its peak memory is the pass's (reading the readings
    from the store is not counted: `bench.store` measures reads)."""
    rows = pl.read_parquet(keep / "rows.parquet")
    disc = pl.read_parquet(keep / "disconnects.parquet")
    records = pl.read_parquet(keep / "records.parquet")
    if copies > 1:
        rows = pl.concat([rows.with_columns(unit=pl.col("unit") + f"-{k}") for k in range(copies)])
        disc = pl.concat([disc.with_columns(unit=pl.col("unit") + f"-{k}") for k in range(copies)])
        records = pl.concat([records.with_columns(unit=pl.col("unit") + f"-{k}") for k in range(copies)])
    day = int(records["day"].max())
    history = records.filter(pl.col("day") < day)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    made = day_records(
        rows_frame(rows.iter_rows()), dict(zip(disc["unit"].to_list(), disc["n"].to_list(), strict=True))
    )
    recorded = time.perf_counter()
    result = assess(pl.concat([history, made.with_columns(day=pl.lit(day, pl.Int64))]), day)
    done = time.perf_counter()
    return {
        "units": result.evaluated,
        "rows": rows.height,
        "records_s": recorded - started,
        "risk_s": done - recorded,
        "pass_s": done - started,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "before_mb": base / 1024,
    }


GRID = Grid("Asia/Tokyo")


def fill_store(path: Path, units: int, now: int) -> float:
    """A store with `units` units' readings of yesterday and of today until `now`, every telegram with a `diag`,
    and their health records of the 28 days before yesterday; the seconds it took."""
    started = time.perf_counter()
    today = datetime.fromtimestamp(now, GRID.zone).date()
    yesterday = GRID.day_start(today - timedelta(days=1))
    ids = [f"U{u:07d}" for u in range(units)]
    diags = [
        msgspec.json.encode(Diag("2.4.1", -80 - u % 30, -10.5, 8.0, 0, f"44010-{u % 5000:06x}", 12, 86400, 3300, 1))
        for u in range(64)
    ]
    with SqliteStore(path, "OFF") as store:
        for k, at in enumerate(range(yesterday, now + 1, SLOT)):
            with store.transaction():
                store.insert_readings(
                    (unit, at, "M1", k, 0, 1, 1, 6, 0, k, at + 5, at + 7, diags[u % 64]) for u, unit in enumerate(ids)
                )
        record = dict.fromkeys(HEALTH_COLUMNS, 0) | {"readings": 48, "rsrp": -90.0, "fw": "2.4.1", "cell": "c1"}
        for d in range(1, 29):
            store.keep_health(
                yesterday - d * DAY,
                ["unit", *HEALTH_COLUMNS],
                ((unit, *(record | {"rsrp": -80.0 - u % 30}).values()) for u, unit in enumerate(ids)),
            )
    return time.perf_counter() - started


def store_pass(path: Path, now: int, chunk: int | None) -> dict[str, float]:
    """The monitor's health pass on the store at `path` at `now` (with `chunk` units a range instead of
    HEALTH_CHUNK_UNITS): its time, records kept and peak memory."""
    from monitoring import health_pass

    if chunk:
        health_pass.HEALTH_CHUNK_UNITS = chunk
    with SqliteStore(path, "NORMAL") as store:
        units = [u for (u,) in store.execute("SELECT unit FROM reading_span")]
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        kept = health_pass.keep_health(store, GRID, units, now)
        took = time.perf_counter() - started
    return {
        "units": len(units),
        "records": kept.records,
        "pass_s": took,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "before_mb": base / 1024,
    }


def _store_child(path: Path, now: int, chunk: int | None) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.health", "--store-pass", str(path), "--now", str(now)]
        + ([] if chunk is None else ["--chunk", str(chunk)]),
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(proc.stdout))


def _child(keep: Path, copies: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.health", "--pass-only", str(keep), "--copies", str(copies)],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(proc.stdout))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=10_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--outages", type=int, default=2, help="fleet-wide outages of an hour in the run")
    ap.add_argument("--scale", type=int, default=10, help="also time the pass for the fleet this many times over")
    ap.add_argument("--store", type=int, help="time the monitor's pass on a store of this many units")
    ap.add_argument("--store-baseline", type=int, help="the fleet it is compared with (default: a tenth)")
    ap.add_argument("--pass-only", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--copies", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--store-pass", type=Path, help=argparse.SUPPRESS)
    ap.add_argument(
        "--chunk", type=int, help="also the pass with this many units a range (1000000000: the whole fleet at once)"
    )
    ap.add_argument("--now", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pass_only:
        print(json.dumps(daily_pass(args.pass_only, args.copies)))
        return
    if args.store_pass:
        print(json.dumps(store_pass(args.store_pass, args.now, args.chunk)))
        return
    if args.store:
        # noon: the pass makes yesterday's records and today's so far
        now = GRID.day_start(datetime.fromtimestamp(time.time(), GRID.zone).date()) + 12 * 3600
        for units in (args.store_baseline or max(1, args.store // 10), args.store):
            with tempfile.TemporaryDirectory(prefix="smame-health-", dir=os.environ.get("SMAME_BENCH_DIR")) as tmp:
                filled = fill_store(Path(tmp) / "smame.db", units, now)
                for chunk in (None, args.chunk) if args.chunk else (None,):
                    p = _store_child(Path(tmp) / "smame.db", now, chunk)
                    print(
                        f"health pass on a store, {p['units']:,.0f} units (filled in {filled:.0f} s), "
                        f"{chunk or HEALTH_CHUNK_UNITS:,} units a range: {p['records']:,.0f} records made in "
                        f"{p['pass_s']:.1f} s, peak {p['peak_mb']:.0f} MB (after opening {p['before_mb']:.0f} MB)"
                    )
        return
    with tempfile.TemporaryDirectory(prefix="smame-health-") as tmp:
        keep = Path(tmp)
        started = time.perf_counter()
        out = run(args.units, args.days, args.seed, HealthMix(), args.outages, keep)
        simulated = time.perf_counter() - started
        passes = [_child(keep, 1)] + ([_child(keep, args.scale)] if args.scale > 1 else [])
    print(f"health: {args.units} units, {args.days} days, seed {args.seed} (simulated and judged in {simulated:.0f} s)")
    print(
        f"  recall {out.recall:.3f}: {out.caught} of {out.predictable} failures with a precursor flagged >= 24 h"
        f" ahead ({out.late} later, {out.missed} never); median lead {out.median_lead_h:.0f} h"
    )
    print(
        f"  precision {out.precision:.3f}: {out.true} of {out.flagged} flagged units failing or degrading within 7 days"
    )
    print(f"  flagged by kind: {dict(sorted(out.flagged_by_kind.items()))}")
    print(f"  false by kind:   {dict(sorted(out.false_by_kind.items()))}")
    shown = sorted(set(out.events))
    print(f"  events said once ({len(shown)}): " + ("; ".join(shown[:6]) or "none"))
    for p in passes:
        print(
            f"  daily pass, {p['units']:.0f} units ({p['rows']:.0f} readings): {p['pass_s']:.2f} s"
            f" (records {p['records_s']:.2f} s, risk {p['risk_s']:.2f} s), peak {p['peak_mb']:.0f} MB"
            f" (after loading {p['before_mb']:.0f} MB)"
        )
    kinds = ", ".join((*PRECURSORS, *LOOKALIKES, "sudden_death"))
    print(f"  (kinds simulated: {kinds})")


if __name__ == "__main__":
    main()

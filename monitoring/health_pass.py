"""The units' health pass: each day's health records made from the store's readings and kept, then each day's
risk assessed and kept. The monitor runs it on the store's thread every `health.pass_every_s`."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from aggregator.store import HEALTH_COLUMNS, Store, UnitRange
from kernel.timegrid import Grid
from monitoring.at_risk import reasons_json
from monitoring.health import day_records, records_frame, rows_frame
from monitoring.risk import BASELINE_DAYS, COLUMNS, assess

# units whose day is made at a time: their rows (48 a unit, each diag read) take about 110 MB in Python
HEALTH_CHUNK_UNITS = 5000


@dataclass
class Kept:
    """What a pass kept: the records, and the `diag` fields left out as wrong "today" and "yesterday"."""

    records: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


def unit_ranges(units: Iterable[str], size: int) -> list[UnitRange]:
    """Ranges of units (`Store.health_rows`) that together hold every unit id there may be, `size` of `units` in
    each: the first open below, the last open above."""
    ordered = sorted(units)
    bounds: list[str | None] = [None, *ordered[size::size], None]
    return list(zip(bounds, bounds[1:], strict=False))


class Stopped(Exception):
    """The pass was asked to stop between two ranges of units: the days it made so far stay."""


def keep_health(
    store: Store, grid: Grid, units: Iterable[str], now: float, stopping: Callable[[], bool] = lambda: False
) -> Kept:
    """Make today's and yesterday's health records of every unit again, and those of the days before that have
    readings or disconnects but no records yet (a new installation, a backfill, a store migrated from before
    them), and keep them, a range of `units` (the registry's) at a time; then assess each of those days' risk,
    oldest first, and keep it. Raise Stopped when `stopping()` says so after a range: the next pass makes what
    is left."""
    today = datetime.fromtimestamp(now, grid.zone).date()
    out = Kept()
    first = today - timedelta(days=BASELINE_DAYS)
    recorded = {d for d, _, _ in store.health_days(grid.day_start(first))}
    days = [
        d
        for d in (first + timedelta(days=k) for k in range(BASELINE_DAYS + 1))
        if d >= today - timedelta(days=1) or grid.day_start(d) not in recorded
    ]
    made: list[tuple[date, int, int]] = []  # the days kept: (day, start, end)
    ranges = unit_ranges(units, HEALTH_CHUNK_UNITS)
    columns = ["unit", *HEALTH_COLUMNS]
    for day in days:
        start, end = grid.day_start(day), grid.day_start(day + timedelta(days=1))
        recent = day >= today - timedelta(days=1)  # made again: the ranges without records now lose theirs
        disconnects = store.disconnects(start, end)
        if not (recent or disconnects or store.has_readings(start, end)):
            continue  # nothing to make: not a range of units asked
        offline = sorted(disconnects)
        records_of_day = dropped = 0
        # a range of units at a time: a day's rows of a whole fleet, each diag read, would not fit in memory
        for bounds in ranges:
            low = 0 if bounds[0] is None else bisect_left(offline, bounds[0])
            high = len(offline) if bounds[1] is None else bisect_left(offline, bounds[1])
            records = day_records(
                rows_frame(store.health_rows(start, end, bounds)), {u: disconnects[u] for u in offline[low:high]}
            )
            if records.height or recent:
                store.keep_health(start, columns, records.iter_rows(), bounds)
            records_of_day += records.height
            dropped += int(records["diag_dropped"].sum())
            if stopping():
                if not recent:  # a day before yesterday half made would count as made: the next pass makes it
                    store.keep_health(start, columns, [])
                raise Stopped
        if records_of_day or recent:
            made.append((day, start, end))
        if recent:
            out.dropped["today" if day == today else "yesterday"] = dropped
        out.records += records_of_day
    since = grid.day_start(made[0][0] - timedelta(days=BASELINE_DAYS))
    history = records_frame(store.health_records(since, grid.day_start(today), COLUMNS), COLUMNS)
    for _, start, end in made:
        result = assess(history, start, min(1.0, max(0.0, (now - start) / (end - start))))
        store.keep_risk(
            start,
            result.evaluated,
            [(u.unit, u.risk, reasons_json(u.reasons)) for u in result.at_risk],
            [(e.scope, e.signal, e.units, e.of, e.words) for e in result.events],
            int(now),
        )
    return out

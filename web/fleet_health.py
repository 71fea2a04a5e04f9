"""The fleet's health and each unit's, as the console's pages and the API show them: read from what the
monitor keeps (the health records and each day's risk), on the store's thread."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from aggregator.store import HEALTH_COLUMNS, Store
from kernel.registry import Registry
from kernel.timegrid import Grid
from monitoring import at_risk
from monitoring.at_risk import Standing, by_reason
from monitoring.inventory import Inventory, Newest, inventory


@dataclass(frozen=True, slots=True)
class Trend:
    """One day of the fleet: units with a record, readings received of the day against the registry's units'
    half hours, units assessed and at risk."""

    day: date
    units: int
    completeness: float | None  # readings received / (units registered x half hours of the day)
    assessed: int
    at_risk: int


@dataclass(frozen=True, slots=True)
class FleetHealth:
    """Who is at risk now (with customers), by reason; the events of today and yesterday; the inventory; the
    trend by day."""

    at_risk: list[tuple[Standing, str]]
    by_reason: dict[str, int]
    events: list[tuple[date, str, str, int, int, str]]  # (day, scope, signal, units, of them assessed, words)
    inventory: Inventory
    trend: list[Trend]


def _date(grid: Grid, start: int) -> date:
    """The local day starting at `start`."""
    return datetime.fromtimestamp(start, grid.zone).date()


def fleet_health(store: Store, grid: Grid, registry: Registry, now: float, trend_days: int) -> FleetHealth:
    """The fleet's health now (`trend_days`: how many days the trend goes back)."""
    days = at_risk.run_days(grid, now, max(2, trend_days))  # (today's and yesterday's events at least)
    units = registry.units
    standing_now = at_risk.read(store, grid, now)
    named = at_risk.with_customers(standing_now, registry)
    events = [(_date(grid, d), sc, sig, n, of, w) for d, sc, sig, n, of, w in store.health_events(days[1])]
    newest = [Newest(*row) for row in store.newest_health(days[1])]
    since = days[trend_days - 1]
    assessed = {d: (e, n) for d, e, n, _ in store.risk_days(since)}
    slots = {d: len(grid.day_slots(_date(grid, d))) for d in days[:trend_days]}
    trend = []
    for d, n, readings in store.health_days(since):
        expected = len(units) * slots.get(d, 48)
        e, r = assessed.get(d, (0, 0))
        trend.append(Trend(_date(grid, d), n, readings / expected if expected else None, e, r))
    return FleetHealth(named, by_reason(standing_now), events, inventory(newest), trend)


@dataclass(frozen=True, slots=True)
class UnitHealth:
    """A unit's health records (oldest first, as dicts with `date`) and whether it stands at risk now."""

    days: list[dict[str, Any]]
    at_risk: Standing | None


def unit_health(store: Store, grid: Grid, unit: str, now: float, count: int) -> UnitHealth:
    """A unit's last `count` days of health, and its standing."""
    records = store.unit_health(unit, at_risk.run_days(grid, now, count)[-1])
    out = [{"date": _date(grid, r["day"]), **{c: r[c] for c in HEALTH_COLUMNS}} for r in records]
    mine = at_risk.read(store, grid, now, unit)
    return UnitHealth(out, mine[0] if mine else None)

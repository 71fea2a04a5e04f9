"""The units at risk now, as operators see them, from the risk the store keeps (`standing` is pure: its rows
in; `read` reads them).

The monitor assesses today (so far) and yesterday every hour (`monitoring.risk`) and keeps each day's at-risk
units. A unit stands at risk while today's or yesterday's assessment says so: at midnight a unit flagged the
day before does not vanish from the list until a day of its own says whether it recovered. It has stood so
since the first day of its unbroken run of at-risk days.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aggregator.store import Store
from kernel.registry import Registry
from kernel.timegrid import Grid

RUN_DAYS = 60  # how far back a unit's unbroken run of days at risk is followed

# the signals a unit is put at risk by (`monitoring.risk` assesses them in this order), as operators read them
SIGNALS = {
    "reboots": "reboots",
    "disconnects": "disconnects",
    "no_data": "no meter data",
    "attaches": "attach attempts",
    "seq_gaps": "lost telegrams",
    "rsrp": "RSRP",
    "sinr": "SINR",
    "vsup_min": "supply voltage",
    "clock_offset": "clock",
    "delay_p50": "delivery delay",
}


@dataclass(frozen=True, slots=True)
class Standing:
    """A unit at risk now: its risk and reasons (of the latest day that flagged it), since which day."""

    unit: str
    risk: float
    reasons: tuple[dict[str, Any], ...]  # {"signal", "severity", "words"}, strongest first
    since: int  # start of the first day of its run
    day: int  # start of the day whose assessment this is

    @property
    def signals(self) -> list[str]:
        """The signals that put it at risk."""
        return [str(r["signal"]) for r in self.reasons]

    @property
    def words(self) -> str:
        """Its reasons in one line."""
        return "; ".join(str(r["words"]) for r in self.reasons)


def standing(rows: Sequence[tuple[int, str, float, str]], days: Sequence[int]) -> list[Standing]:
    """The units at risk now, riskiest first, from the store's at-risk rows (day, unit, risk, reasons as JSON;
    `Store.at_risk`) and the starts of the days newest first (today, yesterday, and before as far as the rows
    go)."""
    by_unit: dict[str, dict[int, tuple[float, str]]] = {}
    for day, unit, risk, reasons in rows:
        by_unit.setdefault(unit, {})[day] = (risk, reasons)
    out = []
    for unit, flagged in by_unit.items():
        latest = next((d for d in days[:2] if d in flagged), None)
        if latest is None:
            continue
        since = latest
        for d in days[days.index(latest) + 1 :]:
            if d not in flagged:
                break
            since = d
        risk, reasons = flagged[latest]
        out.append(Standing(unit, risk, tuple(_reasons(reasons)), since, latest))
    out.sort(key=lambda s: (-s.risk, s.unit))
    return out


def run_days(grid: Grid, now: float, count: int = RUN_DAYS) -> list[int]:
    """The starts of the `count` local days up to `now`'s, newest first."""
    today = datetime.fromtimestamp(now, grid.zone).date()
    return [grid.day_start(today - timedelta(days=k)) for k in range(count)]


def read(store: Store, grid: Grid, now: float, unit: str | None = None) -> list[Standing]:
    """The units (or the one unit) at risk at `now`, as the store keeps their days (on the store's thread)."""
    days = run_days(grid, now)
    return standing(store.at_risk(days[-1], unit), days)


def with_customers(units: Sequence[Standing], registry: Registry) -> list[tuple[Standing, str]]:
    """Each unit at risk with its customer ("-" for a unit no longer in the registry)."""
    known = registry.units
    return [(s, known[s.unit].customer if s.unit in known else "-") for s in units]


def by_reason(units: Sequence[Standing]) -> dict[str, int]:
    """How many units each signal puts at risk (a unit with two reasons counts under both)."""
    return dict(sorted(Counter(s for u in units for s in u.signals).items()))


def text(units: Sequence[Standing], limit: int = 5) -> str:
    """The units at risk in one paragraph: how many, by reason, and the riskiest with their reasons."""
    reasons = ", ".join(f"{SIGNALS.get(k, k)} {n}" for k, n in sorted(by_reason(units).items(), key=lambda kv: -kv[1]))
    riskiest = "; ".join(f"{u.unit} (risk {u.risk:.1f}: {u.words})" for u in units[:limit])
    more = f"; and {len(units) - limit} more" if len(units) > limit else ""
    return f"{len(units)} units at risk of falling silent; by reason: {reasons}; riskiest: {riskiest}{more}"


def reasons_json(reasons: Sequence[Any]) -> str:
    """Reasons (`monitoring.risk.Reason`) as the store keeps them."""
    return json.dumps([{"signal": r.signal, "severity": r.severity, "words": r.words} for r in reasons])


def _reasons(raw: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(raw)
    except ValueError:
        return []
    return [r for r in value if isinstance(r, dict)] if isinstance(value, list) else []

"""The daily report of one local day, read from the store, and the messages that carry it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import date, timedelta

from aggregator.store import SlotRow, Store
from kernel.child import Stopped
from kernel.commands import State
from kernel.emissions import DayFactors, grams, kwh_e4
from kernel.registry import Registry, Unit
from kernel.settings import Settings
from kernel.timegrid import SLOT, Grid
from monitoring import at_risk
from monitoring.channels import fan_out
from monitoring.detect import ProblemSlot, UnitFindings, by_unit, detect
from monitoring.outbox import Message
from monitoring.report import (
    CustomerCo2,
    DailyReport,
    HealthSection,
    RepairSection,
    problems_csv,
    render_html,
    render_slack,
    render_text,
    subject,
)

# Units whose slots are read and weighed at once: a day of 100,000 units as Python rows would take
# about a gigabyte; a share of 2,000 takes about 20 MB.
SHARE = 2000


def build_report(
    store: Store,
    grid: Grid,
    registry: Registry,
    day: date,
    now: int,
    silent_after_s: int = 86400,
    zero_run: int = 12,
    caveat: str = "",
    report_units: int = 20,
    stopping: Callable[[], bool] = lambda: False,
) -> DailyReport:
    """Detect the day's problems from the store, a share of the units at a time; raise Stopped when `stopping()`
    says so after a share."""
    labels = grid.closed(day, now)
    ends = [end for end, _ in labels]
    units = [(u.id, u.customer) for u in sorted(registry.units.values(), key=lambda u: u.id)]
    findings: list[UnitFindings] = []
    problems: list[ProblemSlot] = []
    factors = {c: registry.day_factors(c, day) for c in registry.customers}
    co2 = {c: CustomerCo2(c, f) for c, f in factors.items() if f is not None}
    for k in range(0, len(units), SHARE):
        share = units[k : k + SHARE]
        rows = by_unit(store.units_slots(ends, share[0][0], share[-1][0])) if ends else {}
        last = store.last_readings(u for u, _ in share)
        found, slots = detect(day, labels, share, rows, last, now, silent_after_s, zero_run)
        findings += found
        problems += slots
        for unit, customer in share:
            if customer in co2:
                add_co2(co2[customer], rows.get(unit, {}).values())
        if stopping():
            raise Stopped
    span = grid.day_start(day), grid.day_start(day + timedelta(days=1))
    arrived, about, unknown = store.quarantine_between(*span)
    co2_of_day = [co2[c] for c in sorted(co2)]
    health = health_section(store, grid, registry, day, now, report_units)
    repairs = repair_section(store, *span)
    return DailyReport(
        day, grid.name, findings, problems, arrived, unknown, len(labels), caveat, co2_of_day, about, health, repairs
    )


def repair_section(store: Store, start: int, end: int) -> RepairSection | None:
    """The gaps asked for again with `start <= asked < end` and how many of their half hours are actual now;
    None when there were none."""
    asked = store.repairs(start, end)
    if not asked:
        return None
    actual = 0
    for unit, first_at, last_at, _, _ in asked:
        ends = list(range(first_at + SLOT, last_at + 1, SLOT))
        actual += sum(q == "A" for _, _, q in store.qualities_at([unit], ends))
    answered = sum(state == State.DONE for *_, state in asked)
    return RepairSection(len(asked), len({r[0] for r in asked}), sum(r[3] for r in asked), answered, actual)


def health_section(
    store: Store, grid: Grid, registry: Registry, day: date, now: int, limit: int
) -> HealthSection | None:
    """The units at risk as the report is made (today's and the report day's assessments), and the report day's
    events; None when no day was assessed yet."""
    days = at_risk.run_days(grid, now)
    assessed = [row for row in store.risk_days(days[1]) if row[0] in days[:2]]
    if not assessed:
        return None
    named = at_risk.with_customers(at_risk.read(store, grid, now), registry)
    start = grid.day_start(day)
    events = [(sc, sig, n, of, words) for d, sc, sig, n, of, words in store.health_events(start) if d == start]
    return HealthSection(max(row[1] for row in assessed), named, events, limit)


def add_co2(total: CustomerCo2, rows: Iterable[SlotRow]) -> None:
    """Add a unit's slots of the day to its customer's CO2: each slot in whole grams, as in the CSV files."""
    f: DayFactors = total.factors
    for r in rows:
        if r.imp is None or r.e1 is None or r.coef is None:
            continue
        e4 = kwh_e4(r.imp, r.e1, r.coef)
        total.kwh_e4 += e4
        total.estimated += r.imp_q == "E"
        if f.location is not None:
            total.location_g += grams(e4, f.location.t_per_kwh)
        if f.market is not None:
            total.market_g += grams(e4, f.market.t_per_kwh)


@dataclass(frozen=True)
class Fleet:
    """A registry as it is sent to another process: each unit's id and customer as two lists (a million units'
    objects take eight seconds to pickle, these a third of one), and the rest of it without its units."""

    ids: list[str]
    owners: list[str]
    rest: Registry

    @classmethod
    def of(cls, registry: Registry) -> Fleet:
        return cls(
            list(registry.units),
            [u.customer for u in registry.units.values()],
            replace(registry, units={}, _limits={}, _by_customer={}),
        )

    def registry(self) -> Registry:
        """The registry again, its units with their ids and customers (what the report reads of them)."""
        return replace(self.rest, units={i: Unit(i, c) for i, c in zip(self.ids, self.owners, strict=True)})


@dataclass(frozen=True)
class Rendered:
    """A daily report as its messages carry it, whichever channels they go by."""

    subject: str
    text: str
    slack: str
    html: str
    attachments: list[tuple[str, bytes]]

    @classmethod
    def of(cls, r: DailyReport) -> Rendered:
        attachment = (f"smame-problems-{r.day.isoformat()}.csv", problems_csv(r.problems))
        return cls(subject(r), render_text(r), render_slack(r), render_html(r), [attachment])

    def messages(self, settings: Settings, now: float, key: str) -> list[Message]:
        """The report for every configured channel, under `key` (one per channel)."""
        return fan_out(settings, key, self.subject, self.text, now, self.slack, self.html, self.attachments)


@dataclass(frozen=True)
class ReportMade:
    """A daily report made and rendered, and what the log says of it."""

    rendered: Rendered
    units: int
    with_problems: int
    problem_slots: int
    seconds: float


def make_report(
    store: Store,
    grid: Grid,
    fleet: Fleet,
    day: date,
    now: int,
    silent_after_s: int,
    zero_run: int,
    caveat: str,
    report_units: int,
    stopping: Callable[[], bool],
) -> ReportMade:
    """The monitor's job (`monitoring.worker`): `day`'s report of `fleet` (`build_report`), rendered."""
    began = time.monotonic()
    report = build_report(
        store, grid, fleet.registry(), day, now, silent_after_s, zero_run, caveat, report_units, stopping
    )
    return ReportMade(
        Rendered.of(report),
        len(report.findings),
        sum(1 for f in report.findings if f.has_problems),
        len(report.problems),
        time.monotonic() - began,
    )


def report_messages(report: DailyReport, settings: Settings, now: float, key: str) -> list[Message]:
    """The report for every configured channel, under `key` (one per channel)."""
    return Rendered.of(report).messages(settings, now, key)

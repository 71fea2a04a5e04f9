"""The daily report of one local day, read from the store, and the messages that carry it."""

from __future__ import annotations

from datetime import date, timedelta

from aggregator.store import SlotTuple, Store
from aggregator.timegrid import Grid, SlotLabel
from monitoring.channels import fan_out
from monitoring.detect import by_unit, detect
from monitoring.outbox import Message
from monitoring.report import DailyReport, problems_csv, render_html, render_slack, render_text, subject
from smame.registry import Registry
from smame.settings import Settings


def closed_slots(
    store: Store, grid: Grid, day: date, upto: int
) -> tuple[list[tuple[int, SlotLabel]], dict[str, dict[int, SlotTuple]]]:
    """The day's slots ended by `upto` (end, label), and their stored rows grouped by unit."""
    labels = grid.closed(day, upto)
    rows = by_unit(store.all_slots(grid.day_start(day), labels[-1][0])) if labels else {}
    return labels, rows


def build_report(
    store: Store,
    grid: Grid,
    registry: Registry,
    day: date,
    now: int,
    silent_after_s: int = 86400,
    zero_run: int = 12,
    caveat: str = "",
) -> DailyReport:
    """Detect the day's problems from the store (runs on the store's thread)."""
    labels, rows = closed_slots(store, grid, day, now)
    units = [(u.id, u.customer) for u in sorted(registry.units.values(), key=lambda u: u.id)]
    last = store.last_readings(u for u, _ in units)
    quarantine, unknown = store.quarantine_between(grid.day_start(day), grid.day_start(day + timedelta(days=1)))
    findings, problems = detect(day, labels, units, rows, last, now, silent_after_s, zero_run)
    return DailyReport(day, grid.name, findings, problems, quarantine, unknown, len(labels), caveat)


def report_messages(report: DailyReport, settings: Settings, now: float, key: str) -> list[Message]:
    """The report for every configured channel, under `key` (one per channel)."""
    r = report
    attachment = (f"smame-problems-{r.day.isoformat()}.csv", problems_csv(r.problems))
    return fan_out(settings, key, subject(r), render_text(r), now, render_slack(r), render_html(r), [attachment])

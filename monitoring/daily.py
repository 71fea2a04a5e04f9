"""The daily report of one local day, read from the store, and the messages that carry it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from aggregator.store import SlotTuple, Store
from aggregator.timegrid import Grid, SlotLabel
from monitoring import mail, slack
from monitoring.detect import ProblemSlot, UnitFindings, by_unit, detect
from monitoring.outbox import Message
from monitoring.report import problems_csv, render_html, render_slack, render_text, subject
from smame.registry import Registry
from smame.settings import Settings


@dataclass(frozen=True, slots=True)
class DailyReport:
    """Everything the report says about one day."""

    day: date
    findings: list[UnitFindings]
    problems: list[ProblemSlot]
    quarantine: dict[str, int]
    unknown: list[str]
    slots_per_day: int


def closed_slots(store: Store, grid: Grid, day: date, upto: int
                 ) -> tuple[list[tuple[int, SlotLabel]], dict[str, dict[int, SlotTuple]]]:
    """The day's slots ended by `upto` (end, label), and their stored rows grouped by unit."""
    labels = grid.closed(day, upto)
    rows = by_unit(store.all_slots(grid.day_start(day), labels[-1][0])) if labels else {}
    return labels, rows


def build_report(store: Store, grid: Grid, registry: Registry, day: date, now: int, silent_after_s: int = 86400,
                 zero_run: int = 12) -> DailyReport:
    """Detect the day's problems from the store (runs on the store's thread)."""
    labels, rows = closed_slots(store, grid, day, now)
    units = [(u.id, u.customer) for u in sorted(registry.units.values(), key=lambda u: u.id)]
    last = store.last_readings(u for u, _ in units)
    quarantine, unknown = store.quarantine_between(grid.day_start(day), grid.day_start(day + timedelta(days=1)))
    findings, problems = detect(day, labels, units, rows, last, now, silent_after_s, zero_run)
    return DailyReport(day, findings, problems, quarantine, unknown, len(labels))


def text_of(report: DailyReport, zone: str) -> str:
    """The report as plain text (what `smame report` prints)."""
    r = report
    return render_text(r.day, zone, r.slots_per_day, r.findings, r.quarantine, r.unknown)


def report_messages(report: DailyReport, settings: Settings, now: float, key: str) -> list[Message]:
    """The report for every configured channel, under `key` (one per channel)."""
    r, zone = report, settings.timezone
    title = subject(r.day, r.findings)
    out: list[Message] = []
    if settings.mail.smtp_url:
        k = f"{key}:mail"
        body = mail.compose(k, settings.mail.sender, settings.mail.recipients, title, text_of(r, zone), now,
                            render_html(r.day, zone, r.slots_per_day, r.findings, r.quarantine, r.unknown),
                            [(f"smame-problems-{r.day.isoformat()}.csv", problems_csv(r.problems))])
        out.append((k, "mail", body))
    if settings.slack.enabled:
        out.append((f"{key}:slack", "slack", slack.compose(title, render_slack(r.day, r.findings, r.quarantine, r.unknown))))
    return out

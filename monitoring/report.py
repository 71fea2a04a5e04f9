"""The daily report for operators: text for people, a CSV of every problem slot (pure)."""

from __future__ import annotations

import csv
import html
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from zoneinfo import ZoneInfo

from kernel.emissions import DayFactors, format_e4, format_grams
from monitoring.at_risk import SIGNALS as SIGNAL_WORDS
from monitoring.at_risk import Standing, by_reason
from monitoring.detect import ProblemSlot, UnitFindings


def _ranges(numbers: Sequence[int]) -> str:
    # 3,4,5,9 -> "3-5, 9": a missing morning reads better than 12 numbers
    out: list[str] = []
    for n in numbers:
        if out and out[-1].split("-")[-1] == str(n - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)


@dataclass(slots=True)
class CustomerCo2:
    """A customer's CO2 of the day from its imported electricity (the sums of its files' columns)."""

    customer: str
    factors: DayFactors
    kwh_e4: int = 0  # 0.0001 kWh
    location_g: int = 0
    market_g: int = 0
    estimated: int = 0  # slots whose import is estimated

    def line(self) -> str:
        """One line: both figures in kg (or why one is missing), the energy, and how much of it is estimated."""
        f = self.factors
        loc = f"{format_grams(self.location_g)} kg" if f.location else f"no factor for fiscal year {f.fiscal_year}"
        mkt = f"{format_grams(self.market_g)} kg" if f.market else f"no factor for fiscal year {f.fiscal_year}"
        est = f", {self.estimated} slots estimated" if self.estimated else ""
        return f"location-based {loc}, market-based {mkt} ({format_e4(self.kwh_e4)} kWh imported{est})"


@dataclass(frozen=True, slots=True)
class RepairSection:
    """The gaps asked of their units again (`resend`) on the report's day, and what came of them by now."""

    gaps: int
    units: int
    slots: int  # half hours in the ranges asked for
    answered: int  # gaps whose unit answered done
    actual: int  # of the half hours asked for, those actual now

    def line(self) -> str:
        return (
            f"gap repair: {self.gaps} gap(s) of {self.units} unit(s) asked for again with resend "
            f"({self.slots} half hours); {self.answered} answered; {self.actual} half hours repaired (actual now), "
            f"{self.slots - self.actual} not (yet)"
        )


@dataclass(frozen=True, slots=True)
class HealthSection:
    """The units at risk of failing when the report is made, and what many units showed together on its day."""

    assessed: int  # units assessed on the latest day
    at_risk: list[tuple[Standing, str]]  # with each unit's customer, riskiest first
    events: list[tuple[str, str, int, int, str]]  # the day's (scope, signal, units, of them assessed, words)
    limit: int = 20  # units named

    def head(self) -> str:
        """The count, by reason."""
        reasons = by_reason([s for s, _ in self.at_risk])
        said = ", ".join(f"{SIGNAL_WORDS.get(k, k)} {n}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        return f"units at risk of failing: {len(self.at_risk)} of {self.assessed} assessed" + (
            f" (by reason: {said})" if said else ""
        )

    def lines(self, zone: str) -> list[str]:
        """Each named unit: its customer, risk, since when, and its reasons in words and figures."""
        out = [
            f"{s.unit} ({customer}), risk {s.risk:.1f} since {_day(s.since, zone)}: {s.words}"
            for s, customer in self.at_risk[: self.limit]
        ]
        if len(self.at_risk) > self.limit:
            out.append(f"... and {len(self.at_risk) - self.limit} more (the console's At risk page)")
        return out

    def event_lines(self) -> list[str]:
        """Each event of the day, said once (it put no unit at risk)."""
        return [
            f"{scope}: {SIGNAL_WORDS.get(signal, signal)}: {words} ({units} of {of} units; not counted against them)"
            for scope, signal, units, of, words in self.events
        ]


@dataclass(frozen=True, slots=True)
class DailyReport:
    """Everything the report says about one day."""

    day: date
    zone: str
    findings: list[UnitFindings]
    problems: list[ProblemSlot]
    quarantine: dict[str, int]  # refused telegrams and readings that arrived on the day, by reason
    unknown: list[str]  # unit ids not in the registry that tried to send
    slots_per_day: int
    caveat: str = ""  # said first when the report may not be the whole truth (ingest still catching up)
    co2: list[CustomerCo2] = field(default_factory=list)  # customers with emissions, by id
    quarantine_about: dict[str, int] = field(default_factory=dict)  # refused ones about the day, whenever they came
    health: HealthSection | None = None  # None: no unit assessed yet
    repairs: RepairSection | None = None  # None: no gap asked for on the day

    def quarantined(self) -> str:
        """The day's refused telegrams and readings: those that came that day, and those about it."""
        return f"arrived on the day: {_counts(self.quarantine)}; about the day: {_counts(self.quarantine_about)}"

    @property
    def heard(self) -> list[UnitFindings]:
        """Units with at least one reading stored: the ones whose data the report judges."""
        return [f for f in self.findings if not f.never_heard]

    @property
    def never_heard(self) -> list[UnitFindings]:
        """Registered units that have never sent a reading (not installed yet, or not configured)."""
        return [f for f in self.findings if f.never_heard]


@dataclass(frozen=True, slots=True)
class CustomerSummary:
    """One customer's line of the report."""

    customer: str
    units: int
    with_gaps: int
    missing: int
    estimated: int
    silent: int
    never_heard: int
    anomalies: str  # "rollover 2, spike 1" or "-"


def summarize(findings: Sequence[UnitFindings]) -> list[CustomerSummary]:
    """Per customer: units, units with gaps, missing and estimated slots, silent and never heard units, anomalies."""
    by_customer: dict[str, list[UnitFindings]] = {}
    for f in findings:
        by_customer.setdefault(f.customer, []).append(f)
    out = []
    for customer in sorted(by_customer):
        fs = by_customer[customer]
        flags: Counter[str] = Counter()
        for f in fs:
            flags.update(f.flags)
        out.append(
            CustomerSummary(
                customer,
                len(fs),
                sum(1 for f in fs if f.missing),
                sum(len(f.missing) for f in fs),
                sum(len(f.estimated) for f in fs),
                sum(1 for f in fs if f.silent_since is not None),
                sum(1 for f in fs if f.never_heard),
                ", ".join(f"{k} {v}" for k, v in sorted(flags.items())) or "-",
            )
        )
    return out


def problem_units(findings: Sequence[UnitFindings]) -> list[UnitFindings]:
    """Units with problems, the worst first: silent ones, then by missing slots, anomalies, estimated slots and
    slots without consumption."""
    return sorted((f for f in findings if f.has_problems), key=_severity)


def _severity(f: UnitFindings) -> tuple[int, int, int, int, int, str]:
    zero = sum(b - a + 1 for a, b in f.zero_runs)
    return (f.silent_since is None, -len(f.missing), -f.flags.total(), -len(f.estimated), -zero, f.unit)


def brief_unit(f: UnitFindings, zone: str) -> str:
    """What went wrong with one unit, in a few words (no slot numbers)."""
    parts = []
    if f.silent_since is not None:
        parts.append("silent since " + (_when(f.silent_since, zone) if f.silent_since else "ever"))
    if f.missing:
        parts.append(f"{len(f.missing)} slots missing")
    parts += [f"{k} {v}" for k, v in sorted(f.flags.items())]
    if f.estimated:
        parts.append(f"{len(f.estimated)} estimated")
    if f.zero_runs:
        parts.append(f"no consumption for {sum(b - a + 1 for a, b in f.zero_runs)} slots")
    return ", ".join(parts)


def describe_unit(f: UnitFindings, zone: str) -> str:
    """What went wrong with one unit, in one line."""
    parts = []
    if f.silent_since is not None:
        parts.append("silent since " + (_when(f.silent_since, zone) if f.silent_since else "ever"))
    if f.missing:
        parts.append(f"missing {len(f.missing)}: slots {_ranges(f.missing)}")
    if f.estimated:
        parts.append(f"estimated {len(f.estimated)}: slots {_ranges(f.estimated)}")
    if f.zero_runs:
        parts.append("no consumption: slots " + ", ".join(f"{a}-{b}" for a, b in f.zero_runs))
    if f.flags:
        parts.append(", ".join(f"{k} {v}" for k, v in sorted(f.flags.items())))
    return "; ".join(parts)


def subject(r: DailyReport) -> str:
    """The mail subject: the day and how bad it was at a glance."""
    heard = r.heard
    bad = sum(1 for f in heard if f.missing or f.silent_since is not None)
    missing = sum(len(f.missing) for f in heard)
    never = f", {len(r.never_heard)} never heard from" if r.never_heard else ""
    return (
        f"[smame] daily report {r.day.isoformat()}: {bad} of {len(heard)} units with missing data "
        f"({missing} slots){never}" + (" (may be incomplete)" if r.caveat else "")
    )


def _never_heard(r: DailyReport, limit: int) -> str:
    units = [f.unit for f in r.never_heard]
    more = f" and {len(units) - limit} more" if len(units) > limit else ""
    return f"units never heard from ({len(units)}): " + ", ".join(units[:limit]) + more


def render_text(r: DailyReport, limit: int = 200) -> str:
    """The report as plain text."""
    lines = [f"NOTE: {r.caveat}", ""] if r.caveat else []
    lines += [f"smame daily report for {r.day.isoformat()} ({r.zone}), {r.slots_per_day} slots a unit", ""]
    lines.append(
        f"{'customer':<12} {'units':>6} {'with gaps':>9} {'missing':>8} {'estimated':>9} {'silent':>6} "
        f"{'never':>5} anomalies"
    )
    for c in summarize(r.findings):
        lines.append(
            f"{c.customer:<12} {c.units:>6} {c.with_gaps:>9} {c.missing:>8} {c.estimated:>9} {c.silent:>6} "
            f"{c.never_heard:>5} {c.anomalies}"
        )
    units = problem_units(r.findings)
    lines += ["", f"units with problems: {len(units)} of {len(r.heard)}"]
    lines += [f"  {f.unit} ({f.customer}): {describe_unit(f, r.zone)}" for f in units[:limit]]
    if len(units) > limit:
        lines.append(f"  ... and {len(units) - limit} more (all in the CSV)")
    if r.never_heard:
        lines += ["", _never_heard(r, limit)]
    if r.health is not None:
        lines += ["", r.health.head() + ":" if r.health.at_risk else r.health.head()]
        lines += [f"  {line}" for line in r.health.lines(r.zone)]
        if r.health.events:
            lines.append("events of the fleet or of a cell on the day:")
            lines += [f"  {line}" for line in r.health.event_lines()]
    if r.repairs is not None:
        lines += ["", r.repairs.line()]
    if r.co2:
        lines += ["", "CO2 of the day (imported electricity):"]
        lines += [f"  {c.customer}: {c.line()}" for c in r.co2]
    lines += ["", "quarantined telegrams and readings: " + r.quarantined()]
    if r.unknown:
        lines.append(f"unknown units that tried to send ({len(r.unknown)}): " + ", ".join(r.unknown[:50]))
    return "\n".join(lines) + "\n"


def render_html(r: DailyReport, limit: int = 200) -> str:
    """The report as an HTML page (the mail's rich part)."""
    e = html.escape
    head = (
        "<tr>"
        + "".join(
            f"<th>{h}</th>"
            for h in ("customer", "units", "with gaps", "missing", "estimated", "silent", "never heard", "anomalies")
        )
        + "</tr>"
    )
    rows = "".join(
        f"<tr><td>{e(c.customer)}</td><td>{c.units}</td><td>{c.with_gaps}</td><td>{c.missing}</td>"
        f"<td>{c.estimated}</td><td>{c.silent}</td><td>{c.never_heard}</td><td>{e(c.anomalies)}</td></tr>"
        for c in summarize(r.findings)
    )
    units = problem_units(r.findings)
    items = "".join(
        f"<li><b>{e(f.unit)}</b> ({e(f.customer)}): {e(describe_unit(f, r.zone))}</li>" for f in units[:limit]
    )
    if len(units) > limit:
        items += f"<li>... and {len(units) - limit} more (all in the attached CSV)</li>"
    caveat = f"<p><b>Note: {e(r.caveat)}</b></p>" if r.caveat else ""
    never = f"<p>{e(_never_heard(r, limit))}</p>" if r.never_heard else ""
    health = ""
    if r.health is not None:
        health = f"<h3>{e(r.health.head()[0].upper() + r.health.head()[1:])}</h3>"
        named = "".join(f"<li>{e(line)}</li>" for line in r.health.lines(r.zone))
        health += f"<ul>{named}</ul>" if named else ""
        if r.health.events:
            said = "".join(f"<li>{e(line)}</li>" for line in r.health.event_lines())
            health += f"<p>Events of the fleet or of a cell on the day:</p><ul>{said}</ul>"
    if r.repairs is not None:
        health += f"<p>{e(r.repairs.line()[0].upper() + r.repairs.line()[1:])}</p>"
    co2 = "".join(f"<li><b>{e(c.customer)}</b>: {e(c.line())}</li>" for c in r.co2)
    co2 = f"<h3>CO2 of the day (imported electricity)</h3><ul>{co2}</ul>" if co2 else ""
    unknown = (
        f"<p>Unknown units that tried to send ({len(r.unknown)}): {e(', '.join(r.unknown[:50]))}</p>"
        if r.unknown
        else ""
    )
    return (
        f"<!DOCTYPE html><html><body>{caveat}<h2>smame daily report for {r.day.isoformat()}</h2>"
        f"<p>{e(r.zone)}, {r.slots_per_day} slots a unit</p>"
        f'<table border="1" cellpadding="4" cellspacing="0">{head}{rows}</table>'
        f"<h3>Units with problems: {len(units)} of {len(r.heard)}</h3><ul>{items}</ul>{never}{health}{co2}"
        f"<p>Quarantined telegrams and readings: {e(r.quarantined())}</p>{unknown}</body></html>\n"
    )


def render_slack(r: DailyReport, limit: int = 15) -> str:
    """The report as a short Slack message (mrkdwn): the summary and the worst units."""
    lines = [f"*Note:* {r.caveat}"] if r.caveat else []
    lines += [
        f"*{c.customer}*: {c.units} units, {c.with_gaps} with gaps, {c.missing} missing, {c.estimated} estimated, "
        f"{c.silent} silent"
        + (f", {c.never_heard} never heard from" if c.never_heard else "")
        + f"; anomalies: {c.anomalies}"
        for c in summarize(r.findings)
    ]
    units = problem_units(r.findings)
    if units:
        lines.append(f"Worst units ({len(units)} with problems):")
        lines += [f"• `{f.unit}` ({f.customer}): {brief_unit(f, r.zone)}" for f in units[:limit]]
    if r.health is not None:
        h = r.health
        lines.append(h.head()[0].upper() + h.head()[1:])
        lines += [f"• `{s.unit}` ({customer}): {s.words}" for s, customer in h.at_risk[:limit]]
        if len(h.at_risk) > limit:
            lines.append(f"... and {len(h.at_risk) - limit} more")
        lines += [f"Event, {line}" for line in h.event_lines()]
    if r.repairs is not None:
        lines.append(r.repairs.line()[0].upper() + r.repairs.line()[1:])
    lines += [f"CO2 of the day, *{c.customer}*: {c.line()}" for c in r.co2]
    lines.append("Quarantined telegrams and readings: " + r.quarantined())
    if r.unknown:
        lines.append(f"Unknown units: {len(r.unknown)}")
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def problems_csv(problems: Sequence[ProblemSlot]) -> bytes:
    """Every problem slot: the details behind the report."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["customer", "unit_id", "date", "slot", "start", "end", "problem"])
    for p in sorted(problems, key=lambda p: (p.customer, p.unit, p.index, p.problem)):
        w.writerow([p.customer, p.unit, p.day.isoformat(), p.index, p.start, p.end, p.problem])
    return out.getvalue().encode()


def _day(epoch: int, zone: str) -> str:
    return datetime.fromtimestamp(epoch, ZoneInfo(zone)).strftime("%Y-%m-%d")


def _when(epoch: int, zone: str) -> str:
    return datetime.fromtimestamp(epoch, ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M")

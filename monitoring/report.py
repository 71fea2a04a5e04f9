"""The daily report for operators: text for people, a CSV of every problem slot (pure)."""

from __future__ import annotations

import csv
import html
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

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


@dataclass(frozen=True, slots=True)
class CustomerSummary:
    """One customer's line of the report."""

    customer: str
    units: int
    with_gaps: int
    missing: int
    estimated: int
    silent: int
    anomalies: str  # "rollover 2, spike 1" or "-"


def summarize(findings: Sequence[UnitFindings]) -> list[CustomerSummary]:
    """Per customer: units, units with gaps, missing and estimated slots, silent units, anomalies."""
    by_customer: dict[str, list[UnitFindings]] = {}
    for f in findings:
        by_customer.setdefault(f.customer, []).append(f)
    out = []
    for customer in sorted(by_customer):
        fs = by_customer[customer]
        flags: Counter[str] = Counter()
        for f in fs:
            flags.update(f.flags)
        out.append(CustomerSummary(customer, len(fs), sum(1 for f in fs if f.missing), sum(len(f.missing) for f in fs),
                                   sum(len(f.estimated) for f in fs), sum(1 for f in fs if f.silent_since is not None),
                                   ", ".join(f"{k} {v}" for k, v in sorted(flags.items())) or "-"))
    return out


def problem_units(findings: Sequence[UnitFindings]) -> list[UnitFindings]:
    """Units with problems, most missing slots first."""
    return sorted((f for f in findings if f.has_problems), key=lambda f: (-len(f.missing), f.unit))


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


def subject(day: date, findings: Sequence[UnitFindings]) -> str:
    """The mail subject: the day and how bad it was at a glance."""
    bad = sum(1 for f in findings if f.missing or f.silent_since is not None)
    missing = sum(len(f.missing) for f in findings)
    return f"[smame] daily report {day.isoformat()}: {bad} of {len(findings)} units with missing data ({missing} slots)"


def render_text(day: date, zone: str, slots_per_day: int, findings: Sequence[UnitFindings],
                quarantine: dict[str, int], unknown_units: Sequence[str], limit: int = 200) -> str:
    """The report as plain text."""
    lines = [f"smame daily report for {day.isoformat()} ({zone}), {slots_per_day} slots a unit", ""]
    lines.append(f"{'customer':<12} {'units':>6} {'with gaps':>9} {'missing':>8} {'estimated':>9} {'silent':>6} anomalies")
    for c in summarize(findings):
        lines.append(f"{c.customer:<12} {c.units:>6} {c.with_gaps:>9} {c.missing:>8} {c.estimated:>9} {c.silent:>6} "
                     f"{c.anomalies}")
    units = problem_units(findings)
    lines += ["", f"units with problems: {len(units)} of {len(findings)}"]
    lines += [f"  {f.unit} ({f.customer}): {describe_unit(f, zone)}" for f in units[:limit]]
    if len(units) > limit:
        lines.append(f"  ... and {len(units) - limit} more (all in the CSV)")
    lines += ["", "quarantined telegrams: " + _counts(quarantine)]
    if unknown_units:
        lines.append(f"unknown units that tried to send ({len(unknown_units)}): " + ", ".join(unknown_units[:50]))
    return "\n".join(lines) + "\n"


def render_html(day: date, zone: str, slots_per_day: int, findings: Sequence[UnitFindings],
                quarantine: dict[str, int], unknown_units: Sequence[str], limit: int = 200) -> str:
    """The report as an HTML page (the mail's rich part)."""
    e = html.escape
    head = ("<tr>" + "".join(f"<th>{h}</th>" for h in ("customer", "units", "with gaps", "missing", "estimated",
                                                           "silent", "anomalies")) + "</tr>")
    rows = "".join(f"<tr><td>{e(c.customer)}</td><td>{c.units}</td><td>{c.with_gaps}</td><td>{c.missing}</td>"
                   f"<td>{c.estimated}</td><td>{c.silent}</td><td>{e(c.anomalies)}</td></tr>" for c in summarize(findings))
    units = problem_units(findings)
    items = "".join(f"<li><b>{e(f.unit)}</b> ({e(f.customer)}): {e(describe_unit(f, zone))}</li>" for f in units[:limit])
    if len(units) > limit:
        items += f"<li>... and {len(units) - limit} more (all in the attached CSV)</li>"
    unknown = (f"<p>Unknown units that tried to send ({len(unknown_units)}): {e(', '.join(unknown_units[:50]))}</p>"
               if unknown_units else "")
    return (f"<!DOCTYPE html><html><body><h2>smame daily report for {day.isoformat()}</h2>"
            f"<p>{e(zone)}, {slots_per_day} slots a unit</p>"
            f"<table border=\"1\" cellpadding=\"4\" cellspacing=\"0\">{head}{rows}</table>"
            f"<h3>Units with problems: {len(units)} of {len(findings)}</h3><ul>{items}</ul>"
            f"<p>Quarantined telegrams: {e(_counts(quarantine))}</p>{unknown}</body></html>\n")


def render_slack(day: date, findings: Sequence[UnitFindings], quarantine: dict[str, int],
                 unknown_units: Sequence[str], limit: int = 15) -> str:
    """The report as a short Slack message (mrkdwn): the summary and the worst units."""
    lines = [f"*{c.customer}*: {c.units} units, {c.with_gaps} with gaps, {c.missing} missing, {c.estimated} estimated, "
             f"{c.silent} silent; anomalies: {c.anomalies}" for c in summarize(findings)]
    units = problem_units(findings)
    if units:
        lines.append(f"Worst units ({len(units)} with problems):")
        lines += [f"• `{f.unit}` ({f.customer}): {len(f.missing)} missing, {len(f.estimated)} estimated"
                  + (", silent" if f.silent_since is not None else "") for f in units[:limit]]
    lines.append("Quarantined telegrams: " + _counts(quarantine))
    if unknown_units:
        lines.append(f"Unknown units: {len(unknown_units)}")
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


def _when(epoch: int, zone: str) -> str:
    return datetime.fromtimestamp(epoch, ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M")

"""The daily report for operators: text for people, a CSV of every problem slot (pure)."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Sequence
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


def render_text(day: date, zone: str, slots_per_day: int, findings: Sequence[UnitFindings],
                quarantine: dict[str, int], unknown_units: Sequence[str], limit: int = 200) -> str:
    """The report as plain text."""
    lines = [f"smame daily report for {day.isoformat()} ({zone}), {slots_per_day} slots a unit", ""]
    by_customer: dict[str, list[UnitFindings]] = {}
    for f in findings:
        by_customer.setdefault(f.customer, []).append(f)
    lines.append(f"{'customer':<12} {'units':>6} {'with gaps':>9} {'missing':>8} {'estimated':>9} {'silent':>6} anomalies")
    for customer in sorted(by_customer):
        fs = by_customer[customer]
        flags: Counter[str] = Counter()
        for f in fs:
            flags.update(f.flags)
        lines.append(f"{customer:<12} {len(fs):>6} {sum(1 for f in fs if f.missing):>9} "
                     f"{sum(len(f.missing) for f in fs):>8} {sum(len(f.estimated) for f in fs):>9} "
                     f"{sum(1 for f in fs if f.silent_since is not None):>6} "
                     + (", ".join(f"{k} {v}" for k, v in sorted(flags.items())) or "-"))
    problem_units = [f for f in findings if f.has_problems]
    lines += ["", f"units with problems: {len(problem_units)} of {len(findings)}"]
    for f in sorted(problem_units, key=lambda f: (-len(f.missing), f.unit))[:limit]:
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
        lines.append(f"  {f.unit} ({f.customer}): " + "; ".join(parts))
    if len(problem_units) > limit:
        lines.append(f"  ... and {len(problem_units) - limit} more (all in the CSV)")
    lines += ["", "quarantined telegrams: " + (", ".join(f"{k} {v}" for k, v in sorted(quarantine.items())) or "none")]
    if unknown_units:
        lines.append(f"unknown units that tried to send ({len(unknown_units)}): " + ", ".join(unknown_units[:50]))
    return "\n".join(lines) + "\n"


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

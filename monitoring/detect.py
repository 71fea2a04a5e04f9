"""What went wrong with which unit on a day (pure: the store's rows in, findings out)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date

from aggregator.store import SlotRow
from kernel.meter import flag_names
from kernel.timegrid import SlotLabel


def by_unit(slots: Iterable[SlotRow]) -> dict[str, dict[int, SlotRow]]:
    """Slots grouped by unit and slot end."""
    out: dict[str, dict[int, SlotRow]] = {}
    for s in slots:
        unit = out.get(s.unit)
        if unit is None:
            unit = out[s.unit] = {}
        unit[s.slot] = s
    return out


@dataclass(frozen=True, slots=True)
class ProblemSlot:
    """One slot of one unit that an operator should know about."""

    unit: str
    customer: str
    day: date
    index: int
    start: str
    end: str
    problem: str  # missing | estimated | zero_run | a flag name (rollover, reset, replacement, spike, ...)


@dataclass
class UnitFindings:
    """A unit's day."""

    unit: str
    customer: str
    missing: list[int] = field(default_factory=list)  # slot numbers
    estimated: list[int] = field(default_factory=list)
    flags: Counter[str] = field(default_factory=Counter)
    zero_runs: list[tuple[int, int]] = field(default_factory=list)  # (first, last) slot numbers
    silent_since: int | None = None  # epoch of the last reading, when older than the limit
    never_heard: bool = False  # not one reading stored: a unit not installed yet, not one with missing data

    @property
    def has_problems(self) -> bool:
        return bool(self.missing or self.estimated or self.flags or self.zero_runs or self.silent_since is not None)


def detect(
    day: date,
    labels: Sequence[tuple[int, SlotLabel]],
    units: Iterable[tuple[str, str]],
    slots: Mapping[str, Mapping[int, SlotRow]],
    last_reading: Mapping[str, int | None],
    now: int,
    silent_after: int = 86400,
    zero_run: int = 12,
) -> tuple[list[UnitFindings], list[ProblemSlot]]:
    """Findings per unit (`units`: (unit, customer)) and every problem slot, for a day's closed slots."""
    findings, problems = [], []
    for unit, customer in units:
        rows = slots.get(unit, {})
        f = UnitFindings(unit, customer)
        newest = last_reading.get(unit)
        if newest is None and not rows:  # nothing to detect: listed apart, its slots not counted as missing
            f.never_heard = True
            findings.append(f)
            continue
        run: list[int] = []
        for end, lab in labels:
            r = rows.get(end)
            quality = (r.imp_q or "M") if r is not None else "M"
            what: list[str] = []
            if quality == "M":
                f.missing.append(lab.index)
                what.append("missing")
            elif quality == "E":
                f.estimated.append(lab.index)
                what.append("estimated")
            if r is not None and (r.imp_flags or r.exp_flags):
                names = flag_names(r.imp_flags | r.exp_flags)
                f.flags.update(names)
                what += names
            # nothing imported nor exported: a unit exporting solar power at midday is consuming its own
            if r is not None and quality == "A" and r.imp == 0 and not r.exp:
                run.append(lab.index)
            else:
                _close_run(run, zero_run, f)
                run = []
            if what:
                problems += [ProblemSlot(unit, customer, day, lab.index, lab.start, lab.end, w) for w in what]
        _close_run(run, zero_run, f)
        for first, last in f.zero_runs:
            problems += [
                ProblemSlot(unit, customer, day, lab.index, lab.start, lab.end, "zero_run")
                for _, lab in labels
                if first <= lab.index <= last
            ]
        if newest is None or now - newest > silent_after:
            f.silent_since = newest if newest is not None else 0
        findings.append(f)
    return findings, problems


def _close_run(run: list[int], minimum: int, f: UnitFindings) -> None:
    if len(run) >= minimum:
        f.zero_runs.append((run[0], run[-1]))

"""The fleet at a glance: each unit's state from the time of its newest reading (pure: no clock, no I/O).

A unit sends each half hour's reading within minutes of it: `reporting` while its newest reading is at most
`LATE_AFTER_S` old, `late` after that, `silent` once it is older than `alerts.silent_after_s` (the live
alert's threshold), `never heard` with no reading at all (not installed yet, or its telegrams refused).
The command line (`smame units`) and the operators' console show the same states.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kernel.registry import Unit

LATE_AFTER_S = 3600  # two half hours: one reading may be on its way, two missing is late
STATES = ("reporting", "late", "silent", "never heard")


@dataclass(frozen=True, slots=True)
class UnitState:
    """A unit of the registry with its newest reading's time (epoch, None: never) and its state."""

    unit: str
    customer: str
    meter: str
    label: str
    last: int | None
    state: str


def state_of(last: int | None, now: float, silent_after_s: int) -> str:
    """The state of a unit whose newest reading is at `last`."""
    if last is None:
        return "never heard"
    age = now - last
    if age > silent_after_s:
        return "silent"
    return "late" if age > LATE_AFTER_S else "reporting"


def fleet_states(
    units: Iterable[Unit], last: Mapping[str, int | None], now: float, silent_after_s: int
) -> list[UnitState]:
    """Each unit's state, in the order given."""
    return [
        UnitState(u.id, u.customer, u.meter, u.label, last.get(u.id), state_of(last.get(u.id), now, silent_after_s))
        for u in units
    ]


def by_customer(states: Iterable[UnitState]) -> dict[str, Counter[str]]:
    """How many units of each customer are in each state, customers in order."""
    out: dict[str, Counter[str]] = {}
    for s in states:
        out.setdefault(s.customer, Counter())[s.state] += 1
    return dict(sorted(out.items()))

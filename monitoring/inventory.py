"""The fleet's inventory from each unit's newest day of health (pure): firmware, signal, coverage, reboots.

The signal bands are health.md's: excellent from -80 dBm, good from -90, fair from -100, poor under it, by
the unit's median RSRP of its newest day; a unit that sent no `diag` that day is `unknown`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# (band, its lowest RSRP in dBm): a unit falls in the first band whose floor its RSRP reaches
BANDS = (("excellent", -80.0), ("good", -90.0), ("fair", -100.0), ("poor", float("-inf")))
COVERAGE = {0: "0 (normal)", 1: "1 (CE mode A)", 2: "2 (CE mode B)"}
REBOOTS = (("0", 0), ("1", 1), ("2-5", 5), ("more than 5", None))  # reboots on the newest day
UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Newest:
    """A unit's newest day of health, as far as the inventory reads it."""

    unit: str
    day: int
    fw: str | None
    rsrp: float | None
    sinr: float | None
    ce: int | None
    reboots: int | None  # of the day: its boot counter's rise, else its `seq` starting again


@dataclass
class Inventory:
    """The units in each firmware, signal band, coverage level and count of reboots (each list sorted)."""

    firmware: dict[str, list[str]] = field(default_factory=dict)
    signal: dict[str, list[str]] = field(default_factory=dict)
    coverage: dict[str, list[str]] = field(default_factory=dict)
    reboots: dict[str, list[str]] = field(default_factory=dict)

    def groups(self) -> dict[str, dict[str, list[str]]]:
        """Each grouping by its name, as the console and the API name it."""
        return {"firmware": self.firmware, "signal": self.signal, "coverage": self.coverage, "reboots": self.reboots}


def band(rsrp: float | None) -> str:
    """The signal band of a median RSRP (dBm)."""
    if rsrp is None:
        return UNKNOWN
    return next(name for name, floor in BANDS if rsrp >= floor)


def reboot_bucket(n: int | None) -> str:
    """The reboots-a-day bucket of a count."""
    if n is None:
        return UNKNOWN
    return next(name for name, most in REBOOTS if most is None or n <= most)


def inventory(units: Iterable[Newest]) -> Inventory:
    """Group the units (firmware versions newest name last, bands and levels in their order, unknown last)."""
    out = Inventory()
    for u in sorted(units, key=lambda u: u.unit):
        out.firmware.setdefault(u.fw or UNKNOWN, []).append(u.unit)
        out.signal.setdefault(band(u.rsrp), []).append(u.unit)
        out.coverage.setdefault(COVERAGE.get(u.ce, UNKNOWN) if u.ce is not None else UNKNOWN, []).append(u.unit)
        out.reboots.setdefault(reboot_bucket(u.reboots), []).append(u.unit)
    order = {
        "signal": [b for b, _ in BANDS],
        "coverage": list(COVERAGE.values()),
        "reboots": [b for b, _ in REBOOTS],
    }
    for name, groups in out.groups().items():
        known = order.get(name, sorted(k for k in groups if k != UNKNOWN))
        ranked = {k: groups[k] for k in known if k in groups}
        ranked |= {k: v for k, v in groups.items() if k not in ranked}  # unknown (and anything else) last
        groups.clear()
        groups.update(ranked)
    return out

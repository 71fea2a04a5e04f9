"""What a meter and its communication unit say, as everything reads it: unit ids, register units,
slot qualities and anomaly flags, and a unit's plausibility limits (pure: no clock, no I/O)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntFlag
from fractions import Fraction

UNIT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A meter serial reaches customers' CSV files: letters and digits first, so no cell can start a formula (= + - @)
METER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# ECHONET Lite 0xE1: unit of the cumulative registers, in kWh.
E1_UNITS: dict[int, Fraction] = {
    0x00: Fraction(1),
    0x01: Fraction(1, 10),
    0x02: Fraction(1, 100),
    0x03: Fraction(1, 1000),
    0x04: Fraction(1, 10000),
    0x0A: Fraction(10),
    0x0B: Fraction(100),
    0x0C: Fraction(1000),
    0x0D: Fraction(10000),
}

ACTUAL, ESTIMATED, MISSING = "A", "E", "M"


class Flag(IntFlag):
    """Anomalies carried beside a slot's quality."""

    ROLLOVER = 1
    RESET = 2
    REPLACEMENT = 4
    SPIKE = 8
    CLOCK_SKEW = 16
    CONFLICT = 32


def flag_names(flags: int) -> list[str]:
    """Lower-case names of the flags set, in a fixed order."""
    return [f.name.lower() for f in Flag if f.name and flags & f]


@dataclass(frozen=True, slots=True)
class Limits:
    """Plausibility settings of one unit."""

    max_slot_kwh: Fraction  # contract kW x 0.5 h
    gap_cap: int = 48  # longest gap, in slots, that is estimated
    ceilings: dict[tuple[int, int], int] = field(default_factory=dict, compare=False, hash=False, repr=False)


def format_kwh(raw: int, e1: int, coef: int) -> str:
    """kWh printed with the meter's resolution (coef x unit), exactly: 17 at 0.1 kWh -> "1.7"."""
    resolution = coef * E1_UNITS[e1]
    places = 0
    while (resolution * 10**places).denominator != 1:
        places += 1
    scaled = raw * resolution * 10**places
    digits = f"{int(scaled):0{places + 1}d}"
    return digits if not places else f"{digits[:-places]}.{digits[-places:]}"

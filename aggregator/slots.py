"""Cumulative register readings to 30-minute energy (pure: no clock, no I/O).

Each register (import `fwd`, export `rev`) is a series of points. Two consecutive points of a
series decide every slot between them: one slot apart gives an actual value, a short gap is
estimated by linear interpolation of the register (so the estimates sum exactly to the
register difference), a long gap, a reset or a meter replacement leaves the slots missing.
All arithmetic is on raw register integers.

Values made once per telegram are msgspec Structs: as immutable as frozen dataclasses, and
built several times faster, which counts at tens of thousands of telegrams a second.
"""

from __future__ import annotations

from itertools import pairwise

import msgspec

from kernel.meter import ACTUAL, E1_UNITS, ESTIMATED, MISSING, Flag, Limits
from kernel.timegrid import SLOT


class Point(msgspec.Struct, frozen=True, gc=False):
    """One register's reading at a fixed time, with what is needed to interpret it."""

    at: int  # epoch seconds UTC, on the slot grid
    value: int  # raw register
    meter: str
    digits: int
    e1: int
    coef: int
    flags: int = 0  # reading flags (clock skew, conflict) passed to the slot it closes


class SlotValue(msgspec.Struct, frozen=True, gc=False):
    """Energy of one register in one slot: raw delta (None when missing), quality, flags."""

    end: int
    value: int | None
    quality: str
    flags: int = 0


def max_raw(limits: Limits, e1: int, coef: int) -> int:
    """Largest raw delta that is a plausible energy for one slot."""
    ceiling = limits.ceilings.get((e1, coef))
    if ceiling is None:  # once per scale: Fraction arithmetic is slow on the hot path
        ceiling = limits.ceilings[(e1, coef)] = int(limits.max_slot_kwh / (coef * E1_UNITS[e1]))
    return ceiling


def spread(total: int, n: int) -> list[int]:
    """Split a non-negative integer into n parts by linear interpolation; the parts sum to total."""
    return [total * k // n - total * (k - 1) // n for k in range(1, n + 1)]


def pair_slots(prev: Point, nxt: Point, limits: Limits) -> list[SlotValue]:
    """The slots decided by two consecutive points of one register series.

    Covers every slot in `(prev.at, nxt.at]` when the gap is within the cap; beyond it only the
    slot closed by `nxt` (the ones before it are missing and were never stored).
    """
    n = (nxt.at - prev.at) // SLOT
    if n == 1 and nxt.meter == prev.meter and nxt.digits == prev.digits and nxt.e1 == prev.e1 and nxt.coef == prev.coef:
        delta = nxt.value - prev.value
        if 0 <= delta <= max_raw(limits, nxt.e1, nxt.coef):  # the live case, every half hour for every unit
            return [SlotValue(nxt.at, delta, ACTUAL, nxt.flags)]
    if n <= 0:
        raise ValueError(f"points out of order: {prev.at} then {nxt.at}")
    if n > limits.gap_cap:  # before any work in proportion to the gap, which may be years long
        return [SlotValue(nxt.at, None, MISSING, nxt.flags)]
    ends = [prev.at + SLOT * k for k in range(1, n + 1)]
    if nxt.meter != prev.meter:
        return _missing(ends, Flag.REPLACEMENT | nxt.flags)
    if (nxt.digits, nxt.e1, nxt.coef) != (prev.digits, prev.e1, prev.coef):
        return _missing(ends, Flag.RESET | nxt.flags)

    ceiling = max_raw(limits, nxt.e1, nxt.coef)
    delta = nxt.value - prev.value
    wrap_at = 0
    if delta < 0:
        wrapped = delta % 10**nxt.digits
        if wrapped > ceiling * n:
            return _missing(ends, Flag.RESET | nxt.flags)
        delta = wrapped
        wrap_at = 10**nxt.digits - prev.value  # cumulative energy at which the register wraps

    parts = [delta] if n == 1 else spread(delta, n)
    quality = ACTUAL if n == 1 else ESTIMATED
    out: list[SlotValue] = []
    cumulative = 0
    for end, part in zip(ends, parts, strict=True):
        flags = 0
        before, cumulative = cumulative, cumulative + part
        if wrap_at and before < wrap_at <= cumulative:
            flags |= Flag.ROLLOVER
        if part > ceiling:
            flags |= Flag.SPIKE
        if end == nxt.at:
            flags |= nxt.flags
        out.append(SlotValue(end, part, quality, flags))
    return out


def _missing(ends: list[int], last_flags: int) -> list[SlotValue]:
    # No energy across a discontinuity; the flag sits on the slot closed by the new series' first point.
    return [SlotValue(e, None, MISSING, last_flags if e == ends[-1] else 0) for e in ends]


def series_slots(points: list[Point], limits: Limits) -> list[SlotValue]:
    """Slots of a whole series, points sorted by time and unique (a reference for tests and tools)."""
    out: list[SlotValue] = []
    for prev, nxt in pairwise(points):
        out.extend(pair_slots(prev, nxt, limits))
    return out

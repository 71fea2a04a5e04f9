"""What the console's overviews count, from rows the store gives (pure: no clock, no I/O).

Completeness is said as the share of a unit's closed half hours with an actual reading (quality A), beside the
share estimated (E); the rest are missing (M, or not stored at all).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date


@dataclass(slots=True)
class Share:
    """Half hours of a unit (or of many) over a span: actual, estimated, and how many have closed."""

    actual: int = 0
    estimated: int = 0
    closed: int = 0

    @property
    def missing(self) -> int:
        return max(0, self.closed - self.actual - self.estimated)

    def percent(self, part: int) -> str:
        """`part` of the closed half hours as a percentage with one decimal ('' when none has closed)."""
        return f"{100 * part / self.closed:.1f}" if self.closed else ""

    @property
    def grade(self) -> str:
        """A word for a map's cell: none (nothing closed yet), full, estimated (no gap, some estimated),
        gaps (some missing), empty (nothing at all)."""
        if not self.closed:
            return "none"
        if self.actual == self.closed:
            return "full"
        if not self.missing:
            return "estimated"
        return "empty" if self.missing == self.closed else "gaps"


def customer_shares(
    counts: Iterable[tuple[str, str | None, int]], customer_of: Mapping[str, str], closed_per_unit: int
) -> dict[str, Share]:
    """Each customer's share over a span, from (unit, import quality, count) rows of the span's stored slots;
    every unit of `customer_of` counts `closed_per_unit` closed half hours."""
    out: dict[str, Share] = {}
    for customer in customer_of.values():
        out.setdefault(customer, Share()).closed += closed_per_unit
    for unit, quality, n in counts:
        share = out.get(customer_of.get(unit, ""))
        if share is None:  # a unit no longer in the registry
            continue
        if quality == "A":
            share.actual += n
        elif quality == "E":
            share.estimated += n
    return out


def completeness_map(
    rows: Iterable[tuple[str, int, str | None]],
    first: Mapping[str, int | None],
    days: Sequence[tuple[date, Sequence[int]]],
) -> dict[str, list[Share]]:
    """Each unit's share of each day, from (unit, slot end, import quality) rows; `first` holds each unit's
    first reading (None: never heard): only the half hours after it count as closed, so a unit installed last
    week is not missing the weeks before. `days` are the days with the ends of their closed half hours."""
    day_of = {end: i for i, (_, ends) in enumerate(days) for end in ends}
    out = {
        u: [Share(closed=sum(1 for e in ends if t is not None and e > t)) for _, ends in days] for u, t in first.items()
    }
    for unit, end, quality in rows:
        cells, i = out.get(unit), day_of.get(end)
        if cells is None or i is None:
            continue
        if quality == "A":
            cells[i].actual += 1
        elif quality == "E":
            cells[i].estimated += 1
    return out

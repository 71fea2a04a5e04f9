"""A store in service for the benchmarks: days of every unit's readings and slots written before their load."""

from __future__ import annotations

from collections.abc import Iterable

from aggregator.store import Store
from kernel.meter import ACTUAL
from kernel.reading import Reading
from kernel.timegrid import SLOT


def prefill(store: Store, readings: Iterable[Reading], days: int) -> None:
    """Store `days` of history before the earliest of `readings` for each of their units: a reading every half
    hour (the register 17 less each step back, down to 0 at most) and the slots they close, written directly
    (not through ingest) in time order, a half hour a transaction, as ingest fills a store."""
    first: dict[str, Reading] = {}
    for r in readings:
        if r.unit not in first or r.at < first[r.unit].at:
            first[r.unit] = r
    units = sorted(first)
    steps = days * 86400 // SLOT
    for j in range(steps, 0, -1):
        with store.transaction():
            store.insert_readings(
                (
                    u,
                    first[u].at - j * SLOT,
                    first[u].meter,
                    max(0, (first[u].fwd or 0) - j * 17),
                    first[u].rev,
                    first[u].e1,
                    first[u].coef,
                    first[u].digits,
                    0,
                    0,
                    first[u].at - j * SLOT + 7,
                    first[u].at - j * SLOT + 9,
                    None,
                )
                for u in units
            )
    for end in sorted({r.at - j * SLOT for r in first.values() for j in range(steps - 1, 0, -1)}):
        with store.transaction():
            store.upsert_slots(
                ("imp", "exp"),
                [(end, u, 17, ACTUAL, 0, 0, ACTUAL, 0, first[u].meter, first[u].e1, first[u].coef) for u in units],
            )

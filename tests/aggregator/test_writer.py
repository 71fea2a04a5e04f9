"""The ingest writer process with two batches in flight, on SQLite and PostgreSQL: the second is sent before the
first is committed (on PostgreSQL, planned while the first is written), and nothing behind a batch that failed
is committed."""

from __future__ import annotations

import asyncio
from fractions import Fraction

import pytest

from aggregator.backends import open_url
from aggregator.ingest import UnitTable
from aggregator.writer import Writer, WriterError
from kernel.meter import Limits
from kernel.reading import Incoming, Reading
from kernel.timegrid import Grid

T0 = 1_795_000_000 - 1_795_000_000 % 1800  # a JST half hour
H = 1800
UNITS = [f"W{u:03d}" for u in range(200)]


def batch(k: int) -> list[Incoming]:
    """Every unit's reading of half hour k: 10 Wh more each half hour."""
    return [
        Incoming(Reading(u, T0 + k * H, "M1", 1000 + 10 * k, 0, 1, 1, 6, k, T0 + k * H + 5), T0 + k * H + 7, "t", b"{}")
        for u in UNITS
    ]


async def commit_in_flight(writer: Writer, *ks: int) -> list[BaseException | None]:
    """Send the batches of these half hours one behind the other, each before the one ahead is committed."""
    return await asyncio.gather(*(writer.commit(batch(k), [], T0) for k in ks), return_exceptions=True)


def test_batches_in_flight_commit_in_order_and_none_after_a_failed_one(store_url: str) -> None:
    table = UnitTable({u: ("C1", Limits(Fraction(25), 48)) for u in UNITS})
    writer = Writer(store_url, "FULL", Grid("Asia/Tokyo"), table)
    store = open_url(store_url)

    async def run() -> None:
        await writer.start()
        # the first batch meets units the writer does not know yet; the next three are each unit's next half hour
        assert await commit_in_flight(writer, 0, 1, 2, 3) == [None] * 4
        assert writer.totals.stored == 4 * len(UNITS) and writer.totals.slots == 3 * len(UNITS)
        # half hour 5 of one unit stored behind the writer's back: the batch of half hour 5 fails on it, and
        # the batch of half hour 6, made from the states the failed one would have left, must not land
        with store.transaction():
            store.insert_readings([("W007", T0 + 5 * H, "M1", 7, 0, 1, 1, 6, 0, 5, T0, T0, None)])
        results = await commit_in_flight(writer, 4, 5, 6)
        assert results[0] is None
        assert all(isinstance(r, WriterError) for r in results[1:]), results
        with pytest.raises(WriterError):  # and nothing after it either, until the writer is started again
            await writer.commit(batch(7), [], T0)

    try:
        asyncio.run(run())
    finally:
        writer.close()
    try:
        for unit in ("W000", "W007"):
            stored = [k for k in range(8) if store.reading(unit, T0 + k * H) is not None]
            assert stored == ([0, 1, 2, 3, 4, 5] if unit == "W007" else [0, 1, 2, 3, 4])
            assert [(s.slot, s.imp) for s in store.slots(unit, 0, 2**62)] == [(T0 + k * H, 10) for k in range(1, 5)]
    finally:
        store.close()

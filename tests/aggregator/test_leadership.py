"""Leadership follows the ability to ingest, on a real PostgreSQL: a node whose clock is off never leads, a leader
that cannot ingest hands over to a node that can (and only then), and does not take leadership back while its
fault lasts, unless no other node can lead."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from aggregator.leadership import Leadership
from aggregator.postgres import PostgresStore
from aggregator.store import Deposed
from tests.databases import PostgresDatabase, query

FAST = dict(period=0.1, lease_s=2.0, stale_s=1.0, hold_off_s=1.0)


def server_clock(url: str) -> Callable[[], float]:
    """A clock that agrees with the PostgreSQL server's, whatever this process's clock says (faketime)."""
    [(server,)] = query(url, "SELECT extract(epoch FROM clock_timestamp())")
    skew = float(server) - time.time()
    return lambda: time.time() + skew


def rows(url: str) -> dict[str, str]:
    return {node: state for node, state in query(url, "SELECT node, state FROM nodes")}


@pytest.fixture
def url(postgres: PostgresDatabase) -> str:
    url = postgres.fresh_url()
    PostgresStore(url).close()  # the schema
    return url


async def test_a_node_whose_clock_is_off_never_leads_and_says_why(url: str) -> None:
    right = server_clock(url)
    wrong = Leadership(url, "wrong", clock=lambda: right() - 3600, **FAST)  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.5):
            await wrong.acquire()
    assert wrong.fault.startswith("this node's clock is 3600 s behind the store's"), wrong.fault
    assert "clock is 3600 s behind the store's" in rows(url)["wrong"]  # the leader can tell the operators
    assert query(url, "SELECT value FROM meta WHERE key = 'leader'") == []  # it never led

    # a leader whose clock jumps gives leadership up at its next beat, whether or not another node could lead
    offset = 0.0
    jumping = Leadership(url, "jumping", clock=lambda: right() + offset, **FAST)  # type: ignore[arg-type]
    assert await asyncio.wait_for(jumping.acquire(), 5) == 1
    holding = asyncio.create_task(jumping.hold())
    await asyncio.sleep(0.3)
    assert not holding.done()
    offset = 120.0
    with pytest.raises(Deposed, match="handing over: this node's clock is 120 s ahead of the store's"):
        await asyncio.wait_for(holding, 5)
    await wrong.close()
    await jumping.close()


async def test_a_leader_that_cannot_ingest_hands_over_to_one_that_can_and_stays_out_while_its_fault_lasts(
    url: str,
) -> None:
    right = server_clock(url)
    fault = ""
    a = Leadership(url, "a", clock=right, ingest_fault=lambda: fault, **FAST)  # type: ignore[arg-type]
    assert await asyncio.wait_for(a.acquire(), 5) == 1
    holding = asyncio.create_task(a.hold())
    fault = "cannot reach the broker for 11 s: connection refused"
    await asyncio.sleep(1.0)
    assert not holding.done(), "with no other node to take over, the leader keeps leading (and alerting)"

    b_probe = ""

    async def probe_b() -> str:
        return b_probe

    b = Leadership(url, "b", clock=right, probe=probe_b, **FAST)  # type: ignore[arg-type]
    taking = asyncio.create_task(b.acquire())
    with pytest.raises(Deposed, match="handing over: cannot reach the broker for 11 s"):
        await asyncio.wait_for(holding, 5)
    assert await asyncio.wait_for(taking, 5) == 2
    holding_b = asyncio.create_task(b.hold())

    # a stands by with its fault (its own probe fails): it does not take leadership back, even once b is gone
    # stale, as long as b is fit; and it does when no node that can ingest is left
    async def probe_a() -> str:
        return "cannot reach the broker 127.0.0.1:1: connection refused"

    a.probe = probe_a
    again = asyncio.create_task(a.acquire())
    await asyncio.sleep(1.5)
    assert not again.done() and a.fault.startswith("cannot reach the broker")
    assert '"fault": "cannot reach the broker' in rows(url)["a"]
    b_probe = "no"  # not asked while b leads: its ingest is what counts
    holding_b.cancel()
    await asyncio.gather(holding_b, return_exceptions=True)
    await b.close()  # a clean stop takes b's row with it
    assert await asyncio.wait_for(again, 5) == 3, "someone must lead, if only to tell the operators"
    await a.close()
    assert rows(url) == {}

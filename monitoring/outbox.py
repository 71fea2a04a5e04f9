"""Sending reports and alerts through the store's outbox: kept until sent, retried with backoff, sent once.

A message is queued under a key that names it for ever (the report of a day on a channel, an
alert's start or end), so queueing it again changes nothing. A sender leases the messages it
takes, so two processes (the service and `smame report --send`) never send the same one. A
message is marked sent right after the server took it; only a crash in between those two steps
can send it twice, and mail then carries the same Message-ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

from aggregator.store import Store
from kernel.wake import wait_woken
from monitoring.outbox_table import OutboxRow, OutboxTable

log = logging.getLogger("smame.outbox")
STOP_GRACE_S = 2.0  # how long a stopping outbox waits for the outcome of a send under way (docker gives 10 s)


class SendFailed(Exception):
    """A channel could not deliver; `retry_after` when the server said when to come back."""

    def __init__(self, reason: str, retry_after: float | None = None, permanent: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.permanent = permanent


class Channel(Protocol):
    """Something that delivers stored payloads (mail, Slack); a send that takes longer than `deadline` seconds
    in all counts as failed."""

    name: str
    deadline: float

    def send(self, payload: bytes) -> None: ...


class Lane:
    """One channel's send at a time, each on a daemon thread: a server that stalls holds up only its own
    channel, and never the process's exit."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.current: Future[None] | None = None

    @property
    def busy(self) -> bool:
        """True while a send (perhaps one given up on) has not finished."""
        return self.current is not None and not self.current.done()

    def submit(self, fn: Callable[[], None]) -> Future[None]:
        """Run `fn` now; the future tells how it went."""
        done: Future[None] = Future()

        def work() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 (handed to the waiting side)
                done.set_exception(exc)
            else:
                done.set_result(None)

        self.current = done
        threading.Thread(target=work, name=f"outbox-{self.name}", daemon=True).start()
        return done


Message = tuple[str, str, bytes]  # (key, channel, payload)


class Outbox:
    """Delivers due messages; `run` is the service loop, `deliver_due` one round."""

    def __init__(
        self,
        store: Store,
        channels: Mapping[str, Channel],
        backoff_min: float = 15.0,
        backoff_max: float = 1800.0,
        give_up_s: float = 3 * 86400,
        lease_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        keep_s: float = 30 * 86400,
        poll_s: float = 60.0,
    ) -> None:
        self.store = store
        self.table = OutboxTable(store)
        self.channels = dict(channels)
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.give_up_s = give_up_s
        self.lease_s = lease_s
        self.keep_s = keep_s  # sent and abandoned messages are forgotten after this long
        self.poll_s = poll_s  # how often it looks for messages it was not woken for (queued by other nodes)
        self.clock = clock
        self._pruned = 0.0
        self.stats: Counter[tuple[str, str]] = Counter()  # (channel, sent|failed|given_up)
        self.failing: dict[str, tuple[float, str]] = {}  # channel -> (failing since, last error)
        self._lanes: dict[str, Lane] = {}
        self._wake = asyncio.Event()

    async def put(self, messages: Sequence[Message], also: Callable[[], None] = lambda: None) -> int:
        """Queue messages (those queued before are left alone), and run `also` in the same transaction."""
        now = self.clock()

        def enqueue() -> int:
            with self.store.transaction():
                also()
                return sum(self.table.enqueue(key, channel, payload, now) for key, channel, payload in messages)

        new = await self.store.call(enqueue)
        if new:
            self._wake.set()
        return new

    async def run(self) -> None:
        """Deliver for ever: right after something is queued, and when a retry falls due."""
        while True:
            try:
                if self.clock() - self._pruned >= 3600:
                    await self.prune()
                await self.deliver_due()
                nxt = await self.store.call(self.table.next_due)
            except self.store.errors as exc:  # the database busy past its timeout: try again soon
                log.error("outbox: %s; trying again in 30 s", exc)
                nxt = self.clock() + 30
            wait = self.poll_s if nxt is None else min(self.poll_s, max(0.2, nxt - self.clock()))
            await wait_woken(self._wake, wait)

    async def prune(self) -> None:
        """Forget messages sent or given up more than `keep_s` ago (the table would grow for ever)."""
        now = self._pruned = self.clock()

        def prune() -> None:
            with self.store.transaction():
                self.table.prune(now - self.keep_s)

        await self.store.call(prune)

    async def deliver_due(self) -> int:
        """Send every message due now, the channels side by side; returns how many went out."""
        claim = asyncio.ensure_future(self.store.call(self.table.claim_due, self.clock(), self.lease_s))
        try:
            rows = await asyncio.shield(claim)
        except asyncio.CancelledError:  # stopping as they are claimed: due again at the next start, not in 5 min
            with contextlib.suppress(TimeoutError):  # unless the store does not answer (locked, gone): leased
                async with asyncio.timeout(STOP_GRACE_S):
                    await self._release({row.id for row in await claim})
            raise
        by_channel: dict[str, list[OutboxRow]] = {}
        for row in rows:
            by_channel.setdefault(row.channel, []).append(row)
        counts = await asyncio.gather(*(self._deliver(name, rows) for name, rows in by_channel.items()))
        return sum(counts)

    async def _deliver(self, name: str, rows: list[OutboxRow]) -> int:
        """One channel's due messages, in order; a failure makes its later messages wait as long."""
        channel = self.channels.get(name)
        # Claimed and not yet touched: if the service stops now they are due again at once. A message whose
        # send has begun is settled by its outcome if that comes soon (`_settle`), else it keeps its lease: it
        # may yet go out, and must not go twice.
        untouched = {row.id for row in rows}
        try:
            return await self._deliver_rows(channel, name, rows, untouched)
        except asyncio.CancelledError:
            await self._release(untouched)
            raise

    async def _release(self, ids: set[int]) -> None:
        """Make claimed messages due again at once; a store that does not answer within STOP_GRACE_S leaves them
        to their lease (a stop must not wait on it)."""
        if ids:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_GRACE_S):
                    await asyncio.shield(self.store.call(self.table.release, sorted(ids), self.clock()))

    async def _deliver_rows(
        self, channel: Channel | None, name: str, rows: list[OutboxRow], untouched: set[int]
    ) -> int:
        sent = 0
        blocked: float | None = None
        for row in rows:
            untouched.discard(row.id)
            if blocked is not None:  # keep each channel's order: an alert's end never before its start
                await self.store.call(self.table.retry, row.id, blocked, "waiting for an earlier message")
                continue
            if channel is None:
                await self._give_up(row, f"channel {name} is not configured any more")
                continue
            try:
                await self._send(channel, row)
            except Exception as exc:  # noqa: BLE001 (a failing notification must never stop ingest)
                if not isinstance(exc, SendFailed):
                    # A bad payload or a library's bug: retrying will not cure it, and waiting for it would hold
                    # up every later message of the channel. Kept in the table with its error.
                    log.exception("sending %s by %s raised an unexpected error", row.key, row.channel)
                    exc = SendFailed(f"{type(exc).__name__}: {exc}", permanent=True)
                self.stats[row.channel, "failed"] += 1
                self.failing[row.channel] = (self.failing.get(row.channel, (self.clock(), ""))[0], str(exc))
                if exc.permanent or self.clock() - row.created > self.give_up_s:
                    await self._give_up(row, str(exc))
                    continue
                retry = blocked = self._next_try(row, exc.retry_after)
                await self.store.call(self.table.retry, row.id, retry, str(exc))
                log.warning(
                    "sending %s by %s failed (attempt %d), retrying in %.0f s: %s",
                    row.key,
                    row.channel,
                    row.attempts + 1,
                    retry - self.clock(),
                    exc,
                )
                continue
            await self.store.call(self.table.sent, row.id, self.clock())
            self.stats[row.channel, "sent"] += 1
            self.failing.pop(row.channel, None)
            sent += 1
            log.info("sent %s by %s", row.key, row.channel)
        return sent

    async def _send(self, channel: Channel, row: OutboxRow) -> None:
        """Send on the channel's lane, waiting `channel.deadline` seconds at most. A send that finishes after
        that is still marked sent when it succeeds: no retry starts before it has finished, and then finds
        nothing to send, so nothing goes twice."""
        loop = asyncio.get_running_loop()
        lane = self._lanes.get(channel.name)
        if lane is None:
            lane = self._lanes[channel.name] = Lane(channel.name)
        if lane.busy:
            raise SendFailed("the server has not yet answered an earlier message")
        done = lane.submit(lambda: channel.send(row.payload))
        waiting = asyncio.wrap_future(done)
        try:
            async with asyncio.timeout(channel.deadline):
                await asyncio.shield(waiting)
        except asyncio.CancelledError:
            await self._settle(row, waiting)
            raise
        except TimeoutError:

            def late(f: Future[None]) -> None:
                if not f.cancelled() and f.exception() is None:
                    loop.call_soon_threadsafe(self._sent_late, row)

            done.add_done_callback(late)
            raise SendFailed(f"no answer within {channel.deadline:.0f} s") from None

    async def _settle(self, row: OutboxRow, waiting: asyncio.Future[None]) -> None:
        """Stopping while `row` is being sent: wait a moment for the send's outcome and record it, sent or due
        again at once, so that the next start neither sends it twice nor waits out its lease. Without an
        outcome within STOP_GRACE_S the lease stands: the message may yet go out."""
        try:
            async with asyncio.timeout(STOP_GRACE_S):
                await asyncio.shield(waiting)
        except TimeoutError:
            return
        except Exception as exc:  # noqa: BLE001 (the send failed: recorded, and retried at the next start)
            await asyncio.shield(self.store.call(self.table.retry, row.id, self.clock(), str(exc)))
            return
        await asyncio.shield(self.store.call(self.table.sent, row.id, self.clock()))

    def _sent_late(self, row: OutboxRow) -> Any:
        log.warning("%s by %s went out after all, late", row.key, row.channel)
        return asyncio.ensure_future(self.store.call(self.table.sent, row.id, self.clock()))

    def _next_try(self, row: OutboxRow, retry_after: float | None) -> float:
        if retry_after is not None:  # the server said when (Slack's 429)
            return self.clock() + retry_after
        delay = min(self.backoff_max, self.backoff_min * 2.0**row.attempts)
        return self.clock() + delay * random.uniform(0.5, 1.0)

    async def _give_up(self, row: OutboxRow, error: str) -> None:
        self.stats[row.channel, "given_up"] += 1
        await self.store.call(self.table.give_up, row.id, self.clock(), error)
        log.error("gave up sending %s by %s after %d attempts: %s", row.key, row.channel, row.attempts + 1, error)

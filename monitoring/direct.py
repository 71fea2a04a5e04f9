"""An alert that cannot go through the store: said by this node straight to the channels.

Everything else smame tells goes through the outbox, a table in the store, so that nothing is lost or sent
twice across restarts and failovers. When the store itself is out of reach (PostgreSQL down, a lock held on
smame's tables, this node cut off from it) no node can lead, and the outbox can neither take a message nor
send one. Each node then says so itself: once when the condition has held for a while, once when it ends,
each message retried until a channel takes it. These are kept in memory only: a node restarted meanwhile says
it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from kernel.settings import Settings
from monitoring import alerts
from monitoring.monitor import alert_messages
from monitoring.outbox import Channel, Lane, Message

log = logging.getLogger("smame.monitor")


class DirectAlert:
    """One condition this node tells by itself; `watch` is its service loop."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        channels: Mapping[str, Channel],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.settings = settings
        self.channels = dict(channels)
        self.clock = clock
        self.pending: list[Message] = []  # said, not yet taken by its channel
        self._lanes = {name: Lane(name) for name in self.channels}
        self._since: float | None = None  # since when the condition holds
        self._said: alerts.Notice | None = None  # the ALERT sent for it, until its end is told

    async def watch(self, holding: Callable[[], str], after_s: float, every_s: float) -> None:
        """Look every `every_s`: `holding()` says what holds ("" when nothing does)."""
        while True:
            self.step(holding(), after_s)
            await self.deliver()
            await asyncio.sleep(every_s)

    def step(self, text: str, after_s: float) -> list[alerts.Notice]:
        """One look: the notices it says now (an ALERT after `after_s`, RESOLVED when it ends), queued."""
        now = self.clock()
        notices = []
        if text:
            self._since = now if self._since is None else self._since
            if self._said is None and now - self._since >= after_s:
                self._said = alerts.Notice(self.name, "firing", text, self._since, now)
                notices.append(self._said)
        else:
            if self._said is not None:
                cleared = f"cleared after {alerts.duration(now - self._said.since)}; it was: {self._said.text}"
                notices.append(alerts.Notice(self.name, "resolved", cleared, self._said.since, now))
            self._since, self._said = None, None
        for n in notices:
            (log.info if n.state == "resolved" else log.error)("%s: %s (said directly)", n.subject, n.text)
            self.pending += alert_messages(n, self.settings)
        return notices

    async def deliver(self) -> None:
        """Try each pending message once; keep those that failed for the next look."""
        left = []
        for message in self.pending:
            if not await self._send(message):
                left.append(message)
        self.pending = left

    async def _send(self, message: Message) -> bool:
        _, name, payload = message
        channel, lane = self.channels.get(name), self._lanes.get(name)
        if channel is None or lane is None:
            return True  # a channel no longer configured: nothing to send it by
        if lane.busy:
            return False
        try:
            async with asyncio.timeout(channel.deadline):
                await asyncio.shield(asyncio.wrap_future(lane.submit(lambda: channel.send(payload))))
        except Exception as exc:  # noqa: BLE001 (a send that failed or took too long: tried again later)
            log.warning("%s: not sent by %s yet: %s", self.name, name, str(exc) or type(exc).__name__)
            return False
        return True

"""Publishing a fleet's telegrams: over a few shared connections, or one connection per unit as in the field.

QoS 1 with a bounded in-flight window per connection. A message is never dropped: when a connection
breaks, it is re-established with backoff and the unacknowledged message is published again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import resource
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from broker_bridge.mqtt import MQTT5, ConnectionRefused, MqttClient, MqttError, Nodes
from simulators.scenario import Send

log = logging.getLogger("smame.simulate")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the units publish: the broker, or a cluster's nodes (a unit tries the next when one fails)."""

    nodes: tuple[tuple[str, int], ...]
    tls: ssl.SSLContext | None = None
    password_of: Callable[[str], str | None] = lambda unit: None
    version: int = MQTT5


class Link:
    """One MQTT connection that publishes in order and survives broker outages."""

    def __init__(
        self,
        endpoint: Endpoint,
        client_id: str,
        username: str | None,
        window: int,
        finished: Callable[[], None] = lambda: None,
    ) -> None:
        self.endpoint = endpoint
        self.finished = finished  # called once per message, acknowledged or refused
        self.client_id = client_id
        self.username = username
        self.window = window
        self.client: MqttClient | None = None
        self.queue: asyncio.Queue[Send | None] = asyncio.Queue()
        self.sent = 0
        self.refused = 0
        self._reconnecting = asyncio.Lock()  # one reconnect for all the messages in flight

    async def connect(self) -> MqttClient:
        delay = 0.2
        nodes = Nodes(self.endpoint.nodes)
        while True:
            client = MqttClient(window=self.window, version=self.endpoint.version)
            try:
                await client.connect(
                    *nodes.current,
                    self.client_id,
                    username=self.username,
                    password=self.endpoint.password_of(self.client_id) if self.username else None,
                    tls=self.endpoint.tls,
                    clean_start=True,
                    keepalive=120,
                )
                self.client = client
                return client
            except ConnectionRefused:
                client.close()
                raise  # credentials or authorisation: waiting will not help
            except (TimeoutError, OSError, MqttError) as exc:
                client.close()
                if not nodes.failed():  # the cluster's next node, at once
                    continue
                log.warning("unit link %s: broker unreachable (%s), retrying in %.1f s", self.client_id, exc, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 10.0)

    async def run(self) -> None:
        """Publish what is queued, in order, until a None arrives; wait for every PUBACK."""
        pending: set[asyncio.Task[None]] = set()
        while True:
            send = await self.queue.get()
            if send is None:
                break
            await self._window_free(pending)
            task = asyncio.create_task(self._publish(send))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)

    async def _window_free(self, pending: set[asyncio.Task[None]]) -> None:
        while len(pending) >= self.window:
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)

    async def _publish(self, send: Send) -> None:
        while True:
            client = self.client
            if client is None or not client.connected:
                try:
                    client = await self._reconnect(client)
                except ConnectionRefused as exc:  # e.g. a unit the broker does not know: said, counted, dropped
                    log.error("unit link %s: %s; telegram dropped", self.client_id, exc)
                    self.refused += 1
                    self.finished()
                    return
            try:
                await client.publish(send.topic, send.payload)
                self.sent += 1
                self.finished()
                return
            except MqttError as exc:
                if client.connected:  # refused by the broker (e.g. not authorised): nothing to retry
                    log.error("unit link %s: %s", self.client_id, exc)
                    self.refused += 1
                    self.finished()
                    return

    async def _reconnect(self, broken: MqttClient | None) -> MqttClient:
        async with self._reconnecting:
            if self.client is broken or self.client is None or not self.client.connected:
                await self.connect()
            assert self.client is not None
            return self.client


class FleetPublisher:
    """Routes each unit's telegrams to its link: `connections` shared links, or one per unit."""

    def __init__(
        self, endpoint: Endpoint, connections: int | None, window: int, units: list[str], name: str = "smame-sim"
    ) -> None:
        self.endpoint = endpoint
        self.per_unit = connections is None
        self.window = window
        self.pending = 0  # queued or in flight
        if self.per_unit:
            _raise_file_limit(len(units) + 100)
            self.links = {u: Link(endpoint, u, u, window, self._finished) for u in units}
            self.shared = []
        else:
            n = max(1, connections or 1)
            self.shared = [Link(endpoint, f"{name}-{i}", None, window, self._finished) for i in range(n)]
            self.links = {}
        self.tasks: list[asyncio.Task[None]] = []

    def all_links(self) -> list[Link]:
        return [*self.links.values(), *self.shared]

    async def start(self, concurrency: int = 200) -> float:
        """Open every connection (at most `concurrency` handshakes at once); return the seconds it took."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        gate = asyncio.Semaphore(concurrency)

        async def open_one(link: Link) -> None:
            async with gate:
                await link.connect()

        try:
            await asyncio.gather(*(open_one(link) for link in self.all_links()))
        except ConnectionRefused as exc:
            for link in self.all_links():
                if link.client is not None:
                    link.client.close()
            raise ConnectionRefused(f"{exc} (check the units' credentials)", exc.code) from None
        self.tasks = [asyncio.create_task(link.run()) for link in self.all_links()]
        return loop.time() - started

    def put(self, send: Send) -> None:
        """Queue a telegram on its unit's link (a unit always uses the same link, so its order holds)."""
        link = self.links.get(send.unit)
        if link is None and self.per_unit:  # a unit outside the fleet (unknown to the registry) speaks for itself
            link = self.links[send.unit] = Link(self.endpoint, send.unit, send.unit, self.window, self._finished)
            self.tasks.append(asyncio.create_task(link.run()))
        elif link is None:
            link = self.shared[hash(send.unit) % len(self.shared)]
        self.pending += 1
        link.queue.put_nowait(send)

    def _finished(self) -> None:
        self.pending -= 1

    def backlog(self) -> int:
        """Telegrams queued or in flight (kept as a count: summing 10,000 queues per message is quadratic)."""
        return self.pending

    @property
    def sent(self) -> int:
        return sum(link.sent for link in self.all_links())

    @property
    def refused(self) -> int:
        return sum(link.refused for link in self.all_links())

    def refused_units(self) -> list[str]:
        """The units, each on its own login, whose telegrams the broker refused (none on shared links)."""
        return sorted(unit for unit, link in self.links.items() if link.refused)

    async def close(self) -> None:
        """Wait until every queued telegram is acknowledged, then disconnect."""
        for link in self.all_links():
            link.queue.put_nowait(None)
        await asyncio.gather(*self.tasks)
        for link in self.all_links():
            if link.client is not None:
                await link.client.disconnect()


def _raise_file_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            raise OSError(f"{need} connections need {need} open files; this process may open {hard}")

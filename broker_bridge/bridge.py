"""The ingest service: telegrams from the broker, committed in batches, acknowledged after commit.

Messages are decoded and validated as they arrive and gathered into a batch; a batch is committed when
it is full or its first message has waited `batch_delay_ms`, while the next one fills. Only then are its
PUBACKs sent, in arrival order, on the connection the messages came in on. A crash at any point leaves
them unacknowledged, so the broker delivers them again and the idempotent store ignores the copies.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import os
import random
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass, field

from broker_bridge.mqtt import MQTT5, Message, MqttClient, MqttError, Nodes
from broker_bridge.telegram import Decoded, Reject, Rules, decode, decode_status, unit_of_status, unit_of_topic
from kernel.reading import Incoming, Reason, Refused, Status
from kernel.wake import wait_woken

log = logging.getLogger("smame.bridge")

Commit = Callable[[list[Incoming], list[Refused], list[Status]], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class BrokerTarget:
    """Where and how to connect (built from the broker settings)."""

    nodes: tuple[tuple[str, int], ...]  # the broker's host and port, or each of a cluster's nodes
    client_id: str
    username: str | None
    password: str | None
    topic: str
    session_expiry: int
    keepalive: int
    batch_size: int
    batch_delay: float
    reconnect_min: float
    reconnect_max: float
    tls: ssl.SSLContext | None = None
    version: int = MQTT5  # MQTT311 for a broker that speaks only 3.1.1 (RabbitMQ)


COMMIT_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # histogram bucket bounds
BATCH_SIZES = (1, 10, 100, 500, 1000, 2000, 5000, 10000, 30000)
# Full batches that may wait while one commits. Beyond that the socket is not read: decoding further ahead
# gains nothing, and a loop busy decoding a broker's whole backlog would not see commits finish.
AHEAD = 2
# Payload bytes a batch holds at most, whatever `batch_size` says: with the pause above, what the receiving process
# holds stays a few of these even when units send telegrams near MAX_PAYLOAD (a fleet's are about 200 bytes).
BATCH_BYTES = 4 * 1024 * 1024
# Batches sent to the writer before the first of them is committed: it prepares the second while the store
# writes the first (`aggregator.writer`).
IN_FLIGHT = 2
# A batch in which this many units or more, and at least half of its units, sent readings from the future tells
# that this node's clock is behind the fleet's: it is not committed (its readings would be quarantined and lost to
# the customers), the connection is dropped so that the broker keeps them, and ingest waits CLOCK_HOLD_S before
# it tries again.
CLOCK_UNITS = 3
CLOCK_HOLD_S = 30.0


@dataclass
class BridgeStats:
    """Counters the monitoring part reads."""

    received: int = 0
    acked: int = 0
    batches: int = 0
    connects: int = 0
    sessions_lost: int = 0
    connected: bool = False
    last_commit_s: float = 0.0
    last_batch: int = 0
    last_received: float = 0.0  # time of the newest message (epoch)
    pending: int = 0  # messages received and not yet committed
    progress_at: float = 0.0  # when a commit last finished, or when telegrams began to wait with none waiting
    down_since: float | None = None  # not connected since (epoch); None while connected
    clock_error: str = ""  # why the last batch refused for this node's clock was refused
    clock_error_at: float = 0.0  # when (epoch); 0: never
    last_error: str = ""  # why the last connection attempt or connection failed
    node: str = ""  # host:port of the broker's node ingest connected to last
    status_refused: str = ""  # why the broker refused the units' status topic at the last subscription ("" it took it)
    commit_counts: list[int] = field(default_factory=lambda: [0] * (len(COMMIT_SECONDS) + 1))
    commit_sum: float = 0.0
    size_counts: list[int] = field(default_factory=lambda: [0] * (len(BATCH_SIZES) + 1))
    size_sum: int = 0

    @property
    def commit_bounds(self) -> tuple[float, ...]:
        """Upper bounds of the commit duration histogram's buckets (seconds; +Inf is the last)."""
        return COMMIT_SECONDS

    @property
    def size_bounds(self) -> tuple[int, ...]:
        """Upper bounds of the batch size histogram's buckets (+Inf is the last)."""
        return BATCH_SIZES

    def caught_up(self, now: float, quiet: float = 2.0) -> bool:
        """True when ingest has drained what the broker held for it: connected, nothing received for `quiet`
        seconds and nothing waiting to be committed. Reports on a past day wait for it."""
        return self.connected and self.pending == 0 and now - self.last_received >= quiet

    def stalled_for(self, now: float) -> float:
        """Seconds that received telegrams have waited with no commit finishing; 0 while none waits."""
        return max(0.0, now - self.progress_at) if self.pending else 0.0

    def observe(self, seconds: float, size: int) -> None:
        """Count one committed batch in the histograms (the last bucket is +Inf)."""
        self.commit_counts[bisect.bisect_left(COMMIT_SECONDS, seconds)] += 1
        self.commit_sum += seconds
        self.size_counts[bisect.bisect_left(BATCH_SIZES, size)] += 1
        self.size_sum += size


@dataclass(slots=True)
class _Batch:
    """Messages decoded as they came in, waiting for one commit."""

    first: float  # when its first message came in
    size: int = 0
    bytes: int = 0  # of the payloads
    incoming: list[Incoming] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    statuses: list[Status] = field(default_factory=list)  # units' status messages, in the order they came
    # QoS 1 packet ids by the connection they came in on: a PUBACK is only meaningful there
    acks: dict[MqttClient, list[int]] = field(default_factory=dict)


def status_topic(readings: str) -> str | None:
    """The units' status topic beside their readings' topic (`.../+/reading` -> `.../+/status`, a shared
    subscription's group kept), or None when the readings' topic has no such form."""
    base, _, last = readings.rpartition("/")
    return f"{base}/status" if last == "reading" and base else None


def _clock_behind(batch: _Batch) -> str:
    """Why this batch says this node's clock is behind the units' ("" when it does not): at least CLOCK_UNITS
    units, and half of the batch's, sent only readings that lie in the future."""
    future = {r.unit for r in batch.refused if r.reason == Reason.FUTURE}
    if len(future) < CLOCK_UNITS:  # the common case costs one pass over the (few) refused
        return ""
    units = future | {i.reading.unit for i in batch.incoming}
    if 2 * len(future) < len(units):
        return ""
    return (
        f"readings of {len(future)} of the {len(units)} units in a batch lie in the future: this node's clock "
        "seems behind the units' by more than ingest.clock_tolerance_s"
    )


def tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """A client TLS context (TLS 1.2 or newer) that verifies the broker."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


async def back_off(delay: float, most: float) -> float:
    """Wait about `delay` seconds (jittered, so that many clients do not come back at once); return the next
    delay, doubled up to `most`."""
    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
    return min(delay * 2, most)


async def open_session(client: MqttClient, t: BrokerTarget, client_id: str, node: tuple[str, int]) -> bool:
    """Connect `client` to `node` of the target's broker as `client_id`, its session kept for `session_expiry`;
    return whether the broker still had that session."""
    return await client.connect(
        *node,
        client_id,
        username=t.username,
        password=t.password,
        tls=t.tls,
        session_expiry=t.session_expiry,
        keepalive=t.keepalive,
    )


async def probe_node(t: BrokerTarget, node: tuple[str, int], purpose: str, timeout: float = 5.0) -> str:
    """Whether `node` of the target's broker takes a connection now: one of its own (client id
    `<client_id>-<purpose>-<pid>`, a clean start, nothing subscribed), opened and closed. "" when it did, else why
    not."""
    client = MqttClient(version=t.version)
    try:
        async with asyncio.timeout(timeout):
            await client.connect(
                *node,
                f"{t.client_id[:100]}-{purpose}-{os.getpid()}",
                username=t.username,
                password=t.password,
                tls=t.tls,
                clean_start=True,
                keepalive=0,
                timeout=timeout,
            )
            await client.disconnect()
        return ""
    except Exception as exc:  # refused, reset, no answer
        client.close()
        return str(exc) or type(exc).__name__


class Bridge:
    """Subscribes, batches, commits, acknowledges; reconnects for ever."""

    def __init__(
        self,
        target: BrokerTarget,
        commit: Commit,
        known_units: Callable[[], Container[str]],
        rules: Rules,
        on_session_lost: Callable[[], None] = lambda: None,
        stop_timeout: float = 6.0,
    ) -> None:
        self.target = target
        self.commit = commit
        self.known_units = known_units
        self.rules = rules
        self.on_session_lost = on_session_lost
        self.stop_timeout = stop_timeout
        self.stats = BridgeStats()
        self._batches: deque[_Batch] = deque()  # oldest first; the last may still be filling
        self._flying: deque[asyncio.Task[None]] = deque()  # commits under way, oldest first
        self._filling: _Batch | None = None
        self._paused: MqttClient | None = None  # not read from while AHEAD full batches wait
        self._stopping = False
        self._client: MqttClient | None = None
        self._wake = asyncio.Event()
        self._hold_until = 0.0  # no connection before this (epoch): this node's clock was found behind the fleet's
        self._internal_seen: set[str] = set()  # kinds of unexpected decoding errors already logged
        self.subscribed = asyncio.Event()  # set at the first subscription: start-up work waits for it
        self.stats.down_since = time.time()

    async def run(self) -> None:
        """Connect and ingest until cancelled; on cancel, commit and acknowledge what was received. It may run
        again after that (a node that leads again), with a clean slate: what the last run left unacknowledged
        the broker delivers again."""
        self._batches.clear()
        self._flying.clear()
        self._filling = self._paused = self._client = None
        self._stopping = False
        self.stats.pending = 0
        flusher = asyncio.create_task(self._flush_forever(), name="bridge-flush")
        try:
            await self._connect_forever(flusher)
        finally:
            await self._shutdown(flusher)

    async def _connect_forever(self, flusher: asyncio.Task[None]) -> None:
        t = self.target
        delay = t.reconnect_min
        nodes = Nodes(t.nodes)
        while True:
            if self._hold_until > time.time():
                await asyncio.sleep(self._hold_until - time.time())
            client = MqttClient(version=t.version)
            client.on_messages = functools.partial(self._on_messages, client=client)
            host, port = node = nodes.current
            try:
                present = await open_session(client, t, t.client_id, node)
                # A session the broker kept starts to deliver its backlog here, ahead of the SUBACK.
                log.info("connected to %s:%s as %s, session present: %s", host, port, t.client_id, present)
                await client.subscribe(t.topic, qos=1)
                await self._subscribe_status(client)
            except Exception as exc:  # refused, reset, closed mid-handshake, garbled: all mean "try again later"
                client.close()
                self.stats.connected = False
                self.stats.last_error = str(exc) or type(exc).__name__
                if not nodes.failed():  # another node of the cluster may take us at once
                    log.warning("broker %s:%s unreachable: %s; trying %s:%s", host, port, exc, *nodes.current)
                    continue
                log.warning("broker %s:%s unreachable: %s; retrying in %.1f s", host, port, exc, delay)
                delay = await back_off(delay, t.reconnect_max)
                continue
            nodes.worked()
            self.stats.node = f"{host}:{port}"
            self._client = client
            self.subscribed.set()
            self.stats.connects += 1
            self.stats.connected = True
            self.stats.down_since = None
            delay = t.reconnect_min
            log.info("subscribed to %s", t.topic)
            if not present and self.stats.connects > 1:
                self.stats.sessions_lost += 1
                log.error(
                    "the broker had no session for %s: messages queued while we were away may be lost", t.client_id
                )
                self.on_session_lost()
            done, _ = await asyncio.wait({client.closed, flusher}, return_when=asyncio.FIRST_COMPLETED)
            if flusher in done:
                flusher.result()  # a failing commit stops the service: raise it
            self.stats.connected = False
            self.stats.down_since = time.time()
            self.stats.last_error = str(client.closed.exception() or "connection closed")
            log.warning("lost the broker: %s", client.closed.exception())

    async def probe(self, timeout: float = 5.0) -> str:
        """Whether this node could ingest now: a connection of its own to the broker (its own client id, a clean
        start, no session kept, nothing subscribed), opened and closed. "" when it worked, else why not. A node
        standing by asks it before taking the ingest session over."""
        why = []
        for node in self.target.nodes:  # one node that takes us is enough: the session follows us to it
            error = await probe_node(self.target, node, "probe", timeout)
            if not error:
                return ""
            why.append(f"{node[0]}:{node[1]}: {error}")
        return f"cannot reach the broker {'; '.join(why)}"

    def _on_messages(self, messages: list[Message], client: MqttClient) -> None:
        """Decode the messages of one socket read into the filling batch, starting a new one when it is full
        (`batch_size` telegrams or BATCH_BYTES of payload); stop reading when AHEAD full batches wait for their
        commits."""
        known, rules, full, batches = self.known_units(), self.rules, self.target.batch_size, self._batches
        batch = self._filling
        for message in messages:
            if batch is None:
                batch = self._filling = _Batch(message.received)
                batches.append(batch)
                self._wake.set()
            received = int(message.received)
            topic, payload = message.topic, message.payload
            if topic.endswith("/status"):
                self._status(batch, topic, payload, received, known)
            else:
                self._telegram(batch, topic, payload, received, known, rules)
            if message.packet_id is not None:
                acks = batch.acks.get(client)
                if acks is None:
                    acks = batch.acks[client] = []
                acks.append(message.packet_id)
            batch.size += 1
            batch.bytes += len(payload)
            if batch.size >= full or batch.bytes >= BATCH_BYTES:
                batch = self._filling = None
                self._wake.set()
                if len(batches) >= AHEAD:
                    client.pause()
                    self._paused = client
        if messages:
            if not self.stats.pending:  # the wait for a commit starts now
                self.stats.progress_at = messages[0].received
            self.stats.received += len(messages)
            self.stats.pending += len(messages)
            self.stats.last_received = messages[-1].received

    async def _subscribe_status(self, client: MqttClient) -> None:
        """Subscribe to the units' status topic beside their readings, its retained messages included (each
        unit's last state, at every start); a broker that refuses it costs the connection events, not ingest."""
        topic = status_topic(self.target.topic)
        if topic is None:
            return
        try:
            await client.subscribe(topic, qos=1, retained=True)
        except MqttError as exc:
            if "refused the subscription" not in str(exc):
                raise
            self.stats.status_refused = f"{exc} (the broker's ACL must let smame read {topic})"
            log.warning("units' connection events are not taken: %s", self.stats.status_refused)
        else:
            self.stats.status_refused = ""

    def _telegram(
        self, batch: _Batch, topic: str, payload: bytes, received: int, known: Container[str], rules: Rules
    ) -> None:
        """Decode a telegram into the batch: its readings, and what was refused with why."""
        try:
            d = decode(topic, payload, received, known, rules)
        except Exception as exc:  # a bug must cost one telegram, never the ingest of every unit
            d = self._internal(topic, exc)
        for r in d.readings:
            batch.incoming.append(Incoming(r, received, topic, payload))
        for j in d.rejects:
            batch.refused.append(Refused.of(received, topic, d.unit, j.reason, j.detail, payload, j.at))

    def _status(self, batch: _Batch, topic: str, payload: bytes, received: int, known: Container[str]) -> None:
        """A unit's status message into the batch: its connection state, or refused with why."""
        got = decode_status(topic, payload, received, known)
        if isinstance(got, Status):
            batch.statuses.append(got)
        elif got is not None:
            batch.refused.append(Refused.of(received, topic, unit_of_status(topic), got.reason, got.detail, payload))

    def _internal(self, topic: str, exc: Exception) -> Decoded:
        """A telegram whose decoding failed unexpectedly, refused as internal; logged once per kind of error."""
        kind = type(exc).__name__
        if kind not in self._internal_seen:
            self._internal_seen.add(kind)
            log.error(
                "decoding a telegram on %s failed unexpectedly; quarantined as internal (said once per kind of error)",
                topic[:200],
                exc_info=exc,
            )
        return Decoded(unit_of_topic(topic), [], [Reject(Reason.INTERNAL, f"{kind}: {exc}"[:300])])

    async def _flush_forever(self) -> None:
        flying = self._flying
        while True:
            await self._wake.wait()
            self._wake.clear()
            while flying and flying[0].done():
                flying.popleft().result()  # a failing commit stops the service: raise it
            if not self._batches or sum(not f.done() for f in flying) >= IN_FLIGHT:
                continue
            if self._batches[0] is self._filling:  # wait until it is full or its first message has waited enough
                wait = self.target.batch_delay - (time.time() - self._batches[0].first)
                if wait > 0:
                    await wait_woken(self._wake, wait)
                    self._wake.set()  # look again: full, waited enough, or a commit done
                    continue
            flight = asyncio.create_task(self._commit_batch(self._take()), name="bridge-commit")
            flight.add_done_callback(lambda _: self._wake.set())
            flying.append(flight)
            if self._batches:
                self._wake.set()

    async def _flush(self) -> None:
        if self._batches:
            await self._commit_batch(self._take())

    def _take(self) -> _Batch:
        """The oldest batch, to be committed now; reading goes on if it was paused for want of room."""
        batch = self._batches.popleft()
        if batch is self._filling:
            self._filling = None
        if self._paused is not None and not self._stopping:
            self._paused.resume()
            self._paused = None
        return batch

    async def _commit_batch(self, batch: _Batch) -> None:
        behind = _clock_behind(batch)
        if behind:
            self._refuse_for_clock(batch, behind)
            return
        started = time.perf_counter()
        await self.commit(batch.incoming, batch.refused, batch.statuses)
        self.stats.pending -= batch.size
        self.stats.progress_at = time.time()
        self.stats.last_commit_s = time.perf_counter() - started
        self.stats.batches += 1
        self.stats.last_batch = batch.size
        self.stats.observe(self.stats.last_commit_s, batch.size)
        for c, ids in batch.acks.items():  # a closed connection's messages are redelivered on the next one
            if c.ack(ids):
                self.stats.acked += len(ids)

    def _refuse_for_clock(self, batch: _Batch, why: str) -> None:
        """Commit and acknowledge nothing of a batch that says this node's clock is behind: drop the connections
        it came on, so that the broker delivers it again once the clock is right, and wait before reconnecting."""
        now = time.time()
        if not self.stats.clock_error:
            log.error("%s: nothing is acknowledged; trying again every %.0f s", why, CLOCK_HOLD_S)
        self.stats.clock_error, self.stats.clock_error_at = why, now
        self.stats.pending -= batch.size
        self._hold_until = now + CLOCK_HOLD_S
        for client in batch.acks:
            client.close()

    async def _shutdown(self, flusher: asyncio.Task[None]) -> None:
        self._stopping = True
        flusher.cancel()
        try:
            await flusher
        except (asyncio.CancelledError, Exception):  # a failed commit: what is not committed is not acknowledged
            pass
        client = self._client
        try:
            if client is not None:
                client.pause()
                try:
                    async with asyncio.timeout(self.stop_timeout):  # what is not committed in time is redelivered
                        while self._flying:  # sent to the writer already: committed in any case
                            await self._flying.popleft()
                        while self._batches and client.connected:
                            await self._flush()
                except TimeoutError:
                    log.warning("stopping: %d received messages left unacknowledged for redelivery", self.stats.pending)
                except Exception as exc:  # the store is failing: what is not committed is not acknowledged
                    log.warning(
                        "stopping: %d received messages left unacknowledged for redelivery: %s", self.stats.pending, exc
                    )
                finally:
                    await client.disconnect()
        finally:
            for flight in self._flying:  # cut short: never acknowledged
                flight.cancel()
            await asyncio.gather(*self._flying, return_exceptions=True)
            self._flying.clear()
        self.stats.connected = False
        log.info("ingest stopped: %d received, %d acknowledged", self.stats.received, self.stats.acked)

"""Commands to units: the leader publishes the store's queued commands to their units and keeps their answers
(docs/devices.md, `kernel.commands`).

A connection of its own (client id `<broker.client_id>-devices`, a persistent session), so that ingest's never
waits on it. A command is published at QoS 1 with MQTT 5 request/response properties (response topic,
correlation data = its id, message expiry = what is left of its life), so that a unit that is away gets it when
it comes back, or never once it has lapsed. It is noted `sent` when the broker took it for a unit's session; a
broker that had no subscriber for it (a unit that never connected with a session) keeps it `queued`, published
again `devices.retry_s` later under the same id. Answers are acknowledged to the broker only after the store
has them, so none is lost to a crash; an answer that is no answer is acknowledged, counted with its reason and
dropped. A new leader reads the same store: it publishes what is still queued, and nothing under a new id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from aggregator.campaigns import campaign_pass
from aggregator.desired import config_pass
from aggregator.repair import repair_pass
from aggregator.store import CommandRow, Store
from broker_bridge.bridge import BrokerTarget, back_off, open_session
from broker_bridge.mqtt import Message, MqttClient, MqttError, Nodes, request_properties
from kernel.commands import Answer, AnswerRefused, cmd_topic, command_payload, read_answer, res_topic
from kernel.registry import Registry
from kernel.settings import DevicesSettings

log = logging.getLogger("smame.devices")

ANSWERS_TOPIC = "smame/v1/+/res"
NO_SUBSCRIBERS = 0x10  # PUBACK reason: the broker had no subscription matching the message
TICK_S = 1.0  # how often the queue and the expiries are looked at when no answer wakes the loop
BURST = 500  # commands published at most a tick (and at most rate_per_s worth of them)
PRUNE_EVERY_S = 86400.0  # ended commands and audit entries older than devices.keep_days are deleted this often
STORE_RETRY_S = 10.0  # after the store failed a tick: what was not kept is delivered again by the broker


@dataclass
class DeviceStats:
    """What the commands' service did since start, for the metrics and the console."""

    connected: bool = False
    down_since: float | None = None  # since when it has not been connected (None while it is)
    last_error: str = ""
    failing: str = ""  # why the last look at the store failed ("" once one works)
    published: int = 0
    unheard: int = 0  # published, but no session took it
    answers: int = 0  # answers applied to their commands
    unmatched: int = 0  # well-formed answers to no open command of that unit (a redelivery, a stray)
    refused: Counter[str] = field(default_factory=Counter)  # answers that were none, by reason (REFUSALS)
    expired: int = 0
    repairs: int = 0  # gaps asked of their units with resend
    config_sets: int = 0  # set commands sent to bring units in step with their desired configuration


class Devices:
    """The leader's sender of commands and reader of answers (one per leading node)."""

    def __init__(
        self,
        target: BrokerTarget,
        store: Store,
        settings: DevicesSettings,
        clock: Callable[[], float] = time.time,
        registry: Callable[[], Registry] | None = None,
    ) -> None:
        self.target = target
        self.registry = registry  # the units whose desired configuration is kept in step (None: none)
        self.store = store
        self.settings = settings
        self.clock = clock
        self.stats = DeviceStats()
        self._answers: list[Answer] = []
        self._acks: list[int] = []
        self._wake = asyncio.Event()
        self._budget = 0.0
        self._next_prune = -math.inf  # at start, then once a day
        self._next_repair = -math.inf  # at start, then every devices.repair_every_s
        self._next_config = -math.inf  # at start, then every devices.config_every_s
        self._next_campaign = -math.inf  # at start, then every devices.campaign_every_s

    @property
    def client_id(self) -> str:
        return f"{self.target.client_id[:100]}-devices"

    async def run(self) -> None:
        """Connect, subscribe to the answers, and publish and keep until cancelled; reconnects for ever."""
        t = self.target
        delay = t.reconnect_min
        nodes = Nodes(t.nodes)
        self.stats.down_since = self.clock()
        while True:
            client = MqttClient(on_messages=self._on_messages, version=t.version)
            self._answers, self._acks = [], []  # unacknowledged: the broker delivers them again
            host, port = node = nodes.current
            try:
                await open_session(client, t, self.client_id, node)
                await client.subscribe(ANSWERS_TOPIC, qos=1)
            except Exception as exc:  # refused, reset, garbled: try again later
                client.close()
                self.stats.connected = False
                self.stats.last_error = str(exc) or type(exc).__name__
                if not nodes.failed():
                    continue
                log.warning("commands: broker %s:%s unreachable: %s; retrying in %.1f s", host, port, exc, delay)
                delay = await back_off(delay, t.reconnect_max)
                continue
            nodes.worked()
            self.stats.connected, self.stats.down_since, self.stats.last_error = True, None, ""
            delay = t.reconnect_min
            work = asyncio.create_task(self._serve(client), name="devices-serve")
            try:
                await asyncio.wait({work, client.closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                client.close()
            self.stats.connected, self.stats.down_since = False, self.clock()
            failed = work.exception() if work.done() and not work.cancelled() else None
            if failed is not None and not isinstance(failed, MqttError):
                # a busy or failing store (or a bug) must not stop the rest of smame: said, and tried again
                self.stats.last_error = self.stats.failing = f"{type(failed).__name__}: {failed}"
                log.error("commands: %s; trying again in %.0f s", self.stats.last_error, STORE_RETRY_S)
                await asyncio.sleep(STORE_RETRY_S)
                continue
            self.stats.last_error = str(client.closed.exception() or failed or "connection closed")
            log.warning("commands: lost the broker: %s", self.stats.last_error)

    def _on_messages(self, messages: list[Message]) -> None:
        for m in messages:
            got = read_answer(m.topic, m.payload)
            if isinstance(got, AnswerRefused):
                self.stats.refused[got.reason] += 1
                log.debug("commands: refused an answer on %s: %s", m.topic[:100], got.detail)
            else:
                self._answers.append(got)
            if m.packet_id is not None:
                self._acks.append(m.packet_id)  # acknowledged once the answers before it are kept
        if messages:
            self._wake.set()

    async def _serve(self, client: MqttClient) -> None:
        last = self.clock()
        while True:
            self._wake.clear()  # before the look: answers that come during it wake the next one at once
            now = self.clock()
            self._budget = min(self._budget + (now - last) * self.settings.rate_per_s, max(self.settings.rate_per_s, 1))
            last = now
            await self._keep_answers(client)
            expired = await self.store.call(self.store.expire_commands, int(now))
            if expired:
                self.stats.expired += len(expired)
                log.info("commands: %d expired with no answer", len(expired))
            await self._publish_due(client, int(now))
            if now >= self._next_prune:
                await self._prune(now)
            if self.registry is not None and now >= self._next_config:
                sets = await self.store.call(config_pass, self.store, self.registry(), int(now), self.settings)
                self._next_config = now + self.settings.config_every_s
                if sets:
                    self.stats.config_sets += len(sets)
                    log.info("desired configuration: set sent to %d units out of step", len(sets))
            if now >= self._next_campaign:
                self._next_campaign = now + self.settings.campaign_every_s
                for line in await self.store.call(campaign_pass, self.store, int(now), self.settings.firmware_url):
                    log.info("firmware %s", line)
            if self.settings.repair and now >= self._next_repair:
                asked = await self.store.call(repair_pass, self.store, int(now), self.settings)
                self._next_repair = now + self.settings.repair_every_s
                if asked:
                    self.stats.repairs += len(asked)
                    log.info("gap repair: %d gaps asked of their units with resend", len(asked))
            self.stats.failing = ""
            try:
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            except TimeoutError:
                pass

    async def _prune(self, now: float) -> None:
        keep = self.settings.keep_days
        commands, entries = await self.store.call(self.store.prune_commands, int(now) - keep * 86400)
        self._next_prune = now + PRUNE_EVERY_S
        if commands or entries:
            log.info(
                "commands: deleted %d ended commands and %d audit entries older than %d days", commands, entries, keep
            )

    async def _keep_answers(self, client: MqttClient) -> None:
        answers, acks = self._answers, self._acks
        self._answers, self._acks = [], []
        if answers:
            applied = await self.store.call(self.store.answer_commands, answers, int(self.clock()))
            self.stats.answers += sum(applied)
            self.stats.unmatched += len(applied) - sum(applied)
        if acks:
            client.ack(acks)  # only now that the store has them

    async def _publish_due(self, client: MqttClient, now: int) -> None:
        room = min(int(self._budget), BURST)
        if room <= 0:
            return
        due = await self.store.call(self.store.due_commands, now, room)
        if not due:
            return
        self._budget -= len(due)
        codes = await asyncio.gather(*(self._publish(client, c, now) for c in due), return_exceptions=True)
        results = []
        for c, code in zip(due, codes, strict=True):
            if isinstance(code, BaseException):  # the connection went: it stays queued, sent again on the next
                continue
            taken = code != NO_SUBSCRIBERS
            self.stats.published += 1
            self.stats.unheard += not taken
            detail = "" if taken else "no session of the unit at the broker (it never connected with one)"
            results.append((c.id, taken, detail, now + self.settings.retry_s))
        if results:
            await self.store.call(self.store.commands_published, results, now)
        failed = [c for c in codes if isinstance(c, BaseException)]
        if failed:
            raise failed[0]

    async def _publish(self, client: MqttClient, c: CommandRow, now: int) -> int:
        life = c.expires - now
        payload = command_payload(c.id, c.op, json.loads(c.args), c.expires)
        props = request_properties(res_topic(c.unit), c.id.encode(), life)
        return await client.publish(cmd_topic(c.unit), payload, properties=props)

"""The bridge in-process against a real Mosquitto: what it holds while the store is slow."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest

from broker_bridge.bridge import AHEAD, BATCH_BYTES, IN_FLIGHT, Bridge, BrokerTarget
from broker_bridge.mqtt import MQTT5, MQTT311, ConnectionRefused, MqttClient, MqttError
from broker_bridge.telegram import MAX_PAYLOAD, Rules
from kernel.reading import Incoming, Refused, Status
from kernel.timegrid import Grid
from tests.helpers import Mosquitto, at, free_port, publish, telegram

UNITS, ROUNDS, BATCH = 500, 40, 500  # 20,000 telegrams


def target(port: int, client_id: str, version: int = MQTT5) -> BrokerTarget:
    return BrokerTarget(
        nodes=(("127.0.0.1", port),),
        version=version,
        client_id=client_id,
        username=None,
        password=None,
        topic="smame/v1/+/reading",
        session_expiry=60,
        keepalive=30,
        batch_size=BATCH,
        batch_delay=0.05,
        reconnect_min=0.1,
        reconnect_max=1.0,
    )


async def until_acked(bridge: Bridge, n: int, seconds: float) -> None:
    """Wait until the bridge has acknowledged `n` messages (TimeoutError after `seconds`)."""
    async with asyncio.timeout(seconds):
        while bridge.stats.acked < n:
            await asyncio.sleep(0.05)


async def publish_until_held(bridge: Bridge, port: int, messages: list[tuple[str, bytes]]) -> int:
    """Once the running bridge is connected, publish `messages`; return how many it has received once it stops
    taking more (its store stalled)."""
    while not bridge.stats.connected:
        await asyncio.sleep(0.01)
    await asyncio.to_thread(publish, port, messages)
    held = -1
    async with asyncio.timeout(20):
        while held != bridge.stats.received:
            held = bridge.stats.received
            await asyncio.sleep(1.0)
    return held


async def test_a_stalled_store_stops_reading_from_the_broker_and_loses_nothing(broker: Mosquitto) -> None:
    units = {f"BP{u:03d}" for u in range(UNITS)}
    t0 = at("2026-11-20", "00:00")
    messages = [
        (f"smame/v1/{unit}/reading", telegram(unit, [(t0 + timedelta(minutes=30 * k), k)], seq=k))
        for k in range(ROUNDS)
        for unit in sorted(units)
    ]
    disk = asyncio.Event()  # the store answers only once this is set
    committed: list[Incoming] = []
    flying = [0, 0]  # commits under way, and the most at once

    async def commit(incoming: list[Incoming], refused: list[Refused], statuses: list[Status]) -> None:
        flying[0] += 1
        flying[1] = max(flying)
        await disk.wait()
        flying[0] -= 1
        assert not refused
        committed.extend(incoming)

    bridge = Bridge(
        target(broker.port, "test-backpressure"), commit, lambda: units, Rules(Grid("Asia/Tokyo").on_boundary)
    )
    task = asyncio.create_task(bridge.run())
    try:
        held = await publish_until_held(bridge, broker.port, messages)
        # IN_FLIGHT batches committing (the writer prepares the next while the store writes one), AHEAD full
        # ones waiting, and the rest of the last read from the socket: not the whole backlog, which the broker
        # would send (it may have 65,535 messages unacknowledged).
        assert flying == [IN_FLIGHT, IN_FLIGHT]
        assert AHEAD * BATCH < held < (IN_FLIGHT + AHEAD + 1) * BATCH + 2000
        assert bridge.stats.acked == 0
        disk.set()
        await until_acked(bridge, len(messages), 60)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sorted((i.reading.unit, i.reading.at) for i in committed) == sorted(
        (unit, int((t0 + timedelta(minutes=30 * k)).timestamp())) for k in range(ROUNDS) for unit in units
    )


async def test_large_telegrams_cut_a_batch_at_its_bytes_and_a_stalled_store_holds_a_few_batches(
    broker: Mosquitto,
) -> None:
    # Telegrams near the payload limit (an extra field the decoder skips): a batch of `batch_size` of them would
    # hold 8 MB, and the receiving process several such while the store is slow.
    units = {f"BL{u:03d}" for u in range(UNITS)}
    t0 = at("2026-11-20", "00:00")
    pad = b',"pad":"' + b"x" * (MAX_PAYLOAD - 600) + b'"}'
    messages = [
        (f"smame/v1/{unit}/reading", telegram(unit, [(t0 + timedelta(minutes=30 * k), k)], seq=k)[:-1] + pad)
        for k in range(4)
        for unit in sorted(units)
    ]
    size = len(messages[0][1])
    assert BATCH * size > 1.5 * BATCH_BYTES
    disk = asyncio.Event()
    batches: list[tuple[int, int]] = []  # readings and payload bytes of each committed batch

    async def commit(incoming: list[Incoming], refused: list[Refused], statuses: list[Status]) -> None:
        await disk.wait()
        assert not refused
        batches.append((len(incoming), sum(len(i.payload) for i in incoming)))

    bridge = Bridge(target(broker.port, "test-bytes"), commit, lambda: units, Rules(Grid("Asia/Tokyo").on_boundary))
    task = asyncio.create_task(bridge.run())
    try:
        held = await publish_until_held(bridge, broker.port, messages)
        per_batch = -(-BATCH_BYTES // size)  # telegrams that fill a batch's bytes
        assert held < (IN_FLIGHT + AHEAD + 1) * per_batch + 300  # and what was left of the last socket read
        disk.set()
        await until_acked(bridge, len(messages), 60)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sum(n for n, _ in batches) == len(messages)
    assert max(b for _, b in batches) < BATCH_BYTES + size


class _Registry(set[str]):
    """A registry whose look-up fails for one unit: a bug that decoding does not expect."""

    def __contains__(self, unit: object) -> bool:
        if unit == "POISON":
            raise LookupError("registry broken for POISON")
        return super().__contains__(unit)


async def test_a_telegram_that_breaks_decoding_is_quarantined_and_the_rest_go_on(
    broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    t0 = at("2026-11-20", "00:00")
    units = _Registry({"GOOD1", "GOOD2"})
    messages = [
        (f"smame/v1/{unit}/reading", telegram(unit, [(t0 + timedelta(minutes=30 * k), k)], seq=k))
        for k in range(2)
        for unit in ("GOOD1", "POISON", "GOOD2")
    ]
    committed: list[Incoming] = []
    refused: list[Refused] = []

    async def commit(incoming: list[Incoming], rejects: list[Refused], statuses: list[Status]) -> None:
        committed.extend(incoming)
        refused.extend(rejects)

    bridge = Bridge(target(broker.port, "test-internal"), commit, lambda: units, Rules(Grid("Asia/Tokyo").on_boundary))
    task = asyncio.create_task(bridge.run())
    try:
        while not bridge.stats.connected:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(publish, broker.port, messages)
        await until_acked(bridge, len(messages), 20)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sorted((i.reading.unit, i.reading.seq) for i in committed) == [
        ("GOOD1", 0),
        ("GOOD1", 1),
        ("GOOD2", 0),
        ("GOOD2", 1),
    ]
    assert [(r.unit, r.reason, r.detail) for r in refused] == [
        ("POISON", "internal", "LookupError: registry broken for POISON")
    ] * 2
    assert sorted(r.payload for r in refused) == sorted([messages[1][1], messages[4][1]])
    said = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is not None  # once per kind of error, with its traceback


class RefusingBroker:
    """What Mosquitto cannot be made to do (its ACL filters deliveries and grants every subscription), other
    brokers do: refuse a subscription in its SUBACK. This stands in for such a broker's answer alone."""

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse

    async def subscribe(self, topic: str, qos: int = 1, retained: bool = False) -> None:
        if self.refuse:
            raise MqttError(f"broker refused the subscription to {topic!r}: not authorized (0x87)")


async def test_a_refused_status_topic_is_said_until_a_subscription_takes_it() -> None:
    bridge = Bridge(target(1, "test-status"), lambda *a: asyncio.sleep(0), set, Rules(Grid("Asia/Tokyo").on_boundary))
    await bridge._subscribe_status(RefusingBroker(True))  # type: ignore[arg-type]
    said = bridge.stats.status_refused
    assert "not authorized" in said and "the broker's ACL must let smame read smame/v1/+/status" in said
    await bridge._subscribe_status(RefusingBroker(False))  # type: ignore[arg-type]
    assert bridge.stats.status_refused == ""


async def test_over_mqtt_3_1_1_the_bridge_takes_the_next_node_at_once_and_its_session_stays(
    broker: Mosquitto,
) -> None:
    # a cluster of which the first node is dead (nothing listens on its port): ingest moves to the next at once,
    # not after a back-off, and speaks MQTT 3.1.1 there (as to RabbitMQ)
    dead = free_port()
    t = dataclasses.replace(
        target(broker.port, "test-311", MQTT311), nodes=(("127.0.0.1", dead), ("127.0.0.1", broker.port))
    )
    t = dataclasses.replace(t, reconnect_min=5.0, reconnect_max=5.0)
    committed: list[Incoming] = []

    async def commit(incoming: list[Incoming], refused: list[Refused], statuses: list[Status]) -> None:
        committed.extend(incoming)

    t0 = at("2026-11-20", "00:00")
    messages = [
        (f"smame/v1/N{u}/reading", telegram(f"N{u}", [(t0 + timedelta(minutes=30 * k), k)], seq=k))
        for k in range(3)
        for u in range(10)
    ]
    bridge = Bridge(t, commit, lambda: {f"N{u}" for u in range(10)}, Rules(Grid("Asia/Tokyo").on_boundary))
    task = asyncio.create_task(bridge.run())
    try:
        async with asyncio.timeout(3):  # well within the 5 s back-off
            await bridge.subscribed.wait()
        assert bridge.stats.node == f"127.0.0.1:{broker.port}"
        await asyncio.to_thread(publish, broker.port, messages[:10])
        await until_acked(bridge, 10, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await asyncio.to_thread(publish, broker.port, messages[10:])  # queued in its session while it is away
    bridge = Bridge(t, commit, lambda: {f"N{u}" for u in range(10)}, Rules(Grid("Asia/Tokyo").on_boundary))
    task = asyncio.create_task(bridge.run())
    try:
        await until_acked(bridge, 20, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sorted((i.reading.unit, i.reading.seq) for i in committed) == sorted(
        (f"N{u}", k) for k in range(3) for u in range(10)
    )


async def test_over_mqtt_3_1_1_a_refused_login_says_why(workdir: Path) -> None:
    locked = Mosquitto(workdir / "mq", anonymous=False)
    try:
        client = MqttClient(version=MQTT311)
        with pytest.raises(ConnectionRefused, match="not authorized"):
            await client.connect("127.0.0.1", locked.port, "who")
    finally:
        locked.stop()

"""Commands to units over a real Mosquitto: the leader's sender (broker_bridge.devices) against the simulator's
units (simulators.devices), online, away and never seen, with expiry and redelivery."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from aggregator.backends import open_url
from aggregator.store import CommandRow, Store
from broker_bridge.devices import Devices
from broker_bridge.mqtt import CORRELATION_DATA, MESSAGE_EXPIRY, RESPONSE_TOPIC, Message, MqttClient
from kernel.commands import State, cmd_topic
from kernel.settings import DevicesSettings
from simulators.devices import DeviceFleet, UnitDevice
from simulators.publisher import Endpoint
from tests.broker_bridge.test_bridge import target
from tests.helpers import Mosquitto


def queue(store: Store, command_id: str, unit: str, op: str = "ping", args: str = "{}", life: int = 600) -> None:
    now = int(time.time())
    row = CommandRow(command_id, unit, op, args, now, now + life, "test", "here", State.QUEUED, now, now, 0, "", "")
    store.add_commands([row], [])


async def settled(store: Store, command_id: str, states: set[str], seconds: float = 15.0) -> CommandRow:
    """The command once it is in one of `states` (TimeoutError after `seconds`)."""
    async with asyncio.timeout(seconds):
        while True:
            row = store.command(command_id)
            if row is not None and row.state in states:
                return row
            await asyncio.sleep(0.05)


@pytest.fixture
async def leader(broker: Mosquitto, tmp_path: Path) -> AsyncIterator[Callable[[], Store]]:
    """The leader's commands service running on a store of its own; yields a reader of that store."""
    url = f"sqlite:///{tmp_path / 'smame.db'}"
    store = open_url(url)
    devices = Devices(target(broker.port, f"devices-{tmp_path.name}"), store, DevicesSettings(retry_s=1))
    task = asyncio.create_task(devices.run())
    reader = open_url(url)
    yield lambda: reader
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    store.close()
    reader.close()


async def test_commands_reach_units_online_and_away_and_their_answers_are_kept(
    broker: Mosquitto, leader: Callable[[], Store], tmp_path: Path
) -> None:
    store = leader()
    units = [f"DV{tmp_path.name[-6:]}{i}" for i in range(3)]
    devices = [UnitDevice(u) for u in units]
    fleet = DeviceFleet(Endpoint((("127.0.0.1", broker.port),)), devices, time.time)
    await fleet.start()
    try:
        online, away, _ = units
        queue(store, "ping-1", online)
        queue(store, "set-1", online, "set", json.dumps({"interval_min": 15}))
        queue(store, "boot-1", online, "reboot")
        done = await settled(store, "ping-1", {State.DONE})
        assert json.loads(done.answer)["interval_min"] in (15, 30)
        assert json.loads((await settled(store, "set-1", {State.DONE})).answer)["interval_min"] == 15
        assert devices[0].config["interval_min"] == 15
        await settled(store, "boot-1", {State.ACCEPTED})
        assert devices[0].boots == 1

        # a unit away with its session: the broker holds the command, the unit does it when it is back
        await fleet.online(away, False)
        queue(store, "ping-2", away)
        assert (await settled(store, "ping-2", {State.SENT})).tries == 1
        await asyncio.sleep(0.5)
        assert store.command("ping-2").state == State.SENT  # type: ignore[union-attr]
        await fleet.online(away, True)
        await settled(store, "ping-2", {State.DONE})
        assert devices[1].carried_out == {"ping-2": 1}
    finally:
        await fleet.close()


async def test_a_command_lapses_at_its_expiry_and_an_away_unit_never_does_it(
    broker: Mosquitto, leader: Callable[[], Store], tmp_path: Path
) -> None:
    store = leader()
    away, never = f"DX{tmp_path.name[-6:]}0", f"DX{tmp_path.name[-6:]}1"
    device = UnitDevice(away)
    fleet = DeviceFleet(Endpoint((("127.0.0.1", broker.port),)), [device], time.time)
    await fleet.start()
    try:
        await fleet.online(away, False)
        queue(store, "short", away, life=2)
        queue(store, "nobody", never, life=3)  # no session at the broker: queued, tried again, then lapsed
        await settled(store, "short", {State.SENT})
        expired = await settled(store, "short", {State.EXPIRED}, 10)
        assert "expiry" in expired.detail
        nobody = await settled(store, "nobody", {State.EXPIRED}, 10)
        assert nobody.tries >= 2  # published again under the same id while it lived
        await fleet.online(away, True)
        await asyncio.sleep(1.0)
        assert device.carried_out == {}  # the broker dropped it at its expiry
    finally:
        await fleet.close()


async def test_a_command_redelivered_after_a_cut_is_done_once_and_carries_request_response_properties(
    broker: Mosquitto, leader: Callable[[], Store], tmp_path: Path
) -> None:
    store = leader()
    unit = f"DR{tmp_path.name[-6:]}"
    device = UnitDevice(unit)
    # the unit's first life: it takes the command and carries it out, then is cut off before it answers
    first = MqttClient()
    got: list[Message] = []
    first.on_messages = got.extend
    await first.connect("127.0.0.1", broker.port, unit, session_expiry=600)
    await first.subscribe(cmd_topic(unit), qos=1)
    queue(store, "reboot-1", unit, "reboot")
    async with asyncio.timeout(10):
        while not got:
            await asyncio.sleep(0.05)
    props = got[0].properties or {}
    assert props[RESPONSE_TOPIC] == f"smame/v1/{unit}/res".encode()
    assert props[CORRELATION_DATA] == b"reboot-1"
    assert 0 < int(props[MESSAGE_EXPIRY]) <= 600  # type: ignore[call-overload]
    device.handle(got[0].payload, time.time())
    first.close()  # no PUBACK, no answer
    assert device.boots == 1
    fleet = DeviceFleet(Endpoint((("127.0.0.1", broker.port),)), [device], time.time)
    await fleet.start()
    try:
        await settled(store, "reboot-1", {State.ACCEPTED})
        assert device.carried_out == {"reboot-1": 1} and device.boots == 1
    finally:
        await fleet.close()


async def test_a_failing_store_stops_the_commands_for_a_while_not_smame(
    broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("broker_bridge.devices.STORE_RETRY_S", 0.5)
    url = f"sqlite:///{tmp_path / 'smame.db'}"
    store, other = open_url(url), open_url(url)
    other.execute("ALTER TABLE commands RENAME TO commands_away")  # what the service asks for is not there
    devices = Devices(target(broker.port, f"devices-{tmp_path.name}"), store, DevicesSettings())
    task = asyncio.create_task(devices.run())
    unit = f"DF{tmp_path.name[-6:]}"
    fleet = DeviceFleet(Endpoint((("127.0.0.1", broker.port),)), [UnitDevice(unit)], time.time)
    await fleet.start()
    try:
        async with asyncio.timeout(10):
            while "no such table" not in devices.stats.last_error:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        assert not task.done()  # said and tried again, not raised out of the service
        other.execute("ALTER TABLE commands_away RENAME TO commands")
        queue(other, "after", unit)
        await settled(other, "after", {State.DONE})
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await fleet.close()
        store.close()
        other.close()


async def test_hostile_answers_are_counted_or_kept_with_a_note_and_never_hold_up_the_others(
    broker: Mosquitto, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'smame.db'}"
    store, reader = open_url(url), open_url(url)
    devices = Devices(target(broker.port, f"devices-{tmp_path.name}"), store, DevicesSettings())
    task = asyncio.create_task(devices.run())
    unit = f"DH{tmp_path.name[-6:]}"
    liar = MqttClient()
    await liar.connect("127.0.0.1", broker.port, unit, clean_start=True)
    try:
        async with asyncio.timeout(10):
            while not devices.stats.connected:
                await asyncio.sleep(0.05)
        queue(reader, "odd", unit)
        queue(reader, "fine", unit)
        res = f"smame/v1/{unit}/res"
        for payload in (
            b"\xff\xfe not even text",
            b'{"v":1,"id":"odd","status":"done","state":{"a":"\xff"}}',  # not UTF-8 inside an object skipped over
            b'{"v":1,"id":"x' + b"y" * 100 + b'","status":"done"}',
            b'{"v":1,"id":"fine","status":"done","state":{"fw":"2.3.0"}}',
        ):
            await liar.publish(res, payload)
        odd = await settled(reader, "odd", {State.DONE})
        assert "not kept" in odd.answer
        assert json.loads((await settled(reader, "fine", {State.DONE})).answer) == {"fw": "2.3.0"}
        assert devices.stats.refused == {"not_answer": 1, "bad_id": 1} and not task.done()
    finally:
        liar.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        store.close()
        reader.close()


async def test_messages_with_any_properties_a_unit_may_set_arrive_whole(broker: Mosquitto, tmp_path: Path) -> None:
    """The client reads the properties of a message that has any (a command's, or a unit's telegram with its own):
    every property a publisher may set comes through, with the payload intact."""
    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    got: list[Message] = []
    reader = MqttClient(on_messages=got.extend)
    await reader.connect("127.0.0.1", broker.port, f"props-{tmp_path.name}", clean_start=True)
    await reader.subscribe("smame/v1/+/reading", qos=1)
    props = Properties(PacketTypes.PUBLISH)
    props.PayloadFormatIndicator = 1
    props.MessageExpiryInterval = 600
    props.ContentType = "application/json"
    props.ResponseTopic = "smame/v1/P1/res"
    props.CorrelationData = b"\x00\xff"
    props.UserProperty = [("k" * 300, "v" * 300), ("a", "b")]  # a property block longer than one length byte
    unit = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"P1-{tmp_path.name}", protocol=paho.MQTTv5)
    unit.connect("127.0.0.1", broker.port)
    unit.loop_start()
    try:
        unit.publish("smame/v1/P1/reading", b'{"v":1}', qos=1, properties=props).wait_for_publish(10)
        unit.publish("smame/v1/P1/reading", b'{"v":2}', qos=1).wait_for_publish(10)
        async with asyncio.timeout(10):
            while len(got) < 2:
                await asyncio.sleep(0.05)
    finally:
        unit.disconnect()
        unit.loop_stop()
        reader.close()
    assert [m.payload for m in got] == [b'{"v":1}', b'{"v":2}']
    first = got[0].properties or {}
    assert first[RESPONSE_TOPIC] == b"smame/v1/P1/res" and first[CORRELATION_DATA] == b"\x00\xff"
    assert 0 < int(first[MESSAGE_EXPIRY]) <= 600  # type: ignore[call-overload]
    assert got[1].properties is None  # a telegram without any: the fast path


async def test_the_leader_forgets_ended_commands_and_audit_entries_after_devices_keep_days(
    broker: Mosquitto, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'smame.db'}"
    long_ago, now = int(time.time()) - 500 * 86400, int(time.time())
    with open_url(url) as store:
        old = store.queue_commands("ping", "{}", ["U1"], long_ago, long_ago + 60, "cli:alice", "h")
        store.expire_commands(long_ago + 60)
        kept = store.queue_commands("ping", "{}", ["U2"], now - 10 * 86400, now - 9 * 86400, "cli:alice", "h")
        store.expire_commands(now - 9 * 86400)
    store = open_url(url)
    devices = Devices(target(broker.port, f"prune-{tmp_path.name}"), store, DevicesSettings(keep_days=400))
    task = asyncio.create_task(devices.run())
    try:
        with open_url(url) as reader:
            async with asyncio.timeout(10):
                while reader.command(old[0].id) is not None:
                    await asyncio.sleep(0.05)
            assert reader.command(kept[0].id) is not None
            assert [e[4] for e in reader.audit()] == ["command expired", "command ping"]  # the recent ones'
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        store.close()

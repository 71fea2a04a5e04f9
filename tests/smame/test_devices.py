"""Commands from the command line through `smame run` to a simulated unit and back, and a gap refilled by `resend`."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from simulators.devices import DeviceFleet, UnitDevice
from simulators.publisher import Endpoint
from simulators.scenario import Send
from tests.helpers import (
    JST,
    Mosquitto,
    publish,
    readings_in,
    smame,
    smame_env,
    start_smame,
    stop,
    telegram,
    wait_readings,
    write_registry,
    yesterday,
)

T = TypeVar("T")


class Units:
    """Simulated units answering commands, on an event loop of their own beside the test."""

    def __init__(self, port: int, devices: list[UnitDevice]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fleet = self.call(self._make(port, devices))
        self.call(self.fleet.start())

    async def _make(self, port: int, devices: list[UnitDevice]) -> DeviceFleet:
        return DeviceFleet(Endpoint((("127.0.0.1", port),)), devices, time.time)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.call(self.fleet.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Morning:
    """DU1's readings of yesterday from 00:00 to 06:00, 1 kWh each half hour, as its meter's history holds them,
    and what it resends when asked (each range asked noted, with when)."""

    def __init__(self) -> None:
        self.day = yesterday()
        start = datetime.fromisoformat(f"{self.day}T00:00:00+09:00")
        self.readings = [(start + timedelta(minutes=30 * i), 1000 + 10 * i) for i in range(13)]
        self.asked: list[tuple[int, int, float]] = []

    def sent(self, i: int) -> tuple[str, bytes]:
        """The telegram of its i-th reading."""
        return "smame/v1/DU1/reading", telegram("DU1", [self.readings[i]], seq=i)

    def resend(self, frm: int, to: int, now: float) -> list[Send]:
        self.asked.append((frm, to, time.time()))
        held = [r for r in self.readings if frm <= r[0].timestamp() <= to]
        return [Send(now, "DU1", "smame/v1/DU1/reading", telegram("DU1", held, seq=100))]

    def at(self, i: int) -> int:
        return int(self.readings[i][0].timestamp())


@pytest.fixture
def running(broker: Mosquitto, workdir: Path) -> Iterator[dict[str, str]]:
    """`smame run` on the test broker for units DU1 and DU2 (customer C1); yields its environment."""
    write_registry(workdir, {"DU1": "C1", "DU2": "C1"})
    env = smame_env(workdir, broker.port, SMAME_EXPORT__ENABLED="false", SMAME_DEVICES__RETRY_S="1")
    proc = subscribed(env, workdir)
    yield env
    stop(proc)


def subscribed(env: dict[str, str], workdir: Path) -> subprocess.Popen[bytes]:
    """`smame run` started with `env`, once it has subscribed to the telegrams (its log's lines are added to
    those of earlier runs)."""
    log = workdir / "smame.log"
    before = log.read_text(errors="replace").count("subscribed") if log.exists() else 0
    proc = start_smame(env, log)
    deadline = time.monotonic() + 30
    while log.read_text(errors="replace").count("subscribed") <= before:
        assert time.monotonic() < deadline and proc.poll() is None, (workdir / "smame.log").read_text()
        time.sleep(0.1)
    return proc


def test_an_operator_commands_units_from_the_command_line_and_sees_their_answers(
    broker: Mosquitto, running: dict[str, str]
) -> None:
    units = Units(broker.port, [UnitDevice("DU1"), UnitDevice("DU2", fw="2.2.9")])
    try:
        out = smame(["units", "cmd", "ping", "--customer", "C1", "--wait", "20"], running).stdout
        assert out.startswith("2 command(s) ping queued")
        lines = {line.split()[1]: line for line in out.splitlines()[1:]}
        assert " done " in lines["DU1"] and '"fw":"2.3.0"' in lines["DU1"]
        assert " done " in lines["DU2"] and '"fw":"2.2.9"' in lines["DU2"]
        set_out = smame(["units", "cmd", "set", "interval_min=15", "--unit", "DU1", "--wait", "20"], running)
        assert " done " in set_out.stdout and units.fleet.devices["DU1"].config["interval_min"] == 15
        refused = smame(["units", "cmd", "set", "interval_min=7", "--unit", "DU1"], running, check=False)
        assert refused.returncode == 2 and "interval_min 7" in refused.stderr and "Traceback" not in refused.stderr
        unknown = smame(["units", "cmd", "ping", "--unit", "XX9"], running, check=False)
        assert unknown.returncode == 2 and "XX9" in unknown.stderr
        listed = smame(["units", "commands", "--unit", "DU1"], running).stdout.splitlines()
        assert listed[0] == "2 command(s) of DU1" and all(" done " in line for line in listed[1:])
    finally:
        units.close()


def test_a_gap_the_broker_lost_is_refilled_by_resend(broker: Mosquitto, running: dict[str, str], workdir: Path) -> None:
    morning = Morning()
    lost = {4, 5, 6, 7}  # 02:00 .. 03:30 were acknowledged to the unit, then lost with the broker
    publish(broker.port, [morning.sent(i) for i in range(13) if i not in lost])
    db = workdir / "data" / "smame.db"
    wait_readings(db, 13 - len(lost))
    units = Units(broker.port, [UnitDevice("DU1", resend=morning.resend)])
    try:
        asked = ["from=" + morning.readings[3][0].isoformat(), "to=" + morning.readings[8][0].isoformat()]
        out = smame(["units", "cmd", "resend", *asked, "--unit", "DU1", "--wait", "20"], running).stdout
        assert " done " in out and '"telegrams":1' in out
        wait_readings(db, 13)
        assert readings_in(db) == 13
        time.sleep(1.0)  # the commit of the resent readings' slots
        slots = smame(["slots", "--unit", "DU1", "--date", str(morning.day)], running).stdout.splitlines()[2:14]
        assert [line.split()[2:4] for line in slots] == [["1.0", "A"]] * 12
    finally:
        units.close()


def test_a_gap_later_telegrams_did_not_fill_is_asked_for_by_itself_once_and_reported(
    broker: Mosquitto, workdir: Path
) -> None:
    write_registry(workdir, {"DU1": "C1", "DU2": "C1"})
    env = smame_env(
        workdir,
        broker.port,
        SMAME_EXPORT__ENABLED="false",
        SMAME_DEVICES__REPAIR_EVERY_S="1",
        SMAME_DEVICES__REPAIR_AFTER_S="0",
    )
    morning = Morning()
    lost = {4, 5, 6, 7}
    units = Units(broker.port, [UnitDevice("DU1", resend=morning.resend)])
    proc = subscribed(env, workdir)
    try:
        publish(broker.port, [morning.sent(i) for i in range(13) if i not in lost])
        db = workdir / "data" / "smame.db"
        wait_readings(db, 13, timeout=30)  # the lost four come back, asked for by smame
        assert [(frm, to) for frm, to, _ in morning.asked] == [(morning.at(3), morning.at(8))]
        time.sleep(1.5)  # more passes (one a second): the gap is not asked for again
        assert len(morning.asked) == 1
        slots = smame(["slots", "--unit", "DU1", "--date", str(morning.day)], env).stdout.splitlines()[2:14]
        assert [line.split()[2:4] for line in slots] == [["1.0", "A"]] * 12
        listed = smame(["units", "commands", "--unit", "DU1"], env).stdout.splitlines()
        assert len(listed) == 2 and " resend " in listed[1] and " done " in listed[1], listed
        asked_on = datetime.fromtimestamp(morning.asked[0][2], JST).date()  # the report's day is the zone's
        report = smame(["report", "--date", str(asked_on)], env).stdout
        assert "gap repair: 1 gap(s) of 1 unit(s) asked for again with resend (5 half hours); 1 answered; " in report
        assert "5 half hours repaired (actual now), 0 not (yet)" in report
    finally:
        stop(proc)
        units.close()


def test_a_desired_configuration_reaches_the_units_and_who_is_out_of_step_is_shown(
    broker: Mosquitto, workdir: Path
) -> None:
    write_registry(workdir, {"DU1": "C1", "DU2": "C1", "DU3": "C1"})
    env = smame_env(workdir, broker.port, SMAME_EXPORT__ENABLED="false", SMAME_DEVICES__CONFIG_EVERY_S="1")
    devices = [UnitDevice("DU1"), UnitDevice("DU2"), UnitDevice("DU3", fw="2.1.0", cannot_set={"diag_every"})]
    units = Units(broker.port, devices)
    proc = subscribed(env, workdir)
    try:
        units.call(units.fleet.online("DU2", False))  # away, its session kept at the broker
        out = smame(["units", "config", "set", "interval_min=15", "diag_every=2", "--customer", "C1"], env).stdout
        assert out.strip() == 'customer C1: wanted {"diag_every":2,"interval_min":15}'

        def shown() -> str:
            return smame(["units", "config", "show"], env).stdout

        deadline = time.monotonic() + 20
        while devices[0].config["interval_min"] != 15 or "DU3" not in shown() or " rejected " not in shown():
            assert time.monotonic() < deadline, shown()
            time.sleep(0.2)
        assert devices[0].config == {"interval_min": 15, "brokers": [], "diag_every": 2}
        lines = shown().splitlines()
        assert lines[0] == "1 desired configuration(s)" and "customer C1" in lines[1] and "cli:" in lines[1]
        out_of_step = {line.split()[0]: line for line in lines[3:]}
        assert lines[2] == "2 unit(s) out of step" and set(out_of_step) == {"DU2", "DU3"}, lines
        assert "never reported; last set sent" in out_of_step["DU2"]  # with the broker for it
        assert "last set rejected" in out_of_step["DU3"]

        units.call(units.fleet.online("DU2", True))  # back: the broker hands it the set it kept
        deadline = time.monotonic() + 20
        while "1 unit(s) out of step" not in shown():
            assert time.monotonic() < deadline, shown()
            time.sleep(0.2)
        assert devices[1].config["interval_min"] == 15 and devices[1].carried_out.total() == 1
        time.sleep(1.5)  # more passes (one a second): DU3's refusal is not asked again while it stays online
        assert devices[2].carried_out.total() == 1

        refused = smame(["units", "config", "set", "interval_min=7", "--fleet"], env, check=False)
        assert refused.returncode == 2 and "interval_min 7" in refused.stderr
        unknown = smame(["units", "config", "clear", "--group", "attic"], env, check=False)
        assert unknown.returncode == 2 and "group 'attic'" in unknown.stderr
        assert smame(["units", "config", "clear", "--customer", "C1"], env).stdout.strip().endswith("wanted any more")
        assert shown().splitlines()[:2] == ["0 desired configuration(s)", "0 unit(s) out of step"]
    finally:
        stop(proc)
        units.close()


def test_a_broker_killed_with_telegrams_queued_loses_them_and_the_resend_smame_asks_for_rewrites_the_file(
    workdir: Path,
) -> None:
    broker = Mosquitto(workdir / "mq")  # its own, to kill: no persistence, as a broker between autosaves
    write_registry(workdir, {"DU1": "C1"})
    env = smame_env(
        workdir,
        broker.port,
        SMAME_DEVICES__REPAIR_EVERY_S="1",
        SMAME_DEVICES__REPAIR_AFTER_S="0",
        SMAME_BROKER__RECONNECT_MAX_S="1",
    )
    morning = Morning()
    sent = morning.sent
    db = workdir / "data" / "smame.db"
    proc = subscribed(env, workdir)
    units = None
    try:
        publish(broker.port, [sent(i) for i in range(4)])
        wait_readings(db, 4)
        assert stop(proc) == 0  # away: the broker keeps its session and queues for it
        publish(broker.port, [sent(i) for i in range(4, 8)])  # acknowledged to the unit, which forgets them
        broker.proc.kill()  # the broker dies with them queued, before any save
        broker.proc.wait(10)
        broker.start()
        proc = subscribed(env, workdir)
        publish(broker.port, [sent(i) for i in range(8, 13)])
        wait_readings(db, 9)
        units = Units(broker.port, [UnitDevice("DU1", resend=morning.resend)])
        wait_readings(db, 13, timeout=30)  # the four lost come back, asked for by smame
        time.sleep(1.0)  # the commit of the resent readings' slots
        proc.send_signal(signal.SIGHUP)  # the export runs now, as it would at its next half hour
        path = workdir / "data" / "export" / "C1" / f"C1_{morning.day:%Y%m%d}.csv"

        def morning() -> list[list[str]]:
            rows = [line.split(",") for line in path.read_text().splitlines()[1:]] if path.exists() else []
            return [[r[6], r[8]] for r in rows[:12]]

        deadline = time.monotonic() + 30
        while morning() != [["1.0", "A"]] * 12:
            assert time.monotonic() < deadline, morning()
            time.sleep(0.2)
    finally:
        if units is not None:
            units.close()
        stop(proc)
        broker.stop()

"""Hostile input against a real `smame run` and a real Mosquitto: nothing a unit sends stops ingest for the others."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import paho.mqtt.client as paho

from tests.helpers import (
    Mosquitto,
    at,
    publish,
    readings_in,
    smame,
    smame_env,
    start_smame,
    stop,
    telegram,
    wait_log,
    wait_readings,
    wait_until,
    write_registry,
    yesterday,
)

POISON = [
    b'{"x":' + b"[" * 2000 + b"]" * 2000 + b"}",  # RecursionError out of msgspec, before the fix
    telegram("H1", [(at("2026-11-20", "10:00"), 1)]).replace(
        b"2026-11-20T10:00:00+09:00", b"0001-01-01T00:00:00+09:00"
    ),
    telegram("H1", [(at("2026-11-20", "10:00"), 1)]).replace(
        b"2026-11-20T10:00:00+09:00", b"9999-12-31T23:30:00+00:00"
    ),
    telegram("H1", [(at("2026-11-20", "10:00"), 1)]).replace(
        b"2026-11-20T10:00:00+09:00", b"0001-01-02T00:11:01+00:00"
    ),
]


def publish_retained(port: int, topic: str, payload: bytes) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    client.disconnect()  # before loop_stop(), as in tests.helpers.publish
    client.loop_stop()


def test_poison_telegrams_are_quarantined_and_ingest_goes_on(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"H1": "C1", "H2": "C1"})
    env = smame_env(workdir, broker.port)
    log = workdir / "smame.log"
    day = yesterday().isoformat()
    # A retained poison on an unregistered unit's topic, there before smame ever starts: never delivered to it.
    publish_retained(broker.port, "smame/v1/ANY/reading", POISON[0])
    proc = start_smame(env, log)
    try:
        wait_log(log, "subscribed to")
        messages = [("smame/v1/ANY/reading", POISON[0])] + [("smame/v1/H1/reading", p) for p in POISON]
        messages += [("smame/v1/H2/reading", telegram("H2", [(at(day, "10:00"), 5), (at(day, "10:30"), 9)]))]
        publish(broker.port, messages)
        wait_readings(workdir / "data" / "smame.db", 2)
        wait_until(lambda: "5 quarantined" in smame(["quarantine"], env).stdout, 15, every=0.2)
        assert proc.poll() is None, "smame stopped"
        out = smame(["quarantine"], env).stdout
        assert "not_json 2" in out and "too_old 2" in out and "future 1" in out
        assert "Traceback" not in log.read_text()
    finally:
        assert stop(proc) == 0
    # Restarted, it still gets nothing retained: the same five, no more.
    proc = start_smame(env, log)
    try:
        wait_log(log, "subscribed to")
        publish(broker.port, [("smame/v1/H2/reading", telegram("H2", [(at(day, "11:00"), 12)]))])
        wait_readings(workdir / "data" / "smame.db", 3)
    finally:
        assert stop(proc) == 0
    assert "5 quarantined" in smame(["quarantine"], env).stdout
    assert readings_in(workdir / "data" / "smame.db") == 3
    publish_retained(broker.port, "smame/v1/ANY/reading", b"")  # clear it for the tests after this one


class ClosingBroker:
    """A TCP server that answers CONNECT with a CONNACK, then answers SUBSCRIBE with each of `answers` in turn
    (nothing: the connection closes) and closes the connection."""

    def __init__(self, answers: list[bytes]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answers = answers
        self.subscribes = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        for answer in self.answers:
            conn, _ = self.sock.accept()
            with conn:
                conn.recv(65536)  # CONNECT
                conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK: no session, success, no properties
                if conn.recv(65536)[:1] == b"\x82":
                    self.subscribes += 1
                    conn.sendall(answer)
        self.sock.close()


def test_a_connection_closed_or_garbled_during_subscribe_is_a_reconnect(workdir: Path) -> None:
    answers = [b"", b"\x90\x02\x00\x01", b"\x90\x03\x00\x01\x05", b"\x90\x04\x00\x01\x00\xff", b"\xff\xff\xff\xff\xff"]
    fake = ClosingBroker(answers)
    write_registry(workdir, {"H1": "C1"})
    env = smame_env(workdir, fake.port, SMAME_BROKER__RECONNECT_MIN_S="0.1", SMAME_BROKER__RECONNECT_MAX_S="0.2")
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    try:
        wait_until(lambda: fake.subscribes == len(answers), 15, lambda: log.read_text())
        wait_until(lambda: log.read_text().count("unreachable") >= len(answers), 10, lambda: log.read_text())
        assert proc.poll() is None, log.read_text()
    finally:
        assert stop(proc) == 0
    assert "Traceback" not in log.read_text()

"""Ingest throughput: smame's committed telegrams/s beside mosquitto_sub's rate, on the same load, same run.

Method: for each subscriber, a persistent session (MQTT 5, QoS 1) is created, N telegrams from M units
are queued in a private Mosquitto while the subscriber is away, then the subscriber is started and
timed until it has all N (mosquitto_sub: printed; smame: committed to SQLite, WAL, synchronous=FULL,
each PUBACK after its batch's commit). Preloading keeps the publisher's speed out of the figure.

    .venv/bin/python -m bench.ingest --telegrams 200000 --units 10000
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as paho

from tests.helpers import Mosquitto, at, publish, smame_env, telegram, write_registry


def preload_session(port: int, client_id: str) -> None:
    """Create a persistent QoS 1 subscription, then leave, so the broker queues for it."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    props = paho.Properties(paho.PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    r = c.subscribe("smame/v1/+/reading", qos=1)
    time.sleep(0.3)
    assert r[0] == 0
    c.loop_stop()
    c.disconnect()


def fleet(units: int, telegrams: int) -> list[tuple[str, bytes]]:
    t0 = at("2026-11-01", "00:00")
    out = []
    for k in range(telegrams // units + 1):
        for u in range(units):
            if len(out) == telegrams:
                return out
            unit = f"U{u:06d}"
            out.append((f"smame/v1/{unit}/reading",
                        telegram(unit, [(t0 + timedelta(minutes=30 * k), (u * 31 + k * 17) % 10**6, k % 7)], seq=k,
                                 meter=f"SM-{u:06d}")))
    return out




def bench_mosquitto_sub(mq: Mosquitto, messages: list[tuple[str, bytes]]) -> float:
    preload_session(mq.port, "bench-sub")
    publish(mq.port, messages)
    started = time.perf_counter()
    subprocess.run(["mosquitto_sub", "-p", str(mq.port), "-V", "mqttv5", "-q", "1", "-c", "-i", "bench-sub",
                    "-x", "3600", "-t", "smame/v1/+/reading", "-C", str(len(messages))],
                   stdout=subprocess.DEVNULL, check=True, timeout=600)
    return time.perf_counter() - started


def bench_smame(mq: Mosquitto, messages: list[tuple[str, bytes]], units: int, work: Path, batch: int) -> float:
    write_registry(work, {f"U{u:06d}": f"C{u % 20:02d}" for u in range(units)})
    env = smame_env(work, mq.port, SMAME_BROKER__CLIENT_ID="bench-smame", SMAME_BROKER__BATCH_SIZE=str(batch))
    preload_session(mq.port, "bench-smame")
    publish(mq.port, messages)
    db = work / "data" / "smame.db"
    log = work / "smame.log"
    proc = subprocess.Popen([sys.executable, "-m", "smame.cli", "run"], env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    try:
        while "session present" not in log.read_text():  # the queue starts to flow at CONNACK
            if proc.poll() is not None:
                raise RuntimeError(f"smame exited: {log.read_text()}")
            time.sleep(0.002)
        started = time.perf_counter()
        n = 0
        while n < len(messages):
            time.sleep(0.05)
            if proc.poll() is not None:
                raise RuntimeError(f"smame exited: {log.read_text()}")
            try:
                with sqlite3.connect(db, timeout=30) as c:
                    n = c.execute("SELECT count(*) FROM readings").fetchone()[0]
            except sqlite3.OperationalError:
                pass
        return time.perf_counter() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--telegrams", type=int, default=200_000)
    ap.add_argument("--units", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=2000, help="smame broker.batch_size")
    args = ap.parse_args()
    if not shutil.which("mosquitto_sub"):
        sys.exit("mosquitto_sub not found: apt-get install mosquitto-clients")
    messages = fleet(args.units, args.telegrams)
    size = sum(len(p) for _, p in messages) / len(messages)
    with tempfile.TemporaryDirectory(prefix="smame-bench-") as tmp:
        mq = Mosquitto(Path(tmp) / "mq")
        try:
            base = bench_mosquitto_sub(mq, messages)
            ours = bench_smame(mq, messages, args.units, Path(tmp) / "smame", args.batch)
        finally:
            mq.stop()
    n = len(messages)
    print(f"load: {n} telegrams of {size:.0f} bytes from {args.units} units, QoS 1, preloaded in Mosquitto, "
          f"{os.cpu_count()} cores")
    print(f"mosquitto_sub (C, received):          {n / base:10,.0f} telegrams/s  ({base:.2f} s)")
    print(f"smame run (committed, acked):         {n / ours:10,.0f} telegrams/s  ({ours:.2f} s from CONNACK)")
    print(f"ratio smame / mosquitto_sub:          {base / ours:10.2f}")


if __name__ == "__main__":
    main()

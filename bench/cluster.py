"""A clustered broker measured before choosing it (docs/cluster.md): three RabbitMQ nodes (the MQTT plugin, each
persistent session on a quorum queue) and three NATS nodes (the MQTT gateway, its sessions and messages in
JetStream with stream_replicas 3), all on loopback ports of this machine, beside one Mosquitto, in the same run.

For each engine:
- drain: N telegrams from 10,000 units (published beforehand over 40 connections spread on the nodes, MQTT 3.1.1,
  QoS 1) wait in a persistent session; the reference consumer, mosquitto_sub (C, MQTT 3.1.1, acknowledging each
  message on receipt), drains it from another node; timed from its start until it has all N.
- kill: a burst of K telegrams published on two nodes while mosquitto_sub reads on a third; that node is killed
  (-9) a quarter of the way; the consumer starts again on another node. It says how many telegrams the publishers
  had acknowledged, how many the consumer got (once or more), how many are missing, and how long until the
  consumer received again.
- smame (RabbitMQ and Mosquitto): the same backlog drained by `smame run` (committed to SQLite, acknowledged after
  each commit); timed from its CONNACK until it has acknowledged all N, then a live half hour of `--live` units
  (one telegram each, published while it runs) timed from the last PUBACK until smame has committed it (goal: 30 s
  for 100,000).

    .venv/bin/python -m bench.cluster --telegrams 600000 --kill 100000 --live 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from broker_bridge.mqtt import MQTT311, version_for
from simulators.publisher import Endpoint, FleetPublisher
from simulators.scenario import Send
from tests.helpers import (
    Mosquitto,
    acknowledged,
    at,
    free_port,
    preload_session,
    smame_env,
    telegram,
    wait_port,
    write_registry,
)
from tests.rabbitmq import RabbitCluster

TOPIC = "smame/v1/+/reading"
CONNECTIONS = 40  # publishers: each sends fewer than 65,535 messages (NATS: see the kill below and docs/cluster.md)


class NatsCluster:
    """Three nats-server nodes (Debian's 2.9) clustered on loopback, JetStream on, the MQTT gateway on each."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        routes = [free_port() for _ in range(size)]
        self.ports = [free_port() for _ in range(size)]
        self.procs: list[subprocess.Popen[bytes] | None] = []
        self.confs = []
        for i in range(size):
            d = workdir / f"n{i + 1}"
            d.mkdir(parents=True)
            conf = d / "nats.conf"
            conf.write_text(
                f"server_name: n{i + 1}\nlisten: 127.0.0.1:{free_port()}\n"
                f'jetstream {{ store_dir: "{d}" }}\n'
                f"cluster {{ name: smame, listen: 127.0.0.1:{routes[i]}, "
                f"routes: [{', '.join(f'nats://127.0.0.1:{p}' for p in routes)}] }}\n"
                f"mqtt {{ listen: 127.0.0.1:{self.ports[i]}, stream_replicas: {size}, max_ack_pending: 65535 }}\n"
            )
            self.confs.append(conf)
            self.procs.append(None)
            self.start(i)
        for p in self.ports:
            wait_port(p, 30)
        time.sleep(3)  # the JetStream meta leader is elected

    def start(self, i: int) -> None:
        with open(self.confs[i].with_suffix(".log"), "ab") as log:
            self.procs[i] = subprocess.Popen(["nats-server", "-c", str(self.confs[i])], stdout=log, stderr=log)

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)


def loads(units: int, telegrams: int, first_unit: int = 0, after: int = 0) -> list[Send]:
    """`telegrams` from `units` units, a half hour apart per unit from `after` half hours past the first, each with
    a reading and its own seq."""
    t0 = at("2026-11-01", "00:00")
    out = []
    for k in range(after, after + telegrams // units + 1):
        for u in range(first_unit, first_unit + units):
            if len(out) == telegrams:
                return out
            unit = f"U{u:06d}"
            payload = telegram(unit, [(t0 + timedelta(minutes=30 * k), u * 31 % 500_000 + k * 17)], seq=k)
            out.append(Send(0.0, unit, f"smame/v1/{unit}/reading", payload))
    return out


async def publish(nodes: list[int], version: int, sends: list[Send]) -> float:
    """Publish `sends` at QoS 1 over CONNECTIONS connections spread on `nodes`; return when the last was
    acknowledged (perf_counter)."""
    links = []
    for i in range(len(nodes)):
        share = CONNECTIONS // len(nodes)
        # client ids of their own on each node: a cluster knows each id once and drops the older connection
        endpoint = Endpoint((("127.0.0.1", nodes[i]),), version=version)
        links.append(FleetPublisher(endpoint, share, 200, [], name=f"bench-{i}"))
    for pub in links:
        await pub.start()
    for n, s in enumerate(sends):
        links[n % len(links)].put(s)
    for pub in links:
        await pub.close()
    return time.perf_counter()


def subscribe(port: int, client_id: str) -> None:
    """Create `client_id`'s persistent QoS 1 subscription, then leave (mosquitto_sub -E)."""
    subprocess.run(
        ["mosquitto_sub", "-V", "311", "-p", str(port), "-c", "-i", client_id, "-q", "1", "-t", TOPIC, "-E"],
        check=True,
        timeout=60,
    )


def consumer(port: int, client_id: str, out: Path, count: int | None = None) -> subprocess.Popen[bytes]:
    """mosquitto_sub resuming `client_id`'s session, printing each telegram (up to `count`)."""
    limit = ["-C", str(count)] if count else []
    return subprocess.Popen(
        ["mosquitto_sub", "-V", "311", "-p", str(port), "-c", "-i", client_id, "-q", "1", "-t", TOPIC, *limit],
        stdout=open(out, "ab"),
        stderr=subprocess.DEVNULL,
    )


def lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def drain(ports: list[int], version: int, n: int, work: Path) -> float:
    """Telegrams/s mosquitto_sub drains from a backlog of `n` on the last node (published on the others)."""
    subscribe(ports[-1], "ref-drain")
    asyncio.run(publish(ports[:-1] or ports, version, loads(10_000, n)))
    out = work / "drain.out"
    started = time.perf_counter()
    sub = consumer(ports[-1], "ref-drain", out, n)
    if sub.wait(600):
        raise RuntimeError(f"mosquitto_sub failed after {lines(out)} of {n}")
    return n / (time.perf_counter() - started)


def kill(ports: list[int], version: int, n: int, work: Path, kill_node: Callable[[int], None]) -> str:
    """A burst of `n` on nodes 0 and 1, read on node 2, node 2 killed a quarter of the way."""
    subscribe(ports[2], "ref-kill")
    out = work / "kill.out"
    sub = consumer(ports[2], "ref-kill", out)

    async def burst() -> float:
        task = asyncio.create_task(publish(ports[:2], version, loads(10_000, n, first_unit=20_000)))
        while lines(out) < n // 4:
            if task.done():
                break
            await asyncio.sleep(0.01)
        kill_node(2)
        killed = time.perf_counter()
        sub.kill()
        got = lines(out)
        again = consumer(ports[0], "ref-kill", out)
        while lines(out) == got and time.perf_counter() - killed < 60:
            await asyncio.sleep(0.01)
        resumed = time.perf_counter() - killed
        await task
        deadline = time.monotonic() + 60
        while lines(out) < n and time.monotonic() < deadline:  # until all came, or nothing more for a minute
            before = lines(out)
            await asyncio.sleep(5)
            if lines(out) == before:
                break
        again.kill()
        return resumed

    resumed = asyncio.run(burst())
    seqs = []
    for line in open(out, "rb"):
        try:
            t = json.loads(line)
            seqs.append((t["unit"], t["seq"]))
        except (ValueError, KeyError):
            pass
    unique = len(set(seqs))
    return (
        f"{n:,} acknowledged to the publishers; the consumer got {unique:,} ({len(seqs) - unique:,} twice), "
        f"{n - unique:,} missing; received again {resumed:.1f} s after the kill"
    )


def smame_drain(url: str, kind: str, n: int, live: int, work: Path) -> tuple[float, float]:
    """`smame run` against the broker at `url`: telegrams/s it commits of a backlog of `n` from its CONNACK, and the
    seconds from the last PUBACK of a live half hour of `live` units until it has committed them."""
    write_registry(work, {f"U{u:06d}": f"C{u % 200:03d}" for u in range(max(10_000, live))})
    metrics = free_port()
    env = smame_env(
        work,
        0,
        SMAME_BROKER__URL=url,
        SMAME_BROKER__KIND=kind,
        SMAME_MONITORING__ENABLED="true",
        SMAME_MONITORING__METRICS_PORT=str(metrics),
    )
    ports = [int(p.rsplit(":", 1)[1]) for p in url.split(",")]
    version = version_for(kind)
    if kind == "rabbitmq":
        subscribe(ports[0], env["SMAME_BROKER__CLIENT_ID"])
    else:  # MQTT 5: the session must outlive the connection
        preload_session(ports[0], env["SMAME_BROKER__CLIENT_ID"])
    asyncio.run(publish(ports, version, loads(10_000, n)))
    log = work / "smame.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "smame.cli", "run"], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT
    )
    try:
        while "connected to" not in log.read_text():
            time.sleep(0.005)
        connack = time.perf_counter()
        wait_acked(metrics, n, proc, log)
        rate = n / (time.perf_counter() - connack)
        last = asyncio.run(publish(ports, version, loads(live, live, after=n // 10_000 + 1)))
        wait_acked(metrics, n + live, proc, log)
        return rate, time.perf_counter() - last
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def wait_acked(metrics: int, count: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    while acknowledged(metrics) < count:
        if proc.poll() is not None:
            raise RuntimeError(f"smame exited: {log.read_text()[-3000:]}")
        time.sleep(0.02)


def said(rate: float, lag: float, live: int) -> None:
    """Print smame's drain rate and how long after its last PUBACK a live half hour was committed."""
    print(
        f"                    smame drains        {rate:9,.0f} telegrams/s; a live half hour of {live:,} committed "
        f"{lag:.1f} s after its last PUBACK"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--telegrams", type=int, default=600_000, help="the backlog drained")
    ap.add_argument("--kill", type=int, default=100_000, help="the burst during which a node is killed")
    ap.add_argument("--live", type=int, default=100_000, help="units in the live half hour smame commits")
    ap.add_argument("--engines", default="mosquitto,rabbitmq,nats")
    args = ap.parse_args()
    engines = args.engines.split(",")
    print(f"{os.cpu_count()} cores; drain of {args.telegrams:,} telegrams from 10,000 units, kill during {args.kill:,}")
    with tempfile.TemporaryDirectory(prefix="smame-cluster-", dir=os.environ.get("SMAME_BENCH_DIR")) as tmp:
        work = Path(tmp)
        if "mosquitto" in engines:
            mq = Mosquitto(work / "mq")
            try:
                rate = drain([mq.port], MQTT311, args.telegrams, work / "mq")
                print(f"mosquitto, 1 node:  mosquitto_sub drains {rate:9,.0f} telegrams/s")
                said(
                    *smame_drain(f"mqtt://127.0.0.1:{mq.port}", "mosquitto", args.telegrams, args.live, work), args.live
                )
            finally:
                mq.stop()
        if "rabbitmq" in engines:
            rabbit = RabbitCluster(work / "rabbit")
            try:
                ports = [n.mqtt_port for n in rabbit.nodes]
                rate = drain(ports, MQTT311, args.telegrams, work)
                print(f"rabbitmq, 3 nodes:  mosquitto_sub drains {rate:9,.0f} telegrams/s")
                print(
                    "                    kill -9 of the consumer's node: "
                    + kill(ports, MQTT311, args.kill, work, lambda i: rabbit.nodes[i].kill())
                )
                rabbit.nodes[2].start()
                rabbit.nodes[2].wait()
                rabbit.wait_clustered()
                (work / "smame").mkdir()
                said(*smame_drain(rabbit.url, "rabbitmq", args.telegrams, args.live, work / "smame"), args.live)
            finally:
                rabbit.close()
        if "nats" in engines:
            nats = NatsCluster(work / "nats")
            try:
                rate = drain(nats.ports, MQTT311, args.telegrams, work)
                print(f"nats, 3 nodes:      mosquitto_sub drains {rate:9,.0f} telegrams/s")
                print(
                    "                    kill -9 of the consumer's node: "
                    + kill(nats.ports, MQTT311, args.kill, work, nats.kill)
                )
            finally:
                nats.close()


if __name__ == "__main__":
    main()

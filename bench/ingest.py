"""Ingest throughput: smame's committed telegrams/s beside mosquitto_sub's rate, on the same load, same run.

Three methods, each run for both subscribers against a private Mosquitto:
- live (the issue's and the design notes' method): the subscriber is connected (smame with its start-up
  work done), then publisher processes (bench.publisher, QoS 1) send N telegrams from M units; timed from
  the first publish until the subscriber has all N. Publishers, broker and subscriber share the machine.
- drain: N telegrams are queued in the subscriber's persistent session while it is away, then it is
  started and timed from CONNACK until it has all N: a restart after an outage, with no publisher running
  (smame's start-up work, the first export and the catch-up report, runs meanwhile).
- restart: the same backlog, timed from the moment the process is started until it has all N, with the
  daily report due: what an operator waits for after an outage. It also says how long smame took to
  connect after its start (from its own log line), its rate once connected, and each process's CPU.
With --campaign compare, each method runs without and with a firmware campaign over every unit, started before
smame at the commands' full rate with its units away (the leader moves it on and publishes its fw commands at
devices.rate_per_s), compared by their medians; each run says how many fw commands went out meanwhile. In live
the campaign runs throughout; in drain and restart the commands' service starts only once ingest has
subscribed, after the backlog (by design), so the runs show what its start costs the drain's end.
With --days D, smame's store holds D days of every unit's history before the backlog in drain and restart
(written first, not timed): a store in service, as after a real outage; the default is an empty store.
mosquitto_sub only receives and prints; smame runs every service of a deployment, and ingest decodes,
validates, commits to SQLite (WAL, synchronous=FULL) in its writer process and sends each PUBACK after its
batch's commit. With --storage postgresql://... smame's store is that database instead (each run in a
schema of its own, dropped at the end), commits durable as the server's synchronous_commit says.

    .venv/bin/python -m bench.ingest --telegrams 200000 --units 10000 [--method restart] [--days 10] \\
        [--storage postgresql://...]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import psycopg

from aggregator.backends import open_url
from aggregator.campaigns import create_campaign
from bench.history import prefill
from broker_bridge.telegram import Rules, decode
from kernel.firmware import check_plan
from kernel.registry import load_registry
from kernel.settings import BrokerSettings
from kernel.timegrid import Grid
from tests.databases import schema_url
from tests.helpers import (
    Mosquitto,
    acknowledged,
    at,
    children,
    free_port,
    preload_session,
    process_name,
    publish,
    scrape,
    smame_env,
    telegram,
    wait_until,
    write_registry,
)


def fleet(units: int, telegrams: int, diag: bool = False) -> list[tuple[str, bytes]]:
    """The load: `telegrams` from `units`, a half hour apart per unit; with `diag`, each carries the unit's
    diagnostics, every field (health.md), as a unit that sends them every telegram would."""
    t0 = at("2026-11-01", "00:00")
    out = []
    for k in range(telegrams // units + 1):
        for u in range(units):
            if len(out) == telegrams:
                return out
            unit = f"U{u:06d}"
            out.append(
                (
                    f"smame/v1/{unit}/reading",
                    telegram(
                        unit,
                        # both registers grow, as a fleet's do (one unit in five exports solar power)
                        [(t0 + timedelta(minutes=30 * k), u * 31 % 500_000 + k * 17, (u % 5 == 0) * k * 3)],
                        seq=k,
                        meter=f"SM-{u:06d}",
                        diag=_diag(u, k) if diag else None,
                    ),
                )
            )
    return out


def _diag(u: int, k: int) -> dict[str, object]:
    return {
        "fw": f"2.{u % 3}.0",
        "rsrp": -75 - (u * 7 + k) % 40,
        "rsrq": -3 - ((u + k) % 150) / 10,
        "sinr": ((u * 13 + k) % 300) / 10 - 5,
        "ce": u % 3,
        "cell": f"44010-{u % 97:04x}",
        "boot": u % 50,
        "up": k * 1800 + u,
        "vsup": 3300 - u % 200,
        "att": k % 2,
    }


class Publishers:
    """Publisher processes with their share of the load encoded, waiting for the word."""

    def __init__(self, port: int, telegrams: int, units: int, parts: int) -> None:
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.publisher",
                    "--port",
                    str(port),
                    "--telegrams",
                    str(telegrams),
                    "--units",
                    str(units),
                    "--part",
                    str(i),
                    "--parts",
                    str(parts),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(parts)
        ]
        for p in self.procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"

    def go(self) -> float:
        started = time.perf_counter()
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        return started

    def wait(self) -> None:
        for p in self.procs:
            p.wait(600)


def live_mosquitto_sub(mq: Mosquitto, n: int, units: int, parts: int) -> float:
    sub = subprocess.Popen(
        [
            "mosquitto_sub",
            "-p",
            str(mq.port),
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-i",
            "bench-live-sub",
            "-t",
            "smame/v1/+/reading",
            "-C",
            str(n),
        ],
        stdout=subprocess.DEVNULL,
    )
    publishers = Publishers(mq.port, n, units, parts)  # encoding takes longer than subscribing
    started = publishers.go()
    sub.wait(600)
    took = time.perf_counter() - started
    publishers.wait()
    return took


def live_smame(
    mq: Mosquitto, n: int, units: int, work: Path, batch: int, parts: int, storage: str | None, campaign: bool = False
) -> float:
    # A running service: the load starts once the start-up work (the first export run, the catch-up report of
    # yesterday for 10,000 units) is done, as it is long before a fleet's next half hour in operation.
    url = store_url(work, storage)
    if campaign:
        start_campaign(url, work, units)
    extra = {"SMAME_DEVICES__FIRMWARE_URL": "http://127.0.0.1:9"} if campaign else {}
    proc, metrics = start_bench_smame(
        mq, units, work, batch, "bench-live-smame", url, ("subscribed to", "daily report for"), **extra
    )
    try:
        # The export logs a run only when it writes or deletes files, which it may not on an empty store.
        wait_until(lambda: scrape(metrics).get("smame_export_last_success_timestamp_seconds", 0) > 0, 300)
        publishers = Publishers(mq.port, n, units, parts)
        before = campaign_sent(url) if campaign else 0
        started = publishers.go()
        wait_committed(proc, metrics, n, work / "smame.log")
        took = time.perf_counter() - started
        if campaign:
            sent = campaign_sent(url) - before
            print(f"  the campaign meanwhile: {sent} fw commands published ({sent / took:.0f} a second)")
        publishers.wait()
        return took
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def store_url(work: Path, storage: str | None) -> str:
    """The store of one smame run: an SQLite file in its directory, or an empty schema of its own in the
    PostgreSQL database `storage` (dropped by `drop_schemas`)."""
    if storage is None:
        return f"sqlite:///{work / 'data' / 'smame.db'}"
    schema = f"bench_{work.name.replace('-', '_')}_{os.getpid()}"
    with psycopg.connect(storage, autocommit=True) as c:
        c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        c.execute(f"CREATE SCHEMA {schema}")
    return schema_url(storage, schema)


def drop_schemas(storage: str) -> None:
    """Drop the schemas this run of the benchmark made."""
    with psycopg.connect(storage, autocommit=True) as c:
        for (schema,) in c.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (f"bench\\_%\\_{os.getpid()}",)
        ).fetchall():
            c.execute(f"DROP SCHEMA {schema} CASCADE")


def store_in_service(work: Path, storage: str | None, messages: list[tuple[str, bytes]], units: int, days: int) -> str:
    """The store of one smame run (`store_url`), holding `days` of history of each unit before its first
    telegram in `messages` (`bench.history`): what a restart after an outage commits into."""
    url = store_url(work, storage)
    if days:
        known = {f"U{u:06d}" for u in range(units)}
        rules, now = Rules(Grid("Asia/Tokyo").on_boundary), int(time.time())  # smame_env's zone
        # the fleet's first round holds each unit's first telegram
        first = [r for topic, payload in messages[:units] for r in decode(topic, payload, now, known, rules).readings]
        started = time.perf_counter()
        with open_url(url) as store:
            prefill(store, first, days)
        print(f"  ({days} days of {len(first)} units' history stored first, in {time.perf_counter() - started:.0f} s)")
    return url


def registry_of(work: Path, units: int) -> None:
    """The bench fleet's units.csv and customers.toml in `work`."""
    work.mkdir(parents=True, exist_ok=True)
    write_registry(work, {f"U{u:06d}": f"C{u % 20:02d}" for u in range(units)})


def start_campaign(url: str, work: Path, units: int) -> None:
    """A firmware campaign over every unit, running at the commands' full rate (100 a second) from the start."""
    registry_of(work, units)
    image = random.Random(1).randbytes(64 * 1024)
    registry = load_registry(work / "units.csv", work / "customers.toml")
    with open_url(url) as store:
        store.add_firmware("9.9.9", hashlib.sha256(image).hexdigest(), image, int(time.time()), "bench", "")
        plan = check_plan([], 6000, 3600, 0.5, 1000)
        every = {"units": [f"U{u:06d}" for u in range(units)]}
        create_campaign(store, registry, "9.9.9", every, plan, int(time.time()), "bench", "")


def campaign_sent(url: str) -> int:
    """How many times the campaign's fw commands were published so far."""
    with open_url(url) as store:
        return int(store.execute("SELECT coalesce(sum(tries), 0) FROM commands WHERE op = 'fw'").fetchone()[0])


def start_bench_smame(
    mq: Mosquitto,
    units: int,
    work: Path,
    batch: int,
    client_id: str,
    url: str,
    ready: tuple[str, ...] = ("subscribed to",),
    **extra: str,
) -> tuple[subprocess.Popen[bytes], int]:
    """`smame run` on the store at `url` with every service of a deployment on; returns once the log has each
    `ready` line, with the port of its metrics."""
    port = free_port()  # its metrics: how far it has got
    registry_of(work, units)
    # The daily report is due at start, so that its catch-up happens at a known time, not in some runs only.
    env = smame_env(
        work,
        mq.port,
        SMAME_BROKER__CLIENT_ID=client_id,
        SMAME_BROKER__BATCH_SIZE=str(batch),
        SMAME_REPORT__AT="00:00",
        SMAME_STORAGE__URL=url,
        SMAME_MONITORING__ENABLED="true",
        SMAME_MONITORING__HOST="127.0.0.1",
        SMAME_MONITORING__METRICS_PORT=str(port),
        SMAME_WEB__ENABLED="true",  # as deployed: the API and the console beside ingest
        SMAME_WEB__PORT=str(free_port()),
        **extra,
    )
    log = work / "smame.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "smame.cli", "run"], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while not all(line in log.read_text() for line in ready):
        if proc.poll() is not None:
            raise RuntimeError(f"smame exited: {log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            missing = [line for line in ready if line not in log.read_text()]
            raise RuntimeError(f"smame's log has no {missing} after 300 s: {log}")
        time.sleep(0.002)
    return proc, port


def wait_committed(proc: subprocess.Popen[bytes], port: int, n: int, log: Path) -> None:
    """Until smame's metrics (on `port`) say it has committed and acknowledged `n` telegrams: a scrape costs
    smame little, where counting the stored rows would cost the database a scan of a growing table."""
    done = 0.0
    while done < n:
        time.sleep(0.05)
        if proc.poll() is not None:
            raise RuntimeError(f"smame exited: {log.read_text()}")
        try:
            done = acknowledged(port)
        except OSError:  # not listening yet
            pass


def bench_mosquitto_sub(mq: Mosquitto, messages: list[tuple[str, bytes]]) -> float:
    preload_session(mq.port, "bench-sub")
    publish(mq.port, messages)
    started = time.perf_counter()
    subprocess.run(
        [
            "mosquitto_sub",
            "-p",
            str(mq.port),
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-c",
            "-i",
            "bench-sub",
            "-x",
            "3600",
            "-t",
            "smame/v1/+/reading",
            "-C",
            str(len(messages)),
        ],
        stdout=subprocess.DEVNULL,
        check=True,
        timeout=600,
    )
    return time.perf_counter() - started


@dataclass(frozen=True)
class Backlog:
    """What smame drains in the drain and restart methods: `messages` queued in its session on `mq`'s broker,
    from `units` units, with smame's work directory, batch size, store (None: SQLite) and days of history."""

    mq: Mosquitto
    messages: list[tuple[str, bytes]]
    units: int
    work: Path
    batch: int
    storage: str | None
    days: int
    campaign: bool = False

    def queue(self, client_id: str) -> str:
        """Make smame's store (`store_in_service`), with a campaign running if asked, and queue the messages in
        `client_id`'s session; its URL."""
        url = store_in_service(self.work, self.storage, self.messages, self.units, self.days)
        if self.campaign:
            start_campaign(url, self.work, self.units)
        preload_session(self.mq.port, client_id)
        publish(self.mq.port, self.messages)
        return url

    def start(self, client_id: str, url: str, ready: tuple[str, ...]) -> tuple[subprocess.Popen[bytes], int]:
        """`start_bench_smame` on this backlog's session and store (and campaign)."""
        extra = {"SMAME_DEVICES__FIRMWARE_URL": "http://127.0.0.1:9"} if self.campaign else {}
        return start_bench_smame(self.mq, self.units, self.work, self.batch, client_id, url, ready, **extra)


def bench_smame(backlog: Backlog) -> tuple[float, float]:
    """Seconds from CONNACK to every telegram committed, and the CPU seconds that smame's processes and the
    broker spent meanwhile: the drain's own cost, without smame's start-up."""
    url = backlog.queue("bench-smame")
    # the queue starts to flow at CONNACK
    proc, metrics = backlog.start("bench-smame", url, ready=("session present",))
    try:
        started = time.perf_counter()
        cpu = drain_cpu(proc, backlog.mq)
        wait_committed(proc, metrics, len(backlog.messages), backlog.work / "smame.log")
        took = time.perf_counter() - started
        cpu = drain_cpu(proc, backlog.mq) - cpu
        if backlog.campaign:  # none by design: the commands' service starts once ingest has subscribed
            sent = campaign_sent(url)
            print(f"  the campaign meanwhile: {sent} fw commands published ({sent / took:.0f} a second)")
        return took, cpu
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds() -> float:
    """CPU time used so far by every PostgreSQL server process on this machine (0 without one)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and process_name(int(entry.name)).startswith("postgres"):
            try:
                total += cpu_seconds(int(entry.name))
            except OSError:  # gone meanwhile
                pass
    return total


def drain_cpu(proc: subprocess.Popen[bytes], mq: Mosquitto) -> float:
    """CPU seconds used so far by smame's processes and the broker."""
    return cpu_seconds(proc.pid) + sum(cpu_seconds(c) for c in children(proc.pid)) + cpu_seconds(mq.proc.pid)


def restart_smame(backlog: Backlog) -> tuple[float, float, dict[str, float]]:
    """Seconds from process start to connected (CONNACK: the session's backlog starts to flow), and to every
    telegram committed; and the CPU seconds each process spent meanwhile (smame's by process name)."""
    mq, messages, work, storage = backlog.mq, backlog.messages, backlog.work, backlog.storage
    url = backlog.queue("bench-restart-smame")
    broker_before, server_before = cpu_seconds(mq.proc.pid), server_cpu_seconds()
    started_wall, started = time.time(), time.perf_counter()
    proc, metrics = backlog.start("bench-restart-smame", url, ready=())
    try:
        wait_committed(proc, metrics, len(messages), work / "smame.log")
        took = time.perf_counter() - started
        cpu: dict[str, float] = {"mosquitto": cpu_seconds(mq.proc.pid) - broker_before, "smame": cpu_seconds(proc.pid)}
        for child in children(proc.pid):
            name = process_name(child) or "other"
            cpu[name] = cpu.get(name, 0.0) + cpu_seconds(child)
        if storage is not None:
            cpu["postgres (all server processes)"] = server_cpu_seconds() - server_before
        line = next(x for x in (work / "smame.log").read_text().splitlines() if "session present" in x)
        connected = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() - started_wall
        return connected, took, cpu
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


DEFAULT_BATCH: int = BrokerSettings.model_fields["batch_size"].default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--telegrams", type=int, default=200_000)
    ap.add_argument("--units", type=int, default=10_000)
    ap.add_argument(
        "--batch", type=int, default=DEFAULT_BATCH, help=f"smame broker.batch_size (its default: {DEFAULT_BATCH})"
    )
    ap.add_argument("--publishers", type=int, default=2, help="publisher processes in the live method")
    ap.add_argument(
        "--method", choices=["live", "drain", "restart", "both"], default="both", help="both: live and drain"
    )
    ap.add_argument(
        "--storage", metavar="URL", help="postgresql://... : smame's store in that database (default: SQLite)"
    )
    ap.add_argument(
        "--diag",
        choices=["none", "every", "compare"],
        default="none",
        help="a unit's diag in every telegram (every), or the same methods run without and with, and compared",
    )
    ap.add_argument(
        "--campaign",
        choices=["none", "compare"],
        default="none",
        help="drain and restart without and with a firmware campaign running over every unit, compared",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --diag or --campaign compare: rounds of both loads, their order swapped each round (the first "
        "run of a process is slower), compared by their medians",
    )
    ap.add_argument(
        "--days",
        type=int,
        default=0,
        help="drain and restart: days of every unit's history in smame's store before the backlog (default: empty)",
    )
    args = ap.parse_args()
    if args.days < 0:
        sys.exit("--days: give 0 or more")
    if args.storage and not args.storage.startswith(("postgresql://", "postgres://")):
        sys.exit("--storage: give a postgresql:// URL (SQLite is the default)")
    if not shutil.which("mosquitto_sub"):
        sys.exit("mosquitto_sub not found: apt-get install mosquitto-clients")
    print(f"store: {'PostgreSQL ' + args.storage if args.storage else 'SQLite'}, {os.cpu_count()} cores")
    if args.diag == "compare" and args.campaign == "compare":
        sys.exit("--diag compare and --campaign compare: one comparison at a time")
    compared = "diag" if args.diag == "compare" else "campaign" if args.campaign == "compare" else ""
    if compared:
        loads = [d for r in range(max(1, args.rounds)) for d in ((False, True) if r % 2 == 0 else (True, False))]
    else:
        loads = [args.diag == "every"]
    results: dict[bool, list[dict[str, tuple[float, float]]]] = {False: [], True: []}
    try:
        for on in loads:
            diag = on if compared == "diag" else args.diag == "every"
            campaign = on and compared == "campaign"
            messages = fleet(args.units, args.telegrams, diag)
            size = sum(len(p) for _, p in messages) / len(messages)
            what = "each with a diag" if diag else "without diag"
            running = ", a firmware campaign running over every unit" if campaign else ""
            print(
                f"load: {len(messages)} telegrams of {size:.0f} bytes from {args.units} units, QoS 1, {what}{running}"
            )
            results[on].append(run_methods(args, messages, campaign))
    finally:
        if args.storage:
            drop_schemas(args.storage)
    if results[False] and results[True]:
        rounds = len(results[True])
        against = "diag in every telegram against none" if compared == "diag" else "a campaign running against none"
        print(f"{against}, same run, {rounds} round(s) each, medians (smame's with / without; 1.05 is 5% slower):")
        for method in results[False][0]:
            with_ = statistics.median(r[method][1] for r in results[True])
            without = statistics.median(r[method][1] for r in results[False])
            print(f"  {method:<10} {with_ / without:6.3f}")


def run_methods(
    args: argparse.Namespace, messages: list[tuple[str, bytes]], campaign: bool = False
) -> dict[str, tuple[float, float]]:
    """Run the methods asked for; return each one's seconds (mosquitto_sub's, smame's)."""
    n = len(messages)
    out: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="smame-bench-") as tmp:
        if args.method in ("live", "both"):
            mq = Mosquitto(Path(tmp) / "mq-live")
            try:
                base = live_mosquitto_sub(mq, n, args.units, args.publishers)
                ours = live_smame(
                    mq, n, args.units, Path(tmp) / "smame-live", args.batch, args.publishers, args.storage, campaign
                )
            finally:
                mq.stop()
            print(f"live, {args.publishers} publisher processes running alongside:")
            report(n, base, ours, "from the first publish")
            out["live"] = (base, ours)
        if args.method in ("drain", "both"):
            mq = Mosquitto(Path(tmp) / "mq-drain")
            try:
                base = bench_mosquitto_sub(mq, messages)
                ours, cpu = bench_smame(
                    Backlog(
                        mq,
                        messages,
                        args.units,
                        Path(tmp) / "smame-drain",
                        args.batch,
                        args.storage,
                        args.days,
                        campaign,
                    )
                )
            finally:
                mq.stop()
            print("drain, preloaded in the subscriber's session (a restart after an outage), no publisher running:")
            report(n, base, ours, "from CONNACK")
            print(f"  CPU per telegram from CONNACK (smame's processes and the broker): {cpu / n * 1e6:.1f} us")
            out["drain"] = (base, ours)
            out["drain cpu"] = (0.0, cpu)
        if args.method == "restart":
            mq = Mosquitto(Path(tmp) / "mq-restart")
            try:
                base = bench_mosquitto_sub(mq, messages)  # its start is instant: the drain is the restart
                subscribed, ours, cpu = restart_smame(
                    Backlog(
                        mq,
                        messages,
                        args.units,
                        Path(tmp) / "smame-restart",
                        args.batch,
                        args.storage,
                        args.days,
                        campaign,
                    )
                )
            finally:
                mq.stop()
            print("restart with the backlog in the session, timed from process start (the daily report due):")
            report(n, base, ours, "from process start")
            print(f"  smame connected (CONNACK) after:    {subscribed:10.2f} s from process start")
            drained = ours - subscribed
            print(f"  smame once connected:               {n / drained:10,.0f} telegrams/s  ({drained:.2f} s)")
            print(f"  ratio once connected:               {base / drained:10.2f}")
            print("  CPU per telegram, by process (from /proc; start-up included):")
            for name, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]):
                print(f"    {name:<32} {seconds / n * 1e6:8.1f} us  ({seconds:.2f} s)")
            out["restart"] = (base, ours)
            out["cpu"] = (0.0, sum(cpu.values()))
    return out


def report(n: int, base: float, ours: float, since: str) -> None:
    print(f"  mosquitto_sub (C, received):        {n / base:10,.0f} telegrams/s  ({base:.2f} s)")
    print(f"  smame run (committed, acked):       {n / ours:10,.0f} telegrams/s  ({ours:.2f} s {since})")
    print(f"  ratio smame / mosquitto_sub:        {base / ours:10.2f}")


if __name__ == "__main__":
    main()

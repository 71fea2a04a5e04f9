"""A fleet at scale: the simulator's fleet of N units against `smame run`, beside the same with 1,000 units.

For each size: the registry of the simulator's fleet, a store holding `--days` days of every unit's slots
(and each unit's first reading), then `smame run` with every service on (export, the daily report due at
start, the monitor, metrics). Printed, from smame's own log: how long after its start it subscribed, the
time its first export run took (it rewrites the store's newest day for every customer: a day's files), the
daily report's and the units' health pass's. Once its start-up work is done, the fleet sends one half
hour's readings (each unit's first live reading, which the store has no neighbour for), then the next half
hour, the burst that is timed: from the broker's acknowledgement of its last telegram until smame has
committed and acknowledged every one (its `smame_telegrams_acknowledged` counter, from /metrics); what
smame logged during each burst is printed with it. Then the resident memory of smame and its children
(writer, export workers), now and at their peak (Linux /proc: VmRSS, VmHWM).

    .venv/bin/python -m bench.scale --units 100000 --days 45
    .venv/bin/python -m bench.scale --units 1000000 --days 1 --customers 2000 --baseline 100000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from aggregator.sqlite import SqliteStore
from bench.export import fill
from kernel.timegrid import SLOT, Grid
from simulators.fleet import make_fleet, write_registry
from simulators.publisher import Endpoint, FleetPublisher
from simulators.scenario import Faults, Scenario
from tests.helpers import Mosquitto, acknowledged, children, free_port, memory_mb, process_name, smame_env

ZONE = "Asia/Tokyo"
# smame's text log: "2026-12-07 19:30:05,123 INFO    smame.monitor: ..."
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+\s+(\S+): (.*)$")
FIGURES = {  # what smame's log says about a figure: the first line that matches, and its number of seconds
    "export": re.compile(r"^export: .* in ([\d.]+) s$"),
    "report": re.compile(r"^daily report for .* made in ([\d.]+) s"),
    "health": re.compile(r"^units' health: .* assessed in ([\d.]+) s$"),
}


def logged(log: Path) -> list[tuple[float, str]]:
    """smame's log lines as (epoch, "logger: message")."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if m:
            at = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((at, f"{m[2]}: {m[3]}"))
    return out


def figures(lines: list[tuple[float, str]], started: float) -> dict[str, float]:
    """Seconds from smame's start until it subscribed, and the seconds its log gives each of FIGURES."""
    out: dict[str, float] = {}
    for at, text in lines:
        message = text.split(": ", 1)[1]
        if "subscribed" not in out and message.startswith("subscribed to"):
            out["subscribed"] = at - started
        for name, pattern in FIGURES.items():
            m = pattern.match(message)
            if name not in out and m:
                out[name] = float(m[1])
    return out


def fleet_memory_mb(pid: int) -> dict[str, tuple[float, float]]:
    """Resident and peak resident memory (MB) of a process and its children, by process name."""
    out: dict[str, tuple[float, float]] = {}
    for p in [pid, *children(pid)]:
        name = "smame" if p == pid else process_name(p) or str(p)
        rss, hwm = memory_mb(p)
        before = out.get(name, (0.0, 0.0))
        out[name] = (before[0] + rss, before[1] + hwm)
    return out


async def send(port: int, scenario: Scenario, units: list[str], at: int, first: bool) -> float:
    """Publish the fleet's telegrams of one half hour on 4 connections; return when the last was acknowledged."""
    publisher = FleetPublisher(Endpoint((("127.0.0.1", port),)), 4, 2000, units)
    await publisher.start()
    for s in scenario.start(at) if first else scenario.step(at):
        publisher.put(s)
    await publisher.close()
    return time.perf_counter()


def wait_for(metrics: int, count: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while acknowledged(metrics) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"smame did not acknowledge {count}: {log.read_text()[-3000:]}")
        time.sleep(0.01)
    return time.perf_counter()


def run(units: int, days: int, customers: int, work: Path) -> dict[str, object]:
    grid = Grid(ZONE)
    fleet = make_fleet(units, customers, seed=1)
    ids = [u.id for u in fleet]
    write_registry(fleet, work)
    now = time.time()
    live = grid.floor(now) - SLOT  # the warm-up half hour; the burst is the one after it
    first = grid.day_of(live) - timedelta(days=days)
    started = time.perf_counter()
    with SqliteStore(work / "data" / "smame.db", "NORMAL") as store:
        stored = fill(store, grid, ids, first, days) if days else 0
        # as if late data had come in for the newest stored day of every customer: the first export run
        # rewrites that whole day, so the export workers' peak is a full day's
        newest = (first + timedelta(days=days - 1)).isoformat()
        store.add_changes(sorted({(u.customer, newest) for u in fleet}), int(now))
    filled = time.perf_counter() - started
    mq = Mosquitto(work / "mq")
    metrics = free_port()
    env = smame_env(
        work,
        mq.port,
        SMAME_MONITORING__ENABLED="true",
        SMAME_MONITORING__METRICS_PORT=str(metrics),
        SMAME_REPORT__AT="00:00",  # the catch-up report is due at start, as after any restart past midnight
    )
    log = work / "smame.log"
    began = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "smame.cli", "run"], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT
    )
    try:
        while not all(s in log.read_text() for s in ("subscribed to", "export: ", "daily report for")):
            if proc.poll() is not None:
                raise RuntimeError(f"smame exited: {log.read_text()[-3000:]}")
            time.sleep(0.05)
        scenario = Scenario(fleet, 1, Faults.clean(), ZONE)
        bursts = []
        for k in range(2):
            sent = time.time()
            last_acked = asyncio.run(send(mq.port, scenario, ids, live + k * SLOT, first=k == 0))
            lag = wait_for(metrics, (k + 1) * units, proc, log) - last_acked
            meanwhile = [text for at, text in logged(log) if sent <= at <= time.time()]
            bursts.append((lag, meanwhile))
        memory = fleet_memory_mb(proc.pid)
        timed = figures(logged(log), began)
        return {"stored": stored, "filled": filled, "bursts": bursts, "memory": memory, "figures": timed}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        mq.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=100_000)
    ap.add_argument("--days", type=int, default=45, help="days of every unit's slots in the store")
    ap.add_argument("--customers", type=int, default=200)
    ap.add_argument("--baseline", type=int, default=1000, help="the fleet the memory is compared with")
    args = ap.parse_args()
    results = {}
    for units in (args.baseline, args.units):
        with tempfile.TemporaryDirectory(prefix="smame-scale-", dir=os.environ.get("SMAME_BENCH_DIR")) as tmp:
            results[units] = run(units, args.days, max(1, min(args.customers, units // 50)), Path(tmp))
    for units, r in results.items():
        mem = r["memory"]
        assert isinstance(mem, dict)
        timed, bursts = r["figures"], r["bursts"]
        assert isinstance(timed, dict) and isinstance(bursts, list)
        print(f"{units:,} units, {r['stored']:,} slots stored ({args.days} days, filled in {r['filled']:.0f} s)")
        print(
            "  "
            + ", ".join(
                f"{what} {timed[name]:.1f} s" if name in timed else f"{what}: not in the log"
                for name, what in (
                    ("subscribed", "subscribed after start"),
                    ("export", "first export run (a day's files)"),
                    ("report", "daily report"),
                    ("health", "units' health pass"),
                )
            )
        )
        for k, (lag, meanwhile) in enumerate(bursts):
            print(
                f"  {'first' if k == 0 else 'second'} half hour's burst of {units:,}: committed {lag:.2f} s after "
                "the broker acknowledged its last telegram"
                + (f"; smame logged meanwhile: {' | '.join(meanwhile)}" if meanwhile else "")
            )
        for name, (rss, hwm) in sorted(mem.items()):
            print(f"  {name:<16} resident {rss:7.0f} MB, peak {hwm:7.0f} MB")
        total, peak = sum(m[0] for m in mem.values()), sum(m[1] for m in mem.values())
        print(f"  {'all':<16} resident {total:7.0f} MB, peak {peak:7.0f} MB")
    small, large = (results[args.baseline]["memory"], results[args.units]["memory"])
    assert isinstance(small, dict) and isinstance(large, dict)
    print(
        f"{args.units:,} units against {args.baseline:,}: resident "
        f"+{sum(m[0] for m in large.values()) - sum(m[0] for m in small.values()):.0f} MB, peak "
        f"+{sum(m[1] for m in large.values()) - sum(m[1] for m in small.values()):.0f} MB"
    )


if __name__ == "__main__":
    main()

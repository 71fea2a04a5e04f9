"""Driving a simulated fleet through time: backfill, accelerated or real time, with progress and a summary."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo

from simulators.devices import DeviceFleet, UnitDevice
from simulators.fleet import make_fleet
from simulators.health import HealthMix
from simulators.publisher import Endpoint, FleetPublisher
from simulators.scenario import SLOT, Faults, Scenario, Send, floor_slot
from simulators.truth import conclude, write_truth


@dataclass(frozen=True)
class RunOptions:
    """What to simulate and how fast."""

    units: int = 10_000
    customers: int = 20
    seed: int = 1
    days: float = 0.0  # start this long before `end`
    speed: float = 1.0  # simulated seconds per real second; 0 = as fast as the broker takes them
    follow: bool = False  # after reaching the present, go on in real time until stopped
    end: float | None = None  # epoch; default now
    connections: int | None = 4  # None: one connection per unit
    window: int = 200
    faults: Faults = field(default_factory=Faults.typical)
    truth: Path | None = None
    timezone: str = "Asia/Tokyo"
    gap_cap: int = 48
    health: HealthMix | None = None  # the units send their diagnostics and status, some failing (health.md)
    answer: int = 0  # the first units also answer commands (devices.md), each on a connection of its own


@dataclass
class Summary:
    """What a run did."""

    sent: int = 0
    refused: int = 0
    seconds: float = 0.0
    connect_seconds: float = 0.0
    connections: int = 0
    first: int = 0
    last: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    truth_slots: int = 0


class PacedClock:
    """Simulated time: the past from `start` to `live_from` runs `speed` times faster than real time (never
    ahead of the real clock); from `live_from` on, it is real time, so that a live half hour is published when
    it ends, however far into a half hour the run began."""

    def __init__(
        self,
        start: int,
        speed: float,
        zone: str,
        stop: asyncio.Event,
        live_from: float,
        real: Callable[[], float] = time.time,
    ) -> None:
        self.start, self.speed, self.zone, self.stop, self.live_from, self.real = (
            start,
            speed,
            zone,
            stop,
            live_from,
            real,
        )
        self.t0 = real()

    def wait(self, at: float) -> float:
        """Seconds of real time until simulated time reaches `at` (0 or less: it has)."""
        real = self.real()
        if self.speed <= 0 or at > self.live_from:
            return at - real
        return max((at - self.start) / self.speed - (real - self.t0), at - real)

    async def until(self, at: float) -> None:
        """Sleep until simulated time reaches `at`, or the run is stopped."""
        while not self.stop.is_set():
            wait = self.wait(at)
            if wait <= 0:
                return
            try:
                await asyncio.wait_for(self.stop.wait(), min(wait, 1.0))
            except TimeoutError:
                pass


async def simulate(
    opts: RunOptions, endpoint: Endpoint, out: TextIO = sys.stderr, stop: asyncio.Event | None = None
) -> Summary:
    """Run the fleet; return its summary (and write the truth file when asked)."""
    zone = ZoneInfo(opts.timezone)
    end = floor_slot(opts.end if opts.end is not None else time.time(), zone)
    start = floor_slot(end - opts.days * 86400, zone)
    fleet = make_fleet(opts.units, opts.customers, opts.seed)
    record = opts.truth is not None or opts.answer > 0  # the truth, and what a unit resends, need its history
    scenario = Scenario(fleet, opts.seed, opts.faults, opts.timezone, record, opts.health, (start, end))
    publisher = FleetPublisher(endpoint, opts.connections, opts.window, [u.id for u in fleet])
    summary = Summary(first=start, connections=len(publisher.all_links()))
    summary.connect_seconds = await publisher.start()
    answering = [UnitDevice(s.u.id, resend=s.resend) for s in scenario.sims[: opts.answer]]
    devices = DeviceFleet(endpoint, answering, time.time)
    await devices.start()
    stop = stop or asyncio.Event()
    clock = PacedClock(start, opts.speed, opts.timezone, stop, end)
    heap: list[tuple[float, int, Send]] = []
    order = itertools.count()
    started = time.monotonic()
    progress = asyncio.create_task(_progress(publisher, clock, summary, out))

    async def release(before: float, pace: bool = True) -> None:
        while heap and heap[0][0] < before:
            at, _, send = heapq.heappop(heap)
            if pace and not stop.is_set() and (opts.speed > 0 or at > end):
                await clock.until(at)
            publisher.put(send)
            while publisher.backlog() > 20_000:  # hold the generator back while the broker catches up
                await asyncio.sleep(0.01)

    try:
        for send in scenario.start(start):
            heapq.heappush(heap, (send.at, next(order), send))
        t = start
        while not stop.is_set():
            t += SLOT
            if t > end and not opts.follow:
                break
            if opts.speed > 0 or t > end:
                await clock.until(t)
            for send in scenario.step(t):
                heapq.heappush(heap, (send.at, next(order), send))
            summary.last = t
            await release(t + SLOT)
        await release(float("inf"), pace=False)  # the run is over (or stopped): what was held back goes now
        await publisher.close()
    finally:
        progress.cancel()
        await devices.close()
    summary.sent = publisher.sent
    summary.refused = publisher.refused
    summary.seconds = time.monotonic() - started
    summary.faults = Counter(f.kind for f in scenario.injected)
    if opts.truth is not None:
        meta = {
            "seed": opts.seed,
            "timezone": opts.timezone,
            "units": opts.units,
            "start": start,
            "end": summary.last,
            "gap_cap": opts.gap_cap,
            # logged in as themselves, units the broker does not know never reach smame: verify must know
            "refused_units": publisher.refused_units(),
            # each unit's health condition: precursors (onset, failure), sudden deaths, look-alikes
            "conditions": [asdict(c) for c in scenario.conditions],
        }
        summary.truth_slots = write_truth(
            opts.truth, meta, scenario.injected, conclude(scenario, summary.last, opts.gap_cap)
        )
    return summary


async def _progress(publisher: FleetPublisher, clock: PacedClock, summary: Summary, out: TextIO) -> None:
    tty = out.isatty()
    last_sent, last_time = 0, time.monotonic()
    while True:
        await asyncio.sleep(0.5 if tty else 5.0)
        now = time.monotonic()
        sent = publisher.sent
        rate = (sent - last_sent) / (now - last_time)
        last_sent, last_time = sent, now
        when = _local(summary.last or summary.first, clock.zone)
        line = (
            f"simulated up to {when} | {sent:,} telegrams acknowledged | {rate:,.0f}/s | {publisher.backlog():,} queued"
        )
        out.write(f"\r{line}   " if tty else line + "\n")
        out.flush()


def _local(epoch: int, zone: str) -> str:
    return datetime.fromtimestamp(epoch, ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M")


def describe(summary: Summary, opts: RunOptions) -> str:
    """The end-of-run summary for people."""
    lines = [
        f"{summary.sent:,} telegrams from {opts.units:,} units acknowledged by the broker in {summary.seconds:.1f} s "
        f"({summary.sent / max(summary.seconds, 1e-9):,.0f}/s) over {summary.connections:,} connections "
        f"(opened in {summary.connect_seconds:.2f} s)",
        f"simulated {_local(summary.first, opts.timezone)} to {_local(summary.last, opts.timezone)} ({opts.timezone})",
        "faults injected: " + (", ".join(f"{k} {v}" for k, v in sorted(summary.faults.items())) or "none"),
    ]
    if summary.refused:
        lines.append(f"{summary.refused:,} telegrams refused by the broker (see the log above)")
    if opts.truth is not None:
        lines.append(f"truth: {summary.truth_slots:,} slots written to {opts.truth}")
    return "\n".join(lines)

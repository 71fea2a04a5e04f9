"""Units at risk end to end on a real store (both backends): the simulated fleet's telegrams and link drops
go through ingest day after day, the monitor makes the records and the risk, and the at-risk units reach the
metrics, the alert through the outbox and the daily report; a new monitor (a restart) knows them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from aggregator.backends import open_url
from aggregator.ingest import Ingestor, Outcome
from aggregator.store import Store
from broker_bridge.bridge import BridgeStats
from kernel.reading import Incoming, Reading, Status
from kernel.registry import Registry, load_registry
from kernel.settings import Settings, load_settings
from kernel.timegrid import Grid
from monitoring.daily import build_report
from monitoring.metrics import SmameCollector, Sources
from monitoring.monitor import Monitor, Watched
from monitoring.report import render_slack, render_text
from simulators.health import DAY, Condition, HealthMix, fleet_days
from smame.app import build_outbox
from tests.helpers import write_registry

GRID = Grid("Asia/Tokyo")
START = GRID.day_start(date(2026, 11, 1))
DAYS = 11
FAILURE = START + 11 * DAY + 20 * 3600  # both fall silent late on the day after the last one taken in
FAILING = [Condition("U000005", "reboot_loop", FAILURE - 5 * DAY, FAILURE)]
FAILING.append(Condition("U000009", "clock_failure", FAILURE - 5 * DAY, FAILURE))
QUIET = HealthMix(precursor=0, sudden_death=0, weak_signal=0, diurnal_dip=0, operator_reboot=0, power_cut=0)
UNITS = 24


@dataclass
class Fleet:
    monitor: Monitor
    store: Store
    registry: Registry
    settings: Settings
    end: int  # when the last day was taken in


def incoming(rows: list[tuple[object, ...]]) -> list[Incoming]:
    out = []
    for unit, at, seq, sent, received, no_data, diag in rows:
        assert isinstance(at, int) and isinstance(received, int)
        fwd = None if no_data else at // 1800 % 10**6
        reading = Reading(str(unit), at, "M1", fwd, 0, 1, 1, 6, int(seq), int(sent), 0, diag)  # type: ignore[call-overload]
        out.append(Incoming(reading, received, f"smame/v1/{unit}/reading", b"{}"))
    return sorted(out, key=lambda i: (i.received, i.reading.unit, i.reading.at))


def take_in(tmp_path: Path, store_url: str, daily: bool) -> tuple[Fleet, Ingestor]:
    """The fleet's days through ingest; the monitor checks after each (`daily`) or once after them all (a
    backfill, or a first start on a store that has readings)."""
    names = [f"U{i:06d}" for i in range(UNITS)]
    write_registry(tmp_path, {u: f"C{i % 2}" for i, u in enumerate(names)})
    registry = load_registry(tmp_path / "units.csv", tmp_path / "customers.toml")
    settings = load_settings(
        data_dir=tmp_path,
        alerts={"silent_units_min": 100},
        report={"enabled": False},
        health={"alert_at_risk": 1},
        mail={"smtp_url": "smtp://127.0.0.1:1", "recipients": ["ops@example.jp"]},  # queued, never sent here
    )
    store = open_url(store_url)
    ingest = Ingestor(open_url(store_url), registry, GRID)
    bridge = BridgeStats(connected=True)
    clock = [float(START)]
    monitor = Monitor(
        settings, store, GRID, lambda: registry, Watched(bridge), build_outbox(settings, store, lambda: clock[0])
    )
    _, days = fleet_days(UNITS, DAYS, 7, START, QUIET, 0, FAILING)
    for day, rows, offline in days:
        statuses = sorted(
            (Status(u, t + k * 60, bool(k)) for u, times in offline.items() for t in times for k in (0, 1)),
            key=lambda s: s.at,
        )
        ingest.commit(incoming(rows), [], day + DAY + 3600, statuses)
        clock[0] = day + DAY + 1800  # half past midnight: the day is whole
        bridge.last_received = clock[0] - 10  # caught up
        monitor.clock = lambda: clock[0]
        if daily:
            asyncio.run(monitor.check())  # (the health pass waits for ingest to catch up: the check says so)
            asyncio.run(monitor.jobs())
    asyncio.run(monitor.check())
    asyncio.run(monitor.jobs())
    asyncio.run(monitor.check())  # (a scan after the last pass)
    return Fleet(monitor, store, registry, settings, int(clock[0])), ingest


@pytest.fixture
def fleet(tmp_path: Path, store_url: str) -> Iterator[Fleet]:
    taken, ingest = take_in(tmp_path, store_url, daily=True)
    yield taken
    ingest.store.close()
    taken.store.close()


def test_a_first_pass_makes_the_days_before_it_and_finds_the_same_units(tmp_path: Path) -> None:
    taken, ingest = take_in(tmp_path, f"sqlite:///{tmp_path / 'smame.db'}", daily=False)
    try:
        assert {s.unit for s in taken.monitor.scan.at_risk} == {"U000005", "U000009"}
        assert [d for d, *_ in taken.store.risk_days(START)] == [START + k * DAY for k in range(DAYS + 1)]
    finally:
        ingest.store.close()
        taken.store.close()


def test_failing_units_are_at_risk_a_day_before_they_fall_silent_with_their_reasons(fleet: Fleet) -> None:
    m = fleet.monitor
    at_risk = {s.unit: s for s in m.scan.at_risk}
    assert set(at_risk) == {"U000005", "U000009"}  # the other 22 units are healthy
    # flagged by the pass after the first day that showed it, over a day before each falls silent
    assert all(FAILURE - (s.since + DAY + 1800) >= DAY for s in at_risk.values())
    assert at_risk["U000005"].signals[0] in {"reboots", "disconnects"}
    assert at_risk["U000009"].signals == ["clock_offset"]
    assert "s from its usual" in at_risk["U000009"].words
    # the fleet trend: every day assessed (the next one too, from its first reading), nobody at risk at first
    days = fleet.store.risk_days(START)
    assert [d for d, *_ in days] == [START + k * DAY for k in range(DAYS + 1)]
    assert {e for _, e, _, _ in days} == {UNITS} and days[0][2] == 0 and max(n for _, _, n, _ in days) == 2


def test_the_count_by_reason_is_a_metric_and_more_than_the_setting_is_one_alert(fleet: Fleet) -> None:
    m = fleet.monitor
    registry = CollectorRegistry()
    registry.register(SmameCollector(Sources(m.watched.bridge, Outcome(), lambda: UNITS, monitor=m)))
    text = generate_latest(registry).decode()
    assert 'smame_units_at_risk{reason="all"} 2.0' in text
    assert 'smame_units_at_risk{reason="clock_offset"} 1.0' in text
    assert 'smame_units_at_risk{reason="rsrp"} 0.0' in text
    [alert] = [k for (k,) in fleet.store.execute("SELECT key FROM outbox").fetchall() if "units_at_risk" in k]
    assert alert.startswith("alert:units_at_risk:firing")
    assert "2 units at risk of falling silent" in m.active["units_at_risk"].text
    assert "U000009 (risk" in m.active["units_at_risk"].text


def test_the_daily_report_names_them_and_a_restart_knows_them(fleet: Fleet) -> None:
    day = date(2026, 11, 1) + timedelta(days=DAYS - 1)  # the last day taken in: yesterday
    report = build_report(fleet.store, GRID, fleet.registry, day, fleet.end)
    text = render_text(report)
    assert "units at risk of failing: 2 of 24 assessed" in text
    assert "U000009 (C1), risk" in text and "clock offset +" in text
    assert "`U000005` (C1)" in render_slack(report)
    again = Monitor(
        fleet.settings,
        fleet.store,
        GRID,
        lambda: fleet.registry,
        Watched(BridgeStats(connected=True, last_received=fleet.end)),
        build_outbox(fleet.settings, fleet.store, lambda: fleet.end + 60),
        lambda: fleet.end + 60,
    )
    asyncio.run(again.check())
    assert {s.unit for s in again.scan.at_risk} == {"U000005", "U000009"}
    assert "units_at_risk" in again.active  # not said again: the state was kept

"""The monitor's live checks on a real store, with ingest's counters as the bridge keeps them."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import msgspec
import pytest

from aggregator.backends import open_url
from aggregator.ingest import Ingestor
from broker_bridge.bridge import BridgeStats
from broker_bridge.devices import DeviceStats
from kernel.reading import Diag, Incoming, Reading, Status
from kernel.registry import load_registry
from kernel.settings import load_settings
from kernel.timegrid import Grid
from monitoring.health_pass import Stopped, keep_health, unit_ranges
from monitoring.monitor import Monitor, Watched
from smame.app import build_outbox
from tests.helpers import write_registry

GRID = Grid("Asia/Tokyo")
NOW = GRID.day_start(date(2026, 11, 23)) + 12 * 3600  # noon
UNITS = {"S1": "C1", "S2": "C1", "S3": "C2"}
DAY = 86400


def readings(at: int) -> list[Incoming]:
    return [
        Incoming(Reading(u, at, "M1", 100, 0, 1, 1, 6, 0, at, 0), at, f"smame/v1/{u}/reading", b"{}") for u in UNITS
    ]


@pytest.fixture
def monitor(tmp_path: Path, store_url: str) -> Iterator[tuple[Monitor, BridgeStats, Ingestor]]:
    write_registry(tmp_path, UNITS)
    registry = load_registry(tmp_path / "units.csv", tmp_path / "customers.toml")
    settings = load_settings(
        data_dir=tmp_path,
        alerts={"silent_after_s": 3600, "silent_units_min": 2},
        report={"enabled": False, "catch_up_wait_s": 600},
    )
    store = open_url(store_url)
    bridge = BridgeStats(connected=True)
    clock = [float(NOW)]
    monitor = Monitor(
        settings,
        store,
        GRID,
        lambda: registry,
        Watched(bridge),
        build_outbox(settings, store, lambda: clock[0]),
        lambda: clock[0],
    )
    ingest = Ingestor(open_url(store_url), registry, GRID)
    # every unit last heard of three hours ago, before an outage
    ingest.commit(readings(GRID.floor(NOW - 3 * 3600)), [], NOW)
    yield monitor, bridge, ingest
    ingest.store.close()
    store.close()


def alerts_at(monitor: Monitor, now: float) -> set[str]:
    """A round of the monitor at `now`: its checks, then its jobs when due (a service of their own in smame)."""
    monitor.clock = lambda: now
    notices = asyncio.run(monitor.check())
    asyncio.run(monitor.jobs())
    return {n.name for n in notices if n.state != "resolved"}


def test_units_are_not_called_silent_while_their_backlog_drains(
    monitor: tuple[Monitor, BridgeStats, Ingestor],
) -> None:
    m, bridge, ingest = monitor
    # smame is back after the outage; the broker's backlog is flowing in: units are not silent, their telegrams
    # wait in the broker
    bridge.last_received, bridge.pending = NOW, 2000
    assert "units_silent" not in alerts_at(m, NOW)
    assert not m.scan.silent and m.scan.units == 3
    # the backlog is in: two units' readings are current, one unit is really silent (below the threshold of two)
    ingest.commit(readings(GRID.floor(NOW))[:2], [], NOW)
    bridge.last_received, bridge.pending = NOW - 10, 0
    assert "units_silent" not in alerts_at(m, NOW + 30)
    assert set(m.scan.silent) == {"S3"}


def test_a_fleet_never_caught_up_is_scanned_after_the_wait(monitor: tuple[Monitor, BridgeStats, Ingestor]) -> None:
    m, bridge, _ = monitor
    bridge.pending = 2000
    for t in (NOW, NOW + 300, NOW + 599):
        bridge.last_received = t
        alerts_at(m, t)
        assert not m.scan.silent
    bridge.last_received = NOW + 600
    alerts_at(m, NOW + 600)
    assert set(m.scan.silent) == set(UNITS)
    assert m.active["units_silent"]


def test_silent_units_of_a_store_caught_up_are_alerted(monitor: tuple[Monitor, BridgeStats, Ingestor]) -> None:
    m, bridge, _ = monitor
    assert "units_silent" in alerts_at(m, NOW)
    assert set(m.scan.silent) == set(UNITS)


def test_while_the_broker_is_away_nothing_drains_and_silent_units_are_alerted(
    monitor: tuple[Monitor, BridgeStats, Ingestor],
) -> None:
    m, bridge, _ = monitor
    bridge.connected, bridge.down_since, bridge.pending = False, NOW - 60, 0
    assert "units_silent" in alerts_at(m, NOW)


def test_the_history_keeps_each_start_repeat_and_end_and_operators_hold_back_what_is_sent(
    tmp_path: Path, store_url: str
) -> None:
    write_registry(tmp_path, UNITS)
    registry = load_registry(tmp_path / "units.csv", tmp_path / "customers.toml")
    settings = load_settings(
        data_dir=tmp_path,
        alerts={"silent_after_s": 3600, "silent_units_min": 2, "repeat_s": 3600},
        report={"enabled": False},
        mail={"smtp_url": "smtp://127.0.0.1:1", "recipients": ["ops@example.jp"]},  # queued, never sent here
    )
    store = open_url(store_url)
    clock = [float(NOW)]
    bridge = BridgeStats(connected=True)
    m = Monitor(
        settings,
        store,
        GRID,
        lambda: registry,
        Watched(bridge, node="n1"),
        build_outbox(settings, store, lambda: clock[0]),
        lambda: clock[0],
    )
    ingest = Ingestor(open_url(store_url), registry, GRID)
    ingest.commit(readings(GRID.floor(NOW - 3 * 3600)), [], NOW)

    def check(at: float) -> None:
        clock[0], bridge.last_received = at, at - 10  # telegrams keep coming (caught up): ingest works
        m.clock = lambda: at
        asyncio.run(m.check())

    def mails() -> list[str]:
        return [str(k) for (k,) in store.execute("SELECT key FROM outbox ORDER BY id").fetchall()]

    try:
        check(NOW)  # every unit silent: the alert starts, and is mailed
        assert len(mails()) == 1 and mails()[0].startswith("alert:units_silent:firing")
        m.history.acknowledge("units_silent", m.active["units_silent"].since, "alice", "n1", NOW + 60)
        check(NOW + 3601)  # due for a repeat: acknowledged, so kept in the history and not mailed
        assert len(mails()) == 1
        m.history.silence("units_silent", NOW + 7200, "in an hour", "bob", "n1", NOW + 3700)
        ingest.commit(readings(GRID.floor(NOW + 3900)), [], int(NOW + 3900))
        check(NOW + 3900)  # it clears while silenced: not mailed either
        assert "units_silent" not in m.active and len(mails()) == 1
        m.history.silence("units_silent", NOW, "now", "bob", "n1", NOW + 4000)  # lifted
        entries = [(e.state, e.told, e.who, e.node) for e in reversed(m.history.history(NOW - 1))]
        assert entries == [
            ("firing", True, "", "n1"),
            ("acknowledged", True, "alice", "n1"),
            ("repeat", False, "", "n1"),
            ("silenced", True, "bob", "n1"),
            ("resolved", False, "", "n1"),
            ("unsilenced", True, "bob", "n1"),
        ]
        assert [e.state for e in m.history.history(NOW - 1, state="repeat")] == ["repeat"]
        assert m.history.history(NOW - 1, node="other") == [] and m.history.nodes(NOW - 1) == ["n1"]
        # a later alert of the same kind is not covered by the old acknowledgement, and is mailed when it starts
        check(NOW + 3900 + 7200)
        assert m.active["units_silent"] and mails()[-1].startswith("alert:units_silent:firing")
        check(NOW + 3900 + 7200 + 3601)
        assert mails()[-1].startswith("alert:units_silent:repeat")
    finally:
        ingest.store.close()
        store.close()


def test_each_units_health_of_today_and_yesterday_is_kept_and_made_again_an_hour_later(
    monitor: tuple[Monitor, BridgeStats, Ingestor],
) -> None:
    m, _, ingest = monitor
    diag = msgspec.json.encode(Diag(fw="2.1.0", rsrp=-95, boot=3, vsup=3300))
    at = GRID.floor(NOW - 3600)
    with_diag = [
        msgspec.structs.replace(i, reading=msgspec.structs.replace(i.reading, diag=diag)) for i in readings(at)
    ]
    ingest.commit(with_diag, [], NOW, [Status("S1", int(NOW - 900), False), Status("S1", int(NOW - 800), True)])
    asyncio.run(m.check())
    asyncio.run(m.jobs())
    today = GRID.day_start(date(2026, 11, 23))
    [s1] = m.store.unit_health("S1", today)
    assert (s1["readings"], s1["rsrp"], s1["fw"], s1["disconnects"], s1["vsup_min"]) == (2, -95.0, "2.1.0", 1, 3300)
    later = GRID.floor(NOW + 1800)
    ingest.commit(readings(later), [], NOW + 1800)
    m.clock = lambda: NOW + 1800
    asyncio.run(m.check())
    asyncio.run(m.jobs())
    assert m.store.unit_health("S1", today)[0]["readings"] == 2  # not yet: an hour has not passed
    m.clock = lambda: NOW + 3600
    asyncio.run(m.check())
    asyncio.run(m.jobs())
    assert m.store.unit_health("S1", today)[0]["readings"] == 3  # made again, with the new reading


def test_a_fleets_day_made_a_few_units_at_a_time_is_the_day_made_at_once(
    monitor: tuple[Monitor, BridgeStats, Ingestor], monkeypatch: pytest.MonkeyPatch
) -> None:
    m, _, ingest = monitor
    assert unit_ranges(["S3", "S1", "S2"], 2) == [(None, "S3"), ("S3", None)]
    assert unit_ranges([], 2) == [(None, None)]
    ingest.commit([], [], NOW, [Status("S0", int(NOW - 600), False)])  # a unit the registry no longer has
    for k, at in enumerate((GRID.floor(NOW - 3600), GRID.floor(NOW - 1800))):
        diag = msgspec.json.encode(Diag(fw="2.1.0", rsrp=-90 - k, boot=3 + k, vsup=3300))
        ingest.commit(
            [msgspec.structs.replace(i, reading=msgspec.structs.replace(i.reading, diag=diag)) for i in readings(at)],
            [],
            NOW,
            [Status("S2", at + 60, False), Status("S2", at + 120, True)],
        )
    today = GRID.day_start(date(2026, 11, 23))

    def made(chunk: int, now: float) -> list[tuple[object, ...]]:
        monkeypatch.setattr("monitoring.health_pass.HEALTH_CHUNK_UNITS", chunk)
        m.clock = lambda: now
        asyncio.run(m.check())
        asyncio.run(m.jobs())
        return sorted(m.store.health_records(today, today, ["readings", "rsrp", "reboots", "disconnects"]))

    at_once = made(1000, NOW)
    assert at_once[0] == (today, "S0", 0, None, None, 1)  # disconnects alone
    assert at_once[2] == (today, "S2", 3, -90.5, 1, 2)  # median RSRP, boot 3 then 4
    assert made(1, NOW + 3600) == at_once  # one unit a range: the same records, none twice or lost


def test_a_health_pass_reads_only_days_with_something_to_make_and_stops_between_ranges_when_asked(
    monitor: tuple[Monitor, BridgeStats, Ingestor], monkeypatch: pytest.MonkeyPatch
) -> None:
    m, _, ingest = monitor
    ingest.commit(readings(GRID.floor(NOW - 10 * DAY)), [], NOW)  # a backfilled day among empty ones
    today = GRID.day_start(date(2026, 11, 23))
    asked: list[int] = []
    health_rows = m.store.health_rows
    monkeypatch.setattr(m.store, "health_rows", lambda start, *a: asked.append(start) or health_rows(start, *a))
    monkeypatch.setattr("monitoring.health_pass.HEALTH_CHUNK_UNITS", 1)
    # a registry of thousands of units is thousands of ranges: the 26 days with nothing are not each read so often
    with pytest.raises(Stopped):  # asked to stop (smame stopping) after the first range: the rest is left
        keep_health(m.store, GRID, UNITS, NOW, lambda: len(asked) == 1)
    assert asked == [today - 10 * DAY]
    assert list(m.store.health_records(today - 10 * DAY, today, [])) == []  # not a day half made
    asked.clear()
    keep_health(m.store, GRID, UNITS, NOW)  # the next pass makes it all
    assert sorted(set(asked)) == [today - 10 * DAY, today - DAY, today]
    assert len(asked) == 3 * len(UNITS)
    assert [u for _, u in m.store.health_records(today - 10 * DAY, today - 10 * DAY, [])] == ["S1", "S2", "S3"]


def test_a_health_pass_that_fails_costs_the_records_not_the_alerts(
    monitor: tuple[Monitor, BridgeStats, Ingestor], caplog: pytest.LogCaptureFixture
) -> None:
    m, _, ingest = monitor
    ingest.commit(readings(GRID.floor(NOW - 1800)), [], NOW)
    ingest.store.execute("ALTER TABLE unit_health RENAME TO away")  # a store the pass cannot use (a bad migration)
    assert "units_silent" not in alerts_at(m, NOW)  # the round went on: the alert state was judged
    assert "units' health records not kept" in caplog.text
    assert "health_failing" in alerts_at(m, NOW + 30)  # and an operator is told, on the leader
    assert "not kept" in m.active["health_failing"].text
    ingest.store.execute("ALTER TABLE away RENAME TO unit_health")
    alerts_at(m, NOW + 3600)  # the next pass works
    alerts_at(m, NOW + 3630)
    assert "health_failing" not in m.active


def test_a_report_that_cannot_be_made_is_an_alert_tried_again_later_and_sent_once_made(
    monitor: tuple[Monitor, BridgeStats, Ingestor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m, _, ingest = monitor
    caplog.set_level(logging.INFO, "smame.monitor")
    m.settings = load_settings(data_dir=tmp_path, report={"enabled": True, "catch_up_wait_s": 0})
    ingest.store.execute("ALTER TABLE repairs RENAME TO away")  # what the report reads, unreadable (a bad migration)
    alerts_at(m, NOW)
    assert "daily report for 2026-11-22 not made (" in caplog.text and "repairs" in caplog.text  # (the store's words)
    assert "report_failing" in alerts_at(m, NOW + 30)  # told to an operator: the alerts went on meanwhile
    said = m.active["report_failing"].text
    assert "report for 2026-11-22 failed (" in said and "repairs" in said and "tried again every 10 min" in said
    ingest.store.execute("ALTER TABLE away RENAME TO repairs")
    caplog.clear()
    alerts_at(m, NOW + 60)
    assert "daily report" not in caplog.text  # not tried at every check: a report may take minutes
    alerts_at(m, NOW + 660)
    assert "daily report for 2026-11-22 made in" in caplog.text
    assert m.store.get_meta("report_last_day") == "2026-11-22"
    assert "report_failing" not in alerts_at(m, NOW + 690)


def test_a_refused_status_topic_is_an_alert_until_the_broker_takes_it(
    monitor: tuple[Monitor, BridgeStats, Ingestor],
) -> None:
    m, bridge, ingest = monitor
    ingest.commit(readings(GRID.floor(NOW)), [], NOW)
    bridge.last_received = NOW - 10
    bridge.status_refused = "broker refused the subscription to 'smame/v1/+/status': not authorized (0x87)"
    assert "status_refused" in alerts_at(m, NOW)
    assert "units' disconnects are not counted" in m.active["status_refused"].text
    bridge.status_refused = ""
    alerts_at(m, NOW + 60)
    assert "status_refused" not in m.active


def test_commands_that_cannot_use_the_store_or_reach_the_broker_are_an_alert_on_the_leader(
    monitor: tuple[Monitor, BridgeStats, Ingestor],
) -> None:
    m, bridge, _ = monitor
    commands = DeviceStats(connected=True)
    m.watched.commands = commands
    assert "commands_failing" not in alerts_at(m, NOW)
    commands.failing = "OperationalError: no such table: commands"  # as the commands' service found its store
    assert "commands_failing" in alerts_at(m, NOW + 30)
    assert "no such table" in m.active["commands_failing"].text
    commands.failing = ""
    alerts_at(m, NOW + 60)
    assert "commands_failing" not in m.active
    # its own broker connection refused (an ACL without its topics) while ingest's is up
    commands.connected, commands.down_since, commands.last_error = False, NOW + 60, "not authorized (0x87)"
    assert "commands_failing" not in alerts_at(m, NOW + 90)  # not yet: alerts.broker_down_s
    assert "commands_failing" in alerts_at(m, NOW + 200)
    assert "not authorized" in m.active["commands_failing"].text and "-devices" in m.active["commands_failing"].text
    bridge.connected, bridge.down_since = False, NOW + 200  # the broker down for all: broker_unreachable says it
    alerts_at(m, NOW + 230)
    assert "commands_failing" not in m.active


def test_a_campaign_that_aborted_itself_or_ended_is_told_once_even_after_a_restart(
    monitor: tuple[Monitor, BridgeStats, Ingestor], tmp_path: Path
) -> None:
    from aggregator.campaigns import campaign_pass, create_campaign
    from kernel.commands import AnswerRefused, read_answer
    from kernel.firmware import Phase, check_plan

    m, _, ingest = monitor
    store = ingest.store
    asyncio.run(m.check())  # the first look: campaigns that ended before it are not told
    image = b"\x01" * 1000
    store.add_firmware("2.4.0", hashlib.sha256(image).hexdigest(), image, int(NOW), "cli:alice", "h")
    registry = load_registry(tmp_path / "units.csv", tmp_path / "customers.toml")
    plan = check_plan([100], 0, 60, 0.5, 1)
    c = create_campaign(store, registry, "2.4.0", {"customer": "C1"}, plan, int(NOW), "cli:alice", "h")
    campaign_pass(store, int(NOW), "https://smame.example.jp")
    for command in store.commands(limit=10):  # both units fail at verifying the image
        a = read_answer(
            f"smame/v1/{command.unit}/res",
            f'{{"v":1,"id":"{command.id}","status":"failed","detail":"verify: sha256 differs"}}'.encode(),
        )
        assert not isinstance(a, AnswerRefused)
        store.answer_commands([a], int(NOW) + 5)
    campaign_pass(store, int(NOW) + 10, "https://smame.example.jp")
    assert store.campaign(c.id).phase == Phase.ABORTED  # type: ignore[union-attr]

    told = [n for n in asyncio.run(m.check()) if n.name == "campaign_aborted"]
    assert len(told) == 1 and f"campaign {c.id}" in told[0].text and "2 failed" in told[0].text
    assert "2 of 2 units ended failed" in told[0].text
    assert told[0].subject == "[smame] EVENT: a firmware campaign aborted itself"
    assert not [n for n in asyncio.run(m.check()) if n.name.startswith("campaign")]  # once
    again = Monitor(m.settings, m.store, GRID, m.registry, m.watched, m.outbox, m.clock)  # a restart, or a new leader
    assert not [n for n in asyncio.run(again.check()) if n.name.startswith("campaign")]


def test_an_api_token_near_its_expiry_and_once_expired_is_told_once_each_even_after_a_restart(
    monitor: tuple[Monitor, BridgeStats, Ingestor], store_url: str
) -> None:
    m, _, _ = monitor
    with open_url(store_url) as store:  # (the web layer's Tokens is above the monitor's: the rows as it keeps them)
        with store.transaction():
            for token_id, name, expires in (("a1", "billing", NOW + 20 * DAY), ("b2", "", NOW + 3 * DAY)):
                store.execute(
                    "INSERT INTO api_tokens (id, customer, name, hash, created, expires) "
                    "VALUES (?, 'C1', ?, 'h', 0, ?)",
                    (token_id, name, expires),
                )

    def told(now: float) -> list[str]:
        m.clock = lambda: now
        return [n.text for n in asyncio.run(m.check()) if n.name == "security_token_expiry"]

    assert told(NOW) == [
        "API tokens expire soon: b2 of C1 2026-11-26T12:00+09:00 "
        "(smame tokens add makes a new one; the customer's server needs it)"
    ]
    assert told(NOW + 60) == []
    m = Monitor(m.settings, m.store, GRID, m.registry, m.watched, m.outbox, lambda: NOW)  # a restart
    assert told(NOW + 120) == []
    [text] = told(NOW + 7 * DAY)  # b2 has expired, a1 comes within 14 days
    assert "expire soon: a1 of C1 (billing) 2026-12-13T12:00+09:00; expired: b2 of C1" in text
    assert told(NOW + 7 * DAY + 60) == []


def test_the_audit_logs_changes_to_who_may_do_what_are_security_events_told_once(
    monitor: tuple[Monitor, BridgeStats, Ingestor], store_url: str
) -> None:
    m, _, _ = monitor

    def told(now: float) -> list[str]:
        m.clock = lambda: now
        return [n.text for n in asyncio.run(m.check()) if n.name == "security_audit"]

    with open_url(store_url) as store:
        store.record_audit(int(NOW) - 60, "cli:root", "host-a", "operator added", "olaf", "role admin")  # before
    assert told(NOW) == []  # the first look: what came before it is not news
    with open_url(store_url) as store:
        store.record_audit(int(NOW) + 10, "cli:root", "host-a", "operator's role changed", "olaf", "role viewer")
        store.record_audit(int(NOW) + 20, "console:ana", "192.0.2.4", "command sent", "U1", "")  # not security
        store.record_audit(int(NOW) + 30, "cli:root", "host-a", "customer purged", "C9", "readings 10")
    assert told(NOW + 60) == [
        "2 change(s) to who may do what, or to customers' data: 2026-11-23T12:00+09:00 cli:root from host-a: "
        "operator's role changed olaf (role viewer); 2026-11-23T12:00+09:00 cli:root from host-a: customer purged "
        "C9 (readings 10)"
    ]
    assert told(NOW + 120) == []
    m = Monitor(m.settings, m.store, GRID, m.registry, m.watched, m.outbox, lambda: NOW)  # a restart
    assert told(NOW + 180) == []

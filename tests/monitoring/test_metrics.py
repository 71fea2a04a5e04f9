"""/metrics and /healthz after an end-to-end run: the counts are what was published."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from monitoring.alerts import Active
from monitoring.metrics import SmameCollector, Sources
from monitoring.monitor import Scan
from tests.helpers import (
    Mosquitto,
    at,
    default_app,
    free_port,
    metrics_env,
    publish,
    scrape,
    smame_env,
    start_smame,
    stop,
    telegram,
    wait_log,
    wait_readings,
    wait_until,
    write_registry,
)

DAY = "2026-11-20"


def test_metrics_count_what_was_published_and_health_says_ok(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"M1": "C1", "M2": "C1"})
    port = free_port()
    env = smame_env(workdir, broker.port, **metrics_env(port))
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "subscribed to")
    wait_log(log, "monitoring: /metrics")
    good = [
        (f"smame/v1/M{u}/reading", telegram(f"M{u}", [(at(DAY, f"{k // 2:02d}:{k % 2 * 30:02d}"), 10 * k)]))
        for u in (1, 2)
        for k in range(5)
    ]  # five half-hourly readings: four slots per unit
    bad = [("smame/v1/M1/reading", b"garbage"), ("smame/v1/X9/reading", telegram("X9", [(at(DAY, "10:00"), 1)]))]
    publish(broker.port, good + bad + good[:3])  # 10 good, 2 bad, 3 repeated
    wait_readings(workdir / "data" / "smame.db", 10)
    wait_until(lambda: scrape(port).get("smame_telegrams_acknowledged_total", 0) >= 15, 10, every=0.2)
    # the first export runs once ingest has caught up (2 s without a telegram)
    wait_until(lambda: scrape(port).get("smame_export_runs_total", 0) >= 1, 10, every=0.2)
    m = scrape(port)
    assert m["smame_telegrams_received_total"] == 15
    assert m["smame_telegrams_acknowledged_total"] == 15
    assert m["smame_readings_stored_total"] == 10
    assert m["smame_readings_duplicate_total"] == 3
    assert m["smame_slots_written_total"] == 8  # 4 slots per unit
    assert m['smame_quarantined_total{reason="not_json"}'] == 1
    assert m['smame_quarantined_total{reason="unknown_unit"}'] == 1
    assert m["smame_broker_connected"] == 1 and m["smame_units_registered"] == 2
    assert m["smame_commit_seconds_count"] == m["smame_commit_batches_total"] >= 1
    assert m["smame_commit_batch_size_sum"] == 15  # every telegram received was in a committed batch
    assert m['smame_commit_batch_size_bucket{le="+Inf"}'] == m["smame_commit_batches_total"]
    assert m["smame_export_runs_total"] >= 1
    wait_until(lambda: scrape(port).get("smame_commands_connected") == 1, 10, every=0.2)  # its own connection
    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read())
    assert health == {
        "status": "ok",
        "checks": {"ingest": "ok", "registry": "ok", "store": "ok", "export": "ok"},
        "role": "leader",
        "node": f"{socket.gethostname()[:40]}:{proc.pid}",  # the only node names itself too
    }
    assert m["smame_leader"] == 1 and m["smame_leader_epoch"] == 0  # the only node, on SQLite
    broker.stop()  # the broker goes away: health must say so
    try:
        wait_log(log, "lost the broker")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
            raise AssertionError("healthz answered 200 without a broker")
        except urllib.error.HTTPError as err:
            assert err.code == 503
            ingest = json.loads(err.read())["checks"]["ingest"]  # and why, as the last attempt said
            assert ingest.startswith("not connected to the broker: ") and "refused" in ingest, ingest
    finally:
        broker.start()
    assert stop(proc) == 0


@dataclass
class Standing:
    """A node's role as `aggregator.leadership.Leadership` exposes it, without a store behind it."""

    leading: bool
    leader: dict[str, object] = field(default_factory=lambda: {"node": "other:1", "epoch": 3})


def test_a_standby_exports_none_of_the_figures_only_the_leader_knows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = default_app(tmp_path, monkeypatch)
    try:
        assert app.monitor is not None
        # what the node saw while it led: 200 silent units, an alert, mail waiting
        app.monitor.scan = Scan(units=200, silent={f"U{i}": "C1" for i in range(200)}, outbox_pending=5)
        app.monitor.active = {"units_silent": Active(1.0, "200 of 200 units", 1.0)}

        def samples(leading: bool) -> dict[str, float]:
            registry = CollectorRegistry()
            role = Standing(leading)
            registry.register(
                SmameCollector(
                    Sources(
                        app.bridge.stats,
                        app.writer.totals,
                        lambda: 1,
                        monitor=app.monitor,
                        role=role,
                        commands=app.devices.stats if app.devices else None,
                    )
                )
            )
            return {s.name + str(sorted(s.labels.items())): s.value for m in registry.collect() for s in m.samples}

        leader, standby = samples(True), samples(False)
        assert leader["smame_units_silent[]"] == 200 and leader["smame_outbox_pending[]"] == 5
        assert leader["smame_alert_active[('alert', 'units_silent')]"] == 1
        leader_only = (
            "smame_units_silent",
            "smame_units_reporting",
            "smame_alert_active",
            "smame_outbox",
            "smame_slots_today",
            "smame_units_at_risk",
            "smame_command",  # a standby sends no command
        )
        gone = {k for k in leader if k.startswith(leader_only)}
        assert gone and not gone & set(standby), gone & set(standby)
        assert standby["smame_leader[]"] == 0 and standby["smame_leader_epoch[]"] == 3
        assert any(k.startswith("smame_disk_free_ratio") for k in standby)  # its own disks, on every node
    finally:
        if app.exporter is not None:
            app.exporter.close()
        app.monitor.close()
        if app.devices is not None:
            app.devices.store.close()


def test_a_refused_status_topic_fails_healthz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = default_app(tmp_path, monkeypatch)
    try:
        assert "status" not in app.health()
        app.bridge.stats.status_refused = "broker refused the subscription to 'smame/v1/+/status': not authorized"
        assert app.health()["status"].startswith("units' connection events are not taken: broker refused")
    finally:
        if app.exporter is not None:
            app.exporter.close()
        if app.monitor is not None:
            app.monitor.close()

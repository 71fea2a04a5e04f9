"""/metrics and /healthz after an end-to-end run: the counts are what was published."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from tests.helpers import (
    Mosquitto,
    at,
    free_port,
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
    env = smame_env(
        workdir,
        broker.port,
        SMAME_MONITORING__ENABLED="true",
        SMAME_MONITORING__HOST="127.0.0.1",
        SMAME_MONITORING__METRICS_PORT=str(port),
    )
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
    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read())
    assert health == {"status": "ok", "checks": {"ingest": "ok", "store": "ok", "export": "ok"}, "role": "leader"}
    assert m["smame_leader"] == 1 and m["smame_leader_epoch"] == 0  # the only node, on SQLite
    broker.stop()  # the broker goes away: health must say so
    try:
        wait_log(log, "lost the broker")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
            raise AssertionError("healthz answered 200 without a broker")
        except urllib.error.HTTPError as err:
            assert err.code == 503
            assert json.loads(err.read())["checks"]["ingest"] == "not connected to the broker"
    finally:
        broker.start()
    assert stop(proc) == 0

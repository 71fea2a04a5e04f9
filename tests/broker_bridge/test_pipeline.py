"""End to end: a real Mosquitto, `smame run` as a process, a real MQTT publisher, the CLI to check."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from aggregator.ingest import UnitTable
from aggregator.writer import Writer, WriterError
from kernel.reading import Diag, read_diag
from kernel.timegrid import Grid
from tests.databases import PostgresDatabase
from tests.helpers import (
    Mosquitto,
    at,
    free_port,
    metrics_env,
    publish,
    readings_in,
    running,
    scrape,
    smame,
    smame_env,
    start_smame,
    stop,
    telegram,
    wait_child,
    wait_log,
    wait_readings,
    wait_until,
    write_registry,
)

DAY = "2026-11-20"
HALF_HOUR = timedelta(minutes=30)


def test_telegrams_become_slots_and_bad_ones_are_quarantined(broker: Mosquitto, workdir: Path, store_url: str) -> None:
    write_registry(workdir, {"U1": "C1", "U2": "C1", "U3": "C2"})
    env = smame_env(workdir, broker.port, SMAME_STORAGE__URL=store_url)
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "subscribed to")
    t = "smame/v1/{}/reading"
    good = [
        (t.format("U1"), telegram("U1", [(at(DAY, "10:00"), 523101), (at(DAY, "10:30"), 523118)])),
        (t.format("U1"), telegram("U1", [(at(DAY, "12:00"), 523148)])),  # 3 slots missed: estimated
        (t.format("U2"), telegram("U2", [(at(DAY, "23:30"), 999_990, 5), (at(f"{DAY[:-2]}21", "00:00"), 12, 9)])),
        (t.format("U1"), telegram("U1", [(at(DAY, "10:30"), 523118)])),  # duplicate
    ]
    bad = [
        (t.format("U1"), b"{not json"),
        (t.format("U1"), b'"a string"'),
        (t.format("U1"), b"{" + b" " * 17000 + b"}"),
        (t.format("U1"), telegram("U1", [(at(DAY, "13:00"), 1)]).replace(b'"v":1', b'"v":3')),
        (t.format("U1"), telegram("U1", [(at(DAY, "13:00"), 1)]).replace(b'"seq":1', b'"seq":"1"')),
        (t.format("U2"), telegram("U1", [(at(DAY, "13:00"), 1)])),
        (t.format("U9"), telegram("U9", [(at(DAY, "13:00"), 1)])),
        (t.format("U3"), telegram("U3", [(at(DAY, "13:10"), 1)])),
        (t.format("U3"), telegram("U3", [(at(DAY, "13:00"), 10**6)])),
        (t.format("U3"), telegram("U3", [(at("2099-01-01", "13:00"), 1)], sent=at(DAY, "13:00"))),
        (t.format("U1"), telegram("U1", [(at(DAY, "10:30"), 523000)])),  # conflict with the stored value
    ]
    publish(broker.port, good + bad)
    wait_until(lambda: "11 quarantined" in smame(["quarantine"], env).stdout, 15, every=0.2)
    assert stop(proc) == 0

    out = smame(["slots", "--unit", "U1", "--date", DAY], env).stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in out[2:]}
    assert rows["21"][1:4] == ["10:00-10:30", "1.7", "A"]
    assert [rows[s][2:4] for s in ("22", "23", "24")] == [["1.0", "E"], ["1.0", "E"], ["1.0", "E"]]
    assert rows["21"][-1] == "conflict"
    assert rows["25"][2] == "M"

    u2 = smame(["slots", "--unit", "U2", "--date", DAY], env).stdout.splitlines()
    last = u2[-1].split()
    assert last[:4] == ["48", "23:30-24:00", "2.2", "A"] and last[-1] == "rollover"
    assert last[4:6] == ["0.4", "A"]

    report = smame(["quarantine", "--limit", "100"], env).stdout
    for reason in (
        "not_json",
        "not_object",
        "too_large",
        "unknown_version",
        "bad_field",
        "unit_mismatch",
        "unknown_unit",
        "bad_time",
        "out_of_range",
        "future",
        "conflict",
    ):
        assert f" {reason}: " in report, reason
    assert "11 quarantined" in report


def test_a_units_diagnostics_are_kept_with_its_newest_reading_and_a_wrong_field_only_counted(
    broker: Mosquitto, workdir: Path
) -> None:
    write_registry(workdir, {"U1": "C1"})
    metrics = free_port()
    # the health pass (which reads each kept diag) every second
    fast = dict(SMAME_ALERTS__CHECK_S="0.5", SMAME_HEALTH__PASS_EVERY_S="1")
    env = smame_env(workdir, broker.port, **metrics_env(metrics), **fast)
    proc = start_smame(env, workdir / "smame.log")
    wait_log(workdir / "smame.log", "subscribed to")
    diag = {"fw": "2.1.0", "rsrp": -97, "sinr": 4.5, "boot": 12, "vsup": 3300}
    # the last hour's half hours: the health pass makes today's and yesterday's records again each time
    newest = datetime.fromtimestamp(time.time() // 1800 * 1800, UTC)
    times = [newest - 2 * HALF_HOUR, newest - HALF_HOUR, newest]
    publish(
        broker.port,
        [
            ("smame/v1/U1/reading", telegram("U1", [(times[0], 100), (times[1], 110)], diag=diag)),
            ("smame/v1/U1/reading", telegram("U1", [(times[2], 120)], diag={**diag, "rsrp": 5, "ce": 9})),
        ],
    )
    wait_readings(workdir / "data" / "smame.db", 3)
    days = ("today", "yesterday")
    wait_until(lambda: sum(scrape(metrics).get(f'smame_diag_fields_dropped{{day="{d}"}}', 0) for d in days) == 2, 10)
    assert stop(proc) == 0
    with sqlite3.connect(workdir / "data" / "smame.db") as db:
        kept = dict(db.execute("SELECT at, diag FROM readings WHERE unit = 'U1'").fetchall())
        [dropped] = db.execute("SELECT sum(diag_dropped) FROM unit_health WHERE unit = 'U1'").fetchone()
    assert dropped == 2  # and the unit's record says whose
    first, second, third = (kept[int(t.timestamp())] for t in times)
    assert first is None and read_diag(second) == Diag(**diag)  # type: ignore[arg-type]
    wrong_dropped = read_diag(third)
    assert wrong_dropped.rsrp is None and wrong_dropped.ce is None and wrong_dropped.dropped == 2
    assert wrong_dropped.fw == "2.1.0"  # the good fields kept
    assert "0 quarantined" in smame(["quarantine"], env).stdout


def test_each_change_of_a_units_connection_is_one_event_whatever_the_retained_messages_at_each_start(
    broker: Mosquitto, workdir: Path
) -> None:
    write_registry(workdir, {"U1": "C1", "U2": "C1"})
    env = smame_env(workdir, broker.port)
    status = "smame/v1/{}/status"
    # what the units said before smame first started: kept by the broker (retained; a unit's will is offline)
    publish(broker.port, [(status.format("U1"), b"online"), (status.format("U2"), b"offline")], retain=True)
    publish(broker.port, [(status.format("U9"), b"online")], retain=True)  # not in the registry: nothing kept
    try:
        log = workdir / "smame.log"
        proc = start_smame(env, log)
        wait_log(log, "subscribed to")

        def events() -> list[tuple[str, int]]:
            with sqlite3.connect(workdir / "data" / "smame.db") as db:
                return db.execute("SELECT unit, online FROM connection_events ORDER BY id").fetchall()

        wait_until(lambda: events() == [("U1", 1), ("U2", 0)], 10, lambda: f"{events()}")
        publish(broker.port, [(status.format("U1"), b"offline"), (status.format("U1"), b"online\n")], retain=True)
        publish(broker.port, [(status.format("U2"), b"bogus"), (status.format("U2"), b"o" * 100)])
        wait_until(lambda: len(events()) == 4, 10, lambda: f"{events()}")
        assert stop(proc) == 0
        proc = start_smame(env, workdir / "again.log")  # the retained states come again: they change nothing
        wait_log(workdir / "again.log", "subscribed to")
        publish(broker.port, [(status.format("U2"), b"online")])
        wait_until(lambda: len(events()) == 5, 10, lambda: f"{events()}")
        assert stop(proc) == 0
        assert [e for e in events() if e[0] == "U1"] == [("U1", 1), ("U1", 0), ("U1", 1)]
        assert [e for e in events() if e[0] == "U2"] == [("U2", 0), ("U2", 1)]
        report = smame(["quarantine"], env).stdout
        assert "2 quarantined: bad_status 2" in report and "unknown_unit" not in report, report
    finally:  # the module's tests share the broker: an empty retained message clears one
        publish(broker.port, [(status.format(u), b"") for u in ("U1", "U2", "U9")], retain=True)


def test_sigterm_commits_and_acknowledges_then_exits_cleanly(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {f"S{i}": "C1" for i in range(50)})
    env = smame_env(workdir, broker.port, SMAME_BROKER__BATCH_DELAY_MS="5000", SMAME_BROKER__BATCH_SIZE="30000")
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "subscribed to")
    msgs = [
        (f"smame/v1/S{i}/reading", telegram(f"S{i}", [(at(DAY, f"{h:02d}:00"), h)]))
        for i in range(50)
        for h in range(10)
    ]
    publish(broker.port, msgs)
    started = time.monotonic()
    assert stop(proc) == 0
    assert time.monotonic() - started < 10
    assert readings_in(workdir / "data" / "smame.db") == 500  # held in a 5 s batch, committed on the way out
    assert "500 received, 500 acknowledged" in log.read_text()


def test_messages_sent_while_smame_is_down_arrive_after_restart(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"P1": "C1"})
    env = smame_env(workdir, broker.port)
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "subscribed to")
    assert stop(proc) == 0
    publish(
        broker.port, [("smame/v1/P1/reading", telegram("P1", [(at(DAY, f"{h:02d}:00"), h * 10)])) for h in range(5)]
    )
    proc = start_smame(env, log)
    wait_readings(workdir / "data" / "smame.db", 5)
    assert stop(proc) == 0
    assert "session present: True" in log.read_text()


def test_lost_broker_session_is_reported(workdir: Path) -> None:
    mq = Mosquitto(workdir / "mq")  # persistence off: a restarted broker has forgotten every session
    write_registry(workdir, {"L1": "C1"})
    env = smame_env(workdir, mq.port, SMAME_BROKER__RECONNECT_MIN_S="0.1", SMAME_BROKER__RECONNECT_MAX_S="0.2")
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    try:
        wait_log(log, "session present: False")
        mq.restart()
        wait_log(log, "lost the broker")
        wait_log(log, "had no session", 20)
        publish(mq.port, [("smame/v1/L1/reading", telegram("L1", [(at(DAY, "10:00"), 1)]))])
        wait_readings(workdir / "data" / "smame.db", 1)
    finally:
        assert stop(proc) == 0
        mq.stop()


def test_broker_down_at_start_is_retried(workdir: Path) -> None:
    mq = Mosquitto(workdir / "mq")
    mq.stop()
    write_registry(workdir, {"B1": "C1"})
    env = smame_env(workdir, mq.port, SMAME_BROKER__RECONNECT_MIN_S="0.1", SMAME_BROKER__RECONNECT_MAX_S="0.3")
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    try:
        wait_log(log, "unreachable")
        mq.start()
        wait_log(log, "subscribed to", 20)
    finally:
        assert stop(proc) == 0
        mq.stop()


def test_a_crashing_service_stops_the_process_non_zero(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"X1": "C1"})
    (workdir / "data").mkdir()
    with sqlite3.connect(workdir / "data" / "smame.db") as c:  # a store some other program left behind
        c.execute("CREATE TABLE readings (something_else TEXT)")
    # ingest meets the broken table first: the other services that read the store are off
    env = smame_env(
        workdir,
        broker.port,
        SMAME_EXPORT__ENABLED="false",
        SMAME_ALERTS__ENABLED="false",
        SMAME_REPORT__ENABLED="false",
    )
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "subscribed to")
    publish(broker.port, [("smame/v1/X1/reading", telegram("X1", [(at(DAY, "10:00"), 1)]))])
    assert proc.wait(15) == 1
    assert "service ingest crashed" in log.read_text()


def test_bad_configuration_fails_at_start_naming_the_key(workdir: Path) -> None:
    write_registry(workdir, {"X1": "C1"})
    env = smame_env(workdir, 1883, SMAME_BROKER__BATCH_SIZE="lots")
    proc = smame(["run"], env, check=False)
    assert proc.returncode == 2
    assert "broker.batch_size / SMAME_BROKER__BATCH_SIZE" in proc.stderr
    (workdir / "smame.toml").write_text('timezone = "Mars/Olympus"\n')
    proc = smame(["run", "-c", str(workdir / "smame.toml")], smame_env(workdir, 1883), check=False)
    assert proc.returncode == 2 and "invalid setting timezone" in proc.stderr


def test_a_store_that_cannot_be_opened_fails_at_start_naming_it(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"X1": "C1"})
    (workdir / "data" / "smame.db").mkdir(parents=True)  # not a file
    proc = smame(["run"], smame_env(workdir, broker.port), check=False)
    assert proc.returncode == 2 and f"cannot open the store {workdir / 'data' / 'smame.db'}" in proc.stderr
    # the ingest writer's process, should it be the one that cannot, says why too
    writer = Writer(f"sqlite:///{workdir / 'data' / 'smame.db'}", "FULL", Grid("Asia/Tokyo"), UnitTable({}))
    with pytest.raises(WriterError, match="cannot open the store"):
        asyncio.run(writer.start())
    writer.close()


def test_a_postgresql_store_that_cannot_be_reached_fails_at_start_naming_it(
    broker: Mosquitto, workdir: Path, postgres: PostgresDatabase
) -> None:
    write_registry(workdir, {"X1": "C1"})
    missing = postgres.url.rsplit("/", 1)[0].replace("postgres@", "postgres:secret@") + "/no_such_database"
    proc = smame(["run"], smame_env(workdir, broker.port, SMAME_STORAGE__URL=missing), check=False)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()  # one line, no traceback, and no password in it
    assert "cannot open the store postgresql://postgres:***@" in line and "no_such_database" in line
    assert "secret" not in line


def test_missing_or_wrong_registry_fails_at_start(workdir: Path) -> None:
    env = smame_env(workdir, 1883)
    proc = smame(["run"], env, check=False)
    assert proc.returncode == 2 and "customers file not found (setting registry.customers)" in proc.stderr
    write_registry(workdir, {"X1": "C1"})
    (workdir / "units.csv").write_text("unit_id,customer_id\nX1,C1\nX2,NOPE\n")
    proc = smame(["run"], env, check=False)
    assert proc.returncode == 2 and "units.csv:3: customer_id 'NOPE'" in proc.stderr


def test_registry_is_reloaded_on_sighup(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"H1": "C1"})
    env = smame_env(workdir, broker.port)
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "subscribed to")
    message = [("smame/v1/H2/reading", telegram("H2", [(at(DAY, "10:00"), 1)]))]
    publish(broker.port, message)
    wait_until(lambda: "unknown_unit 1" in smame(["quarantine"], env).stdout, 10, every=0.1)

    (workdir / "units.csv").write_text("unit_id,customer_id\nH1,C1\nH2,NOPE\n")
    proc.send_signal(signal.SIGHUP)
    wait_log(log, "registry reload refused, keeping 1 units")
    write_registry(workdir, {"H1": "C1", "H2": "C2"})
    proc.send_signal(signal.SIGHUP)
    wait_log(log, "registry reloaded: 2 units")
    publish(broker.port, message)
    # a second reading makes a slot, which the writer process files under the unit's customer from the new registry
    publish(broker.port, [("smame/v1/H2/reading", telegram("H2", [(at(DAY, "10:30"), 3)]))])
    wait_readings(workdir / "data" / "smame.db", 2)
    assert stop(proc) == 0
    with sqlite3.connect(workdir / "data" / "smame.db") as c:
        assert c.execute("SELECT imp, imp_q FROM slots WHERE unit = 'H2'").fetchall() == [(2, "A")]
        assert ("C2", DAY) in set(c.execute("SELECT customer, day FROM changes"))


@pytest.mark.slow
def test_a_long_registry_reload_holds_up_no_acknowledgement(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"H1": "C1"})
    env = smame_env(workdir, broker.port, SMAME_EXPORT__ENABLED="false")
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    try:
        wait_log(log, "subscribed to")
        units = ["unit_id,customer_id", "H1,C1", *(f"R{i:07d},C1" for i in range(400_000))]
        (workdir / "units.csv").write_text("\n".join(units) + "\n")  # a few seconds to read
        proc.send_signal(signal.SIGHUP)
        wait_log(log, "registry: reading")
        publish(broker.port, [("smame/v1/H1/reading", telegram("H1", [(at(DAY, "10:00"), 1)]))])
        wait_readings(workdir / "data" / "smame.db", 1)
        assert "registry reloaded" not in log.read_text(), "the telegram waited for the reload"
        wait_log(log, "registry reloaded: 400001 units", 60)
    finally:
        assert stop(proc) == 0


def test_a_dead_writer_process_stops_smame_non_zero(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"W1": "C1"})
    env = smame_env(workdir, broker.port, SMAME_EXPORT__ENABLED="false")
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "subscribed to")
    os.kill(wait_child(proc, "smame-writer"), signal.SIGKILL)  # e.g. the OOM killer
    assert proc.wait(15) == 1  # at once, not only when the next telegram fails to commit
    text = log.read_text()
    assert "service ingest crashed" in text and "the writer process is gone (killed by signal 9)" in text


def test_a_second_run_on_one_sqlite_store_is_refused_naming_the_holder(broker: Mosquitto, workdir: Path) -> None:
    # Two processes on one file would both ingest (one broker session taken from the other), alert and export.
    write_registry(workdir, {"SH1": "C1"})
    env = smame_env(workdir, broker.port)
    first = start_smame(env, workdir / "first.log")
    try:
        wait_log(workdir / "first.log", "subscribed to")
        other = dict(env, SMAME_BROKER__CLIENT_ID=f"other-{workdir.name}")  # ports are free: only the store is shared
        second = smame(["run"], other, check=False)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip() == (
            f"smame: {workdir / 'data' / 'smame.db'} is in use by smame run (pid {first.pid}): "
            "one smame run per SQLite store"
        )
        assert running(first.pid)
    finally:
        assert stop(first) == 0

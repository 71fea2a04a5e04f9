"""End to end: the daily report reaches a real SMTP server and Slack's stand-in; alerts start and clear; nothing
is sent twice across an outage or a restart."""

from __future__ import annotations

import csv
import io
import sqlite3
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from aggregator.ingest import Ingestor
from aggregator.sqlite import SqliteStore
from kernel.reading import Incoming, Reading
from kernel.registry import load_registry
from kernel.timegrid import SLOT, Grid
from tests.helpers import (
    Mosquitto,
    free_port,
    metrics_env,
    publish,
    smame,
    smame_env,
    start_smame,
    stop,
    telegram,
    wait_log,
    wait_until,
    write_registry,
    yesterday,
)
from tests.monitoring.sinks import SlackStandIn, SmtpSink
from tests.monitoring.test_metrics import scrape

GRID = Grid("Asia/Tokyo")
# The report command reads the real clock, so the day is yesterday's and silence is judged against now:
# R1 reports up to now, R2's last reading (yesterday 10:00) is always over 12 hours old.
SILENT_AFTER = "43200"


@pytest.fixture
def day() -> date:
    """Yesterday as the test starts (not when the module is collected: a run may cross midnight meanwhile)."""
    return yesterday()


def day_with_gaps(workdir: Path, day: date) -> set[tuple[str, int]]:
    """R1 reporting until now, R2 silent from yesterday 10:00 on, R3 never heard of; returns the missing
    (unit, slot) pairs of yesterday."""
    write_registry(workdir, {"R1": "C1", "R2": "C1", "R3": "C2"})
    registry = load_registry(workdir / "units.csv", workdir / "customers.toml")
    (workdir / "data").mkdir(exist_ok=True)
    store = SqliteStore(workdir / "data" / "smame.db")
    start = GRID.day_start(day)
    now = int(time.time())
    r1_slots = (GRID.floor(now) - start) // SLOT
    readings = [
        Incoming(
            Reading(u, start + k * SLOT, "SM", 100 + k, 0, 1, 1, 6, k, start + k * SLOT),
            start + k * SLOT + 5,
            f"smame/v1/{u}/reading",
            b"{}",
        )
        for u, last in (("R1", r1_slots), ("R2", 20))
        for k in range(0, last + 1)
    ]
    Ingestor(store, registry, GRID).commit(readings, [], now)
    store.close()
    return {("R2", i) for i in range(21, 49)}  # R3 has never sent anything: listed apart, its slots not counted


def mail_env(workdir: Path, port: int, smtp_port: int, **extra: str) -> dict[str, str]:
    return smame_env(
        workdir,
        port,
        SMAME_MAIL__SMTP_URL=f"smtp://127.0.0.1:{smtp_port}",
        SMAME_REPORT__SILENT_AFTER_S=SILENT_AFTER,
        SMAME_MAIL__SENDER="smame@example.jp",
        SMAME_MAIL__RECIPIENTS="ops@example.jp,night@example.jp",
        **extra,
    )


def test_daily_report_by_mail_and_slack(workdir: Path, day: date) -> None:
    missing = day_with_gaps(workdir, day)
    sink = SmtpSink().start()
    slack = SlackStandIn()
    try:
        env = mail_env(workdir, 1883, sink.port, SMAME_SLACK__WEBHOOK_URL=slack.url)
        out = smame(["report", "--date", day.isoformat(), "--send"], env).stdout
        assert "sent by mail, slack" in out
        [got] = sink.wait(1)
        assert sorted(got.recipients) == ["night@example.jp", "ops@example.jp"]
        msg = got.message
        assert (
            msg["Subject"]
            == f"[smame] daily report {day}: 1 of 2 units with missing data (28 slots), 1 never heard from"
        )
        assert msg["From"] == "smame@example.jp"
        text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
        assert f"R2 (C1): silent since {day} 10:00; missing 28: slots 21-48" in text
        assert "R1 (C1)" not in text
        assert "units never heard from (1): R3" in text and "R3 (C2)" not in text
        assert f"<b>R2</b> (C1): silent since {day} 10:00; missing 28: slots 21-48" in html and "<table" in html
        [attachment] = list(msg.iter_attachments())
        assert attachment.get_filename() == f"smame-problems-{day}.csv"
        rows = list(
            csv.DictReader(
                io.StringIO(
                    attachment.get_content().decode()
                    if isinstance(attachment.get_content(), bytes)
                    else attachment.get_content()
                )
            )
        )
        assert {(r["unit_id"], int(r["slot"])) for r in rows if r["problem"] == "missing"} == missing
        assert {r["problem"] for r in rows} == {"missing"}
        [post] = slack.wait(lambda posts: len(posts) >= 1)
        assert post.body["text"].startswith(f"[smame] daily report {day}")
        assert "*C1*: 2 units, 1 with gaps, 28 missing" in post.body["blocks"][1]["text"]["text"]
    finally:
        sink.stop()
        slack.stop()


def test_send_without_a_channel_says_what_to_set(workdir: Path, day: date) -> None:
    day_with_gaps(workdir, day)
    proc = smame(["report", "--date", day.isoformat(), "--send"], smame_env(workdir, 1883), check=False)
    assert proc.returncode == 2 and "mail.smtp_url or slack.webhook_url" in proc.stderr


def outbox(db: Path) -> dict[str, int]:
    with sqlite3.connect(db, timeout=10) as c:
        pending, sent = c.execute("SELECT count(*) FILTER (WHERE sent IS NULL), count(sent) FROM outbox").fetchone()
    return {"pending": pending, "sent": sent}


def test_mail_down_then_smame_restarted_each_message_arrives_once(workdir: Path, day: date) -> None:
    day_with_gaps(workdir, day)
    sink = SmtpSink()  # down at first
    env = mail_env(
        workdir,
        free_port(),  # no broker there: the broker alert fires
        sink.port,
        SMAME_REPORT__AT="00:00",
        SMAME_REPORT__CATCH_UP_WAIT_S="1",
        SMAME_ALERTS__CHECK_S="0.3",
        SMAME_ALERTS__BROKER_DOWN_S="1",
        SMAME_MONITORING__OUTBOX_RETRY_S="0.5",
    )
    db = workdir / "data" / "smame.db"
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    try:
        wait_log(log, "ALERT: broker unreachable")
        wait_log(log, "daily report for")
        wait_log(log, "retrying in")
        # the alert is logged a moment before it is queued
        wait_until(lambda: outbox(db) == {"pending": 2, "sent": 0}, 10, lambda: str(outbox(db)))
    finally:
        assert stop(proc) == 0
    sink.start()
    proc = start_smame(env, log)
    try:
        got = sink.wait(2)
        time.sleep(2)  # anything sent twice would arrive now
        subjects = sorted(m.message["Subject"] for m in sink.messages)
        assert len(subjects) == 2
        assert subjects[0] == "[smame] ALERT: broker unreachable"
        assert subjects[1].startswith("[smame] daily report ") and subjects[1].endswith("(may be incomplete)")
        report = next(m.message for m in sink.messages if m.message["Subject"] == subjects[1])
        assert (
            "NOTE: ingest had not caught up after 0 min (not connected to the broker)"
            in report.get_body(("plain",)).get_content()
        )  # type: ignore[union-attr]
        assert outbox(db) == {"pending": 0, "sent": 2}
        assert all(sorted(m.recipients) == ["night@example.jp", "ops@example.jp"] for m in got)
    finally:
        assert stop(proc) == 0
        sink.stop()


def test_live_alerts_reach_slack_start_and_clear(workdir: Path) -> None:
    broker = Mosquitto(workdir / "mq")
    slack = SlackStandIn()
    write_registry(workdir, {"S1": "C1", "S2": "C1", "S3": "C2"})
    metrics = free_port()
    env = smame_env(
        workdir,
        broker.port,
        SMAME_SLACK__WEBHOOK_URL=slack.url,
        SMAME_ALERTS__CHECK_S="0.3",
        SMAME_ALERTS__BROKER_DOWN_S="1",
        SMAME_ALERTS__SILENT_AFTER_S="3600",
        SMAME_ALERTS__SILENT_UNITS_MIN="2",
        SMAME_REPORT__ENABLED="false",
        **metrics_env(metrics),
    )
    log = workdir / "smame.log"
    proc = start_smame(env, log)

    def texts() -> list[str]:
        return [p.body["text"] for p in slack.delivered]

    try:
        wait_log(log, "subscribed to")
        # every unit's newest reading is two hours old: all three silent, said once as one alert
        old = datetime.fromtimestamp(GRID.floor(time.time() - 7200), timezone(timedelta(hours=9)))
        publish(broker.port, [(f"smame/v1/{u}/reading", telegram(u, [(old, 5)])) for u in ("S1", "S2", "S3")])
        slack.wait(lambda posts: any("many units silent" in p.body["text"] for p in posts))
        [silent] = [t for t in texts() if "many units silent" in t]
        assert "3 of 3 units have sent no reading for over 1 h 00 min; by customer: C1 2, C2 1" in silent
        broker.stop()
        slack.wait(lambda posts: any("ALERT: broker unreachable" in p.body["text"] for p in posts))
        active = ('smame_alert_active{alert="broker_unreachable"}', 'smame_alert_active{alert="units_silent"}')
        wait_until(lambda: all(scrape(metrics).get(k) == 1 for k in active), 10, lambda: str(scrape(metrics)))
        broker.start()  # without persistence: our session is gone
        slack.wait(lambda posts: any("RESOLVED: broker unreachable" in p.body["text"] for p in posts))
        slack.wait(lambda posts: any("EVENT: the broker lost smame's session" in p.body["text"] for p in posts))
        # Slack's stand-in records a post before smame has its answer and counts it: wait for the count to catch up.
        sent = 'smame_notifications_total{channel="slack",result="sent"}'
        wait_until(
            lambda: scrape(metrics).get(sent) == len(slack.delivered),
            10,
            lambda: f"{scrape(metrics).get(sent)} counted, {len(slack.delivered)} delivered",
        )
        time.sleep(1)  # anything sent twice would arrive now
        heads = [t.split("\n")[0] for t in texts()]
        assert heads.count("[smame] ALERT: broker unreachable") == 1
        assert heads.count("[smame] RESOLVED: broker unreachable") == 1
        assert heads.count("[smame] ALERT: many units silent") == 1
        assert scrape(metrics)[sent] == len(heads)
    finally:
        assert stop(proc) == 0
        broker.stop()
        slack.stop()


def test_after_a_restart_the_report_waits_for_the_backlog(broker: Mosquitto, workdir: Path, day: date) -> None:
    units = {f"B{i}": "C1" for i in range(20)}
    write_registry(workdir, units)
    sink = SmtpSink().start()
    env = mail_env(
        workdir,
        broker.port,
        sink.port,
        SMAME_REPORT__AT="00:00",
        SMAME_ALERTS__CHECK_S="0.3",
        SMAME_REPORT__ENABLED="false",
        SMAME_ALERTS__ENABLED="false",
    )
    env["SMAME_REPORT__SILENT_AFTER_S"] = "172800"  # the last reading is today 00:00: not silent at any hour
    log = workdir / "smame.log"
    try:
        proc = start_smame(env, log)  # once, so that the broker keeps a session for smame
        wait_log(log, "subscribed to")
        assert stop(proc) == 0
        start = GRID.day_start(day)
        jst = timezone(timedelta(hours=9))
        # yesterday whole, queued in smame's session while it was away: 49 readings of 20 units
        publish(
            broker.port,
            [
                (
                    f"smame/v1/{u}/reading",
                    telegram(u, [(datetime.fromtimestamp(start + k * SLOT, jst), 100 + k)], seq=k),
                )
                for k in range(49)
                for u in units
            ],
        )
        env["SMAME_REPORT__ENABLED"] = "true"
        proc = start_smame(env, log)
        try:
            [got] = sink.wait(1, timeout=30)
            assert got.message["Subject"] == f"[smame] daily report {day}: 0 of 20 units with missing data (0 slots)"
        finally:
            assert stop(proc) == 0
    finally:
        sink.stop()

"""The service sees itself: a leader that cannot ingest hands over, a stalled writer and a refused reload reach
the operators (real processes, a real Mosquitto, PostgreSQL and SMTP)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as expected
from selenium.webdriver.support.ui import WebDriverWait

from kernel.timegrid import Grid
from tests.databases import PostgresDatabase, count
from tests.helpers import (
    JST,
    ROOT,
    Mosquitto,
    Relay,
    at,
    free_port,
    publish,
    readings_in,
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
    yesterday,
)
from tests.monitoring.sinks import Received, SmtpSink
from tests.smame.test_failover import UNITS, burst_and, check_exactly_once, node_name_host, start_pair
from tests.web.test_console import PASSWORD

GRID = Grid("Asia/Tokyo")


def mail_env(sink: SmtpSink) -> dict[str, str]:
    return dict(
        SMAME_MAIL__SMTP_URL=f"smtp://127.0.0.1:{sink.port}",
        SMAME_MAIL__SENDER="smame@example.jp",
        SMAME_MAIL__RECIPIENTS="ops@example.jp",
        SMAME_REPORT__ENABLED="false",
        SMAME_ALERTS__CHECK_S="0.5",
    )


def watched(workdir: Path, broker: Mosquitto, sink: SmtpSink, **extra: str) -> tuple[dict[str, str], int]:
    """A node's environment with its metrics and /healthz on a free port (returned) and mail to `sink`."""
    port = free_port()
    metrics = dict(SMAME_MONITORING__ENABLED="true", SMAME_MONITORING__METRICS_PORT=str(port))
    return smame_env(workdir, broker.port, **metrics, **mail_env(sink), **extra), port


def subjects(sink: SmtpSink) -> list[str]:
    return [m.message["Subject"] for m in sink.messages]


def body(mail: Received) -> str:
    return str(mail.message.get_body(("plain",)).get_content())


def health(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_a_leader_cut_off_from_the_broker_hands_over_within_30_s_and_stays_out_while_cut(
    broker: Mosquitto, workdir: Path, postgres: PostgresDatabase
) -> None:
    url = postgres.fresh_url()
    write_registry(workdir, {f"K{u:04d}": f"C{u % 5}" for u in range(UNITS)})
    relay = Relay(broker.port)  # node a reaches the broker through it; node b directly
    sink = SmtpSink().start()
    try:
        a, b, log_a, log_b = start_pair(
            workdir, broker, url, {"a": {"SMAME_BROKER__URL": f"mqtt://127.0.0.1:{relay.port}"}}, **mail_env(sink)
        )
        start = GRID.day_start(yesterday())
        fault = threading.Event()
        sender = burst_and(url, broker, start, fault)
        assert fault.wait(60)
        relay.cut()
        cut = time.monotonic()
        before = count(url, "readings")
        wait_until(lambda: "subscribed to" in log_b.read_text(), 30, lambda: log_a.read_text()[-3000:], every=0.1)
        wait_until(lambda: count(url, "readings") > before, 30 - (time.monotonic() - cut), every=0.1)
        stored_again = time.monotonic() - cut
        sender.join(120)
        check_exactly_once(url, start)  # every reading exact, whatever a had received and not acknowledged
        print(f"stored again {stored_again:.1f} s after the cut")
        assert stored_again < 30, stored_again
        assert "this node no longer leads (epoch 1): handing over: cannot reach the broker" in log_a.read_text()
        # a stands by and, while it cannot reach the broker, says so and does not take leadership back
        time.sleep(5)
        assert log_a.read_text().count("leads now") == 1
        [event] = [m for m in sink.wait(2, 30) if m.message["Subject"] == "[smame] EVENT: another node leads now"]
        name_a, name_b = f"{node_name_host()}:{a.pid}", f"{node_name_host()}:{b.pid}"
        assert re.match(rf"node {name_b} leads now, epoch 2; {name_a}: cannot reach the broker for \d+ s", body(event))
        wait_until(
            lambda: "[smame] ALERT: a node cannot do its part" in subjects(sink), 15, lambda: str(subjects(sink))
        )
        [fault_mail] = [m for m in sink.messages if m.message["Subject"] == "[smame] ALERT: a node cannot do its part"]
        assert f"{name_a}: cannot reach the broker" in body(fault_mail)
        relay.mend()
        wait_until(
            lambda: "[smame] RESOLVED: a node cannot do its part" in subjects(sink), 30, lambda: str(subjects(sink))
        )
        assert log_a.read_text().count("leads now") == 1 and subjects(sink).count(event.message["Subject"]) == 1
        assert stop(a) == 0 and stop(b) == 0
    finally:
        sink.stop()
        relay.close()


@pytest.mark.slow
def test_a_stalled_writer_fails_healthz_and_is_alerted_then_nothing_is_lost(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"W1": "C1"})
    sink = SmtpSink().start()
    env, port = watched(workdir, broker, sink, SMAME_NODE__STALL_S="2")
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    try:
        wait_log(log, "subscribed to")
        writer = wait_child(proc, "smame-writer")
        day = yesterday().isoformat()
        publish(broker.port, [("smame/v1/W1/reading", telegram("W1", [(at(day, "00:00"), 1)]))])
        wait_readings(workdir / "data" / "smame.db", 1)
        assert health(port)[0] == 200
        os.kill(writer, signal.SIGSTOP)  # alive, holding its pipe, committing nothing
        try:
            publish(
                broker.port,
                [("smame/v1/W1/reading", telegram("W1", [(at(day, f"{h:02d}:00"), h)])) for h in range(1, 6)],
            )
            wait_until(lambda: health(port)[0] == 503, 15, lambda: str(health(port)))
            checks = health(port)[1]["checks"]
            assert isinstance(checks, dict) and re.fullmatch(
                r"stalled: 5 telegrams wait, no commit has finished for \d+ s", checks["ingest"]
            ), checks
            [alert] = sink.wait(1, 15)
            assert alert.message["Subject"] == "[smame] ALERT: ingest stalled: nothing committed"
            assert "the writer process or the store is stuck" in body(alert)
        finally:
            os.kill(writer, signal.SIGCONT)
        wait_readings(workdir / "data" / "smame.db", 6)
        wait_until(lambda: health(port)[0] == 200, 15, lambda: str(health(port)))
        sink.wait(2, 15)
        assert subjects(sink) == [
            "[smame] ALERT: ingest stalled: nothing committed",
            "[smame] RESOLVED: ingest stalled: nothing committed",
        ]
    finally:
        assert stop(proc) == 0
        sink.stop()


@pytest.mark.slow
def test_a_refused_registry_reload_fails_healthz_and_is_alerted(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"R1": "C1"})
    sink = SmtpSink().start()
    env, port = watched(workdir, broker, sink)
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    try:
        wait_log(log, "subscribed to")
        units = workdir / "units.csv"
        good = units.read_text()
        units.write_text(good + "R2,NOSUCHCUSTOMER,,,\n")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: health(port)[0] == 503, 15, lambda: str(health(port)))
        checks = health(port)[1]["checks"]
        assert isinstance(checks, dict) and checks["registry"].startswith("reload refused, the previous one kept: ")
        [alert] = sink.wait(1, 15)
        assert alert.message["Subject"] == "[smame] ALERT: registry reload refused"
        assert "NOSUCHCUSTOMER" in body(alert), body(alert)
        units.write_text(good)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: health(port)[0] == 200, 15, lambda: str(health(port)))
        sink.wait(2, 15)
        assert subjects(sink)[1] == "[smame] RESOLVED: registry reload refused"
    finally:
        assert stop(proc) == 0
        sink.stop()


@pytest.mark.slow
def test_a_leader_whose_writer_is_stopped_hands_over_and_nothing_is_lost(
    broker: Mosquitto, workdir: Path, postgres: PostgresDatabase
) -> None:
    url = postgres.fresh_url()
    write_registry(workdir, {f"K{u:04d}": f"C{u % 5}" for u in range(UNITS)})
    a, b, log_a, log_b = start_pair(
        workdir, broker, url, SMAME_REPORT__ENABLED="false", SMAME_ALERTS__ENABLED="false", SMAME_NODE__STALL_S="5"
    )
    writer = wait_child(a, "smame-writer")
    start = GRID.day_start(yesterday())
    fault = threading.Event()
    sender = burst_and(url, broker, start, fault)
    assert fault.wait(60)
    os.kill(writer, signal.SIGSTOP)  # alive, its pipe open, its session open: committing nothing
    stopped = time.monotonic()
    try:
        wait_until(lambda: "subscribed to" in log_b.read_text(), 30, lambda: log_a.read_text()[-3000:], every=0.1)
        took_over = time.monotonic() - stopped
        sender.join(120)
        check_exactly_once(url, start)
        # the stuck writer is killed, not waited for: the node stands by again while it would still be stopped
        wait_log(log_a, "this node no longer leads (epoch 1): handing over: ingest stalled", 20)
        wait_log(log_a, "standing by", 20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(writer, signal.SIGCONT)
    print(f"took over {took_over:.1f} s after the writer stopped")
    assert took_over < 5 + 10
    assert stop(a) == 0 and stop(b) == 0


@pytest.mark.slow
def test_a_standby_whose_export_fails_is_alerted_by_the_leader_and_shown_in_the_nodes_panel(
    broker: Mosquitto, workdir: Path, postgres: PostgresDatabase, browser: webdriver.Chrome
) -> None:
    url = postgres.fresh_url()
    write_registry(workdir, {"E1": "C1"})
    (workdir / "not-a-directory").write_text("")  # b's export directory cannot be made under a file (even as root)
    web = free_port()
    sink = SmtpSink().start()
    try:
        a, b, log_a, log_b = start_pair(
            workdir,
            broker,
            url,
            {
                "a": {"SMAME_WEB__ENABLED": "true", "SMAME_WEB__PORT": str(web)},
                "b": {"SMAME_EXPORT__DIR": str(workdir / "not-a-directory" / "export")},
            },
            **mail_env(sink),
        )
        env_a = smame_env(workdir, broker.port, SMAME_DATA_DIR=str(workdir / "a"), SMAME_STORAGE__URL=url)
        smame(["operators", "add", "alice", "--password-stdin"], env_a, stdin=PASSWORD + "\n")
        name_b = f"{node_name_host()}:{b.pid}"
        wait_until(
            lambda: "[smame] ALERT: a node cannot do its part" in subjects(sink), 60, lambda: str(subjects(sink))
        )
        [mail] = [m for m in sink.messages if m.message["Subject"] == "[smame] ALERT: a node cannot do its part"]
        assert f"{name_b}: " in body(mail) and "not-a-directory" in body(mail), body(mail)

        browser.get(f"http://127.0.0.1:{web}/login")
        browser.find_element(By.NAME, "name").send_keys("alice")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.CSS_SELECTOR, "form.login button").click()
        nodes = WebDriverWait(browser, 15).until(expected.presence_of_element_located((By.ID, "nodes")))
        rows = {r.find_elements(By.TAG_NAME, "td")[0].text: r for r in nodes.find_elements(By.CSS_SELECTOR, "tbody tr")}
        name_a = f"{node_name_host()}:{a.pid}"
        assert set(rows) == {f"{name_a} (this one)", name_b}, list(rows)
        cells_a = [td.text for td in rows[f"{name_a} (this one)"].find_elements(By.TAG_NAME, "td")]
        cells_b = [td.text for td in rows[name_b].find_elements(By.TAG_NAME, "td")]
        assert cells_a[1] == "leader, epoch 1" and cells_a[4] == "nothing", cells_a
        assert cells_b[1] == "standby" and "not-a-directory" in cells_b[4] and cells_b[3] == "never", cells_b
        assert re.fullmatch(r"\d+ s ago", cells_b[2]), cells_b
        assert browser.find_element(By.ID, "node").text == f"node {name_a} · leader · epoch 1"
        browser.save_screenshot(str(ROOT / "build" / "test-artifacts" / "console-nodes.png"))
        assert stop(a) == 0 and stop(b) == 0
    finally:
        sink.stop()


@pytest.mark.slow
def test_a_node_whose_clock_is_behind_the_fleets_acknowledges_nothing_and_loses_nothing(
    broker: Mosquitto, workdir: Path
) -> None:
    units = [f"F{u}" for u in range(5)]
    write_registry(workdir, {**{u: "C1" for u in units}, "LONE": "C2"})
    sink = SmtpSink().start()
    env, port = watched(workdir, broker, sink)
    db = workdir / "data" / "smame.db"
    log = workdir / "smame.log"
    # the fleet's clocks an hour ahead of this node's: as the node sees it, each telegram comes from the future
    ahead = GRID.floor(time.time()) + 3600
    fleet = [
        (f"smame/v1/{u}/reading", telegram(u, [(datetime.fromtimestamp(ahead, JST), 100 + k)], seq=2))
        for k, u in enumerate(units)
    ]
    proc = start_smame(env, log)
    try:
        wait_log(log, "subscribed to")
        # one unit alone with a clock ahead is that unit's fault: quarantined as ever, nothing held up
        publish(broker.port, [("smame/v1/LONE/reading", telegram("LONE", [(datetime.fromtimestamp(ahead, JST), 1)]))])
        wait_until(lambda: quarantined(db) == [("LONE", "future")], 15)
        publish(broker.port, fleet)
        wait_until(lambda: health(port)[0] == 503, 15, lambda: str(health(port)))
        checks = health(port)[1]["checks"]
        assert isinstance(checks, dict) and checks["ingest"].startswith(
            "refusing to acknowledge: readings of 5 of the 5 units in a batch lie in the future"
        ), checks
        [alert] = sink.wait(1, 15)
        assert alert.message["Subject"] == "[smame] ALERT: this node's clock is behind the units'"
        assert readings_in(db) == 0 and quarantined(db) == [("LONE", "future")]  # nothing taken, nothing lost
    finally:
        assert stop(proc) == 0
        sink.stop()
    # set right (here: a node that accepts readings an hour and a half ahead), it gets every one from the broker
    proc = start_smame(smame_env(workdir, broker.port, SMAME_INGEST__CLOCK_TOLERANCE_S="5400"), log)
    try:
        wait_readings(db, len(units))
        assert quarantined(db) == [("LONE", "future")]
    finally:
        assert stop(proc) == 0


def quarantined(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as c:
        return [(str(u), str(r)) for u, r in c.execute("SELECT unit, reason FROM quarantine ORDER BY id")]


@pytest.mark.slow
def test_a_store_no_node_can_use_is_told_directly_and_its_end_too(
    broker: Mosquitto, workdir: Path, postgres: PostgresDatabase
) -> None:
    url = postgres.fresh_url()
    write_registry(workdir, {"S1": "C1"})
    sink = SmtpSink().start()
    env, port = watched(workdir, broker, sink, SMAME_STORAGE__URL=url, SMAME_ALERTS__STORE_DOWN_S="3")
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    try:
        wait_log(log, "subscribed to")
        name = f"{node_name_host()}:{proc.pid}"
        # another session locks smame's meta table: the leader's beat, and any node's election, wait on it;
        # the outbox, in the same store, can neither take nor send a message
        with psycopg.connect(url) as admin:
            admin.execute("LOCK TABLE meta IN ACCESS EXCLUSIVE MODE")
            [alert] = sink.wait(1, 40)
            assert alert.message["Subject"] == "[smame] ALERT: the store cannot be reached"
            assert f"node {name} cannot use the store: no answer" in body(alert)
            status, about = health(port)
            assert status == 503 and about["role"] == "standby", about
        wait_log(log, "leads now, epoch 2", 30)  # the lock gone, it leads again
        sink.wait(2, 30)
        assert subjects(sink) == [
            "[smame] ALERT: the store cannot be reached",
            "[smame] RESOLVED: the store cannot be reached",
        ]
        day = yesterday().isoformat()
        publish(broker.port, [("smame/v1/S1/reading", telegram("S1", [(at(day, "10:00"), 1)]))])
        wait_until(lambda: count(url, "readings") == 1, 15)
    finally:
        assert stop(proc) == 0
        sink.stop()

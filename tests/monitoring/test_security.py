"""Security events: each kind said at once, then gathered into one message an hour; true after a restart."""

from __future__ import annotations

import ftplib
import json
import time
from pathlib import Path

import pytest

from monitoring.security import HOUR, SecurityEvents
from tests.helpers import (
    Mosquitto,
    at,
    free_port,
    publish,
    smame,
    smame_env,
    start_smame,
    stop,
    telegram,
    wait_log,
    wait_readings,
    write_registry,
    yesterday,
)
from tests.monitoring.sinks import SlackStandIn

T = 1_800_000_000.0 - 1_800_000_000.0 % HOUR  # the start of an hour


def test_each_kind_is_said_at_most_once_an_hour_with_everything_gathered() -> None:
    s = SecurityEvents(failed_logins_min=3)
    everywhere = " (a banned address is kept from FTP, SFTP, the API and the console alike)"
    s.ban("192.0.2.1", "the API")  # the door it guessed at is named: not every ban is the file gateway's
    [(kind, text)] = s.due(T + 10)
    assert kind == "security_ban" and text == "1 ban(s) after repeated failed logins: 192.0.2.1 at the API" + everywhere
    s.ban("192.0.2.2", "SFTP")
    s.ban("192.0.2.2", "SFTP")
    assert s.due(T + 20) == []  # said this hour already: gathered for the next
    [(_, text)] = s.due(T + HOUR + 5)
    assert text == "2 ban(s) after repeated failed logins: 192.0.2.2 at SFTP (2x)" + everywhere
    for _ in range(2):
        s.failed_login("alice", "192.0.2.9")
    assert s.due(T + HOUR + 6) == []  # two failures: typing, not an attack
    s.failed_login("alice", "192.0.2.8")
    [(kind, text)] = s.due(T + HOUR + 7)
    assert (
        kind == "security_failed_logins" and text == "failed FTP/SFTP logins by user: alice 3 from 192.0.2.8, 192.0.2.9"
    )
    s.failed_login("bob", "192.0.2.7")
    s.failed_login("bob", "192.0.2.7")
    s.due(T + 2 * HOUR)  # a new hour: bob's two are forgotten, not counted on for ever
    s.failed_login("bob", "192.0.2.7")
    assert s.due(T + 2 * HOUR + 1) == []
    s.mismatches(["unit 'U2' published on the topic of 'U1'"] * 3)
    [(kind, text)] = s.due(T + 2 * HOUR + 2)
    assert kind == "security_unit_mismatch" and text.startswith("3 telegram(s) refused as unit_mismatch")


def test_failures_before_the_first_look_count_towards_the_threshold() -> None:
    s = SecurityEvents(failed_logins_min=2)
    s.failed_login("mallory", "192.0.2.5")
    assert s.due(T + 10) == []  # the monitor's first look, between two failures: the first is this hour's
    s.failed_login("mallory", "192.0.2.5")
    [(kind, _)] = s.due(T + 11)
    assert kind == "security_failed_logins"


def test_a_telegram_under_another_units_topic_reaches_slack(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"S1": "C1", "S2": "C1"})
    slack = SlackStandIn()
    env = smame_env(
        workdir,
        broker.port,
        SMAME_SLACK__WEBHOOK_URL=slack.url,
        SMAME_ALERTS__CHECK_S="0.3",
        SMAME_REPORT__ENABLED="false",
        SMAME_ALERTS__SILENT_UNITS_MIN="100",
    )
    log = workdir / "smame.log"
    day = yesterday().isoformat()
    proc = start_smame(env, log)
    try:
        wait_log(log, "subscribed to")
        forged = telegram("S2", [(at(day, "10:00"), 5)])
        publish(broker.port, [("smame/v1/S1/reading", forged)] * 2)
        [post] = slack.wait(lambda posts: any("security" in p.body["text"] for p in posts))
        assert post.body["text"].startswith("[smame] EVENT: security: telegrams under another unit's topic\n")
        assert "2 telegram(s) refused as unit_mismatch" in post.body["text"]
        assert "unit 'S2' published on the topic of 'S1' (2x)" in post.body["text"]
    finally:
        assert stop(proc) == 0
    proc = start_smame(env, log)  # a restart does not tell it again
    try:
        wait_log(log, "subscribed to")
        publish(broker.port, [("smame/v1/S1/reading", telegram("S1", [(at(day, "10:00"), 5)]))])
        wait_readings(workdir / "data" / "smame.db", 1)
        time.sleep(1)  # three monitor checks: anything told twice would be queued by now
    finally:
        assert stop(proc) == 0
    assert sum("security" in p.body["text"] for p in slack.delivered) == 1
    slack.stop()


def test_a_ban_and_the_failed_logins_behind_it_reach_slack(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"S1": "C1"})
    slack = SlackStandIn()
    port = free_port()
    env = smame_env(
        workdir,
        broker.port,
        SMAME_SLACK__WEBHOOK_URL=slack.url,
        SMAME_ALERTS__CHECK_S="0.3",
        SMAME_REPORT__ENABLED="false",
        SMAME_FTP__ENABLED="true",
        SMAME_FTP__HOST="127.0.0.1",
        SMAME_FTP__PORT=str(port),
        SMAME_FTP__TLS_REQUIRED="false",
        SMAME_FTP__BAN_AFTER="2",
        SMAME_FTP__FAIL_DELAY_S="0",
        SMAME_FTP__PASSIVE_PORTS=f"{40000 + port % 20000}-{40009 + port % 20000}",
    )
    smame(["users", "add", "C1", "alice", "--password-stdin"], env, stdin="alice-password-1\n")
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    try:
        wait_log(log, "ftp: listening")
        stranger = "<!channel> <https://evil.example/reset|reset your password>"  # a user name from outside
        for user in (stranger, stranger):
            client = ftplib.FTP()
            client.connect("127.0.0.1", port, timeout=10)
            with pytest.raises(ftplib.error_perm):
                client.login(user, "wrong-password")
            client.close()
        posts = slack.wait(lambda posts: sum("security" in p.body["text"] for p in posts) >= 2)
        texts = {p.body["text"].split("\n")[0]: p.body["text"] for p in posts if "security" in p.body["text"]}
        assert (
            "1 ban(s) after repeated failed logins: 127.0.0.1 at FTP"
            in texts["[smame] EVENT: security: addresses banned after failed logins"]
        )
        failed = texts["[smame] EVENT: security: repeated failed logins"]
        # shown as text in Slack: no mention of the channel, no hidden link
        assert "&lt;!channel&gt; &lt;https://evil.example/reset|reset your password&gt; 2 from 127.0.0.1" in failed
        assert all("<!channel>" not in json.dumps(p.body) and "<https://evil" not in json.dumps(p.body) for p in posts)
    finally:
        assert stop(proc) == 0
        slack.stop()

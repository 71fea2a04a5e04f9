"""Two `smame run` nodes on one PostgreSQL store and one broker: one leads, the other takes over when the leader
dies, stops or loses the store; every reading is stored once, and a deposed leader commits nothing more."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
import urllib.request
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from subprocess import Popen

import paramiko
import psycopg
import pytest

from aggregator.ingest import Ingestor, UnitTable
from aggregator.postgres import PostgresStore
from aggregator.store import Deposed
from kernel.meter import Limits
from kernel.reading import Incoming, Reading
from kernel.timegrid import SLOT, Grid
from tests.broker_bridge.test_no_loss import ROUNDS, UNITS, register  # the same burst: 21,000 telegrams
from tests.databases import PostgresDatabase, count, query
from tests.ftp_gateway.test_gateway import PASSWORDS, Gateway, ftps, retr, sftp
from tests.helpers import (
    JST,
    Mosquitto,
    free_port,
    gateway_env,
    publish,
    scrape,
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

GRID = Grid("Asia/Tokyo")


def rounds(start: int) -> list[list[tuple[str, bytes]]]:
    return [
        [
            (
                f"smame/v1/K{u:04d}/reading",
                telegram(f"K{u:04d}", [(datetime.fromtimestamp(start + k * SLOT, JST), register(u, k))], seq=k),
            )
            for u in range(UNITS)
        ]
        for k in range(ROUNDS)
    ]


def truth(start: int) -> dict[tuple[str, int], tuple[int, str]]:
    return {
        (f"K{u:04d}", start + k * SLOT): ((register(u, k) - register(u, k - 1)) % 10**6, "A")
        for u in range(UNITS)
        for k in range(1, ROUNDS)
    }


def node(workdir: Path, name: str, broker: Mosquitto, url: str, **extra: str) -> tuple[dict[str, str], Path]:
    """A node's environment (its own data and export directories, the shared store, broker and client id)."""
    env = smame_env(
        workdir,
        broker.port,
        SMAME_DATA_DIR=str(workdir / name),
        SMAME_STORAGE__URL=url,
        SMAME_BROKER__CLIENT_ID=f"smame-ha-{workdir.name}",
        SMAME_BROKER__BATCH_SIZE="500",
        SMAME_BROKER__BATCH_DELAY_MS="50",
        **extra,
    )
    return env, workdir / f"{name}.log"


def leader_of(url: str) -> tuple[str, int]:
    """The leading node and the epoch, as the store records them."""
    [(value,)] = query(url, "SELECT value FROM meta WHERE key = 'leader'")
    row = json.loads(value)
    return row["node"], row["epoch"]


def start_pair(
    workdir: Path, broker: Mosquitto, url: str, per_node: dict[str, dict[str, str]] | None = None, **extra: str
) -> tuple[Popen[bytes], Popen[bytes], Path, Path]:
    """Node a, which leads once it has subscribed, then node b, standing by."""
    per_node = per_node or {}
    env_a, log_a = node(workdir, "a", broker, url, **extra, **per_node.get("a", {}))
    env_b, log_b = node(workdir, "b", broker, url, **extra, **per_node.get("b", {}))
    a = start_smame(env_a, log_a)
    wait_log(log_a, "subscribed to", 30)
    b = start_smame(env_b, log_b)
    wait_log(log_b, "standing by", 30)
    assert leader_of(url)[0] == f"{node_name_host()}:{a.pid}"
    return a, b, log_a, log_b


def node_name_host() -> str:
    return socket.gethostname()[:40]


def burst_and(url: str, broker: Mosquitto, start: int, fault: threading.Event) -> threading.Thread:
    """Publish the burst in the background; `fault` is set once a fifth of it is stored."""

    def publisher() -> None:
        for i, messages in enumerate(rounds(start)):
            publish(broker.port, messages)
            if i == 4:
                wait_until(lambda: count(url, "readings") >= 4 * UNITS, 60, every=0.02)
                fault.set()
            time.sleep(0.05)

    sender = threading.Thread(target=publisher)
    sender.start()
    return sender


def check_exactly_once(url: str, start: int) -> None:
    wait_until(
        lambda: count(url, "readings") >= UNITS * ROUNDS,
        120,
        lambda: f"{count(url, 'readings')} of {UNITS * ROUNDS} stored",
        every=0.2,
    )
    time.sleep(1)  # anything redelivered late would show up as an extra row or a conflict
    assert count(url, "readings") == UNITS * ROUNDS
    assert count(url, "quarantine") == 0
    slots = {(u, s): (imp, q) for u, s, imp, q in query(url, "SELECT unit, slot, imp, imp_q FROM slots")}
    assert slots == truth(start)


@pytest.mark.slow
def test_kill_9_of_the_leader_mid_burst_the_standby_takes_over_and_the_report_goes_once(
    broker: Mosquitto, workdir: Path, postgres: PostgresDatabase
) -> None:
    url = postgres.fresh_url()
    write_registry(workdir, {f"K{u:04d}": f"C{u % 5}" for u in range(UNITS)})
    sink = SmtpSink().start()
    mail = dict(
        SMAME_MAIL__SMTP_URL=f"smtp://127.0.0.1:{sink.port}",
        SMAME_MAIL__SENDER="smame@example.jp",
        SMAME_MAIL__RECIPIENTS="ops@example.jp",
        SMAME_REPORT__AT="00:00",  # yesterday's report is due at once
        SMAME_ALERTS__ENABLED="false",
        SMAME_ALERTS__CHECK_S="0.3",
    )
    try:
        a, b, log_a, log_b = start_pair(workdir, broker, url, **mail)
        [report] = sink.wait(1, timeout=30)  # sent by the leader only
        assert report.message["Subject"].startswith(f"[smame] daily report {yesterday()}")

        start = GRID.day_start(yesterday())
        fault = threading.Event()
        sender = burst_and(url, broker, start, fault)
        assert fault.wait(60)
        a.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        a.wait(10)
        wait_until(lambda: "subscribed to" in log_b.read_text(), 10, lambda: log_b.read_text()[-2000:], every=0.05)
        took_over = time.monotonic() - killed
        sender.join(120)
        assert 4 * UNITS <= count(url, "readings"), "the kill must land mid-burst"
        check_exactly_once(url, start)
        assert leader_of(url) == (f"{node_name_host()}:{b.pid}", 2)
        # the failover is told once, by the new leader, with why the old one went
        [_, event] = sink.wait(2, timeout=30)
        assert event.message["Subject"] == "[smame] EVENT: another node leads now"
        text = event.message.get_body(("plain",)).get_content()
        host = node_name_host()
        assert f"node {host}:{b.pid} leads now, epoch 2; {host}:{a.pid}: it went without handing over" in text
        time.sleep(2)  # a second report or event would be on its way now
        assert len(sink.messages) == 2, [m.message["Subject"] for m in sink.messages]
        assert took_over < 10
        assert stop(b) == 0
    finally:
        sink.stop()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["terminate", "sigstop"])
def test_a_leader_cut_off_from_the_store_or_stopped_is_replaced_and_commits_nothing_more(
    broker: Mosquitto, workdir: Path, postgres: PostgresDatabase, fault: str
) -> None:
    url = postgres.fresh_url()
    write_registry(workdir, {f"K{u:04d}": f"C{u % 5}" for u in range(UNITS)})
    a, b, log_a, log_b = start_pair(workdir, broker, url, SMAME_REPORT__ENABLED="false", SMAME_ALERTS__ENABLED="false")
    a_name, epoch = leader_of(url)
    start = GRID.day_start(yesterday())
    at_fault = threading.Event()
    sender = burst_and(url, broker, start, at_fault)
    assert at_fault.wait(60)
    if fault == "terminate":  # the leader's session ended by the server, as a network cut or a DBA would
        with psycopg.connect(url, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = %s",
                (f"smame node {a_name}",),
            ).fetchone()
        assert ended == (1,)  # the session that holds the leadership lock
    else:
        a.send_signal(signal.SIGSTOP)
    faulted = time.monotonic()
    wait_until(lambda: "leads now" in log_b.read_text(), 10, lambda: log_b.read_text()[-2000:], every=0.05)
    wait_until(lambda: "subscribed to" in log_b.read_text(), 10 - (time.monotonic() - faulted), every=0.05)
    if fault == "sigstop":
        a.send_signal(signal.SIGCONT)
    wait_until(lambda: "no longer leads" in log_a.read_text(), 15, lambda: log_a.read_text()[-3000:])
    sender.join(120)
    check_exactly_once(url, start)
    assert leader_of(url) == (f"{node_name_host()}:{b.pid}", epoch + 1)
    # the deposed node stands by: it neither holds the broker session nor acknowledges
    wait_log(log_a, "standing by", 15)
    assert re.findall(r"leads now, epoch (\d+)", log_a.read_text()) == [str(epoch)]
    assert stop(a) == 0 and stop(b) == 0


def test_a_commit_of_an_old_epoch_waits_for_or_yields_to_the_new_one(postgres: PostgresDatabase) -> None:
    """The fence itself, on two real connections: raising the epoch waits for a commit in flight, and after it
    a commit of the old epoch is refused and writes nothing."""
    url = postgres.fresh_url()
    units = UnitTable({"F1": ("C1", Limits(Fraction(100)))})
    old, new = PostgresStore(url), PostgresStore(url)
    new.set_meta("epoch", "1")
    ingestor = Ingestor(old, units, GRID, epoch=1)
    start = GRID.day_start(yesterday())

    def incoming(k: int) -> list[Incoming]:
        r = Reading("F1", start + k * SLOT, "SM", 100 + k, 0, 1, 1, 6, k, start + k * SLOT)
        return [Incoming(r, r.at, "smame/v1/F1/reading", b"{}")]

    ingestor.commit(incoming(0), [], start)
    raised = threading.Event()
    [(bump_pid,)] = new.execute("SELECT pg_backend_pid()").fetchall()

    def raise_epoch() -> None:
        with new.transaction():
            new.execute("UPDATE meta SET value = '2' WHERE key = 'epoch'")
        raised.set()

    with old.transaction(), psycopg.connect(url, autocommit=True) as watcher:  # a commit of epoch 1 in flight
        old.check_epoch(1)
        bump = threading.Thread(target=raise_epoch)
        bump.start()
        # the new epoch waits for the commit in flight: the server shows its session waiting for a lock (asked
        # without timed waits, which Debian's faketime breaks in the shifted pass)
        for _ in range(20_000):
            row = watcher.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (bump_pid,)).fetchone()
            if row == ("Lock",) or raised.is_set():
                break
        assert row == ("Lock",) and not raised.is_set(), "the new epoch must wait for the commit in flight"
        r = incoming(1)[0].reading
        old.insert_readings(
            [(r.unit, r.at, r.meter, r.fwd, r.rev, r.e1, r.coef, r.digits, 0, r.seq, r.sent, r.at, None)]
        )
    bump.join()
    assert raised.is_set()
    with pytest.raises(Deposed, match="epoch 1.*epoch 2"):
        ingestor.commit(incoming(2), [], start)
    assert count(url, "readings") == 2  # the one before and the one in flight; not the one after
    old.close()
    new.close()


@pytest.mark.slow
def test_both_nodes_serve_the_same_files_over_ftps_and_sftp(
    broker: Mosquitto, workdir: Path, postgres: PostgresDatabase
) -> None:
    url = postgres.fresh_url()
    write_registry(workdir, {f"K{u:04d}": f"C{u % 2}" for u in range(20)})
    gateways = {}
    for name in ("a", "b"):
        ftp, sftp_port = free_port(), free_port()
        gateways[name] = dict(
            **gateway_env(ftp, sftp_port),
            SMAME_MONITORING__ENABLED="true",
            SMAME_MONITORING__HOST="127.0.0.1",
            SMAME_MONITORING__METRICS_PORT=str(free_port()),
        )
    env_a, _ = node(workdir, "a", broker, url)
    smame(["users", "add", "C1", "alice", "--password-stdin"], env_a, stdin=PASSWORDS["alice"] + "\n")
    slack = SlackStandIn()
    a, b, log_a, log_b = start_pair(
        workdir,
        broker,
        url,
        SMAME_REPORT__ENABLED="false",
        SMAME_SLACK__WEBHOOK_URL=slack.url,
        SMAME_ALERTS__CHECK_S="0.3",
        SMAME_FTP__BAN_AFTER="2",
        SMAME_FTP__FAIL_DELAY_S="0",
        per_node=gateways,
    )
    metrics = {n: int(gateways[n]["SMAME_MONITORING__METRICS_PORT"]) for n in ("a", "b")}
    # an operator sees at once which node leads, and in which epoch
    health = {
        n: json.loads(urllib.request.urlopen(f"http://127.0.0.1:{p}/healthz", timeout=5).read())
        for n, p in metrics.items()
    }
    assert health["a"]["role"] == "leader" and health["b"]["role"] == "standby", health
    assert health["a"]["epoch"] == health["b"]["epoch"] == 1 and health["b"]["leader"] == health["a"]["node"]
    assert health["a"]["status"] == health["b"]["status"] == "ok", health  # a standby off the broker is fine
    assert scrape(metrics["a"])["smame_leader"] == 1 and scrape(metrics["b"])["smame_leader"] == 0
    assert scrape(metrics["b"])["smame_leader_epoch"] == 1
    # each node's first export has run (on the leader once the backlog was drained): what comes now is new
    wait_until(lambda: all(scrape(p)["smame_export_last_success_timestamp_seconds"] > 0 for p in metrics.values()), 30)
    start = GRID.day_start(yesterday())
    publish(
        broker.port,
        [
            (
                f"smame/v1/K{u:04d}/reading",
                telegram(f"K{u:04d}", [(datetime.fromtimestamp(start + k * SLOT, JST), 10 * k + u)], seq=k),
            )
            for k in range(49)
            for u in range(20)
        ],
    )
    wait_until(lambda: count(url, "readings") >= 49 * 20, 30)
    name = f"C1_{yesterday():%Y%m%d}.csv"
    files = {n: workdir / n / "export" / "C1" / name for n in ("a", "b")}
    for n, proc in (("a", a), ("b", b)):  # one after the other: each node renders what it has not yet
        asked = time.time()
        proc.send_signal(signal.SIGHUP)  # export now, not at the next half hour
        wait_until(lambda: scrape(metrics[n])["smame_export_last_success_timestamp_seconds"] > asked, 30)  # noqa: B023
        assert files[n].read_text().count("\n") == 1 + 10 * 48  # the header, 48 slots of C1's ten units
    served = {}
    for n, proc, log in (("a", a, log_a), ("b", b, log_b)):
        g = Gateway(
            env_a,
            int(gateways[n]["SMAME_FTP__PORT"]),
            int(gateways[n]["SMAME_SFTP__PORT"]),
            workdir / n / "export",
            log,
            proc,  # type: ignore[arg-type]
        )
        client = ftps(g)
        try:
            served[(n, "ftps")] = retr(client, name)
        finally:
            client.close()
        with sftp(g) as s:
            served[(n, "sftp")] = s.open(name).read()
    assert len(set(served.values())) == 1 and served[("a", "ftps")] == files["a"].read_bytes()

    # someone guessing passwords at the standby: its ban reaches Slack through the shared outbox, once
    for _ in range(2):
        with pytest.raises(paramiko.AuthenticationException):
            sftp(Gateway(env_a, 0, int(gateways["b"]["SMAME_SFTP__PORT"]), workdir / "b", log_b, b), password="wrong")  # type: ignore[arg-type]
    posts = slack.wait(lambda posts: any("addresses banned" in p.body["text"] for p in posts))
    time.sleep(1)  # a second copy would be on its way now
    banned = [p for p in slack.posts if "addresses banned" in p.body["text"]]
    assert len(banned) == 1 and "127.0.0.1" in banned[0].body["text"], posts
    assert stop(a) == 0 and stop(b) == 0
    slack.stop()


@pytest.mark.slow
def test_commands_and_a_campaign_carry_on_across_a_leader_failover_and_nothing_is_sent_twice(
    broker: Mosquitto, workdir: Path, postgres: PostgresDatabase
) -> None:
    from simulators.devices import UnitDevice
    from tests.smame.test_devices import Units

    url = postgres.fresh_url()
    write_registry(workdir, {f"D{u}": "C1" for u in range(8)})
    web = {name: free_port() for name in "ab"}
    image = workdir / "fw.bin"
    image.write_bytes(bytes(range(256)) * 32)
    per_node = {n: {"SMAME_WEB__ENABLED": "true", "SMAME_WEB__PORT": str(port)} for n, port in web.items()}
    extra = dict(
        SMAME_REPORT__ENABLED="false",
        SMAME_ALERTS__ENABLED="false",
        SMAME_DEVICES__RETRY_S="1",
        SMAME_DEVICES__CAMPAIGN_EVERY_S="0.5",
        SMAME_DEVICES__FIRMWARE_URL=f"http://127.0.0.1:{web['b']}",  # the standby's web server serves images too
    )
    # D0..D5 answer; D2 loses its update's answer (judged by its version once asked); D6 and D7 are away
    devices = [UnitDevice(f"D{u}", fw_fault="lost" if u == 2 else "") for u in range(6)]
    units = Units(broker.port, devices)
    a, b, log_a, log_b = start_pair(workdir, broker, url, per_node, **extra)
    env_b = node(workdir, "b", broker, url, **extra, **per_node["b"])[0]
    try:
        smame(["units", "cmd", "ping", "--customer", "C1"], env_b)  # the command line works on any node
        smame(["firmware", "add", str(image), "--version", "2.4.0"], env_b)
        started = smame(
            [
                *("campaign", "start", "--version", "2.4.0", "--units", "D0,D1,D2,D3,D4,D5"),
                *("--waves", "50,100", "--timeout", "5", "--abort-min", "6"),
            ],
            env_b,
        ).stdout
        campaign = started.split()[1].rstrip(":")
        wait_until(lambda: count(url, "commands WHERE op = 'fw'") >= 3, 30, every=0.1)  # the first wave is out
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        wait_until(lambda: "subscribed to" in log_b.read_text(), 15, lambda: log_b.read_text()[-2000:], every=0.05)

        def phase() -> str:
            return str(query(url, f"SELECT phase FROM campaigns WHERE id = '{campaign}'")[0][0])

        wait_until(lambda: phase() == "done", 60, phase, every=0.2)
        assert [u.fw for u in devices] == ["2.4.0"] * 6
        # one fw command a unit, carried out once; each ping once, under the id it was queued with
        fw = query(url, "SELECT unit, count(*) FROM commands WHERE op = 'fw' GROUP BY unit")
        assert sorted(fw) == [(f"D{u}", 1) for u in range(6)]
        assert all(n == 1 for d in devices for n in d.carried_out.values())
        pings = dict(query(url, "SELECT unit, id FROM commands WHERE op = 'ping' AND who LIKE 'cli:%'"))
        assert len(pings) == 8
        late = Units(broker.port, [away := UnitDevice("D6")])
        try:
            wait_until(lambda: query(url, f"SELECT state FROM commands WHERE id = '{pings['D6']}'")[0][0] == "done", 20)
            assert dict(away.carried_out) == {pings["D6"]: 1}  # the new leader published it under its id
        finally:
            late.close()
        assert stop(b) == 0
    finally:
        units.close()
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()

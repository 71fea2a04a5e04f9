"""`smame provision` against the real mosquitto binary: each unit publishes only under its own topic, strangers
are refused, TLS below 1.2 is refused, and running it again keeps what units in the field already use."""

from __future__ import annotations

import asyncio
import csv
import os
import pwd
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from broker_bridge.mqtt import MQTT311, ConnectionRefused, MqttClient, MqttError
from tests.helpers import (
    ROOT,
    Mosquitto,
    at,
    free_port,
    real_processes,
    smame,
    smame_env,
    start_smame,
    stop,
    telegram,
    wait_log,
    wait_port,
    wait_readings,
    wait_until,
    write_registry,
)
from tests.rabbitmq import RabbitCluster, RabbitNode

V5 = paho.MQTTv5


def provisioned(workdir: Path, units: dict[str, str], *extra: str) -> tuple[Path, int, int]:
    """Registry files, `smame provision` into workdir/broker, and a broker on its configuration."""
    write_registry(workdir, units)
    port, tls_port = free_port(), free_port()
    out = workdir / "broker"
    smame(
        [
            "provision",
            "--registry",
            str(workdir / "units.csv"),
            "--out",
            str(out),
            "--port",
            str(port),
            "--tls-port",
            str(tls_port),
            "--data-dir",
            str(workdir / "mqdata"),
            *extra,
        ],
        smame_env(workdir, port),
    )
    return out, port, tls_port


def start_broker(workdir: Path, out: Path, port: int) -> Mosquitto:
    (workdir / "mqdata").mkdir(exist_ok=True)
    # started as root, mosquitto would drop to its own user, who may not read the private files
    return Mosquitto.from_config(workdir / "mq", (out / "mosquitto.conf").read_text() + "user root\n", port)


def credentials(out: Path) -> dict[str, str]:
    with (out / "unit-credentials.csv").open() as f:
        return {r["unit_id"]: r["password"] for r in csv.DictReader(f)}


def ingest_login(out: Path) -> tuple[str, str]:
    env = dict(line.split("=", 1) for line in (out / "smame-broker.env").read_text().splitlines())
    return env["SMAME_BROKER__USERNAME"], env["SMAME_BROKER__PASSWORD"]


class Client:
    """A paho MQTT 5 client that records what happens to it."""

    def __init__(
        self, port: int, user: str | None, password: str | None, tls: ssl.SSLContext | None = None, client_id: str = ""
    ) -> None:
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=V5)
        if user is not None:
            self.c.username_pw_set(user, password)
        if tls is not None:
            self.c.tls_set_context(tls)
        self.connack: ReasonCode | None = None
        self.acks: dict[int, ReasonCode] = {}
        self.granted: list[ReasonCode] = []
        self.received: list[str] = []
        self.connected = threading.Event()
        self.c.on_connect = lambda c, u, f, rc, p: (setattr(self, "connack", rc), self.connected.set())
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.granted.extend(rcs)
        self.c.on_message = lambda c, u, m: self.received.append(m.topic)
        self.error: Exception | None = None
        try:
            self.c.connect("127.0.0.1", port)
        except (OSError, ssl.SSLError) as exc:
            self.error = exc
            return
        self.c.loop_start()
        self.connected.wait(5)

    @property
    def ok(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def publish(self, topic: str, payload: bytes = b"{}") -> ReasonCode:
        info = self.c.publish(topic, payload, qos=1)
        wait_until(lambda: info.mid in self.acks, 5, every=0.02)
        return self.acks[info.mid]

    def close(self) -> None:
        if self.error is None:
            self.c.disconnect()
            self.c.loop_stop()


def test_each_unit_publishes_only_under_its_own_topic_and_ingest_only_reads(workdir: Path) -> None:
    out, port, _ = provisioned(workdir, {"U1": "C1", "U2": "C1"})
    broker = start_broker(workdir, out, port)
    pw = credentials(out)
    ingest = Client(port, *ingest_login(out))
    u1 = Client(port, "U1", pw["U1"])
    try:
        assert ingest.ok and u1.ok
        ingest.c.subscribe("smame/v1/+/reading", qos=1)
        wait_until(lambda: ingest.granted)
        assert not ingest.granted[0].is_failure
        # mosquitto grants a wildcard subscription and checks read access per message: U1 must get nothing
        u1.c.subscribe("smame/v1/+/reading", qos=1)
        wait_until(lambda: u1.granted)
        assert not u1.publish("smame/v1/U1/reading").is_failure
        assert u1.publish("smame/v1/U2/reading").getName() == "Not authorized"  # another unit's topic
        assert u1.publish("smame/v1/U1/other").getName() == "Not authorized"
        assert ingest.publish("smame/v1/U1/reading").getName() == "Not authorized"  # ingest cannot forge readings
        assert ingest.publish("smame/v1/smame-ingest/reading").getName() == "Not authorized"  # nor as itself
        wait_until(lambda: ingest.received)
        time.sleep(0.3)
        assert ingest.received == ["smame/v1/U1/reading"]
        assert u1.received == []
    finally:
        ingest.close()
        u1.close()
        broker.stop()


def test_a_unit_reads_only_its_own_commands_and_ingest_writes_commands_and_reads_answers(workdir: Path) -> None:
    out, port, _ = provisioned(workdir, {"U1": "C1", "U2": "C1"})
    broker = start_broker(workdir, out, port)
    pw = credentials(out)
    ingest = Client(port, *ingest_login(out))
    u1 = Client(port, "U1", pw["U1"])
    try:
        ingest.c.subscribe("smame/v1/+/res", qos=1)
        u1.c.subscribe("smame/v1/+/cmd", qos=1)  # granted, then each message checked: only its own arrive
        wait_until(lambda: ingest.granted and u1.granted)
        assert not ingest.granted[0].is_failure
        assert not ingest.publish("smame/v1/U1/cmd").is_failure
        assert not ingest.publish("smame/v1/U2/cmd").is_failure
        assert ingest.publish("smame/v1/U1/res").getName() == "Not authorized"  # cannot forge a unit's answer
        assert ingest.publish("smame/v1/U1/status").getName() == "Not authorized"
        assert not u1.publish("smame/v1/U1/res").is_failure
        assert u1.publish("smame/v1/U2/res").getName() == "Not authorized"  # another unit's answer
        assert u1.publish("smame/v1/U1/cmd").getName() == "Not authorized"  # nor a command, even to itself
        assert u1.publish("smame/v1/U2/cmd").getName() == "Not authorized"
        wait_until(lambda: ingest.received and u1.received)
        time.sleep(0.3)
        assert ingest.received == ["smame/v1/U1/res"]
        assert u1.received == ["smame/v1/U1/cmd"]
    finally:
        ingest.close()
        u1.close()
        broker.stop()


def test_anonymous_unknown_users_and_wrong_passwords_are_refused(workdir: Path) -> None:
    out, port, _ = provisioned(workdir, {"U1": "C1"})
    broker = start_broker(workdir, out, port)
    try:
        for user, password in [
            (None, None),
            ("U9", "whatever-password"),
            ("U1", "wrong-password"),
            ("smame-ingest", credentials(out)["U1"]),
        ]:
            c = Client(port, user, password)
            assert c.connack is not None and c.connack.is_failure, user
            c.close()
    finally:
        broker.stop()


@pytest.mark.parametrize("bad", ["A+B", "A#", "a/b"])
def test_unit_ids_that_would_widen_the_acl_are_refused(workdir: Path, bad: str) -> None:
    (workdir / "units.csv").write_text(f"unit_id,customer_id\nU1,C1\n{bad},C1\n")
    proc = smame(
        ["provision", "--registry", str(workdir / "units.csv"), "--out", str(workdir / "b")],
        smame_env(workdir, 1883),
        check=False,
    )
    assert proc.returncode == 2
    assert f"line 3: unit id {bad!r} cannot be provisioned" in proc.stderr
    assert not (workdir / "b" / "passwd").exists()


def test_a_units_file_with_a_byte_order_mark_is_read_as_the_registry_reads_it(workdir: Path) -> None:
    # spreadsheets save UTF-8 with a byte-order mark: the registry loads such a file, so provision must too
    (workdir / "units.csv").write_bytes("\ufeffunit_id,customer_id\nU1,C1\n".encode())
    (workdir / "customers.toml").write_text("[customers.C1]\n")
    out = smame(
        ["provision", "--registry", str(workdir / "units.csv"), "--out", str(workdir / "b")], smame_env(workdir, 1883)
    ).stdout
    assert out.startswith("1 units: 1 added") and "U1," in (workdir / "b" / "unit-credentials.csv").read_text()
    (workdir / "units.csv").write_text("unit,customer\nU1,C1\n")
    proc = smame(
        ["provision", "--registry", str(workdir / "units.csv"), "--out", str(workdir / "b")],
        smame_env(workdir, 1883),
        check=False,
    )
    assert proc.returncode == 2 and "header must be unit_id,customer_id" in proc.stderr


@pytest.mark.parametrize("bad", ["smame-ingest\ntopic readwrite #", "in gest", "x/y"])
def test_an_ingest_user_that_would_widen_the_acl_is_refused(workdir: Path, bad: str) -> None:
    write_registry(workdir, {"U1": "C1"})
    proc = smame(
        ["provision", "--registry", str(workdir / "units.csv"), "--out", str(workdir / "b"), "--ingest-user", bad],
        smame_env(workdir, 1883),
        check=False,
    )
    assert proc.returncode == 2 and "--ingest-user" in proc.stderr
    assert not (workdir / "b" / "acl").exists()


def test_the_operators_own_settings_survive_provisioning_again(workdir: Path) -> None:
    out, port, _ = provisioned(workdir, {"U1": "C1"}, "--bind", "127.0.0.1")
    conf = (out / "mosquitto.conf").read_text()
    assert f"listener {port} 127.0.0.1\n" in conf and f"include_dir {out.resolve()}/conf.d\n" in conf
    extra_port = free_port()
    mine = out / "conf.d" / "local.conf"
    mine.write_text(f"# a second listener for a monitoring probe\nlistener {extra_port} 127.0.0.1\n")
    smame(
        [
            "provision",
            "--registry",
            str(workdir / "units.csv"),
            "--out",
            str(out),
            "--port",
            str(port),
            "--data-dir",
            str(workdir / "mqdata"),
            "--bind",
            "127.0.0.1",
        ],
        smame_env(workdir, port),
    )
    assert mine.read_text().endswith(f"listener {extra_port} 127.0.0.1\n")  # untouched
    broker = start_broker(workdir, out, port)
    try:
        wait_port(extra_port)
        ingest = Client(extra_port, *ingest_login(out))  # the broker reads it: same users, same ACL
        assert ingest.ok
        ingest.close()
    finally:
        broker.stop()


def test_owner_and_bind_are_checked_and_applied(workdir: Path) -> None:
    write_registry(workdir, {"U1": "C1"})
    env = smame_env(workdir, 1883)
    base = ["provision", "--registry", str(workdir / "units.csv"), "--out", str(workdir / "b")]
    for extra, said in (
        (["--owner", "no-such-user-here"], "--owner 'no-such-user-here' is no user"),
        (["--bind", "127.0.0.1\nlistener 1"], "is not an address or host name"),
    ):
        proc = smame(base + extra, env, check=False)
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr
    assert not (workdir / "b" / "passwd").exists()
    smame(base + ["--owner", "nobody", "--tls"], env)
    nobody = pwd.getpwnam("nobody")
    out = workdir / "b"
    owners = {p.name: p.stat().st_uid for p in out.iterdir()}
    broker_reads = ("passwd", "acl", "mosquitto.conf", "conf.d", "ca.pem", "server.pem", "server.key", "data")
    assert {n: owners[n] for n in broker_reads} == dict.fromkeys(broker_reads, nobody.pw_uid)
    mine = ("ca.key", "unit-credentials.csv", "smame-broker.env", "certs")  # the broker needs none of these
    assert {n: owners[n] for n in mine} == dict.fromkeys(mine, 0)
    assert (out / "passwd").stat().st_mode & 0o777 == 0o600  # private still, to its new owner
    assert (out / "server.key").stat().st_mode & 0o777 == 0o600
    assert (out.stat().st_gid, out.stat().st_mode & 0o777) == (nobody.pw_gid, 0o750)  # its group may enter
    assert "persistence_location " + str((out / "data").resolve()) + "/" in (out / "mosquitto.conf").read_text()
    smame(base + ["--owner", "1883:1884"], env)  # a container's user, unknown to this machine
    assert ((out / "acl").stat().st_uid, (out / "acl").stat().st_gid) == (1883, 1884)


def test_provisions_output_starts_as_it_is_with_debians_broker_as_its_own_user() -> None:
    real_processes()
    if os.getuid() != 0:
        pytest.skip("giving files to the mosquitto user and starting the broker as it needs root")
    base = Path(tempfile.mkdtemp(prefix="smame-provision-"))  # not under pytest's 0700 directory: the broker
    base.chmod(0o755)  # must reach its files as the user it runs as
    broker = None
    try:
        write_registry(base, {"U1": "C1"})
        port, tls_port = free_port(), free_port()
        out = base / "broker"
        args = ["--out", str(out), "--port", str(port), "--tls-port", str(tls_port), "--bind", "127.0.0.1"]
        registry = ["provision", "--registry", str(base / "units.csv")]
        smame([*registry, *args, "--tls", "--owner", "mosquitto"], smame_env(base, port))
        # the configuration as provision wrote it, by the Debian binary, as Debian's service runs it: its own user
        broker = Mosquitto.__new__(Mosquitto)
        broker.port, broker.dir = port, base / "run"
        broker.dir.mkdir()
        as_mosquitto = ["setpriv", "--reuid=mosquitto", "--regid=mosquitto", "--init-groups"]
        broker.command = [
            *as_mosquitto,
            shutil.which("mosquitto") or "/usr/sbin/mosquitto",
            "-c",
            str(out / "mosquitto.conf"),
        ]
        broker.start()
        ingest = Client(port, *ingest_login(out))
        unit = Client(tls_port, None, None, unit_tls(out, "U1"))
        try:
            assert ingest.ok and unit.ok, (base / "run" / "mosquitto.log").read_text()
            ingest.c.subscribe("smame/v1/+/reading", qos=1)
            wait_until(lambda: ingest.granted)
            assert not unit.publish("smame/v1/U1/reading").is_failure
            wait_until(lambda: ingest.received == ["smame/v1/U1/reading"])
        finally:
            ingest.close()
            unit.close()
        broker.stop()
        assert (out / "data" / "mosquitto.db").exists()  # its persistence, where provision made room for it
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(base)


def test_an_oversized_telegram_is_refused_at_the_door(workdir: Path) -> None:
    out, port, _ = provisioned(workdir, {"U1": "C1"})
    broker = start_broker(workdir, out, port)
    u1 = Client(port, "U1", credentials(out)["U1"])
    try:
        assert u1.ok
        assert not u1.publish("smame/v1/U1/reading", b"x" * 16_384).is_failure  # the contract's limit passes
        u1.c.publish("smame/v1/U1/reading", b"x" * 100_000, qos=1)
        # the broker drops it and the connection (paho then reconnects by itself)
        wait_log(broker.dir / "mosquitto.log", "disconnected due to oversize packet", 10)
    finally:
        u1.close()
        broker.stop()


def test_running_again_keeps_credentials_adds_new_units_and_drops_removed_ones(workdir: Path) -> None:
    out, port, _ = provisioned(workdir, {"U1": "C1", "U2": "C1"}, "--tls")
    before = {line.split(":")[0]: line for line in (out / "passwd").read_text().splitlines()}
    cert, ca, pw = (out / "certs" / "U1.pem").read_bytes(), (out / "ca.pem").read_bytes(), credentials(out)
    ingest_before = ingest_login(out)
    write_registry(workdir, {"U1": "C1", "U3": "C2"})
    proc = smame(
        [
            "provision",
            "--registry",
            str(workdir / "units.csv"),
            "--out",
            str(out),
            "--port",
            str(port),
            "--data-dir",
            str(workdir / "mqdata"),
            "--tls",
        ],
        smame_env(workdir, port),
    )
    assert "2 units: 1 added, 1 kept, 1 removed (U2)" in proc.stdout
    after = {line.split(":")[0]: line for line in (out / "passwd").read_text().splitlines()}
    assert after["U1"] == before["U1"] and after["smame-ingest"] == before["smame-ingest"]
    assert "U3" in after and "U2" not in after
    assert credentials(out)["U1"] == pw["U1"] and set(credentials(out)) == {"U1", "U3"}
    assert (out / "certs" / "U1.pem").read_bytes() == cert and (out / "ca.pem").read_bytes() == ca
    assert (out / "certs" / "U3.pem").exists() and ingest_login(out) == ingest_before
    broker = start_broker(workdir, out, port)  # the kept and the new credentials both work
    try:
        for unit in ("U1", "U3"):
            c = Client(port, unit, credentials(out)[unit])
            assert c.ok, unit
            c.close()
    finally:
        broker.stop()


def unit_tls(out: Path, unit: str | None, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(out / "ca.pem"))
    if unit is not None:
        ctx.load_cert_chain(out / "certs" / f"{unit}.pem", out / "certs" / f"{unit}.key")
    if maximum is not None:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = maximum
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer TLS 1.1 at all; the broker must refuse it
    return ctx


def handshake_refused(port: int, tls: ssl.SSLContext) -> bool:
    """True when the broker refuses a TLS handshake in `tls`'s terms. (paho leaves the socket of a failed
    handshake open; this closes it.)"""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with tls.wrap_socket(raw, server_hostname="127.0.0.1"):
                return False
        except (ssl.SSLError, OSError):
            return True


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")  # offering old TLS is the point
def test_mutual_tls_units_log_in_by_certificate_and_old_tls_is_refused(workdir: Path) -> None:
    out, port, tls_port = provisioned(workdir, {"U1": "C1", "U2": "C1"}, "--tls")
    broker = start_broker(workdir, out, port)
    ingest = Client(port, *ingest_login(out))
    u1 = Client(tls_port, None, None, unit_tls(out, "U1"))
    try:
        assert ingest.ok and u1.ok
        ingest.c.subscribe("smame/v1/+/reading", qos=1)
        wait_until(lambda: ingest.granted)
        assert not u1.publish("smame/v1/U1/reading").is_failure
        assert u1.publish("smame/v1/U2/reading").getName() == "Not authorized"  # the certificate names the unit
        wait_until(lambda: ingest.received)
        assert ingest.received == ["smame/v1/U1/reading"]
        no_cert = Client(tls_port, "U2", credentials(out)["U2"], unit_tls(out, None))
        assert not no_cert.ok  # a password is not enough on the TLS listener
        no_cert.close()
        assert handshake_refused(tls_port, unit_tls(out, "U2", maximum=ssl.TLSVersion.TLSv1_1))
    finally:
        ingest.close()
        u1.close()
        broker.stop()


def test_smame_ingests_from_a_provisioned_broker(workdir: Path) -> None:
    out, port, _ = provisioned(workdir, {"U1": "C1"})
    broker = start_broker(workdir, out, port)
    user, password = ingest_login(out)
    env = smame_env(workdir, port, SMAME_BROKER__USERNAME=user, SMAME_BROKER__PASSWORD=password)
    proc = start_smame(env, workdir / "smame.log")
    try:
        wait_log(workdir / "smame.log", "subscribed to")
        u1 = Client(port, "U1", credentials(out)["U1"])
        info = u1.c.publish("smame/v1/U1/reading", telegram("U1", [(at("2026-11-23", "10:00"), 5)]), qos=1)
        info.wait_for_publish(5)
        wait_readings(workdir / "data" / "smame.db", 1)
        u1.close()
    finally:
        assert stop(proc) == 0
        broker.stop()


def test_verify_counts_the_unknown_units_a_provisioned_broker_refused_as_kept_out(workdir: Path) -> None:
    port = free_port()
    env = smame_env(workdir, port)
    fleet = ["--units", "30", "--customers", "2"]
    smame(["simulate", *fleet, "--write-registry", str(workdir)], env)
    out = workdir / "broker"
    smame(["provision", "--out", str(out), "--port", str(port), "--data-dir", str(workdir / "mqdata")], env)
    broker = start_broker(workdir, out, port)
    user, password = ingest_login(out)
    env = dict(env, SMAME_BROKER__USERNAME=user, SMAME_BROKER__PASSWORD=password)
    proc = start_smame(env, workdir / "smame.log")
    truth = workdir / "truth.jsonl"
    try:
        wait_log(workdir / "smame.log", "subscribed to")
        run = smame(
            [
                "simulate",
                *fleet,
                "--connections",
                "per-unit",
                "--credentials",
                str(out / "unit-credentials.csv"),
                "--backfill",
                "1",
                "--end",
                "2026-11-23T09:00:00+09:00",
                "--clean",
                "--unknown-rate",
                "0.05",
                "--truth",
                str(truth),
            ],
            env,
        )
        refused = re.search(r"([\d,]+) telegrams refused by the broker", run.stdout)
        assert refused is not None, run.stdout  # units the registry does not know cannot log in
        acknowledged = re.search(r"([\d,]+) telegrams from 30 units acknowledged", run.stdout)
        assert acknowledged is not None, run.stdout
        wait_readings(workdir / "data" / "smame.db", int(acknowledged[1].replace(",", "")))  # one reading each
    finally:
        assert stop(proc) == 0
        broker.stop()
    verify = smame(["verify", "--truth", str(truth)], env, check=False)
    assert verify.returncode == 0 and "OK: 0 mismatches" in verify.stdout, verify.stdout
    assert re.search(r"refused by the broker:unknown +\d+ +\d+ +0\n", verify.stdout), verify.stdout


async def test_provisioned_rabbitmq_keeps_each_unit_to_its_own_topics_and_ingest_to_reading(workdir: Path) -> None:
    # the same credentials, as RabbitMQ's definitions (docs/cluster.md): loaded by a real node at its boot
    out, _, _ = provisioned(workdir, {"U1": "C1", "U2": "C1"})
    definitions = out / "rabbitmq-definitions.json"
    rabbit = RabbitCluster(workdir / "rabbit", 1, f"load_definitions = {definitions}\n", anonymous=False)
    port, pw, (user, password) = rabbit.nodes[0].mqtt_port, credentials(out), ingest_login(out)

    opened: list[MqttClient] = []

    async def login(client_id: str, who: str, secret: str, got: list[str] | None = None) -> MqttClient:
        client = MqttClient(lambda ms: got.extend(m.topic for m in ms) if got is not None else None, version=MQTT311)
        opened.append(client)
        await client.connect("127.0.0.1", port, client_id, username=who, password=secret, clean_start=True)
        return client

    try:
        to_ingest: list[str] = []
        ingest = await login(f"{user}-test", user, password, to_ingest)
        await ingest.subscribe("smame/v1/+/reading")
        await ingest.subscribe("smame/v1/+/res")
        to_u1: list[str] = []
        u1 = await login("U1", "U1", pw["U1"], to_u1)
        await u1.subscribe("smame/v1/U1/cmd")
        assert await u1.publish("smame/v1/U1/reading", b"{}") == 0
        assert await u1.publish("smame/v1/U1/res", b"{}") == 0
        assert await ingest.publish("smame/v1/U1/cmd", b"{}") == 0
        await asyncio.sleep(0.5)
        assert sorted(to_ingest) == ["smame/v1/U1/reading", "smame/v1/U1/res"] and to_u1 == ["smame/v1/U1/cmd"]
        # refused, each on a connection of its own (RabbitMQ closes a connection that publishes where it may not)
        for who, topic in [
            ("U1", "smame/v1/U2/reading"),  # another unit's readings
            ("U1", "smame/v1/U1/cmd"),  # a command, even to itself
            (user, "smame/v1/U1/reading"),  # ingest cannot forge readings
            (user, "smame/v1/U1/res"),
        ]:
            client = await login(f"{who}-x" if who == user else who, who, password if who == user else pw["U1"])
            with pytest.raises(MqttError):
                await asyncio.wait_for(client.publish(topic, b"{}"), 10)
            client.close()
        u1 = await login("U1", "U1", pw["U1"])
        with pytest.raises(MqttError):  # another unit's commands
            await u1.subscribe("smame/v1/U2/cmd")
        u1.close()
        with pytest.raises(ConnectionRefused):
            await login("U1", "U1", "wrong-password")
        with pytest.raises(ConnectionRefused):
            await login("U9", "U9", pw["U1"])
        assert sorted(to_ingest) == ["smame/v1/U1/reading", "smame/v1/U1/res"]
    finally:
        for client in opened:
            client.close()
        await asyncio.sleep(0.5)
        rabbit.close()


async def test_the_cluster_profiles_rabbitmq_conf_takes_units_by_certificate_and_ingest_by_password(
    workdir: Path,
) -> None:
    # deploy/rabbitmq/rabbitmq.conf as it ships, on a real node: only its ports, paths and node name are this test's
    out, _, _ = provisioned(workdir, {"U1": "C1", "U2": "C1"}, "--tls")
    tls_port = free_port()
    shipped = (ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf").read_text().replace("/etc/rabbitmq/broker", str(out))
    ours = ("listeners.tcp.default", "mqtt.listeners.tcp.default", "management.tcp.port", "cluster_formation.")
    conf = "".join(line + "\n" for line in shipped.splitlines() if not line.startswith(ours))
    conf = conf.replace("mqtt.listeners.ssl.default = 8883", f"mqtt.listeners.ssl.default = 127.0.0.1:{tls_port}")
    assert f"127.0.0.1:{tls_port}" in conf and str(out / "rabbitmq-definitions.json") in conf
    node = RabbitNode(workdir / "rabbit", f"smame{os.getpid()}tls@localhost", "cookie-of-this-test", conf)
    node.start()
    got: list[str] = []
    clients = [MqttClient(lambda ms: got.extend(m.topic for m in ms), version=MQTT311) for _ in range(3)]
    ingest, u1, no_cert = clients
    try:
        node.wait()
        wait_port(tls_port, 60)
        user, password = ingest_login(out)
        await ingest.connect("127.0.0.1", node.mqtt_port, user, username=user, password=password, clean_start=True)
        await ingest.subscribe("smame/v1/+/reading")
        # no user name: the certificate's CN is the unit
        await u1.connect("127.0.0.1", tls_port, "U1", tls=unit_tls(out, "U1"), clean_start=True)
        assert await u1.publish("smame/v1/U1/reading", b"{}") == 0
        with pytest.raises((MqttError, OSError)):  # a password is not enough on the TLS listener
            await no_cert.connect(
                "127.0.0.1", tls_port, "U2", username="U2", password=credentials(out)["U2"], tls=unit_tls(out, None)
            )
        await asyncio.sleep(0.5)
        assert got == ["smame/v1/U1/reading"]
    finally:
        for client in clients:
            client.close()
        await asyncio.sleep(0.5)  # a TLS connection's close waits for the node's answer: before the node goes
        node.kill()

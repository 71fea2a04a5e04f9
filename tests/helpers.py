"""Real parts for tests: a Mosquitto on a free port, a paho publisher, registries, telegrams, smame itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as paho
import pytest

from broker_bridge.telegram import WireReading, WireTelegram, encode
from smame.demo import free_port, wait_port  # noqa: F401 (the tests use the demo's own)
from web.server import WebServer

if TYPE_CHECKING:
    from smame.app import App

JST = timezone(timedelta(hours=9))
ROOT = Path(__file__).resolve().parent.parent
SHIFTED = "FAKETIME" in os.environ  # .ci/run's second pass: this process runs under faketime, days ahead
IN_PROCESS_ONLY = SHIFTED or os.environ.get("SMAME_TESTS") == "in-process"  # scripts/check's quick pass


def real_processes() -> None:
    """Skip the calling test in a pass of in-process tests only: it starts smame or Mosquitto. Under a shifted
    clock, faketime, inherited by them, hangs their TLS: those tests run on the real clock in the first pass,
    and the shifted pass proves that the in-process ones hold on any date. scripts/check runs the in-process
    ones alone, for a quick answer."""
    if IN_PROCESS_ONLY:
        pytest.skip("starts smame or Mosquitto processes: not in this pass")


class Mosquitto:
    """A private mosquitto broker on a free port (the Debian binary, as in production)."""

    def __init__(self, workdir: Path, extra: str = "", anonymous: bool = True) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.port = free_port()
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous {str(anonymous).lower()}\npersistence false\n"
            "max_queued_messages 1000000\nmax_inflight_messages 0\nset_tcp_nodelay true\n" + extra
        )
        self.command = [binary, "-c", str(conf)]
        self.start()

    @classmethod
    def from_config(cls, workdir: Path, text: str, port: int) -> Mosquitto:
        """A broker on a configuration of its own (which listens on `port`)."""
        self = cls.__new__(cls)
        self.port, self.dir = port, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "mosquitto.conf").write_text(text)
        self.command = [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(workdir / "mosquitto.conf")]
        self.start()
        return self

    def start(self) -> None:
        real_processes()
        with open(self.dir / "mosquitto.log", "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_many_files)
        wait_port(self.port)

    def stop(self) -> None:
        # Mosquitto 2.0 sets its run flag after it installs its SIGTERM handler and opens its listeners,
        # so a SIGTERM that lands just after start-up is forgotten: repeat it until the broker exits.
        for _ in range(10):
            if self.proc.poll() is not None:
                return
            self.proc.terminate()
            try:
                self.proc.wait(1)
            except subprocess.TimeoutExpired:
                continue
        raise TimeoutError(f"mosquitto on port {self.port} did not stop within 10 s of SIGTERM")

    def restart(self) -> None:
        self.stop()
        self.start()


def secure_broker(workdir: Path, users: dict[str, str]) -> tuple[Mosquitto, Path]:
    """A Mosquitto with only a TLS 1.2+ listener and a password file; returns it and the CA to trust."""
    workdir.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=workdir, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=smame test CA",
    )
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"
    )
    (workdir / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    )
    passwd = workdir / "passwd"
    passwd.write_text("")
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True, capture_output=True)
    extra = (
        f"cafile {workdir / 'ca.pem'}\ncertfile {workdir / 'server.pem'}\nkeyfile {workdir / 'server.key'}\n"
        f"tls_version tlsv1.2\npassword_file {passwd}\n"
        # Started as root, mosquitto drops to its own user, who may not read a test's private files.
        "user root\n"
    )
    mq = Mosquitto(workdir, extra, anonymous=False)
    return mq, workdir / "ca.pem"


def _many_files() -> None:
    # A broker for thousands of unit connections needs as many file descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def publish(
    port: int,
    messages: Iterable[tuple[str, bytes]],
    client_id: str = "",
    auth: tuple[str, str] | None = None,
    ca: Path | None = None,
    retain: bool = False,
) -> int:
    """Publish at QoS 1 (retained, with `retain`) and wait until the broker has acknowledged every message."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    if auth:
        client.username_pw_set(*auth)
    if ca:
        client.tls_set(ca_certs=str(ca))
    client.max_inflight_messages_set(2000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    messages = list(messages)
    for start in range(0, len(messages), 20_000):  # paho has 65,535 packet ids for everything in its queue
        infos = [
            client.publish(topic, payload, qos=1, retain=retain) for topic, payload in messages[start : start + 20_000]
        ]
        for info in infos:
            info.wait_for_publish(120)
            assert info.is_published()
    # disconnect first: it wakes the network thread, which loop_stop() would otherwise wait up to a second for
    client.disconnect()
    client.loop_stop()
    return len(messages)


def preload_session(port: int, client_id: str) -> None:
    """Create `client_id`'s persistent QoS 1 subscription to every unit's readings, then leave, so that the
    broker queues them for it (as for smame while it is down)."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    props = paho.Properties(paho.PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    r = c.subscribe("smame/v1/+/reading", qos=1)
    time.sleep(0.3)
    assert r[0] == 0
    c.disconnect()  # before loop_stop(), as in publish()
    c.loop_stop()


def at(day: str, hhmm: str) -> datetime:
    """A JST time on a day: at('2026-11-23', '10:30')."""
    return datetime.fromisoformat(f"{day}T{hhmm}:00+09:00")


def telegram(
    unit: str,
    readings: list[tuple[datetime, int] | tuple[datetime, int, int | None]],
    *,
    meter: str = "SM-1",
    seq: int = 1,
    digits: int = 6,
    e1: int = 1,
    coef: int = 1,
    sent: datetime | None = None,
    diag: dict[str, object] | None = None,
) -> bytes:
    """A v1 telegram as a unit would publish it (with `diag`, its diagnostics as given, right or wrong)."""
    wire = [WireReading(r[0], r[1], r[2] if len(r) > 2 else 0) for r in readings]  # type: ignore[misc]
    sent = sent or readings[-1][0] + timedelta(seconds=7)
    return encode(WireTelegram(1, unit, meter, seq, sent, e1, digits, wire, coef, diag))


def write_registry(
    directory: Path, units: dict[str, str], contract_kw: dict[str, float] | None = None
) -> tuple[Path, Path]:
    """units.csv and customers.toml for {unit: customer}."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["unit_id,customer_id,meter_id,contract_kw,label"]
    for u, c in sorted(units.items()):
        kw = (contract_kw or {}).get(u, "")
        lines.append(f"{u},{c},,{kw},")
    (directory / "units.csv").write_text("\n".join(lines) + "\n")
    customers = sorted(set(units.values()))
    (directory / "customers.toml").write_text("".join(f'[customers.{c}]\nname = "Customer {c}"\n' for c in customers))
    return directory / "units.csv", directory / "customers.toml"


def first_start(workdir: Path) -> None:
    """The store in `workdir`'s data directory, empty, as `smame run` makes it at its first start: every other
    command refuses a store that does not exist."""
    from aggregator.backends import open_url

    open_url(f"sqlite:///{workdir / 'data' / 'smame.db'}").close()


def console_env(workdir: Path, broker_port: int, password: str, **settings: str) -> tuple[dict[str, str], int]:
    """The environment of a smame serving its console and API on a free port (returned), its store made and
    operator `alice` added with `password`, an admin (who may do everything the console offers); `settings`:
    more SMAME_ variables."""
    from smame.demo import free_port

    port = free_port()
    env = smame_env(workdir, broker_port, SMAME_WEB__ENABLED="true", SMAME_WEB__PORT=str(port), **settings)
    first_start(workdir)
    smame(["operators", "add", "alice", "--role", "admin", "--password-stdin"], env, stdin=password.rstrip("\n") + "\n")
    return env, port


def default_app(directory: Path, monkeypatch: pytest.MonkeyPatch) -> App:
    """smame's app, built in-process with the default settings over a one-unit registry in `directory`, no
    `SMAME_` variable of the environment in the way (the caller closes its exporter and monitor store)."""
    from kernel.settings import load_settings
    from smame.app import App

    write_registry(directory, {"U1": "C1"})
    for key in [k for k in os.environ if k.startswith("SMAME_")]:
        monkeypatch.delenv(key)
    registry = {"units": directory / "units.csv", "customers": directory / "customers.toml"}
    return App.build(load_settings(None, data_dir=directory / "data", registry=registry))


def smame_env(workdir: Path, port: int, **extra: str) -> dict[str, str]:
    """Environment for a smame process using a test broker and a private data directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMAME_")}
    env.update(
        SMAME_DATA_DIR=str(workdir / "data"),
        SMAME_BROKER__URL=f"mqtt://127.0.0.1:{port}",
        SMAME_BROKER__CLIENT_ID=f"smame-test-{workdir.name}",
        SMAME_REGISTRY__UNITS=str(workdir / "units.csv"),
        SMAME_REGISTRY__CUSTOMERS=str(workdir / "customers.toml"),
        SMAME_LOG__FORMAT="text",
        # Listeners on fixed ports stay off unless a test asks for them on free ports.
        SMAME_FTP__ENABLED="false",
        SMAME_SFTP__ENABLED="false",
        SMAME_MONITORING__ENABLED="false",
        SMAME_WEB__ENABLED="false",
    )
    env.update(extra)
    return env


def metrics_env(port: int) -> dict[str, str]:
    """Settings for smame's metrics and health endpoint on this port of 127.0.0.1."""
    return dict(
        SMAME_MONITORING__ENABLED="true", SMAME_MONITORING__HOST="127.0.0.1", SMAME_MONITORING__METRICS_PORT=str(port)
    )


def gateway_env(ftp: int, sftp: int) -> dict[str, str]:
    """Settings for FTP/FTPS and SFTP on these ports of 127.0.0.1, with ten passive ports of their own."""
    return dict(
        SMAME_FTP__ENABLED="true",
        SMAME_SFTP__ENABLED="true",
        SMAME_FTP__HOST="127.0.0.1",
        SMAME_FTP__PORT=str(ftp),
        SMAME_SFTP__HOST="127.0.0.1",
        SMAME_SFTP__PORT=str(sftp),
        SMAME_FTP__PASSIVE_PORTS=f"{40000 + ftp % 20000}-{40009 + ftp % 20000}",
    )


def smame(
    args: list[str], env: dict[str, str], check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a smame command to completion (with `stdin` as its standard input; none by default)."""
    real_processes()
    proc = subprocess.run(
        [sys.executable, "-m", "smame.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"smame {args} exited {proc.returncode}: {proc.stderr}")
    return proc


STARTED: list[subprocess.Popen[bytes]] = []  # stopped at the end of the test that started them (conftest)


def scrape(port: int) -> dict[str, float]:
    """Every sample of smame's metrics endpoint on `port`, by name with its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def acknowledged(port: int) -> float:
    """smame's count of telegrams committed and acknowledged, from its metrics endpoint on `port`."""
    return scrape(port).get("smame_telegrams_acknowledged_total", 0)


def start_smame(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start `smame run` in the background."""
    real_processes()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "smame.cli", "run"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    STARTED.append(proc)
    return proc


def wait_until(
    done: Callable[[], object], timeout: float = 15.0, what: Callable[[], str] = lambda: "", every: float = 0.05
) -> None:
    """Block until `done()` is true; past the timeout raise TimeoutError saying `what()`."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done in {timeout} s" + (f": {what()}" if what else ""))
        time.sleep(every)


def yesterday(zone: timezone = JST) -> date:
    """The local day before today, by the real clock: tests that need a recent day use it, never a fixed date."""
    return datetime.now(zone).date() - timedelta(days=1)


def wait_log(log: Path, text: str, timeout: float = 15.0) -> None:
    """Block until a log file contains the text."""
    wait_until(
        lambda: log.exists() and text in log.read_text(errors="replace"),
        timeout,
        lambda: f"{text!r} not in {log}:\n{log.read_text(errors='replace') if log.exists() else ''}",
    )


def readings_in(db: Path) -> int:
    """Readings stored in a smame database (0 while it is being made)."""
    with sqlite3.connect(db, timeout=10) as c:
        try:
            return int(c.execute("SELECT count(*) FROM readings").fetchone()[0])
        except sqlite3.OperationalError:  # no table yet
            return 0


def wait_readings(db: Path, n: int, timeout: float = 30.0) -> None:
    """Block until the database holds at least n readings."""
    wait_until(
        lambda: db.exists() and readings_in(db) >= n,
        timeout,
        lambda: f"{readings_in(db) if db.exists() else 0} readings stored, expected {n}",
        every=0.1,
    )


def children(pid: int) -> list[int]:
    """The child processes of a process (Linux /proc), e.g. smame's writer and export workers."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return out


def memory_mb(pid: int) -> tuple[float, float]:
    """A process's resident memory and its peak so far, in MB (Linux /proc: VmRSS, VmHWM)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def running(pid: int) -> bool:
    """True while a process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def process_name(pid: int) -> str:
    """A process's name as ps shows it ("" when it is gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def wait_child(proc: subprocess.Popen[bytes], name: str, timeout: float = 15.0) -> int:
    """Block until a smame process has a child process of this name (smame-writer, smame-export)."""
    found: list[int] = []

    def named() -> bool:
        found[:] = [c for c in children(proc.pid) if process_name(c) == name]
        return bool(found)

    wait_until(named, timeout, lambda: f"smame has no child process {name!r}")
    return found[0]


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM and wait; return the exit code."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


@contextlib.contextmanager
def serving(server: WebServer) -> Iterator[int]:
    """Run a web server as smame's supervisor does (a task, cancelled at the end), on a thread and loop of its
    own; yield its port."""
    stopping = threading.Event()

    async def serve() -> None:
        task = asyncio.create_task(server.run())
        await asyncio.get_running_loop().run_in_executor(None, stopping.wait)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        while server.port is None:
            assert thread.is_alive(), "the web server did not start"
            time.sleep(0.01)
        yield server.port
    finally:
        stopping.set()
        thread.join(15)
        assert not thread.is_alive(), "the web server did not stop"


def connect_from(source: str, port: int) -> socket.socket:
    """A connection to 127.0.0.1:`port` from `source`, another address of the loopback range (all of 127/8 is
    local): a stranger or a customer of its own address."""
    s = socket.socket()
    s.settimeout(10)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


class Relay:
    """A TCP relay from a free port of 127.0.0.1 to `port`. `cut()` stops it carrying bytes either way and leaves
    new connections unanswered, with no reset: a link cut as a dead switch or a firewall's lost state cuts it.
    `mend()` carries them again. Its threads end with the test process."""

    def __init__(self, port: int) -> None:
        self.target = port
        self._open = threading.Event()
        self._open.set()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    def cut(self) -> None:
        self._open.clear()

    def mend(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._server.close()
        self._open.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self._open.wait()  # while cut, a new connection is accepted by the kernel and never answered
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            client.close()
            return
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._carry, args=(src, dst), daemon=True).start()

    def _carry(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._open.wait()  # held, not dropped: as TCP would retransmit once the link is back
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

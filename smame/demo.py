"""`smame demo`: the whole product on one machine, with real parts, in a few minutes.

A private Mosquitto on a free port, `smame run` on SQLite with FTPS, SFTP, metrics and alerts, a
local SMTP server that keeps every mail as a file, and a simulated fleet publishing the last day at
accelerated time with faults. Then it shows what each user sees: slots, the quarantine, a customer's
CSV file fetched over FTPS, the metrics, the daily report (mailed to the local SMTP server), and
`smame verify` against the simulator's truth. Ctrl-C stops everything.
"""

from __future__ import annotations

import ftplib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from aiosmtpd.controller import Controller

from simulators.fleet import make_fleet, write_factors, write_registry
from smame.users import add_user

MARKER = ".smame-demo"  # the demo only ever wipes a directory it made


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs."""

    work: Path = Path("demo")
    units: int = 2000
    customers: int = 10
    speed: float = 1800.0
    follow: bool = True  # after the tour, the fleet goes on live until Ctrl-C (only on a terminal)


class MailDrop:
    """A local SMTP server that writes each message it takes to DIR/NNN.eml (an operator's inbox, as files)."""

    def __init__(self, directory: Path, port: int) -> None:
        self.dir = directory
        self.port = port
        self.count = 0
        directory.mkdir(parents=True, exist_ok=True)
        self.controller = Controller(self, hostname="127.0.0.1", port=port)
        logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every SMTP command

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's name)
        self.count += 1
        (self.dir / f"{self.count:03d}.eml").write_bytes(envelope.original_content or envelope.content)
        return "250 OK"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(opts: DemoOptions, out: TextIO = sys.stdout) -> int:
    """Run the demo; returns 0 when `smame verify` finds every slot right."""
    tour = Tour.prepare(opts, out)
    with ExitStack() as stack:
        tour.start(stack)
        day, truth = tour.simulate_last_day()
        unit, customer = tour.first_unit()
        tour.show_slots(unit, day)
        tour.show_quarantine()
        tour.show_export(customer, day)
        tour.show_emissions(customer, day)
        tour.show_ftps()
        tour.show_api(unit, day)
        tour.show_metrics()
        tour.show_report(day)
        verified = tour.verify(truth)
        tour.show_where(unit, day)
        if _interactive(opts):
            tour.follow()
        return verified


@dataclass
class Tour:
    """The demo's work directory, ports and settings, and each step it shows."""

    opts: DemoOptions
    out: TextIO
    work: Path
    ports: dict[str, int]
    password: str  # the demo customer's FTPS/SFTP login
    env: dict[str, str]
    drop: MailDrop | None = None
    token: str = ""  # the demo customer's API token, once made

    @property
    def toml(self) -> Path:
        return self.work / "smame.toml"

    @classmethod
    def prepare(cls, opts: DemoOptions, out: TextIO) -> Tour:
        """A fresh work directory with settings, a broker configuration, the fleet's registry and a login."""
        work = _fresh(opts.work)
        ports = {name: free_port() for name in ("mqtt", "ftp", "sftp", "metrics", "smtp", "web")}
        passive = 40000 + ports["ftp"] % 20000
        password = "demo-" + secrets.token_hex(6)
        (work / "smame.toml").write_text(_settings(work, ports, passive))
        (work / "mosquitto.conf").write_text(
            f"listener {ports['mqtt']} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 1000000\n"
        )
        write_registry(make_fleet(opts.units, opts.customers, 1), work)
        write_factors(work, datetime.now(ZoneInfo("Asia/Tokyo")).date())
        add_user(work / "customers.toml", "C000", "demo", password, [])
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMAME_")} | {"SMAME_LOG__FORMAT": "text"}
        return cls(opts, out, work, ports, password, env)

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def command(self, *args: str) -> list[str]:
        """The command line of `smame ARGS` with the demo's settings."""
        return [sys.executable, "-m", "smame.cli", *args, "-c", str(self.toml)]

    def smame(self, *args: str, check: bool = True, stdin: str | None = None) -> str:
        """What a `smame` command prints, run with the demo's settings (`stdin`: its standard input)."""
        proc = subprocess.run(
            self.command(*args),
            env=self.env,
            text=True,
            input=stdin,
            stdout=subprocess.PIPE,
            stderr=sys.stderr,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"smame {args[0]} exited {proc.returncode}")
        return proc.stdout

    def start(self, stack: ExitStack) -> None:
        """Mosquitto, the mail drop and `smame run`, each stopped when `stack` closes."""
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        conf = self.work / "mosquitto.conf"
        stack.enter_context(_process([mosquitto, "-c", str(conf)], self.work / "mosquitto.log", self.env))
        wait_port(self.ports["mqtt"])
        self.drop = MailDrop(self.work / "mail", self.ports["smtp"])
        self.drop.controller.start()
        stack.callback(self.drop.controller.stop)
        log = self.work / "smame.log"
        stack.enter_context(_process(self.command("run"), log, self.env))
        _wait_log(log, "subscribed to")
        self.say(
            f"== a private Mosquitto on 127.0.0.1:{self.ports['mqtt']}; smame runs with its settings in {self.toml}"
        )

    def simulate_last_day(self) -> tuple[date, Path]:
        """The fleet publishes from an hour before yesterday until now; returns yesterday and the truth file."""
        zone = ZoneInfo("Asia/Tokyo")
        now = datetime.now(zone)
        day = (now - timedelta(days=1)).date()
        # from an hour before yesterday began, so that yesterday is whole, as operators see it at 08:00
        start = datetime(day.year, day.month, day.day, tzinfo=zone) - timedelta(hours=1)
        days = (now - start).total_seconds() / 86400
        o = self.opts
        self.say(
            f"== simulating {o.units:,} units from {start:%Y-%m-%d %H:%M} until now at {o.speed:g}x real time, "
            "with faults, and units failing or only looking unwell (docs/health.md)"
        )
        truth = self.work / "truth.jsonl"
        fleet = ["--units", str(o.units), "--customers", str(o.customers)]
        timing = ["--days", f"{days:.4f}", "--speed", str(o.speed)]
        command = self.command("simulate", *fleet, *timing, "--health", "--truth", str(truth))
        subprocess.run(command, env=self.env, check=True)
        _settled(self.ports["metrics"])
        time.sleep(12.5)  # one more health pass of the monitor (health.pass_every_s below), and a look at the store
        return day, truth

    def first_unit(self) -> tuple[str, str]:
        """The first unit of the registry and its customer."""
        first = (self.work / "units.csv").read_text().splitlines()[1].split(",")
        return first[0], first[1]

    def show_slots(self, unit: str, day: date) -> None:
        self.say(f"\n== smame slots --unit {unit} --date {day}   (a unit's half hours: kWh, quality, flags)")
        lines = self.smame("slots", "--unit", unit, "--date", str(day)).splitlines()
        self.say("\n".join(lines[:2] + lines[18:30] + ["   ..."]))

    def show_quarantine(self) -> None:
        self.say("\n== smame quarantine --limit 3   (refused input, kept with its reason)")
        self.say(self.smame("quarantine", "--limit", "3").rstrip())

    def show_export(self, customer: str, day: date) -> None:
        self.say("\n== smame export   (the service does this after each half hour; this catches up at once)")
        self.say(self.smame("export").splitlines()[0])
        csv_file = self.work / "data" / "export" / customer / f"{customer}_{day:%Y%m%d}.csv"
        self.say(f"   {csv_file}:")
        rows = csv_file.read_text(encoding="utf-8").splitlines()
        self.say("\n".join("   " + r for r in rows[:3] + ["..."] + rows[20:22]))
        digest = (csv_file.parent / (csv_file.name + ".sha256")).read_text().split()[0]
        self.say(
            f"   sha256 {'matches' if digest == hashlib.sha256(csv_file.read_bytes()).hexdigest() else 'DIFFERS'}"
            f" {csv_file.name}.sha256"
        )

    def show_emissions(self, customer: str, day: date) -> None:
        self.say(
            f"\n== smame emissions --customer {customer} --month {day:%Y-%m}   (CO2 of the imported electricity, "
            f"location- and market-based; {customer}_{day:%Y%m}_co2.csv beside the daily files)"
        )
        rows = self.smame("emissions", "--customer", customer, "--month", f"{day:%Y-%m}").splitlines()
        self.say("\n".join("   " + r for r in rows[:3] + (["   ..."] if len(rows) > 4 else []) + rows[-1:]))

    def show_ftps(self) -> None:
        self.say(f"\n== customer C000's server fetches its files over FTPS (user demo, password {self.password})")
        names = _ftps_listing(self.ports["ftp"], self.work / "data" / "ftps-cert.pem", self.password)
        self.say("\n".join("   " + n for n in names[:4]))

    def show_api(self, unit: str, day: date) -> None:
        self.smame("operators", "add", "demo", "--role", "admin", "--password-stdin", stdin=self.password + "\n")
        console = f"http://127.0.0.1:{self.ports['web']}/"
        self.say(f"\n== the operators' console: {console} (operator demo, password {self.password})")
        self.token = self.smame("tokens", "add", "C000", "--name", "demo").strip()
        base = f"http://127.0.0.1:{self.ports['web']}/api/v1"
        self.say(f"\n== customer C000's server reads the JSON API with a token (smame tokens add C000: {self.token})")
        units = _api(f"{base}/units", self.token)["units"]
        self.say(f"   GET /api/v1/units: {len(units)} units, the first: {json.dumps(units[0])}")
        slots = _api(f"{base}/units/{unit}/slots?from={day}", self.token)["slots"]
        self.say(f"   GET /api/v1/units/{unit}/slots?from={day}: {len(slots)} half hours, the 19th:")
        self.say(f"   {json.dumps(slots[18])}")
        month = f"{day:%Y-%m}"
        total = _api(f"{base}/customers/C000/emissions?month={month}", self.token)["total"]
        self.say(f"   GET /api/v1/customers/C000/emissions?month={month}: the month's total {json.dumps(total)}")

    def show_metrics(self) -> None:
        port = self.ports["metrics"]
        self.say(f"\n== metrics (http://127.0.0.1:{port}/metrics), a few of them")
        shown = (
            "smame_telegrams_received_total",
            "smame_readings_stored_total",
            "smame_quarantined_total",
            "smame_units_reporting",
            "smame_slots_today",
        )
        self.say("\n".join("   " + line for line in _metrics(port, shown)))

    def show_report(self, day: date) -> None:
        self.say(f"\n== the daily report for {day} (smame report --send: printed, and mailed to the local SMTP server)")
        report = self.smame("report", "--date", str(day), "--send", check=False).splitlines()
        co2 = [k for k, line in enumerate(report) if line.startswith("CO2 of the day")][:1]
        risk = [k for k, line in enumerate(report) if line.startswith("units at risk of failing")][:1]
        shown = report[:10] + ["   ..."]
        shown += [line for k in risk for line in report[k : k + 6] + ["   ..."]]  # a few units with their reasons
        shown += [line for k in co2 for line in report[k : k + 3] + ["   ..."]] + report[-3:]
        self.say("\n".join("   " + line for line in shown))
        received = self.drop.count if self.drop is not None else 0
        self.say(f"   mails received so far: {received} in {self.work / 'mail'} (open them with any mail program)")

    def verify(self, truth: Path) -> int:
        """`smame verify` against the simulator's truth, shown as it prints; its exit code."""
        self.say(f"\n== smame verify --truth {truth}   (every stored slot against what the simulator knows it sent)")
        return subprocess.run(self.command("verify", "--truth", str(truth)), env=self.env).returncode

    def show_where(self, unit: str, day: date) -> None:
        """Where everything the demo ran is, to look at now or afterwards."""
        if _interactive(self.opts):
            head = "Look around (smame keeps running with the fleet live; Ctrl-C stops everything):"
        elif self.opts.follow:
            head = (
                "Everything stops now: standard input is no terminal, so there is no Ctrl-C to wait for. "
                "Run the demo in a terminal to keep it running; what it ran, to look at afterwards:"
            )
        else:
            head = "Everything stops now (--no-follow); what it ran, to look at afterwards:"
        work, ports, password, toml = self.work, self.ports, self.password, self.toml
        self.say(f"""
{head}
  settings   {toml}            log {work / "smame.log"}
  CSV files  {work / "data" / "export"}/<customer>/   (format: docs/csv-format.md)
  FTPS       curl --ssl-reqd --cacert {work / "data" / "ftps-cert.pem"} --user demo:{password} ftp://127.0.0.1:{ports["ftp"]}/
  SFTP       sftp -P {ports["sftp"]} demo@127.0.0.1        (password {password})
  console    http://127.0.0.1:{ports["web"]}/   (operator demo, password {password}; docs/console.md)
  API        curl -H 'Authorization: Bearer {self.token}' http://127.0.0.1:{ports["web"]}/api/v1/units   (docs/api.md)
  metrics    http://127.0.0.1:{ports["metrics"]}/metrics    health http://127.0.0.1:{ports["metrics"]}/healthz
  mail       {work / "mail"}/*.eml   (the daily report, and any alert)
  a unit     .venv/bin/smame slots -c {toml} --unit {unit} --date {day}""")
        if _interactive(self.opts):
            self.say(
                f"  a command  .venv/bin/smame units cmd ping -c {toml} --unit {unit} --wait 10   (the first "
                f"{ANSWERING} units answer commands while the fleet is live; docs/devices.md)"
            )

    def follow(self) -> None:
        """The fleet goes on live, in real time, until Ctrl-C."""
        o = self.opts
        fleet = ["--units", str(o.units), "--customers", str(o.customers)]
        try:
            subprocess.run(self.command("simulate", *fleet, "--follow", "--answer", str(ANSWERING)), env=self.env)
        except KeyboardInterrupt:
            pass


ANSWERING = 10  # the live fleet's units that answer commands (each holds a connection of its own)


def _interactive(opts: DemoOptions) -> bool:
    return opts.follow and sys.stdin.isatty()


def _fresh(work: Path) -> Path:
    if work.exists():
        if not (work / MARKER).exists() and any(work.iterdir()):
            raise OSError(f"{work} exists and was not made by smame demo; choose another --dir")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).touch()
    return work.resolve()


def _settings(work: Path, ports: dict[str, int], passive: int) -> str:
    return f"""# smame demo settings (see docs/configuration.md)
data_dir = "{work / "data"}"
[broker]
url = "mqtt://127.0.0.1:{ports["mqtt"]}"
client_id = "smame-demo"
[registry]
units = "{work / "units.csv"}"
customers = "{work / "customers.toml"}"
[emissions]
factors = "{work / "emission_factors.csv"}"
[ftp]
host = "127.0.0.1"
port = {ports["ftp"]}
passive_ports = "{passive}-{passive + 19}"
[sftp]
host = "127.0.0.1"
port = {ports["sftp"]}
[monitoring]
host = "127.0.0.1"
metrics_port = {ports["metrics"]}
[web]
port = {ports["web"]}
[mail]
smtp_url = "smtp://127.0.0.1:{ports["smtp"]}"
sender = "smame-demo@localhost"
recipients = ["operators@localhost"]
[report]
enabled = false  # the demo sends it by hand once the simulated day is in
[alerts]
check_s = 2.0
# The demo replays a day and a half in a minute and a half: while it catches up, every unit's newest
# reading is hours old, which in production would rightly be a units_silent alert.
silent_after_s = 259200
[health]
pass_every_s = 10  # the demo's day and a half is in within minutes: its units' health is assessed as it comes
[log]
format = "text"
"""


@contextmanager
def _process(command: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(12)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts connections on the port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _wait_log(log: Path, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"smame did not start; see {log}")


def _api(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _metrics(port: int, prefixes: tuple[str, ...]) -> list[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return [line for line in text.splitlines() if line.startswith(prefixes)]


def _settled(port: int, timeout: float = 60.0) -> None:
    """Wait until every telegram received is committed and acknowledged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        values = {
            line.split()[0]: float(line.split()[1])
            for line in _metrics(port, ("smame_telegrams_received_total", "smame_telegrams_acknowledged_total"))
        }
        if values and values["smame_telegrams_received_total"] == values["smame_telegrams_acknowledged_total"]:
            return
        time.sleep(0.3)


def _ftps_listing(port: int, ca: Path, password: str) -> list[str]:
    ftp = ftplib.FTP_TLS(context=ssl.create_default_context(cafile=str(ca)))
    ftp.connect("127.0.0.1", port, timeout=10)
    ftp.login("demo", password)
    ftp.prot_p()
    names = sorted(ftp.nlst())
    ftp.quit()
    return names

"""The `smame` command."""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import getpass
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from aggregator.store import Store, check_copy, restore_copy, sqlite_path
from broker_bridge.bridge import target_from_url, tls_context
from broker_bridge.mqtt import ConnectionRefused
from broker_bridge.provision import BROKER_NAMES, ProvisionError, provision, read_units
from csv_export.files import check_writable
from kernel.meter import flag_names, format_kwh
from kernel.reading import REASONS
from kernel.registry import RegistryError
from kernel.settings import Settings, SettingsError, load_settings
from kernel.timegrid import Grid
from monitoring.channels import configured
from monitoring.daily import build_report, report_messages
from monitoring.report import problems_csv, render_text
from simulators.fleet import make_fleet
from simulators.fleet import write_registry as write_fleet_registry
from simulators.publisher import Endpoint
from simulators.run import RunOptions, Summary, describe, simulate
from simulators.scenario import Faults
from simulators.truth import Observed, compare, read_truth
from smame.app import (
    App,
    RegistryHolder,
    build_exporter,
    build_gateway,
    build_outbox,
    check_ports,
    listeners,
    open_store,
    store_lock,
)
from smame.demo import DemoOptions, run_demo
from smame.logs import setup_logging
from smame.users import UsersError, add_user, list_users, remove_user, set_password


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `smame` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"smame: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log.level, settings.log.format)
    try:
        return int(args.func(settings, args) or 0)
    except BrokenPipeError:  # `smame ... | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (RegistryError, UsersError, OSError) as exc:
        print(f"smame: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", type=Path, help="TOML settings file (environment variables override it)")
    parser = argparse.ArgumentParser(prog="smame", description="Meter-reading backend for SmaMe II LTE-M units.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the services (ingest) until SIGTERM/SIGINT")
    run.set_defaults(func=_run)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="the whole product on this machine: broker, smame, a simulated fleet, a tour",
        description="Starts a private Mosquitto, smame (SQLite, FTPS, SFTP, metrics, alerts), a local SMTP server "
        "and a simulated fleet publishing the last day at accelerated time with faults; then shows slots, "
        "the quarantine, a customer's CSV file over FTPS, metrics, the daily report and smame verify. "
        "On a terminal the fleet then goes on live until Ctrl-C.",
    )
    demo.add_argument("--dir", type=Path, default=Path("demo"), help="work directory, wiped first (default ./demo)")
    demo.add_argument("--units", type=_positive, default=2000, help="fleet size (default 2000)")
    demo.add_argument("--customers", type=_positive, default=10, help="customers (default 10)")
    demo.add_argument(
        "--speed",
        type=_non_negative,
        default=1800.0,
        help="simulated seconds per real second (default 1800: the day in under a minute; 0: at once)",
    )
    demo.add_argument("--no-follow", dest="follow", action="store_false", help="stop after the tour")
    demo.set_defaults(func=_demo)

    slots = sub.add_parser("slots", parents=[common], help="print a unit's slots of one local day")
    slots.add_argument("--unit", required=True)
    slots.add_argument("--date", required=True, type=_date, help="local day, YYYY-MM-DD")
    slots.set_defaults(func=_slots)

    simulate = sub.add_parser(
        "simulate",
        parents=[common],
        help="publish telegrams of a simulated fleet (with faults and a ground truth)",
        description="Publish a simulated fleet's telegrams to the broker of the settings (or --broker). "
        "Examples: --backfill 3 (three past days, as fast as the broker takes them); "
        "--days 1 --speed 1800 (yesterday at one half hour per second, then stop); "
        "--follow (live, in real time, until Ctrl-C).",
    )
    simulate.add_argument("--units", type=_positive, default=10_000, help="fleet size (default 10000)")
    simulate.add_argument("--customers", type=_positive, default=20, help="customers the units belong to (default 20)")
    simulate.add_argument("--seed", type=int, default=1, help="same seed, same fleet and same telegrams (default 1)")
    simulate.add_argument("--days", type=_non_negative, default=0.0, help="start this many days before --end")
    simulate.add_argument(
        "--speed",
        type=_non_negative,
        default=1.0,
        help="simulated seconds per real second (1800 = a half hour a second; 0 = no waiting)",
    )
    simulate.add_argument(
        "--backfill",
        type=_non_negative,
        metavar="DAYS",
        help="the past DAYS as fast as the broker takes them (= --days DAYS --speed 0)",
    )
    simulate.add_argument("--follow", action="store_true", help="after reaching the present, go on in real time")
    simulate.add_argument("--end", type=_instant, help="simulate up to this time (ISO 8601; default now)")
    simulate.add_argument(
        "--connections",
        default="4",
        type=_connections,
        help="shared MQTT connections (default 4), or per-unit: one connection per unit",
    )
    simulate.add_argument("--window", type=_positive, default=200, help="QoS 1 messages in flight per connection")
    simulate.add_argument("--clean", action="store_true", help="no faults at all")
    for name in Faults.names():
        simulate.add_argument(
            f"--{name.replace('_', '-')}-rate",
            type=_non_negative,
            dest=f"rate_{name}",
            metavar="R",
            help=f"rate of {name.replace('_', ' ')} (default {getattr(Faults.typical(), name)})",
        )
    simulate.add_argument("--truth", type=Path, metavar="FILE", help="write what a perfect backend must conclude")
    simulate.add_argument(
        "--write-registry",
        type=Path,
        metavar="DIR",
        help="write units.csv and customers.toml of the fleet to DIR, and exit",
    )
    simulate.add_argument("--broker", help="broker URL (default: broker.url of the settings)")
    simulate.add_argument(
        "--credentials",
        type=Path,
        metavar="FILE",
        help="CSV unit_id,password: each unit logs in as itself (with --connections per-unit)",
    )
    simulate.set_defaults(func=_simulate)

    export = sub.add_parser(
        "export",
        parents=[common],
        help="write customers' CSV files now",
        description="Without dates: what the scheduled run does (days changed since the last run, today's files, "
        "retention). With dates: re-render those days (written only where the bytes change).",
    )
    export.add_argument("--customer", action="append", metavar="C", help="only this customer (repeatable)")
    when = export.add_mutually_exclusive_group()
    when.add_argument("--date", type=_date, metavar="D", help="one local day, YYYY-MM-DD")
    when.add_argument("--from", dest="first", type=_date, metavar="D1", help="first day (with --to)")
    when.add_argument("--all", action="store_true", help="every day of the retention window")
    export.add_argument("--to", dest="last", type=_date, metavar="D2", help="last day (with --from)")
    export.set_defaults(func=_export)

    serve = sub.add_parser("serve-files", parents=[common], help="run only the FTP/FTPS/SFTP gateway")
    serve.set_defaults(func=_serve_files)

    users = sub.add_parser("users", parents=[common], help="customers' FTP/SFTP logins (in the customers file)")
    users_sub = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    add = users_sub.add_parser("add", parents=[common], help="add a login (asks for its password)")
    add.add_argument("customer")
    add.add_argument("user")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.add_argument(
        "--ssh-key",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="an SSH public key file (repeatable); with no password, key login only",
    )
    add.set_defaults(func=_users_add)
    passwd = users_sub.add_parser("passwd", parents=[common], help="give a login a new password (asks for it)")
    passwd.add_argument("customer")
    passwd.add_argument("user")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    passwd.set_defaults(func=_users_passwd)
    remove = users_sub.add_parser("remove", parents=[common], help="remove a login")
    remove.add_argument("user")
    remove.set_defaults(func=_users_remove)
    listing = users_sub.add_parser("list", parents=[common], help="list logins")
    listing.set_defaults(func=_users_list)

    report = sub.add_parser("report", parents=[common], help="the daily report on one local day (printed)")
    report.add_argument("--date", type=_date, help="local day (default: yesterday)")
    report.add_argument("--csv", type=Path, metavar="FILE", help="also write every problem slot to FILE")
    report.add_argument("--send", action="store_true", help="also send it now by mail and Slack, as configured")
    report.set_defaults(func=_report)

    provision = sub.add_parser(
        "provision",
        parents=[common],
        help="write the broker's password file, ACL and config (and TLS certificates)",
        description="Mosquitto's password file (its own hash format), an ACL that lets each unit publish only under "
        "smame/v1/<unit id>/ and the ingest user read, a mosquitto.conf, unit-credentials.csv (unit_id,password) "
        "for the units, and smame-broker.env for smame. With --tls also a device CA, the broker's "
        "certificate and one client certificate per unit (mutual TLS). Run it again after adding units: "
        "existing credentials are kept.",
    )
    provision.add_argument("--registry", type=Path, help="units.csv (default: registry.units of the settings)")
    provision.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the files go (kept private)")
    provision.add_argument("--tls", action="store_true", help="also certificates, and a mutual-TLS listener on 8883")
    provision.add_argument(
        "--broker-name",
        action="append",
        metavar="NAME",
        help="host name or address units use for the broker, in its certificate (repeatable; "
        "default localhost, 127.0.0.1, mosquitto)",
    )
    provision.add_argument(
        "--conf-dir",
        metavar="PATH",
        help="where the broker sees DIR (default: DIR itself; /mosquitto/config in the compose stack)",
    )
    provision.add_argument(
        "--data-dir", default="/mosquitto/data", metavar="PATH", help="the broker's persistence directory"
    )
    provision.add_argument("--port", type=_positive, default=1883, help="the broker's password listener (default 1883)")
    provision.add_argument("--bind", metavar="ADDRESS", help="the address of that listener (default: all)")
    provision.add_argument(
        "--owner",
        metavar="USER",
        help="give the files to this user (a broker not run by compose reads them as mosquitto)",
    )
    provision.add_argument("--tls-port", type=_positive, default=8883, help="its mutual-TLS listener (default 8883)")
    provision.add_argument(
        "--ingest-user", default="smame-ingest", help="the user smame logs in as (default smame-ingest)"
    )
    provision.add_argument(
        "--outage-hours",
        type=_non_negative,
        default=24.0,
        metavar="H",
        help="size the broker's queue for smame to be away this long (default 24)",
    )
    provision.set_defaults(func=_provision)

    backup = sub.add_parser("backup", parents=[common], help="copy the database while smame runs (online backup)")
    backup.add_argument("file", type=Path, help="where the copy goes (replaced atomically)")
    backup.add_argument(
        "--verify",
        action="store_true",
        help="only check FILE, an earlier copy: whole (SQLite's integrity check) and smame's",
    )
    backup.set_defaults(func=_backup)

    restore = sub.add_parser(
        "restore", parents=[common], help="put a checked copy in place of the database (smame stopped)"
    )
    restore.add_argument("file", type=Path, help="a copy made by smame backup")
    restore.set_defaults(func=_restore)

    verify = sub.add_parser("verify", parents=[common], help="compare the stored slots with a simulator's truth file")
    verify.add_argument("--truth", type=Path, required=True, metavar="FILE")
    verify.set_defaults(func=_verify)

    quarantine = sub.add_parser("quarantine", parents=[common], help="list quarantined telegrams with their reasons")
    quarantine.add_argument(
        "--reason", choices=REASONS, metavar="REASON", help=f"only this reason: {', '.join(REASONS)}"
    )
    quarantine.add_argument("--limit", type=int, default=50, help="newest N (default 50)")
    quarantine.set_defaults(func=_quarantine)
    return parser


def _positive(text: str) -> int:
    return int(_number(text, int, 1))


def _non_negative(text: str) -> float:
    return float(_number(text, float, 0))


def _number(text: str, kind: type[int] | type[float], least: int) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < least:
        raise argparse.ArgumentTypeError(
            f"{text} must be at least {least}" if least else f"{text} must not be negative"
        )
    return value


def _connections(text: str) -> int | None:
    return None if text == "per-unit" else _positive(text)


def _instant(text: str) -> float:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a UTC offset, e.g. 2026-11-23T12:00:00+09:00")
    return when.timestamp()


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


def _run(settings: Settings, args: argparse.Namespace) -> int:
    check_ports(listeners(settings))
    with store_lock(settings):
        return _run_app(App.build(settings))


def _run_app(app: App) -> int:
    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # optional: plain asyncio works, a little slower
        runner = asyncio.run
    try:
        runner(app.run())
    except Exception:  # the crashed service was logged by the supervisor
        return 1
    return 0


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    try:
        return run_demo(DemoOptions(args.dir, args.units, args.customers, args.speed, args.follow))
    except KeyboardInterrupt:
        print("\nsmame demo: stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"smame demo: {exc}", file=sys.stderr)
        return 1


def _slots(settings: Settings, args: argparse.Namespace) -> int:
    grid = Grid(settings.timezone)
    ends = grid.day_slots(args.date)
    registered = args.unit in RegistryHolder(settings).current.units
    with open_store(settings, create=False) as store:
        known = registered or store.last_at(args.unit) is not None  # a unit removed since still has its history
        stored = {r.slot: r for r in store.slots(args.unit, ends[0] - 1800, ends[-1])}
    if not known:
        print(
            f"smame slots: unit {args.unit!r} is neither in {settings.registry.units} nor in the store", file=sys.stderr
        )
        return 2
    print(f"unit {args.unit}, {args.date} ({settings.timezone}), {len(ends)} slots")
    print(f"{'slot':>4} {'start':>5}-{'end':<5} {'import_kwh':>11} {'q':>1} {'export_kwh':>11} {'q':>1}  flags")
    for end in ends:
        label = grid.label(end)
        r = stored.get(end)
        imp = exp = ""
        iq = eq = "M"
        flags: list[str] = []
        if r is not None:
            if r.imp is not None and r.e1 is not None and r.coef is not None:
                imp = format_kwh(r.imp, r.e1, r.coef)
            if r.exp is not None and r.e1 is not None and r.coef is not None:
                exp = format_kwh(r.exp, r.e1, r.coef)
            iq, eq = r.imp_q or "M", r.exp_q or "M"
            flags = flag_names(r.imp_flags | r.exp_flags)
        print(f"{label.index:>4} {label.start:>5}-{label.end:<5} {imp:>11} {iq} {exp:>11} {eq}  {','.join(flags)}")
    return 0


def _simulate(settings: Settings, args: argparse.Namespace) -> int:
    if args.write_registry is not None:
        units, customers = write_fleet_registry(make_fleet(args.units, args.customers, args.seed), args.write_registry)
        print(f"wrote {units} ({args.units} units) and {customers} ({min(args.customers, args.units)} customers)")
        return 0
    days, speed = (args.backfill, 0.0) if args.backfill is not None else (args.days, args.speed)
    faults = Faults.clean() if args.clean else Faults.typical()
    rates = {n: getattr(args, f"rate_{n}") for n in Faults.names() if getattr(args, f"rate_{n}") is not None}
    faults = dataclasses.replace(faults, **rates)
    passwords = _credentials(args.credentials) if args.credentials else {}
    host, port, tls = target_from_url(args.broker or settings.broker.url)
    b = settings.broker
    context = tls_context(str(b.ca_file) if b.ca_file else None, None, None) if tls else None
    opts = RunOptions(
        units=args.units,
        customers=args.customers,
        seed=args.seed,
        days=days,
        speed=speed,
        follow=args.follow,
        end=args.end,
        connections=args.connections,
        window=args.window,
        faults=faults,
        truth=args.truth,
        timezone=settings.timezone,
        gap_cap=settings.ingest.gap_cap_slots,
    )

    async def main() -> Summary:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await simulate(opts, Endpoint(host, port, context, passwords.get), sys.stderr, stop)

    try:
        summary = asyncio.run(main())
    except ConnectionRefused as exc:
        print(f"smame simulate: {exc}", file=sys.stderr)
        return 1
    print(("\n" if sys.stderr.isatty() else "") + describe(summary, opts))
    return 0


def _credentials(path: Path) -> dict[str, str]:
    with path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"unit_id", "password"} <= set(rows[0]):
        raise OSError(f"{path}: header must be unit_id,password")
    return {r["unit_id"]: r["password"] for r in rows}


def _export(settings: Settings, args: argparse.Namespace) -> int:
    grid = Grid(settings.timezone)
    holder = RegistryHolder(settings)
    exporter = build_exporter(settings, holder, grid)
    registry = holder.current
    now = time.time()
    today = grid.day_of(grid.floor(now - settings.export.grace_s))
    if (args.first is None) != (args.last is None):
        print("smame export: --from and --to go together", file=sys.stderr)
        return 2
    customers = args.customer or sorted(registry.customers)
    unknown = [c for c in customers if c not in registry.customers]
    if unknown:
        print(
            f"smame export: unknown customer {', '.join(unknown)} (not in {settings.registry.customers})",
            file=sys.stderr,
        )
        return 2
    try:
        check_writable(exporter.root)
        if args.date or args.first or args.all:
            first, last = (
                (args.date, args.date)
                if args.date
                else (args.first, args.last)
                if args.first
                else (today - timedelta(days=settings.export.retention_days), today)
            )
            if first > last:
                print("smame export: --from is after --to", file=sys.stderr)
                return 2
            days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
            pairs = [(c, d) for d in days for c in customers]
            result = exporter.export(pairs, now, _progress_bar() if sys.stderr.isatty() else lambda d, t: None)
        else:
            result = exporter.scheduled(now)
    except OSError as exc:
        print(f"smame export: {exc}", file=sys.stderr)
        return 1
    finally:
        exporter.close()
    print(
        f"{len(result.written)} files written, {result.unchanged} unchanged, {len(result.deleted)} deleted by "
        f"retention ({result.days} days) in {exporter.root}"
    )
    for path in result.written:
        print(f"  {path}")
    return 0


def _progress_bar() -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} days")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _serve_files(settings: Settings, args: argparse.Namespace) -> int:
    check_ports(listeners(settings, files_only=True))
    holder = RegistryHolder(settings)
    gateway = build_gateway(settings, holder)
    if gateway is None:
        print("smame serve-files: both ftp.enabled and sftp.enabled are false", file=sys.stderr)
        return 2

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        loop.add_signal_handler(signal.SIGHUP, holder.reload)
        try:
            await gateway.run()
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    return 0


_RELOAD_HINT = "a running smame sees it after `kill -HUP <pid>` (or a restart)"


def _read_password(args: argparse.Namespace, what: str) -> str:
    """The new password from standard input (--password-stdin) or asked twice on the terminal; raises
    UsersError saying what is wrong."""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif not sys.stdin.isatty():
        raise UsersError("no terminal to ask for the password on: give it on standard input with --password-stdin")
    else:
        password = getpass.getpass(f"{what}: ")
        if password != getpass.getpass("again: "):
            raise UsersError("the passwords differ")
    if len(password) < 12:
        raise UsersError("a password needs at least 12 characters")
    return password


def _users_add(settings: Settings, args: argparse.Namespace) -> int:
    try:
        password = (
            None if args.ssh_key and not args.password_stdin else _read_password(args, f"password for {args.user}")
        )
    except UsersError as exc:
        print(f"smame users add: {exc}", file=sys.stderr)
        return 2
    keys = [k.read_text(encoding="utf-8").strip() for k in args.ssh_key]
    try:
        add_user(settings.registry.customers, args.customer, args.user, password, keys)
    except UsersError as exc:
        print(f"smame users add: {exc}", file=sys.stderr)
        return 2
    print(f"added {args.user} to {args.customer} in {settings.registry.customers}; {_RELOAD_HINT}")
    return 0


def _users_passwd(settings: Settings, args: argparse.Namespace) -> int:
    try:
        password = _read_password(args, f"new password for {args.user}")
        set_password(settings.registry.customers, args.user, password, args.customer)
    except UsersError as exc:
        print(f"smame users passwd: {exc}", file=sys.stderr)
        return 2
    print(f"new password for {args.user} of {args.customer}; {_RELOAD_HINT}")
    return 0


def _users_remove(settings: Settings, args: argparse.Namespace) -> int:
    try:
        customer = remove_user(settings.registry.customers, args.user)
    except UsersError as exc:
        print(f"smame users remove: {exc}", file=sys.stderr)
        return 2
    print(f"removed {args.user} of {customer}; {_RELOAD_HINT}")
    return 0


def _users_list(settings: Settings, args: argparse.Namespace) -> int:
    for customer, user, how in list_users(settings.registry.customers):
        print(f"{customer:<12} {user:<24} {how}")
    return 0


def _report(settings: Settings, args: argparse.Namespace) -> int:
    grid = Grid(settings.timezone)
    registry = RegistryHolder(settings).current
    now = int(time.time())
    day = args.date or datetime.fromtimestamp(now, grid.zone).date() - timedelta(days=1)
    if args.send and not configured(settings):
        print(
            "smame report: --send needs mail.smtp_url or slack.webhook_url (or slack.token) in the settings",
            file=sys.stderr,
        )
        return 2
    with open_store(settings, create=False) as store:
        r = settings.report
        report = build_report(store, grid, registry, day, now, r.silent_after_s, r.zero_run_slots)
        print(render_text(report), end="")
        if args.csv:
            args.csv.write_bytes(problems_csv(report.problems))
            print(f"\n{len(report.problems)} problem slots written to {args.csv}")
        if args.send:
            return _send(settings, store, report_messages(report, settings, now, f"report:{day}:by-hand:{now}"))
    return 0


def _send(settings: Settings, store: Store, messages: list[tuple[str, str, bytes]]) -> int:
    outbox = build_outbox(settings, store)

    async def send() -> int:
        await outbox.put(messages)
        return await outbox.deliver_due()

    sent = asyncio.run(send())
    if sent < len(messages):
        errors = "; ".join(err for _, err in outbox.failing.values())
        print(
            f"\nsent {sent} of {len(messages)}; the rest stays in the outbox and `smame run` retries it: {errors}",
            file=sys.stderr,
        )
        return 1
    print(f"\nsent by {', '.join(ch for _, ch, _ in messages)}")
    return 0


def _provision(settings: Settings, args: argparse.Namespace) -> int:
    try:
        units = read_units(args.registry or settings.registry.units)
        done = provision(
            units,
            args.out,
            tls=args.tls,
            ingest_user=args.ingest_user,
            broker_names=args.broker_name or BROKER_NAMES,
            conf_dir=args.conf_dir,
            data_dir=args.data_dir,
            outage_hours=args.outage_hours,
            port=args.port,
            tls_port=args.tls_port,
            bind=args.bind,
            owner=args.owner,
        )
    except ProvisionError as exc:
        print(f"smame provision: {exc}", file=sys.stderr)
        return 2
    print(
        f"{len(units)} units: {len(done.added)} added, {len(done.kept)} kept, {len(done.removed)} removed "
        f"({', '.join(done.removed[:10]) or 'none'}); files in {args.out}:"
    )
    for name in sorted({p.name for p in done.files if p.parent == args.out}):
        print(f"  {name}")
    if args.tls:
        print(f"  certs/ ({len(units) + 1} client certificates)")
    print(
        f"Give each unit its line of {args.out / 'unit-credentials.csv'} (or its certificate); give smame "
        f"{args.out / 'smame-broker.env'}; then reload the broker (kill -HUP) to apply."
    )
    return 0


def _backup(settings: Settings, args: argparse.Namespace) -> int:
    if args.verify:
        counts = check_copy(args.file)
        print(f"{args.file} is whole: " + ", ".join(f"{n:,} {table}" for table, n in counts.items()))
        return 0
    with open_store(settings, create=False) as store:
        started = time.monotonic()
        store.backup(args.file)
    print(
        f"copied {store.path} to {args.file} ({args.file.stat().st_size / 2**20:.1f} MiB) in "
        f"{time.monotonic() - started:.1f} s"
    )
    return 0


def _restore(settings: Settings, args: argparse.Namespace) -> int:
    live = sqlite_path(settings.storage_url)
    with store_lock(settings, exclusive=True):
        counts = check_copy(args.file)
        restore_copy(args.file, live)
    print(f"restored {live} from {args.file}: " + ", ".join(f"{n:,} {table}" for table, n in counts.items()))
    return 0


def _verify(settings: Settings, args: argparse.Namespace) -> int:
    truth = read_truth(args.truth)
    if truth.meta.get("gap_cap") != settings.ingest.gap_cap_slots:
        print(
            f"warning: the truth assumes ingest.gap_cap_slots={truth.meta.get('gap_cap')}, "
            f"the settings say {settings.ingest.gap_cap_slots}",
            file=sys.stderr,
        )
    with open_store(settings, create=False) as store:

        def stored(unit: str, after: int, until: int) -> dict[int, Observed]:
            return {
                r.slot: (
                    r.imp,
                    r.imp_q or "M",
                    r.exp,
                    r.exp_q or "M",
                    tuple(sorted(flag_names(r.imp_flags | r.exp_flags))),
                )
                for r in store.slots(unit, after, until)
            }

        report = compare(truth, stored, store.quarantine_counts())
    print(report.table())
    for line in report.examples:
        print("  " + line)
    checked = sum(good + bad for good, bad in report.rows.values())
    print(
        f"{'MISMATCH' if report.mismatches else 'OK'}: {report.mismatches} mismatches in {len(truth.slots):,} slots "
        f"of {truth.meta.get('units')} units ({checked:,} checks by fault kind)"
    )
    return 1 if report.mismatches else 0


def _quarantine(settings: Settings, args: argparse.Namespace) -> int:
    with open_store(settings, create=False) as store:
        counts = store.quarantine_counts()
        rows = store.quarantine(args.reason, args.limit)
    total = sum(counts.values())
    print(f"{total} quarantined" + (": " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if counts else ""))
    for q in rows:
        when = datetime.fromtimestamp(q.received).astimezone().isoformat(timespec="seconds")
        preview = q.payload[:120].decode("utf-8", errors="replace")
        print(f"#{q.id} {when} {q.topic} {q.reason}: {q.detail}")
        if preview:
            print(f"    payload: {preview}{'...' if len(q.payload) > 120 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`smame export`: customers' CSV files written now, as scheduled or for given days; `smame emissions`: a
customer's monthly CO2 summary, brought up to date and printed."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import date, timedelta

from csv_export.files import check_writable
from csv_export.jobs import days_of, month_of, summary_path
from kernel.settings import Settings
from kernel.timegrid import Grid
from smame.app import RegistryHolder, build_exporter
from smame.commands.args import Subcommands, local_date, month


def add(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Add `export` to the command line."""
    export = sub.add_parser(
        "export",
        parents=[common],
        help="write customers' CSV files now",
        description="Without dates: what the scheduled run does (days changed since the last run, today's files, "
        "retention). With dates: re-render those days (written only where the bytes change).",
    )
    export.add_argument("--customer", action="append", metavar="C", help="only this customer (repeatable)")
    when = export.add_mutually_exclusive_group()
    when.add_argument("--date", type=local_date, metavar="D", help="one local day, YYYY-MM-DD")
    when.add_argument("--from", dest="first", type=local_date, metavar="D1", help="first day (with --to)")
    when.add_argument("--all", action="store_true", help="every day of the retention window")
    export.add_argument("--to", dest="last", type=local_date, metavar="D2", help="last day (with --from)")
    export.set_defaults(func=_export)

    emissions = sub.add_parser(
        "emissions",
        parents=[common],
        help="print a customer's monthly CO2 summary",
        description="Render the month's days of the customer (files written only where the bytes change), "
        "then print its summary {customer}_{YYYYMM}_co2.csv as the customer gets it.",
    )
    emissions.add_argument("--customer", required=True, metavar="C", help="the customer (co2_columns = true)")
    emissions.add_argument("--month", required=True, type=month, metavar="YYYY-MM", help="the month")
    emissions.set_defaults(func=_emissions)


def _export(settings: Settings, args: argparse.Namespace) -> int:
    grid = Grid(settings.timezone)
    holder = RegistryHolder(settings)
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
    days: list[date] = []
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
    with build_exporter(settings, holder, grid, create=False) as exporter:
        try:
            check_writable(exporter.root)
            if days:
                pairs = [(c, d) for d in days for c in customers]
                result = exporter.export(pairs, now, _progress_bar() if sys.stderr.isatty() else lambda d, t: None)
            else:
                result = exporter.scheduled(now)
        except OSError as exc:
            print(f"smame export: {exc}", file=sys.stderr)
            return 1
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


def _emissions(settings: Settings, args: argparse.Namespace) -> int:
    grid = Grid(settings.timezone)
    holder = RegistryHolder(settings)
    customer = holder.current.customers.get(args.customer)
    if customer is None:
        print(
            f"smame emissions: unknown customer {args.customer} (not in {settings.registry.customers})", file=sys.stderr
        )
        return 2
    if not customer.co2_columns:
        print(
            f"smame emissions: customer {customer.id} has no emissions: set co2_columns = true in "
            f"{settings.registry.customers}",
            file=sys.stderr,
        )
        return 2
    now = time.time()
    today = grid.day_of(grid.floor(now - settings.export.grace_s))
    if args.month > month_of(today):
        print(f"smame emissions: {args.month:%Y-%m} has not begun", file=sys.stderr)
        return 2
    with build_exporter(settings, holder, grid, create=False) as exporter:
        try:
            check_writable(exporter.root)
            pairs = [(customer.id, d) for d in days_of(args.month) if d <= today]
            exporter.export(pairs, now, files_from=exporter.first_kept(now))
        except OSError as exc:
            print(f"smame emissions: {exc}", file=sys.stderr)
            return 1
    path = summary_path(exporter.root, customer.id, args.month)
    if not path.exists():
        print(f"smame emissions: no data of customer {customer.id} in {args.month:%Y-%m}", file=sys.stderr)
        return 1
    sys.stdout.write(path.read_bytes().decode(customer.encoding).replace("\r\n", "\n"))
    return 0

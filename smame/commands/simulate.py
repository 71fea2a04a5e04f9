"""`smame simulate` (a simulated fleet on the broker) and `smame verify` (the store against its truth)."""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from broker_bridge.bridge import tls_context
from broker_bridge.mqtt import ConnectionRefused, version_for
from kernel.meter import flag_names
from kernel.settings import Settings, broker_nodes
from simulators.health import HealthMix
from simulators.scenario import Faults
from smame.app import open_store
from smame.commands.args import Subcommands, connections, count, instant, non_negative, positive

if TYPE_CHECKING:
    from simulators.run import Summary
    from simulators.truth import Observed


def add(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Add `simulate` and `verify` to the command line."""
    simulate = sub.add_parser(
        "simulate",
        parents=[common],
        help="publish telegrams of a simulated fleet (with faults and a ground truth)",
        description="Publish a simulated fleet's telegrams to the broker of the settings (or --broker). "
        "Examples: --backfill 3 (three past days, as fast as the broker takes them); "
        "--days 1 --speed 1800 (yesterday at one half hour per second, then stop); "
        "--follow (live, in real time, until Ctrl-C).",
    )
    simulate.add_argument("--units", type=positive, default=10_000, help="fleet size (default 10000)")
    simulate.add_argument("--customers", type=positive, default=20, help="customers the units belong to (default 20)")
    simulate.add_argument("--seed", type=int, default=1, help="same seed, same fleet and same telegrams (default 1)")
    simulate.add_argument("--days", type=non_negative, default=0.0, help="start this many days before --end")
    simulate.add_argument(
        "--speed",
        type=non_negative,
        default=1.0,
        help="simulated seconds per real second (1800 = a half hour a second; 0 = no waiting)",
    )
    simulate.add_argument(
        "--backfill",
        type=non_negative,
        metavar="DAYS",
        help="the past DAYS as fast as the broker takes them (= --days DAYS --speed 0)",
    )
    simulate.add_argument("--follow", action="store_true", help="after reaching the present, go on in real time")
    simulate.add_argument("--end", type=instant, help="simulate up to this time (ISO 8601; default now)")
    simulate.add_argument(
        "--connections",
        default="4",
        type=connections,
        help="shared MQTT connections (default 4), or per-unit: one connection per unit",
    )
    simulate.add_argument("--window", type=positive, default=200, help="QoS 1 messages in flight per connection")
    simulate.add_argument("--clean", action="store_true", help="no faults at all")
    for name in Faults.names():
        simulate.add_argument(
            f"--{name.replace('_', '-')}-rate",
            type=non_negative,
            dest=f"rate_{name}",
            metavar="R",
            help=f"rate of {name.replace('_', ' ')} (default {getattr(Faults.typical(), name)})",
        )
    simulate.add_argument(
        "--health",
        action="store_true",
        help="the units also send their diag and status; 3%% fail with a precursor, others die suddenly or only look "
        "unwell, and the network is away for an hour (docs/health.md; the truth names each unit's condition)",
    )
    simulate.add_argument(
        "--answer",
        type=count,
        default=0,
        metavar="N",
        help="the first N units also answer commands (ping, reboot, set, resend from their history, fw), each on "
        "a connection of its own with a persistent session (docs/devices.md)",
    )
    simulate.add_argument("--truth", type=Path, metavar="FILE", help="write what a perfect backend must conclude")
    simulate.add_argument(
        "--write-registry",
        type=Path,
        metavar="DIR",
        help="write units.csv, customers.toml and emission_factors.csv of the fleet to DIR, and exit",
    )
    simulate.add_argument("--broker", help="broker URL (default: broker.url of the settings)")
    simulate.add_argument(
        "--credentials",
        type=Path,
        metavar="FILE",
        help="CSV unit_id,password: each unit logs in as itself (with --connections per-unit)",
    )
    simulate.set_defaults(func=_simulate)

    verify = sub.add_parser("verify", parents=[common], help="compare the stored slots with a simulator's truth file")
    verify.add_argument("--truth", type=Path, required=True, metavar="FILE")
    verify.set_defaults(func=_verify)


def _simulate(settings: Settings, args: argparse.Namespace) -> int:
    # the simulator is loaded by the commands that run it, not by every smame command (`smame run` above all)
    from simulators.fleet import make_fleet, write_factors
    from simulators.fleet import write_registry as write_fleet_registry
    from simulators.publisher import Endpoint
    from simulators.run import RunOptions, describe, simulate

    if args.write_registry is not None:
        units, customers = write_fleet_registry(make_fleet(args.units, args.customers, args.seed), args.write_registry)
        factors = write_factors(args.write_registry, datetime.now(ZoneInfo(settings.timezone)).date())
        print(
            f"wrote {units} ({args.units} units), {customers} ({min(args.customers, args.units)} customers) and "
            f"{factors} (set emissions.factors to it)"
        )
        return 0
    days, speed = (args.backfill, 0.0) if args.backfill is not None else (args.days, args.speed)
    faults = Faults.clean() if args.clean else Faults.typical()
    rates = {n: getattr(args, f"rate_{n}") for n in Faults.names() if getattr(args, f"rate_{n}") is not None}
    faults = dataclasses.replace(faults, **rates)
    passwords = _credentials(args.credentials) if args.credentials else {}
    try:
        nodes, tls = broker_nodes(args.broker or settings.broker.url)
    except ValueError as exc:
        print(f"smame simulate: --broker {exc}", file=sys.stderr)
        return 2
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
        health=HealthMix() if args.health else None,
        answer=min(args.answer, args.units),
    )

    async def main() -> Summary:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await simulate(
            opts,
            Endpoint(nodes, context, passwords.get, version_for(settings.broker.kind)),
            sys.stderr,
            stop,
        )

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


def _verify(settings: Settings, args: argparse.Namespace) -> int:
    from simulators.truth import compare, read_truth  # see _simulate

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

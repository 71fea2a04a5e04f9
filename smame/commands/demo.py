"""`smame demo`: the whole product on this machine (`smame.demo` runs it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kernel.settings import Settings
from smame.commands.args import Subcommands, non_negative, positive


def add(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Add `demo` to the command line."""
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
    demo.add_argument("--units", type=positive, default=2000, help="fleet size (default 2000)")
    demo.add_argument("--customers", type=positive, default=10, help="customers (default 10)")
    demo.add_argument(
        "--speed",
        type=non_negative,
        default=1800.0,
        help="simulated seconds per real second (default 1800: the day in under a minute; 0: at once)",
    )
    demo.add_argument("--no-follow", dest="follow", action="store_false", help="stop after the tour")
    demo.set_defaults(func=_demo)


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    # here, not at the top: every smame command (`smame run` above all) would load the demo's SMTP server
    from smame.demo import DemoOptions, run_demo

    try:
        return run_demo(DemoOptions(args.dir, args.units, args.customers, args.speed, args.follow))
    except KeyboardInterrupt:
        print("\nsmame demo: stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"smame demo: {exc}", file=sys.stderr)
        return 1

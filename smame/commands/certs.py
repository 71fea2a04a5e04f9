"""`smame certs list`: the certificates smame uses or watches (monitoring.certificates), soonest to expire first."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from zoneinfo import ZoneInfo

from kernel.certificates import held_in
from kernel.settings import Settings
from smame.commands.args import Subcommands


def add(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Add `certs` and its action to the command line."""
    certs = sub.add_parser("certs", parents=[common], help="certificates and their expiry")
    certs_sub = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    listing = certs_sub.add_parser(
        "list", parents=[common], help="the certificates in use and watched, soonest to expire first"
    )
    listing.add_argument("--within", type=int, metavar="DAYS", help="only those that expire within DAYS days")
    listing.set_defaults(func=_list)


def _list(settings: Settings, args: argparse.Namespace) -> int:
    zone, now = ZoneInfo(settings.timezone), time.time()
    held, problems = held_in(settings.watched_certificates)
    for h in held:
        left = (h.not_after - now) / 86400
        if args.within is not None and left > args.within:
            continue
        until = datetime.fromtimestamp(h.not_after, zone).isoformat(timespec="minutes")
        state = f"{left:6.0f} days" if left > 0 else "   EXPIRED"
        print(f"{state}  {until}  {'CA ' if h.ca else '   '}{h.subject:<40} {h.path}")
    for problem in problems:
        print(f"smame certs list: cannot read {problem}", file=sys.stderr)
    return 1 if problems else 0

"""`smame report`: the daily report of one local day, printed, and sent when asked."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

from aggregator.store import Store
from kernel.settings import Settings
from kernel.timegrid import Grid
from monitoring.channels import configured
from monitoring.daily import build_report, report_messages
from monitoring.report import problems_csv, render_text
from smame.app import RegistryHolder, build_outbox, open_store
from smame.commands.args import Subcommands, local_date


def add(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Add `report` to the command line."""
    report = sub.add_parser("report", parents=[common], help="the daily report on one local day (printed)")
    report.add_argument("--date", type=local_date, help="local day (default: yesterday)")
    report.add_argument("--csv", type=Path, metavar="FILE", help="also write every problem slot to FILE")
    report.add_argument("--send", action="store_true", help="also send it now by mail and Slack, as configured")
    report.set_defaults(func=_report)


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
        report = build_report(
            store, grid, registry, day, now, r.silent_after_s, r.zero_run_slots, "", settings.health.report_units
        )
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

"""The `smame` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import date, datetime
from pathlib import Path

from aggregator.slots import flag_names, format_kwh
from aggregator.timegrid import Grid
from smame.app import App, open_store
from smame.logs import setup_logging
from smame.registry import RegistryError
from smame.settings import Settings, SettingsError, load_settings


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
    except (RegistryError, OSError) as exc:
        print(f"smame: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", type=Path, help="TOML settings file (environment variables override it)")
    parser = argparse.ArgumentParser(prog="smame", description="Meter-reading backend for SmaMe II LTE-M units.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the services (ingest) until SIGTERM/SIGINT")
    run.set_defaults(func=_run)

    slots = sub.add_parser("slots", parents=[common], help="print a unit's slots of one local day")
    slots.add_argument("--unit", required=True)
    slots.add_argument("--date", required=True, type=_date, help="local day, YYYY-MM-DD")
    slots.set_defaults(func=_slots)

    quarantine = sub.add_parser("quarantine", parents=[common], help="list quarantined telegrams with their reasons")
    quarantine.add_argument("--reason", help="only this reason")
    quarantine.add_argument("--limit", type=int, default=50, help="newest N (default 50)")
    quarantine.set_defaults(func=_quarantine)
    return parser


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


def _run(settings: Settings, args: argparse.Namespace) -> int:
    app = App.build(settings)
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


def _slots(settings: Settings, args: argparse.Namespace) -> int:
    grid = Grid(settings.timezone)
    ends = grid.day_slots(args.date)
    store = open_store(settings)
    try:
        stored = {r.slot: r for r in store.slots(args.unit, ends[0] - 1800, ends[-1])}
    finally:
        store.close()
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


def _quarantine(settings: Settings, args: argparse.Namespace) -> int:
    store = open_store(settings)
    try:
        counts = store.quarantine_counts()
        rows = store.quarantine(args.reason, args.limit)
    finally:
        store.close()
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

"""`smame units`, `smame slots` and `smame quarantine`: what the store holds, read while smame runs."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from kernel.meter import flag_names, format_kwh
from kernel.reading import REASONS
from kernel.settings import Settings
from kernel.timegrid import Grid
from monitoring.fleet import STATES, fleet_states
from monitoring.inventory import BANDS, UNKNOWN, Newest, band
from smame.app import RegistryHolder, open_store
from smame.commands import devices
from smame.commands.args import Subcommands, local_date


def add(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Add `units`, `slots` and `quarantine` to the command line."""
    units = sub.add_parser("units", parents=[common], help="the fleet: each unit's last reading and state")
    units.add_argument("--customer", help="only this customer's units")
    units.add_argument("--silent", action="store_true", help="only units silent now (alerts.silent_after_s)")
    units.add_argument("--firmware", metavar="VERSION", help="only units whose newest day named this firmware")
    units.add_argument(
        "--signal",
        choices=[*(b for b, _ in BANDS), UNKNOWN],
        help="only units of this signal band on their newest day (excellent >= -80 dBm, good, fair, poor < -100)",
    )
    units.set_defaults(func=_units)
    devices.add_to(units, common)

    slots = sub.add_parser("slots", parents=[common], help="print a unit's slots of one local day")
    slots.add_argument("--unit", required=True)
    slots.add_argument("--date", required=True, type=local_date, help="local day, YYYY-MM-DD")
    slots.set_defaults(func=_slots)

    quarantine = sub.add_parser("quarantine", parents=[common], help="list quarantined telegrams with their reasons")
    quarantine.add_argument(
        "--reason", choices=REASONS, metavar="REASON", help=f"only this reason: {', '.join(REASONS)}"
    )
    quarantine.add_argument("--limit", type=int, default=50, help="newest N (default 50)")
    quarantine.set_defaults(func=_quarantine)


def _units(settings: Settings, args: argparse.Namespace) -> int:
    registry = RegistryHolder(settings).current
    if args.customer is not None and args.customer not in registry.customers:
        print(f"smame units: customer {args.customer!r} is not in {settings.registry.customers}", file=sys.stderr)
        return 2
    chosen = registry.units_of(args.customer) if args.customer else sorted(registry.units.values(), key=lambda u: u.id)
    now = time.time()
    health = args.firmware is not None or args.signal is not None
    grid = Grid(settings.timezone)
    with open_store(settings, create=False) as store:
        last = store.last_readings([u.id for u in chosen])
        yesterday = datetime.fromtimestamp(now, grid.zone).date() - timedelta(days=1)
        newest = {row[0]: Newest(*row) for row in store.newest_health(grid.day_start(yesterday))} if health else {}
    if health:  # as of each unit's newest day of health (today's or yesterday's), as the console's Inventory
        chosen = [
            u
            for u in chosen
            if u.id in newest
            and (args.firmware is None or newest[u.id].fw == args.firmware)
            and (args.signal is None or band(newest[u.id].rsrp) == args.signal)
        ]
    states = fleet_states(chosen, last, now, settings.alerts.silent_after_s)
    counts = Counter(s.state for s in states)
    print(f"{len(states)} units: " + ", ".join(f"{counts[k]} {k}" for k in STATES))
    zone = ZoneInfo(settings.timezone)
    for s in states:
        if args.silent and s.state != "silent":
            continue
        when = "-" if s.last is None else datetime.fromtimestamp(s.last, zone).isoformat()
        line = f"{s.unit:<16} {s.customer:<12} {when:<25} {s.state:<12}"
        if health:
            n = newest[s.unit]
            rsrp = "-" if n.rsrp is None else f"{n.rsrp:.0f} dBm"
            line += f" firmware {n.fw or UNKNOWN}, RSRP {rsrp} ({band(n.rsrp)})"
        print(line.rstrip())
    return 0


def _slots(settings: Settings, args: argparse.Namespace) -> int:
    grid = Grid(settings.timezone)
    ends = grid.day_slots(args.date)
    registered = args.unit in RegistryHolder(settings).current.units
    with open_store(settings, create=False) as store:
        known = registered or store.last_at(args.unit) is not None  # a unit removed since still has its history
        stored = {r.slot: r for r in store.slots_at(args.unit, ends)}
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

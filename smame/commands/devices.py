"""`smame units cmd`, `smame units commands` and `smame units cancel`: commands to units (docs/devices.md).

The command line writes a command into the store (queued, with who asked and from where); the leading node's
`smame run` publishes it and keeps the unit's answer. `--wait` follows the commands until each has its answer.
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
import time
from datetime import datetime

from aggregator.desired import check_target, steps_now, text
from aggregator.store import CommandRow, Store
from kernel.commands import FINAL, CommandError, State, check_args, parse_arg_pairs, targets
from kernel.settings import Settings
from smame.app import RegistryHolder, open_store
from smame.commands.args import non_negative, positive

WAIT_POLL_S = 0.5


def add_to(units: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """Add `cmd`, `commands` and `cancel` under `smame units`."""
    sub = units.add_subparsers(dest="action", metavar="ACTION", required=False)
    cmd = sub.add_parser(
        "cmd",
        parents=[common],
        help="send a command to units: ping, reboot, set, resend, fw",
        description="Queue a command for units; the leading node sends it and keeps each unit's answer.",
    )
    cmd.add_argument("op", help="ping, reboot, set, resend or fw")
    cmd.add_argument("args", nargs="*", metavar="KEY=VALUE", help="its arguments (set interval_min=15, ...)")
    target = cmd.add_mutually_exclusive_group(required=True)
    target.add_argument("--unit", action="append", help="this unit (repeat for more)")
    target.add_argument("--customer", help="every unit of this customer")
    cmd.add_argument("--expires", type=positive, metavar="SECONDS", help="its life (default devices.expiry_s)")
    cmd.add_argument("--wait", type=non_negative, metavar="SECONDS", help="wait this long for the answers")
    cmd.set_defaults(func=_cmd)

    listing = sub.add_parser("commands", parents=[common], help="list commands with their state and answer")
    listing.add_argument("--unit", help="only this unit's")
    listing.add_argument("--limit", type=positive, default=50, help="newest N (default 50)")
    listing.set_defaults(func=_list)

    cancel = sub.add_parser("cancel", parents=[common], help="withdraw a command not yet sent")
    cancel.add_argument("id", help="the command's id")
    cancel.set_defaults(func=_cancel)

    config = sub.add_parser(
        "config",
        parents=[common],
        help="the units' desired configuration, and who is out of step",
        description="Show, set or clear the configuration wanted of the fleet, a customer, a group or a unit; the "
        "leading node sends `set` to units whose reported configuration differs.",
    )
    what = config.add_subparsers(dest="config_action", metavar="show|set|clear", required=True)
    show = what.add_parser("show", parents=[common], help="the desired configurations and the units out of step")
    show.add_argument("--limit", type=positive, default=50, help="units out of step listed (default 50)")
    show.set_defaults(func=_config_show)
    for name, helped in (("set", "want these values"), ("clear", "forget what is wanted at this scope")):
        p = what.add_parser(name, parents=[common], help=helped)
        if name == "set":
            p.add_argument("args", nargs="+", metavar="KEY=VALUE", help="interval_min=15 diag_every=1 brokers=...")
        scope = p.add_mutually_exclusive_group(required=True)
        scope.add_argument("--fleet", action="store_true", help="every unit")
        scope.add_argument("--customer", help="a customer's units")
        scope.add_argument("--group", help="the units of this group (units.csv's group column)")
        scope.add_argument("--unit", help="one unit")
        p.set_defaults(func=_config_change)


def who_asks() -> tuple[str, str]:
    """Who asks from the command line (the administrator's account), and from which host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}", socket.gethostname()


def _cmd(settings: Settings, args: argparse.Namespace) -> int:
    try:
        op_args = check_args(args.op, parse_arg_pairs(args.args))
    except CommandError as exc:
        print(f"smame units cmd: {exc}", file=sys.stderr)
        return 2
    try:
        units = targets(RegistryHolder(settings).current, args.unit or [], args.customer)
    except CommandError as exc:
        print(f"smame units cmd: {exc} ({settings.registry.units})", file=sys.stderr)
        return 2
    now = int(time.time())
    expires = now + (args.expires or settings.devices.expiry_s)
    who, origin = who_asks()
    text = json.dumps(op_args, separators=(",", ":"))
    with open_store(settings, create=False) as store:
        rows = store.queue_commands(args.op, text, units, now, expires, who, origin)
        print(f"{len(rows)} command(s) {args.op} queued, expiring {_when(expires)}")
        if not args.wait:
            for r in rows:
                print(f"{r.id} {r.unit}")
            return 0
        return _wait(store, [r.id for r in rows], args.wait)


def _wait(store: Store, ids: list[str], seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while True:
        rows = [r for r in (store.command(i) for i in ids) if r is not None]
        open_ = [r for r in rows if r.state not in FINAL and not (r.op == "reboot" and r.state == State.ACCEPTED)]
        if not open_ or time.monotonic() >= deadline:
            break
        time.sleep(WAIT_POLL_S)
    for r in rows:
        _print(r)
    good = {State.DONE, State.ACCEPTED}
    return 0 if all(r.state in good for r in rows) else 1


def _list(settings: Settings, args: argparse.Namespace) -> int:
    with open_store(settings, create=False) as store:
        rows = store.commands(args.unit, args.limit)
    print(f"{len(rows)} command(s)" + (f" of {args.unit}" if args.unit else ""))
    for r in rows:
        _print(r)
    return 0


def _cancel(settings: Settings, args: argparse.Namespace) -> int:
    who, origin = who_asks()
    with open_store(settings, create=False) as store:
        row = store.command(args.id)
        if row is None:
            print(f"smame units cancel: no command {args.id!r}", file=sys.stderr)
            return 2
        if not store.cancel_command(args.id, int(time.time()), who, origin):
            print(f"smame units cancel: command {args.id} is {row.state}, not queued: it cannot be withdrawn")
            return 1
    print(f"command {args.id} cancelled")
    return 0


def _config_change(settings: Settings, args: argparse.Namespace) -> int:
    scope = (
        next(s for s in ("customer", "group", "unit") if getattr(args, s) is not None) if not args.fleet else "fleet"
    )
    try:
        wanted = check_args("set", parse_arg_pairs(args.args)) if args.config_action == "set" else None
        target = check_target(RegistryHolder(settings).current, scope, getattr(args, scope, "") or "")
    except CommandError as exc:
        print(f"smame units config: {exc}", file=sys.stderr)
        return 2
    who, origin = who_asks()
    with open_store(settings, create=False) as store:
        store.want(scope, target, wanted, who, origin, int(time.time()))
    where = f"{scope} {target}".strip()
    print(f"{where}: wanted {text(wanted)}" if wanted is not None else f"{where}: nothing wanted any more")
    return 0


def _config_show(settings: Settings, args: argparse.Namespace) -> int:
    registry = RegistryHolder(settings).current
    with open_store(settings, create=False) as store:
        desired = store.desired()
        steps = steps_now(store, registry)
    print(f"{len(desired)} desired configuration(s)")
    for scope, target, config, who, _, at in desired:
        print(f"  {f'{scope} {target}'.strip():<24} {config}  ({who}, {_when(at)})")
    print(f"{len(steps)} unit(s) out of step")
    for s in steps[: args.limit]:
        reported = (
            "never reported" if s.reported is None else f"reported {text(s.reported)} {_when(s.reported_at or 0)}"
        )
        tried = f"; last set {s.last_try[3] or 'forgotten'} {_when(s.last_try[1])}" if s.last_try else ""
        print(f"  {s.unit:<16} wants {text(s.differs)}, {reported}{tried}")
    if len(steps) > args.limit:
        print(f"  ... and {len(steps) - args.limit} more")
    return 0


def _print(r: CommandRow) -> None:
    line = f"{r.id} {r.unit:<16} {r.op:<7} {r.state:<9} {_when(r.changed)}"
    if r.detail:
        line += f"  {r.detail}"
    if r.answer:
        line += f"  {r.answer}"
    print(line)


def _when(epoch: int) -> str:
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")

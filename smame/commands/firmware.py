"""`smame firmware` and `smame campaign`: firmware images for units and the campaigns that install them
(docs/devices.md, "Firmware campaigns"). The leading node's `smame run` moves campaigns on."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from datetime import datetime
from pathlib import Path

from aggregator.campaigns import change_phase, create_campaign, read_plan
from aggregator.store import StoreError
from kernel.commands import FW_MAX_BYTES, CommandError
from kernel.firmware import STEPS, check_plan, wave_sizes
from kernel.reading import DIAG_NAME
from kernel.settings import Settings
from smame.app import RegistryHolder, open_store
from smame.commands.args import Subcommands, positive
from smame.commands.devices import who_asks


def add(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Add `firmware` and `campaign` to the command line."""
    fw = sub.add_parser("firmware", parents=[common], help="firmware images for units")
    fw_sub = fw.add_subparsers(dest="action", metavar="add|list", required=True)
    add_ = fw_sub.add_parser("add", parents=[common], help="keep an image (its size and SHA-256) in the store")
    add_.add_argument("file", type=Path, help="the image")
    add_.add_argument("--version", required=True, help="the version it installs, as units report it (2.4.0)")
    add_.set_defaults(func=_add)
    listing = fw_sub.add_parser("list", parents=[common], help="the images kept")
    listing.set_defaults(func=_list)

    campaign = sub.add_parser("campaign", parents=[common], help="firmware campaigns: start, follow, pause, cancel")
    c_sub = campaign.add_subparsers(dest="action", metavar="start|list|show|pause|resume|cancel", required=True)
    start = c_sub.add_parser("start", parents=[common], help="install a kept image on units, in waves or at a rate")
    start.add_argument("--version", required=True, help="the image's version")
    target = start.add_mutually_exclusive_group(required=True)
    target.add_argument("--customer", help="every unit of this customer")
    target.add_argument("--from-version", help="every unit last known on this firmware version")
    target.add_argument("--units", help="these units, comma-separated")
    pace = start.add_mutually_exclusive_group()
    pace.add_argument("--waves", default="1,10,50,100", help="cumulative shares in percent (default 1,10,50,100)")
    pace.add_argument("--rate", type=positive, help="units started a minute instead of waves")
    start.add_argument("--timeout", type=positive, default=3600, metavar="SECONDS", help="a unit's (default 3600)")
    start.add_argument("--abort-share", type=float, default=0.1, help="abort when more failed (default 0.1)")
    start.add_argument("--abort-min", type=positive, default=10, help="... once this many ended (default 10)")
    start.add_argument("--name", default="", help="a name for people")
    start.set_defaults(func=_start)
    c_list = c_sub.add_parser("list", parents=[common], help="the newest campaigns with their counts")
    c_list.set_defaults(func=_campaigns)
    show = c_sub.add_parser("show", parents=[common], help="a campaign: its waves, counts, failed units")
    show.add_argument("id")
    show.set_defaults(func=_show)
    for action in ("pause", "resume", "cancel"):
        p = c_sub.add_parser(action, parents=[common], help=f"{action} a campaign")
        p.add_argument("id")
        p.set_defaults(func=_phase, change=action)


def _add(settings: Settings, args: argparse.Namespace) -> int:
    if not DIAG_NAME.fullmatch(args.version):
        print(f"smame firmware add: version {args.version[:40]!r} is not [A-Za-z0-9._+-]{{1,32}}", file=sys.stderr)
        return 2
    try:
        size = args.file.stat().st_size
        if not 0 < size <= FW_MAX_BYTES:
            print(f"smame firmware add: {args.file} holds {size} bytes: 1 to {FW_MAX_BYTES}", file=sys.stderr)
            return 2
        data = args.file.read_bytes()
    except OSError as exc:
        print(f"smame firmware add: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    sha = hashlib.sha256(data).hexdigest()
    who, origin = who_asks()
    with open_store(settings, create=False) as store:
        try:
            store.add_firmware(args.version, sha, data, int(time.time()), who, origin)
        except StoreError as exc:
            print(f"smame firmware add: {exc}", file=sys.stderr)
            return 1
    print(f"firmware {args.version}: {len(data)} bytes, sha256 {sha}")
    return 0


def _list(settings: Settings, args: argparse.Namespace) -> int:
    with open_store(settings, create=False) as store:
        images = store.firmwares()
    print(f"{len(images)} firmware image(s)")
    for version, sha, size, added, who in images:
        print(f"  {version:<12} {size:>10} bytes  sha256 {sha}  {_when(added)} {who}")
    return 0


def _start(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.devices.firmware_url:
        print(
            "smame campaign start: set devices.firmware_url (where units reach smame's web server) first",
            file=sys.stderr,
        )
        return 2
    if args.customer is not None:
        target: dict[str, object] = {"customer": args.customer}
    elif args.from_version is not None:
        target = {"from_version": args.from_version}
    else:
        target = {"units": [u.strip() for u in args.units.split(",") if u.strip()]}
    who, origin = who_asks()
    try:
        waves = [] if args.rate else [float(w) for w in args.waves.split(",")]
        plan = check_plan(waves, args.rate or 0, args.timeout, args.abort_share, args.abort_min)
        registry = RegistryHolder(settings).current
        with open_store(settings, create=False) as store:
            c = create_campaign(store, registry, args.version, target, plan, int(time.time()), who, origin, args.name)
    except ValueError as exc:  # CommandError, or a wave that is no number
        print(f"smame campaign start: {exc}", file=sys.stderr)
        return 2
    sizes = wave_sizes(plan, c.total)
    how = f"{plan.rate} units a minute" if plan.rate else "waves of " + ", ".join(map(str, sizes)) + " units"
    print(f"campaign {c.id}: {args.version} for {c.total} units, {how}")
    return 0


def _campaigns(settings: Settings, args: argparse.Namespace) -> int:
    with open_store(settings, create=False) as store:
        rows = [(c, store.campaign_counts(c.id)) for c in store.campaigns()]
    print(f"{len(rows)} campaign(s)")
    for c, counts in rows:
        said = ", ".join(f"{counts[s]} {s}" for s in STEPS if counts.get(s))
        print(f"  {c.id} {c.version:<10} {c.phase:<9} {_when(c.created)}  {said}  {c.detail}")
    return 0


def _show(settings: Settings, args: argparse.Namespace) -> int:
    with open_store(settings, create=False) as store:
        c = store.campaign(args.id)
        if c is None:
            print(f"smame campaign show: no campaign {args.id[:40]!r}", file=sys.stderr)
            return 2
        counts = store.campaign_counts(c.id)
        failed = store.campaign_units(c.id, "failed", 50)
    plan = read_plan(c.plan)
    print(f"campaign {c.id} ({c.name}): {c.version}, {c.phase}{f' ({c.detail})' if c.detail else ''}")
    print(f"  target {c.target}; asked by {c.who} {_when(c.created)}")
    sizes = wave_sizes(plan, c.total)
    print(
        f"  {'rate ' + str(plan.rate) + ' a minute' if plan.rate else 'waves ' + json.dumps(sizes)}, timeout "
        f"{plan.timeout_s} s, aborts over {plan.abort_share:.0%} failed once {plan.abort_min} ended"
    )
    print("  " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STEPS))
    for _, unit, _, _, changed, stage, detail in failed:
        print(f"  failed {unit:<16} {stage:<9} {_when(changed)}  {detail}")
    return 0


def _phase(settings: Settings, args: argparse.Namespace) -> int:
    who, origin = who_asks()
    with open_store(settings, create=False) as store:
        try:
            phase = change_phase(store, args.id, args.change, int(time.time()), who, origin)
        except CommandError as exc:
            print(f"smame campaign {args.change}: {exc}", file=sys.stderr)
            return 2
    print(f"campaign {args.id} {phase}")
    return 0


def _when(epoch: int) -> str:
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")

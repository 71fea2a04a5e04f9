"""`smame provision`: the broker's logins, ACL, configuration and certificates for the registry's units."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from broker_bridge.provision import BROKER_NAMES, ProvisionError, provision, read_units
from kernel.settings import Settings
from smame.commands.args import Subcommands, non_negative, positive


def add(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Add `provision` to the command line."""
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
        "--data-dir",
        metavar="PATH",
        help="the broker's persistence directory (default: DIR/data, made here; /mosquitto/data with --conf-dir)",
    )
    provision.add_argument("--port", type=positive, default=1883, help="the broker's password listener (default 1883)")
    provision.add_argument("--bind", metavar="ADDRESS", help="the address of that listener (default: all)")
    provision.add_argument(
        "--owner",
        metavar="USER",
        help="give the files the broker reads to this user or uid[:gid] (Debian's broker runs as mosquitto; "
        "compose's as 1883); the CA key and the units' credentials stay yours",
    )
    provision.add_argument("--tls-port", type=positive, default=8883, help="its mutual-TLS listener (default 8883)")
    provision.add_argument(
        "--ingest-user", default="smame-ingest", help="the user smame logs in as (default smame-ingest)"
    )
    provision.add_argument(
        "--outage-hours",
        type=non_negative,
        default=24.0,
        metavar="H",
        help="size the broker's queue for smame to be away this long (default 24)",
    )
    provision.set_defaults(func=_provision)


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

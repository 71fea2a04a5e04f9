"""`smame customers export C --all --out DIR` and `smame customers remove C --purge`: a customer's end of
contract. The export is every stored day of the customer as its CSV files and CO2 summaries, with a manifest of
checksums; the purge deletes its rows, files, logins and tokens, and prints a receipt of what went. Both are in
the audit log."""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

from csv_export.exporter import Exporter
from csv_export.jobs import TOTALS_DIR
from kernel.settings import Settings
from kernel.timegrid import Grid
from smame.app import RegistryHolder, open_store
from smame.commands.args import Subcommands
from smame.commands.audit import audit_entry
from smame.users import UsersError, remove_customer

MANIFEST = "SHA256SUMS"  # the manifest's name: `sha256sum -c SHA256SUMS` checks the export


def add(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Add `customers` and its actions to the command line."""
    customers = sub.add_parser("customers", parents=[common], help="a customer's end of contract: export, purge")
    customers_sub = customers.add_subparsers(dest="customers_command", metavar="ACTION", required=True)
    export = customers_sub.add_parser(
        "export", parents=[common], help="every stored day of a customer as CSV files, with a manifest"
    )
    export.add_argument("customer")
    export.add_argument("--all", action="store_true", required=True, help="every day the store holds (required)")
    export.add_argument("--out", type=Path, required=True, metavar="DIR", help="where <customer>/ is written")
    export.set_defaults(func=_export)
    remove = customers_sub.add_parser(
        "remove", parents=[common], help="delete a customer's data, files, logins and tokens, with a receipt"
    )
    remove.add_argument("customer")
    remove.add_argument("--purge", action="store_true", required=True, help="delete its data (required)")
    remove.add_argument("--yes", action="store_true", help="do not ask to confirm (no terminal: required)")
    remove.set_defaults(func=_remove)


def _manifest(directory: Path) -> list[tuple[str, str, int]]:
    """(SHA-256, name relative to `directory`, bytes) of every file under it but checksum sidecars and a
    manifest, by name."""
    out = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if path.name.endswith(".sha256") or path.name == MANIFEST:
            continue
        data = path.read_bytes()
        out.append((hashlib.sha256(data).hexdigest(), path.relative_to(directory).as_posix(), len(data)))
    return out


def _sums(files: list[tuple[str, str, int]]) -> bytes:
    """Files as `sha256sum` lists them (and `sha256sum -c` reads them): a line of SHA-256 and name each."""
    return "".join(f"{digest}  {name}\n" for digest, name, _ in files).encode()


def _export(settings: Settings, args: argparse.Namespace) -> int:
    grid, holder = Grid(settings.timezone), RegistryHolder(settings)
    registry = holder.current
    if args.customer not in registry.customers:
        print(f"smame customers export: no customer {args.customer} in {settings.registry.customers}", file=sys.stderr)
        return 2
    target = args.out / args.customer
    if target.exists() and any(target.iterdir()):
        print(f"smame customers export: {target} is not empty: give another --out", file=sys.stderr)
        return 2
    e = settings.export
    now = time.time()
    today = grid.day_of(grid.floor(now - e.grace_s))
    with Exporter(
        open_store(settings, create=False), lambda: registry, grid, args.out, 0, e.grace_s, workers=e.workers
    ) as exporter:
        first = exporter.first_days(registry, [(args.customer, today)]).get(args.customer)
        days = [] if first is None else [first + timedelta(days=i) for i in range((today - first).days + 1)]
        exporter.export([(args.customer, d) for d in days], now)
        store = exporter.store
        target.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(args.out / TOTALS_DIR, ignore_errors=True)  # the exporter's own sums, not the customer's
        files = _manifest(target)
        manifest = _sums(files)
        (target / MANIFEST).write_bytes(manifest)
        digest = hashlib.sha256(manifest).hexdigest()
        span = f"{days[0]} to {days[-1]}" if days else "no day stored"
        detail = f"{len(files)} files, {span}, {MANIFEST} sha256 {digest}"
        audit_entry(store, "customer exported", args.customer, detail)
    print(
        f"exported {args.customer}: {len(days)} days ({span}), {len(files)} files, "
        f"{sum(n for _, _, n in files):,} bytes in {target}"
    )
    print(f"manifest {target / MANIFEST} (sha256 {digest}); check with: cd {target} && sha256sum -c {MANIFEST}")
    return 0


def _remove(settings: Settings, args: argparse.Namespace) -> int:
    holder = RegistryHolder(settings)
    registry = holder.current
    customer = args.customer
    if customer not in registry.customers:
        print(f"smame customers remove: no customer {customer} in {settings.registry.customers}", file=sys.stderr)
        return 2
    units = [u.id for u in registry.units_of(customer)]
    if not args.yes:
        if not sys.stdin.isatty():
            print("smame customers remove: no terminal to confirm on: give --yes", file=sys.stderr)
            return 2
        answer = input(
            f"This deletes every reading, slot, file, login and token of {customer} ({len(units)} units) "
            f"for good. Type {customer} to go on: "
        )
        if answer.strip() != customer:
            print("smame customers remove: not confirmed; nothing deleted", file=sys.stderr)
            return 1
    assert settings.export.dir is not None
    with open_store(settings, create=False) as store:
        rows = store.purge_customer(customer, units)
        files: list[tuple[str, str, int]] = []
        for directory in (settings.export.dir / customer, settings.export.dir / TOTALS_DIR / customer):
            if directory.is_dir():
                files += _manifest(directory)
                shutil.rmtree(directory)
        try:
            logins, lines = remove_customer(settings.registry.customers, settings.registry.units, customer)
        except UsersError as exc:
            print(
                f"smame customers remove: its data is deleted, but the registry is not changed: {exc}; fix it "
                "and run this again",
                file=sys.stderr,
            )
            return 1
        listing = _sums(files)
        receipt = [f"{table} {n}" for table, n in rows.items() if n] + [
            f"files {len(files)} (sha256 of their list {hashlib.sha256(listing).hexdigest()})",
            f"logins {logins}",
            f"units {lines}",
        ]
        audit_entry(store, "customer purged", customer, "; ".join(receipt))
    print(f"removed {customer} for good. Deleted:")
    for table, n in rows.items():
        print(f"  {table:<18} {n:>12,} rows")
    print(f"  {'files':<18} {len(files):>12,} ({sum(n for _, _, n in files):,} bytes)")
    for digest, name, _ in files:
        print(f"    {digest}  {name}")
    print(f"  {'logins':<18} {logins:>12,}   (from {settings.registry.customers})")
    print(f"  {'units':<18} {lines:>12,}   (from {settings.registry.units})")
    print(
        "A running smame takes the registry without the customer at `kill -HUP <pid>` (or a restart); "
        "`smame provision` again withdraws its units' broker credentials."
    )
    return 0

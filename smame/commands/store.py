"""`smame backup` and `smame restore`: a checked copy of the database, and putting one back."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from aggregator.backends import is_postgres, open_url
from aggregator.copy import copy_store, fingerprint
from aggregator.sqlite import SqliteStore, check_copy, restore_copy, sqlite_path
from aggregator.store import TABLES, StoreError
from kernel.settings import Settings
from smame.app import open_store, store_lock
from smame.commands.args import Subcommands
from smame.commands.audit import audit_entry


def add(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Add `backup` and `restore` to the command line."""
    backup = sub.add_parser("backup", parents=[common], help="copy the database while smame runs (online backup)")
    backup.add_argument("file", type=Path, help="where the copy goes (replaced atomically)")
    backup.add_argument(
        "--verify",
        action="store_true",
        help="only check FILE, an earlier copy: whole (SQLite's integrity check) and smame's",
    )
    backup.set_defaults(func=_backup)

    restore = sub.add_parser(
        "restore", parents=[common], help="put a checked copy in place of the database (smame stopped)"
    )
    restore.add_argument("file", type=Path, help="a copy made by smame backup")
    restore.set_defaults(func=_restore)

    migrate = sub.add_parser(
        "migrate", parents=[common], help="copy the store into an empty PostgreSQL database (smame stopped)"
    )
    migrate.add_argument("--to", required=True, metavar="URL", help="postgresql://user@host:5432/database")
    migrate.set_defaults(func=_migrate)


def _sqlite_only(settings: Settings) -> None:
    if is_postgres(settings.storage_url):
        raise StoreError("the store is PostgreSQL: copy it with pg_dump and put it back with pg_restore")


def _backup(settings: Settings, args: argparse.Namespace) -> int:
    if args.verify:
        counts = check_copy(args.file)
        print(f"{args.file} is whole: " + ", ".join(f"{n:,} {table}" for table, n in counts.items()))
        return 0
    _sqlite_only(settings)
    with open_store(settings, create=False) as store:
        assert isinstance(store, SqliteStore)
        started = time.monotonic()
        store.backup(args.file)
    print(
        f"copied {store.path} to {args.file} ({args.file.stat().st_size / 2**20:.1f} MiB) in "
        f"{time.monotonic() - started:.1f} s"
    )
    return 0


def _restore(settings: Settings, args: argparse.Namespace) -> int:
    _sqlite_only(settings)
    live = sqlite_path(settings.storage_url)
    with store_lock(settings, "restore"):
        counts = check_copy(args.file)
        restore_copy(args.file, live)
    with open_store(settings, create=False) as store:
        audit_entry(store, "store restored", str(live), f"from {args.file}: {counts.get('slots', 0):,} slots")
    print(f"restored {live} from {args.file}: " + ", ".join(f"{n:,} {table}" for table, n in counts.items()))
    return 0


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    if not is_postgres(args.to):
        raise StoreError(f"--to must be a postgresql:// URL, not {args.to.split(':', 1)[0]}:")
    started = time.monotonic()
    with (
        store_lock(settings, "migrate"),
        open_store(settings, create=False) as source,
        open_url(args.to) as target,
    ):
        counts = copy_store(source, target, lambda table, n: print(f"  {table}: {n:,}", flush=True))
        for table in TABLES[1:]:  # every table but meta, whose schema entry is the target's own
            there, here = (int(s.execute(f"SELECT count(*) FROM {table}").fetchone()[0]) for s in (target, source))
            if there != here:
                raise StoreError(f"the copy differs: {table} has {there:,} rows there, {here:,} here")
        copied, ours = fingerprint(target), fingerprint(source)
        if copied != ours:
            raise StoreError(
                f"the copy differs: slots {copied[0]:,} rows {copied[1][:16]}, here {ours[0]:,} {ours[1][:16]}"
            )
    print(
        f"copied {sum(counts.values()):,} rows in {time.monotonic() - started:.1f} s; "
        f"{ours[0]:,} slots, checksum {ours[1][:16]} on both sides. "
        "Set storage.url to the new store and start smame."
    )
    return 0

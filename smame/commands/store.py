"""`smame backup` and `smame restore`: a checked copy of the database, and putting one back."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from aggregator.backends import is_postgres
from aggregator.sqlite import SqliteStore, check_copy, restore_copy, sqlite_path
from aggregator.store import StoreError
from kernel.settings import Settings
from smame.app import open_store, store_lock
from smame.commands.args import Subcommands


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
    with store_lock(settings, exclusive=True):
        counts = check_copy(args.file)
        restore_copy(args.file, live)
    print(f"restored {live} from {args.file}: " + ", ".join(f"{n:,} {table}" for table, n in counts.items()))
    return 0

"""The `smame` command."""

from __future__ import annotations

import os
import signal
import sys

from smame import _interrupted

signal.signal(signal.SIGINT, _interrupted)  # before the imports below, which take a while

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from kernel.registry import RegistryError  # noqa: E402
from kernel.settings import SettingsError, load_settings  # noqa: E402
from smame.commands import GROUPS  # noqa: E402
from smame.logs import setup_logging  # noqa: E402
from smame.users import UsersError  # noqa: E402
from web.access import AccessError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `smame` console script: Ctrl-C at any moment (a prompt, start-up) ends it with one line
    and exit code 130."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: a KeyboardInterrupt from here on
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("\nsmame: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if args.command not in SHARED_OUTPUT:
        # the store, its WAL and copies, the customers' files and keys are smame's alone, whatever the umask
        # of the shell or service manager that started it (0644 gave every local user every reading)
        os.umask(0o077)
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"smame: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log.level, settings.log.format)
    try:
        return int(args.func(settings, args) or 0)
    except BrokenPipeError:  # `smame ... | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (RegistryError, UsersError, AccessError, OSError) as exc:
        print(f"smame: {exc}", file=sys.stderr)
        return 2


# Commands that write files for other programs (the broker's configuration, readable by Mosquitto's user; a
# simulated registry): they set each file's mode themselves and keep the caller's umask.
SHARED_OUTPUT = {"provision", "simulate"}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", type=Path, help="TOML settings file (environment variables override it)")
    parser = argparse.ArgumentParser(prog="smame", description="Meter-reading backend for SmaMe II LTE-M units.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.add(sub, common)
    return parser


if __name__ == "__main__":
    sys.exit(main())

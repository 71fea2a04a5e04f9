"""`smame users add|passwd|remove|list`: customers' file gateway logins, kept in the customers file."""

from __future__ import annotations

import argparse
import functools
import getpass
import sys
from collections.abc import Callable
from pathlib import Path

from kernel.settings import Settings
from smame.commands.args import Subcommands
from smame.commands.audit import audit_if_stored
from smame.users import UsersError, add_user, list_users, remove_user, set_password

_RELOAD_HINT = "a running smame sees it after `kill -HUP <pid>` (or a restart)"


def add(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Add `users` and its actions to the command line."""
    users = sub.add_parser("users", parents=[common], help="customers' FTP/SFTP logins (in the customers file)")
    users_sub = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    add = users_sub.add_parser("add", parents=[common], help="add a login (asks for its password)")
    add.add_argument("customer")
    add.add_argument("user")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.add_argument(
        "--ssh-key",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="an SSH public key file (repeatable); with no password, key login only",
    )
    add.set_defaults(func=_users_add)
    passwd = users_sub.add_parser("passwd", parents=[common], help="give a login a new password (asks for it)")
    passwd.add_argument("customer")
    passwd.add_argument("user")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    passwd.set_defaults(func=_users_passwd)
    remove = users_sub.add_parser("remove", parents=[common], help="remove a login")
    remove.add_argument("user")
    remove.set_defaults(func=_users_remove)
    listing = users_sub.add_parser("list", parents=[common], help="list logins")
    listing.set_defaults(func=_users_list)


def read_password(args: argparse.Namespace, what: str) -> str:
    """The new password from standard input (--password-stdin) or asked twice on the terminal; raises
    UsersError saying what is wrong."""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif not sys.stdin.isatty():
        raise UsersError("no terminal to ask for the password on: give it on standard input with --password-stdin")
    else:
        password = getpass.getpass(f"{what}: ")
        if password != getpass.getpass("again: "):
            raise UsersError("the passwords differ")
    if len(password) < 12:
        raise UsersError("a password needs at least 12 characters")
    return password


Handler = Callable[[Settings, argparse.Namespace], int]


def _refused_as(action: str) -> Callable[[Handler], Handler]:
    """A handler whose UsersError is said as one line naming the action, with exit code 2."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run(settings: Settings, args: argparse.Namespace) -> int:
            try:
                return handler(settings, args)
            except UsersError as exc:
                print(f"smame users {action}: {exc}", file=sys.stderr)
                return 2

        return run

    return wrap


@_refused_as("add")
def _users_add(settings: Settings, args: argparse.Namespace) -> int:
    password = None if args.ssh_key and not args.password_stdin else read_password(args, f"password for {args.user}")
    keys = [k.read_text(encoding="utf-8").strip() for k in args.ssh_key]
    add_user(settings.registry.customers, args.customer, args.user, password, keys)
    how = ", ".join(["password"] * bool(password) + [f"{len(keys)} SSH key(s)"] * bool(keys))
    audit_if_stored(settings, "login added", args.user, f"customer {args.customer}; {how}")
    print(f"added {args.user} to {args.customer} in {settings.registry.customers}; {_RELOAD_HINT}")
    return 0


@_refused_as("passwd")
def _users_passwd(settings: Settings, args: argparse.Namespace) -> int:
    password = read_password(args, f"new password for {args.user}")
    set_password(settings.registry.customers, args.user, password, args.customer)
    audit_if_stored(settings, "login's password changed", args.user, f"customer {args.customer}")
    print(f"new password for {args.user} of {args.customer}; {_RELOAD_HINT}")
    return 0


@_refused_as("remove")
def _users_remove(settings: Settings, args: argparse.Namespace) -> int:
    customer = remove_user(settings.registry.customers, args.user)
    audit_if_stored(settings, "login removed", args.user, f"customer {customer}")
    print(f"removed {args.user} of {customer}; {_RELOAD_HINT}")
    return 0


def _users_list(settings: Settings, args: argparse.Namespace) -> int:
    for customer, user, how in list_users(settings.registry.customers):
        print(f"{customer:<12} {user:<24} {how}")
    return 0

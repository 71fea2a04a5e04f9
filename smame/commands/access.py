"""`smame tokens add|list|remove` and `smame operators add|list|remove|passwd|role|2fa`: who may use the web server;
`smame bans list|remove`: who is kept out of it and the file gateway.

All live in the store (hashes only), so a running smame, and every node sharing the store, sees a change at
its next request (a lifted ban within a few seconds). What is done to operators is in the audit log, as done by
`cli:<the system user>` on this machine."""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import segno

from aggregator.store import Store
from ftp_gateway.accounts import normalize
from kernel.settings import Settings
from smame.app import BANS_EVERY_S, RegistryHolder, open_store
from smame.commands.args import Subcommands
from smame.commands.audit import audit_entry
from smame.commands.users import read_password
from web.access import ROLES, SCOPES, AccessError, Operators, Tokens, new_totp_secret, totp_uri


def add(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Add `tokens` and `operators` and their actions to the command line."""
    tokens = sub.add_parser("tokens", parents=[common], help="customers' API tokens (in the store)")
    tokens_sub = tokens.add_subparsers(dest="tokens_command", metavar="ACTION", required=True)
    add = tokens_sub.add_parser("add", parents=[common], help="make a token for a customer (printed once)")
    add.add_argument("customer")
    add.add_argument("--name", default="", help="a label to tell tokens apart (e.g. the machine using it)")
    add.add_argument("--expires", type=_span, metavar="SPAN", help="refused after this long: 90d, 12h (default: never)")
    add.add_argument(
        "--scope",
        type=_scope,
        default=SCOPES,
        metavar="LIST",
        help=f"what it reads, comma-separated of {', '.join(SCOPES)} (default: all)",
    )
    add.set_defaults(func=_tokens_add)
    listing = tokens_sub.add_parser("list", parents=[common], help="list tokens (never their secrets)")
    listing.add_argument("--customer", help="only this customer's")
    listing.set_defaults(func=_tokens_list)
    remove = tokens_sub.add_parser("remove", parents=[common], help="remove a token: refused from its next use")
    remove.add_argument("id")
    remove.set_defaults(func=_tokens_remove)

    operators = sub.add_parser("operators", parents=[common], help="operators' console logins (in the store)")
    operators_sub = operators.add_subparsers(dest="operators_command", metavar="ACTION", required=True)
    asking = (("add", "add an operator (asks for a password)"), ("passwd", "give an operator a new password"))
    for action, what in asking:
        p = operators_sub.add_parser(action, parents=[common], help=what)
        p.add_argument("name")
        p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
        p.set_defaults(func=_operators_add if action == "add" else _operators_passwd)
        if action == "add":
            p.add_argument("--role", choices=ROLES, default="operator", help="what it may do (default: operator)")
            p.add_argument("--2fa", dest="two_factor", action="store_true", help="enrol an authenticator now")
    role = operators_sub.add_parser("role", parents=[common], help="give an operator another role")
    role.add_argument("name")
    role.add_argument("role", choices=ROLES)
    role.set_defaults(func=_operators_role)
    two = operators_sub.add_parser(
        "2fa", parents=[common], help="enrol an operator's authenticator (a QR code here), or --reset it"
    )
    two.add_argument("name")
    two.add_argument("--reset", action="store_true", help="take its authenticator and recovery codes away")
    two.set_defaults(func=_operators_2fa)
    remove = operators_sub.add_parser("remove", parents=[common], help="remove an operator")
    remove.add_argument("name")
    remove.set_defaults(func=_operators_remove)
    listing = operators_sub.add_parser("list", parents=[common], help="list operators")
    listing.set_defaults(func=_operators_list)

    bans = sub.add_parser("bans", parents=[common], help="addresses banned for failed logins (in the store)")
    bans_sub = bans.add_subparsers(dest="bans_command", metavar="ACTION", required=True)
    listing = bans_sub.add_parser("list", parents=[common], help="list the addresses banned now, on every node")
    listing.set_defaults(func=_bans_list)
    remove = bans_sub.add_parser("remove", parents=[common], help="lift an address's ban on every node")
    remove.add_argument("address")
    remove.set_defaults(func=_bans_remove)


def _shown(epoch: int, settings: Settings) -> str:
    """A time as every smame command shows it: in the configured time zone, not the machine's."""
    return datetime.fromtimestamp(epoch, ZoneInfo(settings.timezone)).isoformat(timespec="seconds")


def _tokens_add(settings: Settings, args: argparse.Namespace) -> int:
    if args.customer not in RegistryHolder(settings).current.customers:
        raise AccessError(f"customer {args.customer} is not in {settings.registry.customers}")
    now = int(time.time())
    expires = None if args.expires is None else now + args.expires
    with open_store(settings, create=False) as store:
        token = Tokens(store).add(args.customer, args.name, now, expires, args.scope)
        token_id = token.split("_")[1]
        until = f"until {_shown(expires, settings)}" if expires else "no expiry"
        audit_entry(store, "token added", token_id, f"customer {args.customer}; reads {' '.join(args.scope)}; {until}")
    print(token)  # alone on standard output: `TOKEN=$(smame tokens add C)`
    print(f"token {token_id} for {args.customer} ({until}): keep it now, it is not shown again", file=sys.stderr)
    return 0


def _span(text: str) -> int:
    """Seconds of a span given as 90d or 12h."""
    m = re.fullmatch(r"([1-9][0-9]{0,4})([dh])", text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give days or hours, as 90d or 12h")
    return int(m[1]) * (86400 if m[2] == "d" else 3600)


def _scope(text: str) -> tuple[str, ...]:
    """The scopes a comma-separated list names, each one of SCOPES."""
    named = [s.strip() for s in text.split(",") if s.strip()]
    wrong = [s for s in named if s not in SCOPES]
    if wrong or not named:
        raise argparse.ArgumentTypeError(f"{text!r}: give some of {', '.join(SCOPES)}, comma-separated")
    return tuple(named)


def _tokens_list(settings: Settings, args: argparse.Namespace) -> int:
    with open_store(settings, create=False) as store:
        found = Tokens(store).list(args.customer)
    now = time.time()
    for t in found:
        until = "no expiry"
        if t.expires is not None:
            until = f"{'expired' if t.expired(now) else 'until'} {_shown(t.expires, settings)}"
        print(f"{t.id}  {t.customer:<12} {_shown(t.created, settings)}  {','.join(t.scope):<22} {until:<33} {t.name}")
    return 0


def _tokens_remove(settings: Settings, args: argparse.Namespace) -> int:
    with open_store(settings, create=False) as store:
        customer = Tokens(store).remove(args.id)
        audit_entry(store, "token removed", args.id, f"customer {customer}")
    print(f"removed token {args.id} of {customer}")
    return 0


def _operators_add(settings: Settings, args: argparse.Namespace) -> int:
    password = read_password(args, f"password for {args.name}")
    with open_store(settings, create=False) as store:
        Operators(store).add(args.name, password, int(time.time()), args.role)
        audit_entry(store, "operator added", args.name, f"role {args.role}")
        print(f"added operator {args.name} ({args.role})")
        if args.two_factor:
            _enrol(store, args.name)
    return 0


def _operators_role(settings: Settings, args: argparse.Namespace) -> int:
    with open_store(settings, create=False) as store:
        Operators(store).set_role(args.name, args.role)
        audit_entry(store, "operator's role changed", args.name, f"role {args.role}")
    print(f"operator {args.name} is now a {args.role}")
    return 0


def _operators_2fa(settings: Settings, args: argparse.Namespace) -> int:
    with open_store(settings, create=False) as store:
        operators = Operators(store)
        if args.reset:
            operators.reset_second_factor(args.name)
            audit_entry(store, "second factor reset", args.name)
            print(f"operator {args.name} has no second factor now (its sessions ended): it enrols again")
            return 0
        if operators.has_second_factor(args.name):
            raise AccessError(f"operator {args.name} has an authenticator already: --reset it first")
        if operators.hash_of(args.name) is None:
            raise AccessError(f"no operator {args.name}")
        _enrol(store, args.name)
    return 0


def _enrol(store: Store, name: str) -> None:
    """Show a new authenticator key (a QR code on the terminal, and as text), take a code it makes from
    standard input, and print the recovery codes."""
    secret = new_totp_secret()
    uri = totp_uri(name, secret)
    if sys.stdout.isatty():
        segno.make(uri).terminal(compact=True)
    print(f"authenticator key for {name}: {secret}\n  ({uri})")
    print("code it shows now: ", end="", flush=True)
    code = sys.stdin.readline().strip()
    codes = Operators(store).enrol(name, secret, code, time.time())
    audit_entry(store, "second factor enrolled", name)
    print(f"enrolled. Recovery codes for {name}, each good once, shown only now:")
    for c in codes:
        print(f"  {c}")


def _operators_passwd(settings: Settings, args: argparse.Namespace) -> int:
    password = read_password(args, f"new password for {args.name}")
    with open_store(settings, create=False) as store:
        Operators(store).set_password(args.name, password)
        audit_entry(store, "operator's password changed", args.name)
    print(f"new password for operator {args.name}")
    return 0


def _operators_remove(settings: Settings, args: argparse.Namespace) -> int:
    with open_store(settings, create=False) as store:
        Operators(store).remove(args.name)
        audit_entry(store, "operator removed", args.name)
    print(f"removed operator {args.name}")
    return 0


def _operators_list(settings: Settings, args: argparse.Namespace) -> int:
    with open_store(settings, create=False) as store:
        for o in Operators(store).list():
            second = f"2fa ({o.recovery_left} recovery codes left)" if o.two_factor else "password only"
            print(f"{o.name:<24} {o.role:<9} {second:<32} since {_shown(o.created, settings)}")
    return 0


def _bans_list(settings: Settings, args: argparse.Namespace) -> int:
    now = time.time()
    with open_store(settings, create=False) as store:
        found = store.bans(now)
    for address, door, since, until, node in found:
        left = max(1, round((until - now) / 60))
        print(f"{address:<40} {door or 'a door':<12} since {_shown(int(since), settings)}  {left} min left  ({node})")
    if not found:
        print("no address is banned", file=sys.stderr)
    return 0


def _bans_remove(settings: Settings, args: argparse.Namespace) -> int:
    address = normalize(args.address)
    with open_store(settings, create=False) as store:
        lifted = store.lift_ban(address)
        if lifted:
            audit_entry(store, "ban lifted", address)
    if not lifted:
        raise AccessError(f"{address} is not banned (smame bans list shows who is)")
    print(f"lifted the ban of {address}: every node lets it in again within {BANS_EVERY_S:.0f} s")
    return 0

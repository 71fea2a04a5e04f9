"""`smame users`: customers' FTP/SFTP logins, kept in customers.toml (edited in place, comments kept)."""

from __future__ import annotations

import csv
import os
import re
import stat
from pathlib import Path

import tomlkit
import tomlkit.exceptions
import tomlkit.items

from ftp_gateway.passwords import hash_password
from kernel.registry import RegistryError, parse_customers

USER = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class UsersError(ValueError):
    """A user could not be added or removed; the message says why."""


def _load(path: Path) -> tomlkit.TOMLDocument:
    try:
        return tomlkit.parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsersError(f"{path}: customers file not found (setting registry.customers)") from None
    except (OSError, UnicodeDecodeError, tomlkit.exceptions.ParseError) as exc:
        raise UsersError(f"{path}: cannot be read: {exc}; fix it by hand first") from None


def _save(path: Path, doc: tomlkit.TOMLDocument) -> None:
    # A file that smame would refuse to load is never written: the old one stays, and says the same as before.
    text = tomlkit.dumps(doc)
    try:
        parse_customers(text, path)
    except RegistryError as exc:
        raise UsersError(f"not written, the result would be refused: {exc}") from None
    # The file holds password hashes: the new one gets the old one's mode from its first byte on.
    mode = stat.S_IMODE(path.stat().st_mode)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.fchmod(fd, mode)  # the umask must not narrow or widen it either
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _all(doc: tomlkit.TOMLDocument) -> list[tuple[str, str]]:
    return [(cid, u["name"]) for cid, c in doc.get("customers", {}).items() for u in c.get("users", [])]


def add_user(path: Path, customer: str, user: str, password: str | None, ssh_keys: list[str]) -> None:
    """Add a login to a customer, with a scrypt hash of its password and/or SSH public keys."""
    if not USER.fullmatch(user):
        raise UsersError(f"user name {user!r} must be 1 to 64 of A-Z a-z 0-9 _ . -")
    if not password and not ssh_keys:
        raise UsersError("give a password or an SSH public key")
    doc = _load(path)
    customers = doc.get("customers", {})
    if customer not in customers:
        raise UsersError(f"customer {customer} is not in {path}")
    if any(name == user for _, name in _all(doc)):
        raise UsersError(f"user {user} exists already")
    entry = tomlkit.table()
    entry["name"] = user
    if password:
        entry["password_hash"] = hash_password(password)
    if ssh_keys:
        entry["ssh_keys"] = ssh_keys
    users = customers[customer].get("users")
    if not isinstance(users, tomlkit.items.AoT):  # absent, or an inline `users = [...]`: one [[...users]] table each
        old = list(users or [])
        users = tomlkit.aot()
        for u in old:
            users.append(tomlkit.item(dict(u)))
        customers[customer]["users"] = users
    users.append(entry)
    _save(path, doc)


def remove_user(path: Path, user: str) -> str:
    """Remove a login; return its customer."""
    doc = _load(path)
    for cid, c in doc.get("customers", {}).items():
        users = c.get("users", [])
        for i, u in enumerate(users):
            if u["name"] == user:
                del users[i]
                if not users:  # an empty `users = []` would not take a [[...users]] table after it
                    del c["users"]
                _save(path, doc)
                return str(cid)
    raise UsersError(f"no user {user} in {path}")


def set_password(path: Path, user: str, password: str, customer: str | None = None) -> str:
    """Give a login (of `customer`, when given) a new password, hashed with today's parameters; return its
    customer."""
    doc = _load(path)
    for cid, c in doc.get("customers", {}).items():
        for u in c.get("users", []):
            if u["name"] == user and customer in (None, cid):
                u["password_hash"] = hash_password(password)
                _save(path, doc)
                return str(cid)
    raise UsersError(f"no user {user}" + (f" of customer {customer}" if customer else "") + f" in {path}")


def list_users(path: Path) -> list[tuple[str, str, str]]:
    """(customer, user, how it logs in) for every login."""
    doc = _load(path)
    out = []
    for cid, c in doc.get("customers", {}).items():
        for u in c.get("users", []):
            how = ", ".join(
                k
                for k, present in (("password", "password_hash" in u), ("ssh key", bool(u.get("ssh_keys"))))
                if present
            )
            out.append((str(cid), str(u["name"]), how))
    return out


def remove_customer(customers: Path, units: Path, customer: str) -> tuple[int, int]:
    """Take a customer out of the registry: its table of customers.toml (with its logins) and its units' lines
    of units.csv (the other lines as they were). Returns (logins, units) removed. Either file is left alone when
    the customer is not in it, so that a purge stopped half-way can be run again."""
    doc = _load(customers)
    table = doc.get("customers", {})
    logins = len(table[customer].get("users", [])) if customer in table else 0
    try:
        lines = units.read_text(encoding="utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersError(f"{units}: cannot be read: {exc}") from None
    header = next(csv.reader(lines[:1]), [])
    if "customer_id" not in header:
        raise UsersError(f"{units}: no customer_id column in its header; fix it by hand first")
    column = header.index("customer_id")
    kept = lines[:1]
    for line in lines[1:]:
        row = next(csv.reader([line]), [])
        if len(row) <= column or row[column].strip() != customer:
            kept.append(line)
    removed = len(lines) - len(kept)
    if removed:
        tmp = units.with_name(units.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, units)
    if customer in table:
        del table[customer]
        _save(customers, doc)
    return logins, removed

"""Who may use the web server: customers' API tokens, operators' logins and their console sessions, kept in the
store as hashes only.

A token is `smame_<id>_<secret>`: the id finds its row, the secret is compared with the row's SHA-256 of it
(a token is 256 random bits: a fast hash is enough, unlike a password). Both tables live in the store, so
every node sees a new or removed token or operator at its next request, with no reload. A console session is
a random cookie whose SHA-256 keys its row (with the session's CSRF token): ended by logging out, by removing
the operator, or after `SESSION_IDLE_S` unused or `SESSION_MAX_S` in all.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from aggregator.store import Store
from ftp_gateway.passwords import N, P, R, hash_password, verify_password

TOKEN = re.compile(r"smame_(?P<id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{43})")
OPERATOR = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
LABEL_MAX = 200
SESSION_COOKIE = "smame_session"  # the console's session cookie, which the API also takes from operators
SESSION_IDLE_S = 8 * 3600
SESSION_MAX_S = 24 * 3600
# compared against when the operator does not exist, so that a failure takes the same time either way
_NO_OPERATOR = f"scrypt${N}${R}${P}$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


class AccessError(ValueError):
    """A token or operator could not be added or removed; the message says why."""


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as listed: never its secret."""

    id: str
    customer: str
    name: str
    created: int


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Tokens:
    """Customers' API tokens in the store (synchronous: call on the store's thread)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, customer: str, name: str, now: int) -> str:
        """Make a token for `customer`, store its hash, and return the token (shown once, never again)."""
        if len(name) > LABEL_MAX or not name.isprintable():
            raise AccessError(f"a token's name is at most {LABEL_MAX} printable characters")
        token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO api_tokens (id, customer, name, hash, created) VALUES (?, ?, ?, ?, ?)",
                (token_id, customer, name, _digest(secret), now),
            )
        return f"smame_{token_id}_{secret}"

    def list(self, customer: str | None = None) -> list[TokenInfo]:
        """Every token (of `customer`, when given), oldest first."""
        where, args = (" WHERE customer = ?", (customer,)) if customer else ("", ())
        rows = self.store.execute(
            f"SELECT id, customer, name, created FROM api_tokens{where} ORDER BY created, id", args
        ).fetchall()
        return [TokenInfo(*r) for r in rows]

    def remove(self, token_id: str) -> str:
        """Remove a token; return its customer."""
        with self.store.transaction():
            row = self.store.execute("SELECT customer FROM api_tokens WHERE id = ?", (token_id,)).fetchone()
            if row is None:
                raise AccessError(f"no token {token_id}")
            self.store.execute("DELETE FROM api_tokens WHERE id = ?", (token_id,))
        return str(row[0])

    def customer_of(self, token: str) -> str | None:
        """The customer a token belongs to, or None when it is malformed, unknown or wrong."""
        m = TOKEN.fullmatch(token)
        if m is None:
            return None
        row = self.store.execute("SELECT customer, hash FROM api_tokens WHERE id = ?", (m["id"],)).fetchone()
        if row is None or not hmac.compare_digest(row[1], _digest(m["secret"])):
            return None
        return str(row[0])


class Operators:
    """Operators' console logins in the store (synchronous: call on the store's thread)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, name: str, password: str, now: int) -> None:
        """Add an operator with a scrypt hash of the password."""
        if not OPERATOR.fullmatch(name):
            raise AccessError(f"operator name {name!r} must be 1 to 64 of A-Z a-z 0-9 _ . @ -")
        with self.store.transaction():
            if self.store.execute("SELECT 1 FROM operators WHERE name = ?", (name,)).fetchone():
                raise AccessError(f"operator {name} exists already")
            # sessions an operator of this name left (from before sessions ended with their operator) are not theirs
            self.store.execute("DELETE FROM web_sessions WHERE operator = ?", (name,))
            self.store.execute(
                "INSERT INTO operators (name, hash, created) VALUES (?, ?, ?)", (name, hash_password(password), now)
            )

    def set_password(self, name: str, password: str) -> None:
        """Give an operator a new password; every session opened with the old one ends."""
        with self.store.transaction():
            changed = self.store.execute(
                "UPDATE operators SET hash = ? WHERE name = ?", (hash_password(password), name)
            ).rowcount
            self.store.execute("DELETE FROM web_sessions WHERE operator = ?", (name,))
        if not changed:
            raise AccessError(f"no operator {name}")

    def remove(self, name: str) -> None:
        """Remove an operator and end its sessions."""
        with self.store.transaction():
            if not self.store.execute("DELETE FROM operators WHERE name = ?", (name,)).rowcount:
                raise AccessError(f"no operator {name}")
            self.store.execute("DELETE FROM web_sessions WHERE operator = ?", (name,))

    def list(self) -> list[tuple[str, int]]:
        """(name, created) of every operator, by name."""
        return [(str(n), int(c)) for n, c in self.store.execute("SELECT name, created FROM operators ORDER BY name")]

    def hash_of(self, name: str) -> str | None:
        """The operator's password hash (None: no such operator)."""
        row = self.store.execute("SELECT hash FROM operators WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    def verify(password: str, stored: str | None) -> bool:
        """Whether the password matches the hash `hash_of` gave, with the same work when there was none. Slow
        on purpose (scrypt, about 0.2 s): call it off the store's thread, which other requests wait on."""
        ok = verify_password(password, stored if stored is not None else _NO_OPERATOR)
        return ok and stored is not None


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in operator's session: who, and the token its forms must carry."""

    operator: str
    csrf: str


class Sessions:
    """Operators' console sessions in the store (synchronous: call on the store's thread)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def open(self, operator: str, now: int) -> tuple[str, Session]:
        """A new session: the cookie's value (its secret) and the session."""
        secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self.store.transaction():
            self.store.execute(  # ended ones go as new ones come: the table holds the live ones and a few
                "DELETE FROM web_sessions WHERE seen < ? OR created < ?", (now - SESSION_IDLE_S, now - SESSION_MAX_S)
            )
            self.store.execute(
                "INSERT INTO web_sessions (id, operator, csrf, created, seen) VALUES (?, ?, ?, ?, ?)",
                (_digest(secret), operator, csrf, now, now),
            )
        return secret, Session(operator, csrf)

    def get(self, secret: str, now: int) -> Session | None:
        """The live session of a cookie's value, or None (unknown, ended, expired, or its operator removed)."""
        if not secret or len(secret) > 100:
            return None
        key = _digest(secret)
        row = self.store.execute(
            "SELECT s.operator, s.csrf, s.created, s.seen FROM web_sessions s "
            "JOIN operators o ON o.name = s.operator WHERE s.id = ?",
            (key,),
        ).fetchone()
        if row is None or row[3] < now - SESSION_IDLE_S or row[2] < now - SESSION_MAX_S:
            return None
        if now - row[3] >= 60:  # a minute's precision is enough for the idle limit: no write per request
            with self.store.transaction():
                self.store.execute("UPDATE web_sessions SET seen = ? WHERE id = ?", (now, key))
        return Session(str(row[0]), str(row[1]))

    def close(self, secret: str) -> None:
        """End a session (logging out)."""
        with self.store.transaction():
            self.store.execute("DELETE FROM web_sessions WHERE id = ?", (_digest(secret),))

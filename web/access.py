"""Who may use the web server: customers' API tokens, operators' logins and their console sessions, kept in the
store as hashes only.

A token is `smame_<id>_<secret>`: the id finds its row, the secret is compared with the row's SHA-256 of it
(a token is 256 random bits: a fast hash is enough, unlike a password). Both tables live in the store, so
every node sees a new or removed token or operator at its next request, with no reload. A console session is
a random cookie whose SHA-256 keys its row (with the session's CSRF token): ended by logging out, by removing
the operator, or after `SESSION_IDLE_S` unused or `SESSION_MAX_S` in all.

Each operator has a role (ROLES: a viewer reads, an operator also acts on units, alerts and bans, an admin also
runs firmware campaigns and the like) and may have a second factor: an authenticator's secret (TOTP, RFC 6238,
30 s steps, a step either side taken for clock drift, no step taken twice) and ten recovery codes, each good once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyotp

from aggregator.store import Store
from ftp_gateway.passwords import N, P, R, hash_password, verify_password

TOKEN = re.compile(r"smame_(?P<id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{43})")
OPERATOR = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
LABEL_MAX = 200
SESSION_COOKIE = "smame_session"  # the console's session cookie, which the API also takes from operators
SESSION_IDLE_S = 8 * 3600
SESSION_MAX_S = 24 * 3600
SCOPES = ("units", "files", "emissions")  # what a token reads: units and their slots, daily files, CO2 figures
ROLES = ("viewer", "operator", "admin")  # each may do all that the one before it may, and more
TOTP_STEP_S = 30
TOTP_CODE = re.compile(r"[0-9]{6}")
RECOVERY_CODE = re.compile(r"[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}")
RECOVERY_CODES = 10
ISSUER = "smame"  # how an authenticator app names the account
# compared against when the operator does not exist, so that a failure takes the same time either way
_NO_OPERATOR = f"scrypt${N}${R}${P}$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


class AccessError(ValueError):
    """A token or operator could not be added or removed; the message says why."""


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as listed (never its secret), and as a request's token is known: its customer, what it may
    read, and when it stops (None: never)."""

    id: str
    customer: str
    name: str
    created: int
    expires: int | None = None
    scope: tuple[str, ...] = SCOPES

    def expired(self, now: float) -> bool:
        """Whether the token is refused at `now` for its age."""
        return self.expires is not None and now >= self.expires


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Tokens:
    """Customers' API tokens in the store (synchronous: call on the store's thread)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, customer: str, name: str, now: int, expires: int | None = None, scope: Sequence[str] = SCOPES) -> str:
        """Make a token for `customer` that reads `scope` until `expires` (None: for ever), store its hash, and
        return the token (shown once, never again)."""
        if len(name) > LABEL_MAX or not name.isprintable():
            raise AccessError(f"a token's name is at most {LABEL_MAX} printable characters")
        unknown = [s for s in scope if s not in SCOPES]
        if unknown or not scope:
            raise AccessError(f"a token's scope is some of {', '.join(SCOPES)}, not {', '.join(unknown) or 'none'}")
        if expires is not None and expires <= now:
            raise AccessError("a token's expiry must be in the future")
        token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO api_tokens (id, customer, name, hash, created, expires, scope) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (token_id, customer, name, _digest(secret), now, expires, " ".join(s for s in SCOPES if s in scope)),
            )
        return f"smame_{token_id}_{secret}"

    def list(self, customer: str | None = None) -> list[TokenInfo]:
        """Every token (of `customer`, when given), oldest first."""
        where, args = (" WHERE customer = ?", (customer,)) if customer else ("", ())
        rows = self.store.execute(
            f"SELECT id, customer, name, created, expires, scope FROM api_tokens{where} ORDER BY created, id", args
        ).fetchall()
        return [_token(r) for r in rows]

    def remove(self, token_id: str) -> str:
        """Remove a token; return its customer."""
        with self.store.transaction():
            row = self.store.execute("SELECT customer FROM api_tokens WHERE id = ?", (token_id,)).fetchone()
            if row is None:
                raise AccessError(f"no token {token_id}")
            self.store.execute("DELETE FROM api_tokens WHERE id = ?", (token_id,))
        return str(row[0])

    def known(self, token: str) -> TokenInfo | None:
        """The token (its customer, scope and expiry: expired or not), or None when it is malformed, unknown or
        wrong."""
        m = TOKEN.fullmatch(token)
        if m is None:
            return None
        row = self.store.execute(
            "SELECT id, customer, name, created, expires, scope, hash FROM api_tokens WHERE id = ?", (m["id"],)
        ).fetchone()
        if row is None or not hmac.compare_digest(row[6], _digest(m["secret"])):
            return None
        return _token(row[:6])


def may(role: str, need: str) -> bool:
    """Whether an operator of `role` may do what needs `need` (an unknown role may do nothing)."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(need)


def totp_uri(name: str, secret: str) -> str:
    """The otpauth:// address an authenticator app reads (from a QR code) to make an operator's codes."""
    return pyotp.TOTP(secret).provisioning_uri(name=name, issuer_name=ISSUER)


def new_totp_secret() -> str:
    """A new authenticator secret (160 random bits, base32)."""
    return pyotp.random_base32(32)


def _totp_step(secret: str, code: str, now: float, after: int) -> int | None:
    """The time step (of now's and one either side) whose code `code` is, if newer than `after`; else None."""
    if not TOTP_CODE.fullmatch(code):
        return None
    totp, here = pyotp.TOTP(secret), int(now) // TOTP_STEP_S
    for step in (here - 1, here, here + 1):
        if step > after and hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


@dataclass(frozen=True, slots=True)
class OperatorInfo:
    """An operator as listed."""

    name: str
    created: int
    role: str
    two_factor: bool
    recovery_left: int


class Operators:
    """Operators' console logins in the store (synchronous: call on the store's thread)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, name: str, password: str, now: int, role: str = "operator") -> None:
        """Add an operator of `role` with a scrypt hash of the password (and no second factor yet)."""
        if not OPERATOR.fullmatch(name):
            raise AccessError(f"operator name {name!r} must be 1 to 64 of A-Z a-z 0-9 _ . @ -")
        _check_role(role)
        with self.store.transaction():
            if self.store.execute("SELECT 1 FROM operators WHERE name = ?", (name,)).fetchone():
                raise AccessError(f"operator {name} exists already")
            # sessions an operator of this name left (from before sessions ended with their operator) are not theirs
            self.store.execute("DELETE FROM web_sessions WHERE operator = ?", (name,))
            self.store.execute(
                "INSERT INTO operators (name, hash, created, role) VALUES (?, ?, ?, ?)",
                (name, hash_password(password), now, role),
            )

    def set_role(self, name: str, role: str) -> None:
        """Give an operator another role (its open sessions have it from their next request)."""
        _check_role(role)
        with self.store.transaction():
            if not self.store.execute("UPDATE operators SET role = ? WHERE name = ?", (role, name)).rowcount:
                raise AccessError(f"no operator {name}")

    def enrol(self, name: str, secret: str, code: str, now: float) -> list[str]:
        """Give an operator the authenticator whose secret is `secret`, once `code` shows the operator has it;
        return ten new recovery codes (shown once: only their hashes are kept). AccessError when the code is
        not the secret's now, or there is no such operator."""
        step = _totp_step(secret, code.strip(), now, 0)
        if step is None:
            raise AccessError("the code is not the authenticator's: check the phone's clock and type the newest")
        codes = ["-".join(secrets.token_hex(6)[i : i + 4] for i in (0, 4, 8)) for _ in range(RECOVERY_CODES)]
        with self.store.transaction():
            changed = self.store.execute(
                "UPDATE operators SET totp = ?, totp_step = ?, recovery = ? WHERE name = ?",
                (secret, step, " ".join(_digest(c) for c in codes), name),
            ).rowcount
        if not changed:
            raise AccessError(f"no operator {name}")
        return codes

    def reset_second_factor(self, name: str) -> None:
        """Take an operator's authenticator and recovery codes away (a lost phone); its sessions end."""
        with self.store.transaction():
            changed = self.store.execute(
                "UPDATE operators SET totp = NULL, totp_step = 0, recovery = '' WHERE name = ?", (name,)
            ).rowcount
            self.store.execute("DELETE FROM web_sessions WHERE operator = ?", (name,))
        if not changed:
            raise AccessError(f"no operator {name}")

    def has_second_factor(self, name: str) -> bool:
        """Whether the operator has an authenticator (False for no such operator)."""
        row = self.store.execute("SELECT totp FROM operators WHERE name = ?", (name,)).fetchone()
        return row is not None and row[0] is not None

    def check_second(self, name: str, code: str, now: float) -> str | None:
        """Take a second factor: the authenticator's code of now (or a step either side) newer than any taken
        before, or an unused recovery code (used up by this). Return how ("totp", "recovery"), or None when the
        code is neither (or the operator has no second factor)."""
        code = code.strip().lower()
        with self.store.transaction():
            row = self.store.execute(
                "SELECT totp, totp_step, recovery FROM operators WHERE name = ?", (name,)
            ).fetchone()
            if row is None or row[0] is None:
                return None
            step = _totp_step(str(row[0]), code, now, int(row[1]))
            if step is not None:
                self.store.execute("UPDATE operators SET totp_step = ? WHERE name = ?", (step, name))
                return "totp"
            left = str(row[2]).split()
            if RECOVERY_CODE.fullmatch(code) and (digest := _digest(code)) in left:
                left.remove(digest)
                self.store.execute("UPDATE operators SET recovery = ? WHERE name = ?", (" ".join(left), name))
                return "recovery"
        return None

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

    def list(self) -> list[OperatorInfo]:
        """Every operator, by name."""
        rows = self.store.execute("SELECT name, created, role, totp IS NOT NULL, recovery FROM operators ORDER BY name")
        return [OperatorInfo(str(n), int(c), str(r), bool(t), len(str(codes).split())) for n, c, r, t, codes in rows]

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
    """A logged-in operator's session: who, the token its forms must carry, the operator's role now, and
    whether it has a second factor."""

    operator: str
    csrf: str
    role: str = "viewer"
    two_factor: bool = False


class Sessions:
    """Operators' console sessions in the store (synchronous: call on the store's thread)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def open(self, operator: str, now: int) -> str:
        """A new session; returns the cookie's value (its secret)."""
        secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self.store.transaction():
            self.store.execute(  # ended ones go as new ones come: the table holds the live ones and a few
                "DELETE FROM web_sessions WHERE seen < ? OR created < ?", (now - SESSION_IDLE_S, now - SESSION_MAX_S)
            )
            self.store.execute(
                "INSERT INTO web_sessions (id, operator, csrf, created, seen) VALUES (?, ?, ?, ?, ?)",
                (_digest(secret), operator, csrf, now, now),
            )
        return secret

    def get(self, secret: str, now: int) -> Session | None:
        """The live session of a cookie's value, or None (unknown, ended, expired, or its operator removed)."""
        if not secret or len(secret) > 100:
            return None
        key = _digest(secret)
        row = self.store.execute(
            "SELECT s.operator, s.csrf, s.created, s.seen, o.role, o.totp IS NOT NULL FROM web_sessions s "
            "JOIN operators o ON o.name = s.operator WHERE s.id = ?",
            (key,),
        ).fetchone()
        if row is None or row[3] < now - SESSION_IDLE_S or row[2] < now - SESSION_MAX_S:
            return None
        if now - row[3] >= 60:  # a minute's precision is enough for the idle limit: no write per request
            with self.store.transaction():
                self.store.execute("UPDATE web_sessions SET seen = ? WHERE id = ?", (now, key))
        return Session(str(row[0]), str(row[1]), str(row[4]), bool(row[5]))

    def close(self, secret: str) -> None:
        """End a session (logging out)."""
        with self.store.transaction():
            self.store.execute("DELETE FROM web_sessions WHERE id = ?", (_digest(secret),))


def _token(row: Sequence[Any]) -> TokenInfo:
    """A token of its row (id, customer, name, created, expires, scope)."""
    token_id, customer, name, created, expires, scope = row
    kept = tuple(str(scope).split())
    until = None if expires is None else int(expires)
    return TokenInfo(str(token_id), str(customer), str(name), int(created), until, kept)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise AccessError(f"role {role!r} is none of {', '.join(ROLES)}")

"""Who may log in, where their files are, and who is banned for failing too often."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ftp_gateway.downloads import Downloads
from ftp_gateway.passwords import N, P, R, outdated, verify_password
from kernel.addresses import ip_of
from kernel.registry import Registry

log = logging.getLogger("smame.files")


@dataclass(frozen=True, slots=True)
class Account:
    """One login: its customer, home directory and credentials."""

    user: str
    customer: str
    home: Path
    password_hash: str | None
    ssh_keys: tuple[str, ...]


class Accounts:
    """Logins from the registry in force (so a reload takes effect at the next login)."""

    def __init__(
        self,
        registry: Callable[[], Registry],
        export_dir: Path,
        rehash: Callable[[str, str], object] = lambda user, password: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.export_dir = export_dir
        self.rehash = rehash  # stores a new hash of a password whose hash has weaker parameters than today's
        self.on_failed_login: Callable[[str, str], object] = lambda user, address: None  # security events
        self.events: Counter[tuple[str, str]] = Counter()  # (protocol, login|failed_login|download) for metrics
        self.downloads = Downloads(clock)  # which file was last sent, to whom: the gateway keeps it in the store
        self._rehashed: set[str] = set()

    def get(self, user: str) -> Account | None:
        """The account of a user name, or None."""
        for customer in self.registry().customers.values():
            for u in customer.users:
                if u.name == user:
                    home = self.export_dir / customer.id
                    home.mkdir(parents=True, exist_ok=True)
                    return Account(u.name, customer.id, home, u.password_hash, tuple(u.ssh_keys))
        return None

    def downloaded(self, protocol: str, account: Account, file: str) -> None:
        """Count a file sent (metrics) and note it for the customer's page."""
        self.events[(protocol, "download")] += 1
        self.downloads.note(account.customer, Path(file).name, protocol, account.user)

    def allows(self, account: Account, address: str) -> bool:
        """Whether the account's customer takes logins from `address` (its `allow` list; a customer removed
        since: no)."""
        customer = self.registry().customers.get(account.customer)
        return customer is not None and customer.allows(address)

    def failed(self, protocol: str, user: str, address: str) -> None:
        """Count a failed login (metrics) and tell whoever watches for security events."""
        self.events[(protocol, "failed_login")] += 1
        self.on_failed_login(user, normalize(address))

    def check_password(self, user: str, password: str) -> Account | None:
        """The account when the password is right, else None (the same work whether the user exists, has a
        password or logs in by key only: the time of a failure tells nothing)."""
        account = self.get(user)
        stored = account.password_hash if account is not None and account.password_hash else None
        ok = verify_password(password, stored or _DUMMY)
        if not (ok and stored is not None):
            return None
        if outdated(stored) and user not in self._rehashed:
            self._rehashed.add(user)  # once: the registry in memory keeps the old hash until it is reloaded
            try:
                self.rehash(user, password)
                log.info("login %s: password hash renewed with today's parameters", user)
            except Exception as exc:  # noqa: BLE001 (the login stands; the next restart tries again)
                log.warning("login %s: could not renew its password hash: %s", user, exc)
        return account


_DUMMY = f"scrypt${N}${R}${P}$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


@dataclass
class Bans:
    """Failed logins per address: after `max_failures` within `window` seconds, banned for `ban_s` seconds.

    A success clears nothing: a customer's own good logins between its guesses at another's password must not
    keep it from being banned. Failures are also counted per account they were aimed at (an FTP/SFTP user, an
    API token's id, an operator): once an account has had `max_failures` within the window, from however many
    addresses, each further failure against it bans its address at once. The account itself is never locked,
    so a stranger guessing cannot lock its owner out.

    The nodes share their bans through the store (`exchange`): a ban earned at one node keeps the address from
    all of them, and an operator's lift (`smame bans remove`, the console) reaches each at its next exchange."""

    max_failures: int = 5
    window: float = 600.0
    ban_s: float = 3600.0
    on_ban: Callable[[str, str], None] = lambda address, door: None  # the address, and the door it guessed at
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, list[float]] = field(default_factory=dict)
    _aimed: dict[str, list[float]] = field(default_factory=dict)  # failures by the account they were aimed at
    _until: dict[str, float] = field(default_factory=dict)
    _doors: dict[str, str] = field(default_factory=dict)  # where each banned address earned its ban
    _kept: set[str] = field(default_factory=set)  # bans the store has (a kept ban missing there was lifted)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    bans: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # right credentials from an address not allowed, by door

    def refuse(self, address: str, who: str, door: str) -> None:
        """Note right credentials used from an address their customer does not allow (its `allow` list): logged
        and counted, never a failure toward a ban (the customer's own machine, moved, must not be banned)."""
        log.warning("%s: refused %s from %s: not an address its customer allows", door, who, normalize(address))
        with self._lock:
            self.refused[door] += 1

    def banned(self, address: str) -> bool:
        """Whether the address is banned now."""
        address = normalize(address)
        with self._lock:
            until = self._until.get(address)
            if until is None:
                return False
            if self.clock() >= until:
                self._forget(address)
                return False
            return True

    def lift(self, address: str) -> bool:
        """Let an address in again at once (an operator's word); False when it was not banned here."""
        with self._lock:
            return self._forget(normalize(address)) is not None

    def exchange(self, stored: list[tuple[str, str, float, float, str]], now: float, node: str) -> list[Ban]:
        """Bring this node's bans and the store's list (`Store.bans` at wall time `now`) in step: adopt the
        other nodes' bans, drop those an operator lifted there; return the bans the store lacks, to be kept
        there and then confirmed with `kept`."""
        in_store = {row[0]: row for row in stored}
        with self._lock:
            offset = now - self.clock()  # wall time minus this ban list's clock
            for address, until in list(self._until.items()):
                if until + offset <= now:
                    self._forget(address)
                elif address in self._kept and address not in in_store:
                    self._forget(address)
                    log.info("ban of %s lifted by an operator", address)
            for address, door, _, until, _ in in_store.values():
                if address not in self._until:
                    self._until[address], self._doors[address] = until - offset, door
                    self._kept.add(address)
                    self._failures.pop(address, None)
            return [
                (address, self._doors.get(address, ""), now, until + offset, node)
                for address, until in self._until.items()
                if address not in self._kept
            ]

    def kept(self, bans: list[Ban]) -> None:
        """The store holds these bans now (as `exchange` gave them)."""
        with self._lock:
            self._kept.update(b[0] for b in bans if b[0] in self._until)

    def _forget(self, address: str) -> float | None:
        self._doors.pop(address, None)
        self._kept.discard(address)
        return self._until.pop(address, None)

    def active(self) -> dict[str, float]:
        """Addresses banned now, with the seconds each ban has left."""
        with self._lock:
            now = self.clock()
            return {a: until - now for a, until in self._until.items() if until > now}

    def failed(self, address: str, account: str = "", door: str = "") -> bool:
        """Count a failed login from `address` aimed at `account` (as `kind name`) at `door` (FTP, SFTP, the API,
        the console: one ban list keeps the address from all of them); True when it bans the address."""
        address, account = normalize(address), account[:MAX_ACCOUNT]
        with self._lock:
            now = self.clock()
            recent = self._count(self._failures, address, now)
            aimed = self._count(self._aimed, account, now) if account else []
            if len(recent) < self.max_failures and len(aimed) <= self.max_failures:
                return False
            self._failures.pop(address, None)
            self._until[address], self._doors[address] = now + self.ban_s, door
            self._kept.discard(address)  # a new ban: the store learns its new end
            self.bans += 1
        self.on_ban(address, door)
        return True

    def _count(self, counts: dict[str, list[float]], key: str, now: float) -> list[float]:
        """Add a failure at `now` to `key`'s, forgetting those out of the window; return them."""
        recent = [t for t in counts.get(key, []) if now - t < self.window] + [now]
        counts[key] = recent
        if len(counts) > MAX_COUNTED:  # strangers from many addresses: forget those quiet for a window
            for stale in [k for k, times in counts.items() if now - times[-1] >= self.window]:
                del counts[stale]
        return recent


Ban = tuple[str, str, float, float, str]  # address, door, since, until (wall time), node: as the store keeps it
MAX_ACCOUNT = 128  # characters of an account's name kept to count failures against it
MAX_COUNTED = 10_000  # addresses or accounts with failures kept before the quiet ones are forgotten


def normalize(address: str) -> str:
    """One spelling per address: `::ffff:127.0.0.1` (IPv4 on a dual-stack socket) is `127.0.0.1`."""
    ip = ip_of(address)
    return address if ip is None else str(ip)


@dataclass(eq=False)
class Ticket:
    """One connection waiting at the door: its address, and how to close it when a customer needs its place."""

    address: str
    evict: Callable[[], object]
    gone: bool = False


@dataclass
class Doorway:
    """Connections that have not logged in yet: counted per address and in all, each count capped, and each
    connection given `login_timeout` seconds to log in.

    When every place is taken, a newcomer does not simply wait its turn behind strangers that renew their
    connections as fast as they are closed: it takes the place of the oldest waiting connection of the
    address holding the most places, when that address holds more than the newcomer would; and an address
    that has logged in before (one of the last KNOWN_MAX) takes the place of a stranger's at once. So a few
    addresses idling at every place keep no customer out, and many addresses holding one place each keep out
    no customer who has logged in before. A connection from an address that has logged in is never put out."""

    per_address: int = 4
    total: int = 32
    login_timeout: float = 20.0
    _waiting: dict[str, list[Ticket]] = field(default_factory=dict)  # oldest first
    _known: OrderedDict[str, None] = field(default_factory=OrderedDict)  # addresses that logged in, newest last
    _lock: threading.Lock = field(default_factory=threading.Lock)
    refused: int = 0
    evicted: int = 0

    def enter(self, address: str, evict: Callable[[], object]) -> Ticket | None:
        """Let one more connection from this address wait for its login, `evict` closing it should a customer
        need its place (any thread may call it); None when it may not wait."""
        address = normalize(address)
        ticket, victim = Ticket(address, evict), None
        with self._lock:
            mine = len(self._waiting.get(address, ()))
            if mine >= self.per_address:
                self.refused += 1
                return None
            if sum(len(t) for t in self._waiting.values()) >= self.total:
                victim = self._victim(address, mine)
                if victim is None:
                    self.refused += 1
                    return None
                self._remove(victim)
                self.evicted += 1
            self._waiting.setdefault(address, []).append(ticket)
        if victim is not None:
            log.info("door: closed a connection of %s waiting to log in, for one of %s", victim.address, address)
            try:
                victim.evict()
            except Exception as exc:  # noqa: BLE001 (its place is taken all the same; the newcomer must not pay)
                log.warning("door: could not close a connection of %s: %s", victim.address, exc)
        return ticket

    def _victim(self, address: str, mine: int) -> Ticket | None:
        """The connection whose place a newcomer from `address` (holding `mine`) takes, if any."""
        strangers = [t for a, t in self._waiting.items() if a not in self._known and a != address]
        if not strangers:  # the places are held by addresses that logged in before: nobody is put out for it
            return None
        tickets = max(strangers, key=len)
        return tickets[0] if address in self._known or len(tickets) > mine + 1 else None

    def leave(self, ticket: Ticket) -> None:
        """A waiting connection went away (or was closed by the door: nothing more to do)."""
        with self._lock:
            self._remove(ticket)

    def logged_in(self, ticket: Ticket) -> None:
        """A waiting connection logged in: its place is free, and its address known from now on."""
        with self._lock:
            self._remove(ticket)
            self._known[ticket.address] = None
            self._known.move_to_end(ticket.address)
            while len(self._known) > KNOWN_MAX:
                self._known.popitem(last=False)

    def _remove(self, ticket: Ticket) -> None:
        if ticket.gone:
            return
        ticket.gone = True
        tickets = self._waiting[ticket.address]
        tickets.remove(ticket)
        if not tickets:
            del self._waiting[ticket.address]


KNOWN_MAX = 10_000  # addresses that logged in, remembered (in memory) to be let in ahead of strangers

"""Security events for the operators: gathered as they happen, said once an hour at most per kind (pure: no I/O).

A ban of an address on the file gateway, a user whose password keeps failing, and telegrams whose unit id is
not their topic's are not states that hold and clear, like alerts, but things that happened: each kind is
told in one grouped message for the hour, however many there were.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

HOUR = 3600
# The audit log's actions that change who may do what, or remove or hand over data: each is also a security event
# (written by the command line, smame/commands, and the console, web/console.py).
SECURITY_ACTIONS = (
    *("operator added", "operator removed", "operator's role changed", "operator's password changed"),
    *("second factor enrolled", "second factor reset", "token added", "token removed"),
    *("login added", "login's password changed", "login removed"),
    *("customer exported", "customer purged", "store restored", "ban lifted"),
)


@dataclass
class SecurityEvents:
    """What happened since each kind was last told; thread-safe (the FTP server has a thread of its own)."""

    failed_logins_min: int = 5  # a user is named once this many logins failed within the hour
    _bans: list[tuple[str, str]] = field(default_factory=list)  # (address, the door it guessed at)
    _failed: Counter[str] = field(default_factory=Counter)  # user -> failures
    _failed_from: dict[str, set[str]] = field(default_factory=dict)  # user -> addresses
    _mismatches: Counter[str] = field(default_factory=Counter)  # "unit claimed on topic of unit" -> count
    _told: dict[str, int] = field(default_factory=dict)  # kind -> hour last told
    _window: int = -1  # the hour whose failed logins are being counted
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ban(self, address: str, door: str = "") -> None:
        """An address was banned for failing to log in too often at `door` (FTP, SFTP, the API, the console)."""
        with self._lock:
            self._bans.append((address, door))

    def failed_login(self, user: str, address: str) -> None:
        """A login failed."""
        with self._lock:
            self._failed[user] += 1
            self._failed_from.setdefault(user, set()).add(address)

    def mismatches(self, details: Iterable[str]) -> None:
        """Telegrams refused because their unit id was not the topic's (one detail each)."""
        with self._lock:
            self._mismatches.update(details)

    def due(self, now: float) -> list[tuple[str, str]]:
        """(kind, text) of each kind with something to tell that was not told yet this hour; what is returned is
        forgotten, the rest waits for the next hour."""
        hour = int(now // HOUR)
        out: list[tuple[str, str]] = []
        with self._lock:
            if self._bans and self._told.get("security_ban") != hour:
                counted = Counter(self._bans)
                out.append(
                    (
                        "security_ban",
                        f"{len(self._bans)} ban(s) after repeated failed logins: "
                        + ", ".join(
                            a + (f" at {door}" if door else "") + (f" ({n}x)" if n > 1 else "")
                            for (a, door), n in sorted(counted.items())
                        )
                        + " (a banned address is kept from FTP, SFTP, the API and the console alike)",
                    )
                )
                self._bans.clear()
            many = {u: n for u, n in self._failed.items() if n >= self.failed_logins_min}
            if many and self._told.get("security_failed_logins") != hour:
                out.append(
                    (
                        "security_failed_logins",
                        "failed FTP/SFTP logins by user: "
                        + "; ".join(
                            f"{u} {n} from {', '.join(sorted(self._failed_from[u])[:5])}"
                            for u, n in sorted(many.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
                        ),
                    )
                )
                self._failed.clear()
                self._failed_from.clear()
            if self._mismatches and self._told.get("security_unit_mismatch") != hour:
                total = sum(self._mismatches.values())
                out.append(
                    (
                        "security_unit_mismatch",
                        f"{total} telegram(s) refused as unit_mismatch (a unit's "
                        "credentials used for another unit's data?): "
                        + "; ".join(f"{d} ({n}x)" if n > 1 else d for d, n in self._mismatches.most_common(10)),
                    )
                )
                self._mismatches.clear()
            for kind, _ in out:
                self._told[kind] = hour
            if self._window != hour:  # a few failures are ordinary typing: they count towards the threshold
                # within one hour, not for ever (those before the first look are this hour's: kept)
                if self._window >= 0:
                    for user in [u for u, n in self._failed.items() if n < self.failed_logins_min]:
                        del self._failed[user]
                        self._failed_from.pop(user, None)
                self._window = hour
        return out

"""Which customer file was last downloaded, when, how and by whom: noted as the servers send files, kept in the
store by the gateway a few seconds later, shown on the console's customer page.

Noting is thread-safe (the FTP server runs on a thread of its own) and bounded: one entry per file sent, and only
files that exist are sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

Row = tuple[str, str, int, str, str, int]  # customer, file, at, via, who, count: as Store.record_downloads takes


class Downloads:
    """Downloads noted since they were last taken for the store."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._noted: dict[tuple[str, str], tuple[int, str, str, int]] = {}

    def note(self, customer: str, file: str, via: str, who: str) -> None:
        """A file of `customer` was sent over `via` (ftp, sftp, api) to `who` (a login or a token)."""
        self.restore([(customer, file, int(self.clock()), via, who, 1)])

    def take(self) -> list[Row]:
        """Everything noted, forgotten here: the caller stores it (or gives it back with `restore`)."""
        with self._lock:
            noted, self._noted = self._noted, {}
        return [(c, f, at, via, who, n) for (c, f), (at, via, who, n) in noted.items()]

    def restore(self, rows: list[Row]) -> None:
        """Merge rows back (the store could not take them): the newest download stays, the counts add up."""
        with self._lock:
            for customer, file, at, via, who, n in rows:
                old = self._noted.get((customer, file))
                if old is not None:
                    newest = (at, via, who) if at >= old[0] else old[:3]
                    at, via, who, n = *newest, n + old[3]
                self._noted[(customer, file)] = (at, via, who, n)

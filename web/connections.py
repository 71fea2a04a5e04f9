"""The web server's connections as uvicorn's HTTP/1.1 protocol keeps them, bounded for strangers.

uvicorn closes a connection that idles after a response, but not one that never finishes a request: a
client that connects and sends nothing, or one header byte every few seconds, holds its place for ever, and
64 of them deny the API and the console to everyone. Here a connection must send a whole request head within
HEAD_TIMEOUT_S of connecting (or of its last response), and one address holds at most PER_ADDRESS
connections at once; beyond that, a new one is closed at once. A trusted proxy (`web.trusted_proxies`) carries
every client's connections, so it is not capped: the proxy bounds its own clients.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT_S = 5.0
PER_ADDRESS = 8


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head and a cap on connections per address."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._armed_for: object = None  # the request cycle before the head the deadline waits for
        self._address = ""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._address = self.client[0] if self.client else ""
        held = _per_address(self.server_state)
        held[self._address] += 1
        proxies = getattr(self.server_state, "smame_proxies", None)
        if held[self._address] > PER_ADDRESS and not (proxies and proxies.trusts(self._address)):
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_deadline is not None and self.cycle is not self._armed_for:  # a whole head came
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's head, if any, must come in time too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        held = _per_address(self.server_state)
        held[self._address] -= 1
        if held[self._address] <= 0:
            del held[self._address]
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._armed_for = self.cycle
        self._head_deadline = self.loop.call_later(HEAD_TIMEOUT_S, self._too_slow)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _too_slow(self) -> None:
        self._head_deadline = None
        if self.cycle is self._armed_for and not self.transport.is_closing():
            self.transport.close()


def _per_address(state: Any) -> Counter[str]:
    """The connections each address holds on this server (kept on uvicorn's per-server state)."""
    held: Counter[str] | None = getattr(state, "smame_per_address", None)
    if held is None:
        held = Counter()
        state.smame_per_address = held
    return held

"""Which peers may say who their client is: `X-Forwarded-For` and `X-Forwarded-Proto` from the proxies an operator
named in `web.trusted_proxies`, and from no one else.

A forwarded header from anyone else is ignored: a caller that could name its own address would never be banned,
and could get a victim's address banned from every door by guessing "from" it. The client is the rightmost
address in `X-Forwarded-For` that is not itself a trusted proxy (each proxy appends the peer it saw, so what lies
left of that is the client's own say and proves nothing).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from functools import lru_cache

from kernel.addresses import ip_of
from web.guard import App, Receive, Scope, Send

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
log = logging.getLogger("smame.web")


class Proxies:
    """The trusted proxies: addresses or networks (`10.0.0.0/8`, `::1`); none by default."""

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.networks: tuple[Network, ...] = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        self.trusts = lru_cache(maxsize=1024)(self._trusts)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def _trusts(self, host: str) -> bool:
        """Whether `host` is a trusted proxy (an IPv4 peer on a dual-stack socket counts as its IPv4 address)."""
        ip = ip_of(host)
        return ip is not None and any(ip in n for n in self.networks)

    def client(self, peer: str, forwarded_for: str) -> str:
        """The client's address: `peer` unless it is a trusted proxy that forwarded one; a forwarded entry
        that is not an address (or a chain of trusted proxies only) leaves the last proxy as the client."""
        if not self.trusts(peer):
            return peer
        client = peer
        for entry in reversed(forwarded_for.split(",")[-MAX_HOPS:]):
            host = _host(entry.strip())
            if host is None:
                break
            client = host
            if not self.trusts(host):
                break
        return client


MAX_TOLD = 100  # peers logged for sending forwarded headers untrusted: strangers can make no more lines than that
MAX_HOPS = 16  # entries of X-Forwarded-For read (from the right); more proxies than that in a row is no deployment


def _host(entry: str) -> str | None:
    """The address in one `X-Forwarded-For` entry (`192.0.2.1`, `192.0.2.1:5000`, `[2001:db8::1]:5000`)."""
    if entry.startswith("[") and "]" in entry:
        entry = entry[1 : entry.index("]")]
    elif entry.count(":") == 1:
        entry = entry.split(":")[0]
    try:
        return str(ipaddress.ip_address(entry))
    except ValueError:
        return None


def forwarded(app: App, proxies: Proxies) -> App:
    """`app` seeing, for a request from a trusted proxy, the client and scheme that proxy forwarded. A peer not
    trusted that sends `X-Forwarded-For` is logged once (it may be the operator's own proxy, not yet named:
    then every customer behind it is one client, banned together)."""
    told: set[str] = set()

    async def unwrap(scope: Scope, receive: Receive, send: Send) -> None:
        peer = scope.get("client")
        if scope["type"] == "http" and peer and not proxies.trusts(peer[0]) and len(told) < MAX_TOLD:
            if peer[0] not in told and any(k == b"x-forwarded-for" for k, _ in scope.get("headers", [])):
                told.add(peer[0])
                log.warning(
                    "web: %s sends X-Forwarded-For but is not in web.trusted_proxies: its requests are judged, "
                    "counted and banned as its own; if it is your reverse proxy, name it there",
                    peer[0],
                )
        if scope["type"] == "http" and peer and proxies.trusts(peer[0]):
            values = [v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-forwarded-for"]
            client = proxies.client(peer[0], ",".join(values))
            if client != peer[0]:
                scope["client"] = (client, 0)
            schemes = [v for k, v in scope.get("headers", []) if k == b"x-forwarded-proto"]
            if schemes and schemes[-1].strip() in (b"http", b"https"):
                scope["scheme"] = schemes[-1].strip().decode()
        await app(scope, receive, send)

    return unwrap

"""Network addresses as smame compares them (pure)."""

from __future__ import annotations

import ipaddress


def ip_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `text` names (a zone after `%` left out), an IPv4 address mapped into IPv6 (as a dual-stack
    socket gives an IPv4 peer) as the IPv4 address itself; None when it names none."""
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip

"""A unit's firmware download (devices.md): an HTTP/1.1 GET of an image, from a byte on (a Range request), as a
unit's small HTTP client makes it; `cut_after` stops reading part-way (the link dropped), to be resumed."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

MAX_HEAD = 16 * 1024


class DownloadError(Exception):
    """The image could not be fetched; the message says why (the stage's words)."""


async def fetch(url: str, start: int = 0, cut_after: int | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """(HTTP status, the body's bytes read) of a GET of `url` from byte `start` on; DownloadError when the server
    cannot be reached or answers no HTTP."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise DownloadError(f"cannot fetch {url[:80]}: http:// only in the simulator")
    host, port = parts.hostname, parts.port or 80
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                head = f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
                if start:
                    head += f"Range: bytes={start}-\r\n"
                writer.write((head + "\r\n").encode())
                raw = await reader.readuntil(b"\r\n\r\n")
                if len(raw) > MAX_HEAD:
                    raise DownloadError("an answer's head too large")
                lines = raw.decode("latin-1").split("\r\n")
                status = int(lines[0].split()[1])
                fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
                length = int(next((v for k, v in fields.items() if k.lower() == "content-length"), "0"))
                want = length if cut_after is None else min(length, cut_after)
                body = await reader.readexactly(want) if want else b""
                return status, body
            finally:
                writer.close()
    except (OSError, TimeoutError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
        raise DownloadError(f"{type(exc).__name__}: {exc}"[:200]) from None

"""What every answer of the web server carries and what no request may be: the security headers, and a request
head (its target and headers) of at most HEAD_LIMIT bytes, whatever the HTTP parser let through.

uvicorn's `h11_max_incomplete_event_size` bounds only a head that arrives in pieces; one sent in a single write
is parsed whole. This wrapper refuses the request before any handler sees it, with `431` and a reason as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

HEAD_LIMIT = 16 * 1024
# The console has no inline script or style and loads nothing from elsewhere; nothing may frame it.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
        b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def head_size(scope: Scope) -> int:
    """The bytes of a request's target and headers, about as they came on the wire."""
    size = len(scope.get("raw_path") or scope.get("path", "").encode()) + len(scope.get("query_string", b""))
    return size + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))


def guarded(app: App) -> App:
    """`app` with the security headers on every answer and an oversized request head refused."""

    async def guard(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        if head_size(scope) > HEAD_LIMIT:
            body = json.dumps({"error": f"a request head over {HEAD_LIMIT // 1024} KiB is refused"}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 431, "headers": headers + SECURITY_HEADERS})
            await send({"type": "http.response.body", "body": body})
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await app(scope, receive, with_headers)

    return guard

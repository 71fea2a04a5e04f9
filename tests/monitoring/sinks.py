"""Real receivers for what smame sends: an SMTP server (aiosmtpd) and a local stand-in for Slack's endpoint."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.helpers import free_port, wait_until


@dataclass
class Received:
    """One message as the server took it."""

    sender: str
    recipients: list[str]
    message: EmailMessage


class SmtpSink:
    """An aiosmtpd server on a fixed free port, which can be started and stopped (to play an outage)."""

    def __init__(
        self,
        port: int | None = None,
        tls: ssl.SSLContext | None = None,
        login: tuple[str, str] | None = None,
        implicit_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.port = port or free_port()
        self.messages: list[Received] = []
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.login = login
        self.controller: Controller | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's name)
        msg = message_from_bytes(envelope.content, policy=default)
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), msg))  # type: ignore[arg-type]
        return "250 OK"

    def _auth(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login.decode(), data.password.decode()) == self.login
        return AuthResult(success=ok, handled=False)

    def start(self) -> SmtpSink:
        kwargs: dict[str, Any] = {}
        if self.tls is not None:
            kwargs.update(tls_context=self.tls, require_starttls=True)
        if self.implicit_tls is not None:
            kwargs.update(ssl_context=self.implicit_tls)
        if self.login is not None:
            kwargs.update(
                authenticator=self._auth,
                auth_required=True,
                auth_require_tls=self.tls is not None and self.implicit_tls is None,
            )
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, **kwargs)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def wait(self, n: int, timeout: float = 20.0) -> list[Received]:
        """Block until at least n messages arrived."""
        return (
            wait_until(lambda: len(self.messages) >= n, timeout, lambda: f"{len(self.messages)} of {n} mails")
            or self.messages
        )


@dataclass
class Post:
    at: float
    path: str
    body: dict[str, Any]


class SlackStandIn:
    """Answers POSTs like Slack's webhook: 200 "ok", or the scripted statuses first (429 with Retry-After)."""

    def __init__(self, statuses: list[int] | None = None, retry_after: int = 1) -> None:
        self.statuses = list(statuses or [])
        self.posts: list[Post] = []  # every request, answered or refused
        self.delivered: list[Post] = []  # those answered 200
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                post = Post(time.time(), self.path, body)
                stand_in.posts.append(post)
                status = stand_in.statuses.pop(0) if stand_in.statuses else 200
                if "/api/" in self.path:  # the Web API (bot token) answers JSON
                    reply = json.dumps(
                        {"ok": True} if status == 200 else {"ok": False, "error": "ratelimited"}
                    ).encode()
                else:  # an incoming webhook answers plain text
                    reply = b"ok" if status == 200 else b"rate_limited"
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", str(retry_after))
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                if status == 200:
                    stand_in.delivered.append(post)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"{base}/services/T0/B0/secret"  # as an incoming webhook
        self.api_url = f"{base}/api/"  # as the Web API
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def wait(self, predicate: Callable[[list[Post]], bool], timeout: float = 20.0) -> list[Post]:
        """Block until the delivered posts satisfy the predicate."""
        wait_until(
            lambda: predicate(self.delivered), timeout, lambda: f"delivered: {[p.body['text'] for p in self.delivered]}"
        )
        return self.delivered

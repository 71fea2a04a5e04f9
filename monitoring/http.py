"""`/metrics` for Prometheus and `/healthz` for orchestrators, on the standard library's HTTP server."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("smame.monitoring")

Health = Callable[[], dict[str, str]]  # check name -> "ok" or what is wrong
MAX_CONNECTIONS = 32  # at once; more are closed unanswered (a scraper and an orchestrator need two)
PER_ADDRESS = 4  # at once from one address: a stranger's slow connections leave room for the scraper's
IDLE_TIMEOUT_S = 10.0  # a connection that sends nothing for this long is closed
HEAD_TIMEOUT_S = 5.0  # a request head must be whole this long after the connection came (one byte a second is not)


class _Server(ThreadingHTTPServer):
    """A thread per connection, but a bounded number of them."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: connections beyond it wait in the kernel, then time out

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._held: Counter[str] = Counter()  # connections by address
        self._deadlines: dict[int, threading.Timer] = {}  # by the connection's socket's id, until its head is in
        self._lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            crowded = self._held[client_address[0]] >= PER_ADDRESS
            if not crowded:
                self._held[client_address[0]] += 1
        if crowded:
            self.shutdown_request(request)
            return
        if not self._slots.acquire(blocking=False):
            self._leave(client_address[0])
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # the head's deadline: a request not whole by then has its socket shut, which ends the handler's read
        deadline = threading.Timer(HEAD_TIMEOUT_S, _shut, (request,))
        deadline.daemon = True
        with self._lock:
            self._deadlines[id(request)] = deadline
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.head_done(request)
            self._slots.release()
            self._leave(client_address[0])

    def head_done(self, request: Any) -> None:
        """The connection's request head is whole: its deadline no longer holds (a slow answer is not its fault)."""
        with self._lock:
            deadline = self._deadlines.pop(id(request), None)
        if deadline is not None:
            deadline.cancel()

    def _leave(self, address: str) -> None:
        with self._lock:
            self._held[address] -= 1
            if self._held[address] <= 0:
                del self._held[address]


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class MonitoringServer:
    """Serves in a thread of its own until stopped."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Health,
        idle_timeout: float = IDLE_TIMEOUT_S,
        about: Callable[[], dict[str, object]] = dict,
    ) -> None:
        """`about` adds what the node is (its role among nodes) to the answer of /healthz."""

        class Handler(BaseHTTPRequestHandler):
            timeout = idle_timeout

            def parse_request(self) -> bool:
                whole = super().parse_request()
                assert isinstance(self.server, _Server)
                self.server.head_done(self.request)
                return whole

            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                if self.path == "/metrics":
                    self._reply(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif self.path == "/healthz":
                    checks = health()
                    ok = all(v == "ok" for v in checks.values())
                    body = json.dumps({"status": "ok" if ok else "failing", "checks": checks, **about()}).encode()
                    self._reply(200 if ok else 503, "application/json", body)
                else:
                    self._reply(404, "text/plain", b"see /metrics and /healthz\n")

            def _reply(self, code: int, kind: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # scrapes are not events
                pass

        self.httpd = _Server((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="monitoring", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("monitoring: /metrics and /healthz on port %d", self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

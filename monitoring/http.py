"""`/metrics` for Prometheus and `/healthz` for orchestrators, on the standard library's HTTP server."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("smame.monitoring")

Health = Callable[[], dict[str, str]]  # check name -> "ok" or what is wrong
MAX_CONNECTIONS = 32  # at once; more are closed unanswered (a scraper and an orchestrator need two)
IDLE_TIMEOUT_S = 10.0  # a connection that sends nothing for this long is closed


class _Server(ThreadingHTTPServer):
    """A thread per connection, but a bounded number of them."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: connections beyond it wait in the kernel, then time out

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


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

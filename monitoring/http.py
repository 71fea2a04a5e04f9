"""`/metrics` for Prometheus and `/healthz` for orchestrators, on the standard library's HTTP server."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("smame.monitoring")

Health = Callable[[], dict[str, str]]  # check name -> "ok" or what is wrong


class MonitoringServer:
    """Serves in a thread of its own until stopped."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                if self.path == "/metrics":
                    self._reply(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif self.path == "/healthz":
                    checks = health()
                    ok = all(v == "ok" for v in checks.values())
                    body = json.dumps({"status": "ok" if ok else "failing", "checks": checks}).encode()
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

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="monitoring", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("monitoring: /metrics and /healthz on port %d", self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

"""The metrics endpoint under hostile clients: local by default, idle connections closed, a bounded thread count."""

from __future__ import annotations

import socket
import threading
import urllib.request

from prometheus_client import CollectorRegistry

from kernel.settings import Settings
from monitoring.http import MAX_CONNECTIONS, MonitoringServer
from tests.helpers import wait_until


def test_metrics_listen_on_this_machine_only_by_default() -> None:
    assert Settings().monitoring.host == "127.0.0.1"


def test_idle_connections_neither_pile_up_threads_nor_lock_out_a_scrape() -> None:
    server = MonitoringServer("127.0.0.1", 0, CollectorRegistry(), lambda: {"x": "ok"}, idle_timeout=1.0)
    server.start()
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(100)]
    try:
        wait_until(lambda: threading.active_count() - before >= MAX_CONNECTIONS - 1, 5)
        assert threading.active_count() - before <= MAX_CONNECTIONS
        # the idle ones time out and are closed; then a scrape gets through
        wait_until(lambda: threading.active_count() - before <= 1, 10)
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5).read()
        assert b'"status": "ok"' in body
        assert idle[0].recv(1) == b""  # closed by the server
    finally:
        for s in idle:
            s.close()
        server.stop()

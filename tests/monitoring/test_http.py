"""The metrics endpoint under hostile clients: local by default, idle connections closed, a bounded thread count."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request

from prometheus_client import CollectorRegistry

from kernel.settings import Settings
from monitoring.http import HEAD_TIMEOUT_S, MAX_CONNECTIONS, PER_ADDRESS, MonitoringServer
from tests.helpers import connect_from, real_processes, wait_until


def test_metrics_listen_on_this_machine_only_by_default() -> None:
    assert Settings().monitoring.host == "127.0.0.1"


def test_idle_or_dripping_connections_neither_pile_up_threads_nor_lock_out_a_scrape() -> None:
    real_processes()  # its deadlines run on the wall clock, which the shifted pass's faketime bends
    server = MonitoringServer("127.0.0.1", 0, CollectorRegistry(), lambda: {"x": "ok"}, idle_timeout=60.0)
    server.start()
    before = threading.active_count()
    # strangers from ten addresses, four connections each (more than the server serves at once), idle
    idle = [connect_from(f"127.0.0.{3 + k // PER_ADDRESS}", server.port) for k in range(10 * PER_ADDRESS)]
    drip = connect_from("127.0.0.30", server.port)
    try:
        drip.sendall(b"GET /healthz HTTP/1.1\r\n")
        extra = connect_from("127.0.0.3", server.port)  # over its address's four: closed at once
        assert extra.recv(1) == b""
        extra.close()
        wait_until(lambda: threading.active_count() - before >= MAX_CONNECTIONS, 5)
        assert threading.active_count() - before <= 2 * MAX_CONNECTIONS  # a handler and its head's deadline each
        # one header byte a second holds nothing past the head's deadline; the idle ones go then too, long
        # before their idle timeout, and a scrape gets through
        for _ in range(int(HEAD_TIMEOUT_S) + 2):
            with contextlib.suppress(OSError):
                drip.sendall(b"X")
            time.sleep(1)
        assert drip.recv(100) == b""
        wait_until(lambda: threading.active_count() - before <= 1, 5)
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5).read()
        assert b'"status": "ok"' in body
        assert idle[0].recv(1) == b""  # closed by the server
    finally:
        for s in idle:
            s.close()
        drip.close()
        server.stop()

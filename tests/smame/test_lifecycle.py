"""Start and stop of `smame run`: a signal at any moment stops it in time, and nothing on disk crashes a service."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import (
    Mosquitto, children, running, smame_env, start_smame, wait_child, wait_log, wait_until, write_registry,
)


@pytest.mark.parametrize("after", [0.0, 0.15, 0.4])
def test_sigterm_right_after_start_stops_smame_and_its_children(broker: Mosquitto, workdir: Path, after: float) -> None:
    write_registry(workdir, {"L1": "C1"})
    log = workdir / "smame.log"
    proc = start_smame(smame_env(workdir, broker.port), log)
    wait_log(log, "smame started", timeout=30)
    time.sleep(after)  # the moment is the point: while the writer and the export workers start
    kids = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(12) == 0, log.read_text()
    wait_until(lambda: not any(running(k) for k in kids), 10, lambda: f"children left: {kids}")
    assert "smame stopped" in log.read_text()


def test_a_second_sigterm_exits_at_once_and_a_stuck_stop_ends_in_time(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"L1": "C1"})
    log = workdir / "smame.log"
    for second in (True, False):
        proc = start_smame(smame_env(workdir, broker.port), log)
        wait_log(log, "subscribed to")
        writer = wait_child(proc, "smame-writer")
        os.kill(writer, signal.SIGSTOP)  # a writer that does not answer: a stop that would wait for it for ever
        try:
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            if second:
                wait_log(log, "SIGTERM received: stopping")
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(3) == 130
                assert "received again: exiting now" in log.read_text()
            else:
                assert proc.wait(12) == 1  # the stop deadline
                assert 8 < time.monotonic() - started < 11
                assert "still stopping after 9 s: exiting now" in log.read_text()
        finally:
            os.kill(writer, signal.SIGKILL)
        log.write_text("")


def test_a_stray_file_in_the_export_directory_is_left_alone(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"L1": "C1"})
    stray = workdir / "data" / "export" / "C1" / "C1_20261399.csv"
    stray.parent.mkdir(parents=True)
    stray.write_text("not ours\n")
    log = workdir / "smame.log"
    proc = start_smame(smame_env(workdir, broker.port), log)
    try:
        wait_log(log, "export: ")
        assert proc.poll() is None, log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(12) == 0, log.read_text()
    assert stray.read_text() == "not ours\n" and "crashed" not in log.read_text()

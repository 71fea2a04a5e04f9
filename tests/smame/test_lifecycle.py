"""Start and stop of `smame run`: a signal at any moment stops it in time, and nothing on disk crashes a service."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import termios
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import (
    Mosquitto,
    at,
    children,
    free_port,
    publish,
    real_processes,
    running,
    smame,
    smame_env,
    start_smame,
    telegram,
    wait_child,
    wait_log,
    wait_readings,
    wait_until,
    write_registry,
    yesterday,
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


def test_sigterm_while_the_web_server_loads_does_not_wait_for_it_to_start(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"L1": "C1"})
    env = smame_env(workdir, broker.port, SMAME_WEB__ENABLED="true", SMAME_WEB__PORT=str(free_port()))
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "smame started", timeout=30)  # the web server's framework takes a second or two to load
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(12) == 0, log.read_text()
    took = time.monotonic() - started
    # it stopped once the framework had loaded, not after its thread's 5 s join (nor the 9 s deadline)
    assert "web server listening" not in log.read_text() and took < 4, took


# From 0.1 s: Python's own start (40-50 ms here, before any of smame's code runs) ends as Python ends any program.
@pytest.mark.parametrize("after", [0.1, 0.3, 0.8])
def test_ctrl_c_at_any_moment_of_start_up_ends_with_one_line_and_no_traceback(
    broker: Mosquitto, workdir: Path, after: float
) -> None:
    write_registry(workdir, {"L1": "C1"})
    port = free_port()
    env = smame_env(workdir, broker.port, SMAME_WEB__ENABLED="true", SMAME_WEB__PORT=str(port))
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    time.sleep(after)  # before the settings are read, while the store opens, while the web server loads
    proc.send_signal(signal.SIGINT)
    code = proc.wait(12)
    text = log.read_text()
    assert code in (0, 130) and "Traceback" not in text, (code, text)
    assert text.rstrip().endswith("smame: interrupted" if code == 130 else "smame stopped"), text


def test_ctrl_c_at_a_password_prompt_ends_with_one_line(workdir: Path) -> None:
    real_processes()
    write_registry(workdir, {"L1": "C1"})
    terminal, tty = os.openpty()  # the prompt reads a terminal, as an operator's would be

    def own_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "smame.cli", "users", "add", "C1", "bob"],
        env=smame_env(workdir, 1883),
        stdin=tty,
        stdout=tty,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=own_terminal,
        text=True,
    )
    os.close(tty)
    try:
        prompt = b""
        while b"password" not in prompt.lower():
            prompt += os.read(terminal, 1024)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        os.close(terminal)
    assert proc.returncode == 130 and "Traceback" not in err and err.rstrip().endswith("smame: interrupted"), err


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
        wait_log(log, "subscribed to")
        day = yesterday().isoformat()
        publish(broker.port, [("smame/v1/L1/reading", telegram("L1", [(at(day, "10:00"), 1), (at(day, "10:30"), 2)]))])
        wait_readings(workdir / "data" / "smame.db", 2)
        proc.send_signal(signal.SIGHUP)  # an export run now, with retention, rather than at the next half hour
        wait_log(log, "export: ")
        assert proc.poll() is None, log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(12) == 0, log.read_text()
    assert stray.read_text() == "not ours\n" and "crashed" not in log.read_text()


def test_a_database_deleted_under_smame_acknowledges_nothing_and_loses_nothing(
    broker: Mosquitto, workdir: Path
) -> None:
    write_registry(workdir, {"D1": "C1"})
    port = free_port()
    env = smame_env(workdir, broker.port, SMAME_MONITORING__ENABLED="true", SMAME_MONITORING__METRICS_PORT=str(port))
    log = workdir / "smame.log"
    db = workdir / "data" / "smame.db"
    proc = start_smame(env, log)
    wait_log(log, "has the store open")
    wait_log(log, "monitoring: /metrics")
    for f in db.parent.glob("smame.db*"):
        f.unlink()
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert answer.value.code == 503 and "deleted or replaced" in json.loads(answer.value.read())["checks"]["store"]
    day = yesterday().isoformat()
    publish(broker.port, [("smame/v1/D1/reading", telegram("D1", [(at(day, f"{h:02d}:00"), h)])) for h in range(20)])
    assert proc.wait(15) == 1  # ingest stops rather than acknowledge what went into a deleted file
    assert "deleted or replaced" in log.read_text()
    proc = start_smame(env, log)  # what the deployment's restart does
    try:
        wait_readings(db, 20)  # nothing was acknowledged, so the broker delivered it all again
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(12) == 0


@pytest.mark.parametrize("setting", ["ftp.port", "sftp.port", "monitoring.metrics_port"])
def test_a_port_in_use_stops_smame_at_once_naming_the_setting(workdir: Path, setting: str) -> None:
    write_registry(workdir, {"L1": "C1"})
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    section, key = setting.split(".")
    env = smame_env(
        workdir,
        free_port(),
        SMAME_FTP__HOST="127.0.0.1",
        SMAME_SFTP__HOST="127.0.0.1",
        SMAME_MONITORING__HOST="127.0.0.1",
        SMAME_FTP__PORT="0",
        SMAME_SFTP__PORT="0",
        SMAME_MONITORING__METRICS_PORT="0",
    )
    env.update({f"SMAME_{section.upper()}__ENABLED": "true", f"SMAME_{section.upper()}__{key.upper()}": str(port)})
    try:
        for command in (["run"], ["serve-files"]) if section != "monitoring" else (["run"],):
            proc = smame(command, env, check=False)
            assert proc.returncode == 2, proc.stderr
            assert (
                proc.stderr.strip()
                == f"smame: {setting}: cannot listen on 127.0.0.1 port {port}: Address already in use"
            )
    finally:
        taken.close()


# What only the other services need, loaded by them when they start: before, `smame run` loaded all of it
# (about 0.4 s) before it could connect to the broker, and the broker's backlog waited.
NOT_ON_THE_WAY_TO_THE_BROKER = ("polars", "asyncssh", "slack_sdk", "uvicorn", "fastapi", "aiosmtpd", "simulators.run")


def test_smame_run_reaches_the_broker_without_loading_what_only_the_other_services_need(tmp_path: Path) -> None:
    write_registry(tmp_path, {"U1": "C1"})
    env = smame_env(tmp_path, free_port(), SMAME_SFTP__ENABLED="true", SMAME_WEB__ENABLED="true")
    env.update(SMAME_EXPORT__ENABLED="true", SMAME_MONITORING__ENABLED="true", SMAME_ALERTS__ENABLED="true")
    # what `smame run` does before its services start: its command line, the settings, every part built
    script = (
        "import sys; import smame.cli; from kernel.settings import load_settings; from smame.app import App\n"
        "app = App.build(load_settings(None))\n"
        "assert app.exporter and app.gateway and app.monitor and app.web, 'a service is off'\n"
        f"print(' '.join(m for m in {NOT_ON_THE_WAY_TO_THE_BROKER!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == []

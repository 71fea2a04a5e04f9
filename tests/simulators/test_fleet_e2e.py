"""A simulated fleet with every fault through a real Mosquitto and the real backend: the truth holds."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    Mosquitto,
    acknowledged,
    free_port,
    metrics_env,
    smame,
    smame_env,
    start_smame,
    stop,
    wait_log,
    wait_until,
)

END = "2026-11-23T09:00:00+09:00"
EVERY_FAULT = [
    "--dropout-rate",
    "0.5",
    "--replacement-rate",
    "0.05",
    "--reset-rate",
    "0.05",
    "--death-rate",
    "0.02",
    "--spike-rate",
    "0.1",
    "--no-data-rate",
    "0.01",
    "--malformed-rate",
    "0.01",
    "--future-rate",
    "0.01",
    "--clock-skew-rate",
    "0.01",
    "--out-of-order-rate",
    "0.02",
    "--duplicate-rate",
    "0.02",
    "--unknown-rate",
    "0.002",
]


def readings(workdir: Path) -> int:
    with sqlite3.connect(workdir / "data" / "smame.db") as c:
        return int(c.execute("SELECT count(*) FROM readings").fetchone()[0])


@pytest.mark.slow
def test_200_units_3_days_every_fault_verify_finds_no_mismatch(broker: Mosquitto, workdir: Path) -> None:
    metrics = free_port()
    env = smame_env(workdir, broker.port, **metrics_env(metrics))
    fleet = ["--units", "200", "--customers", "5"]
    smame(["simulate", *fleet, "--write-registry", str(workdir)], env)
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "subscribed to")
    truth = workdir / "truth.jsonl"
    run = smame(["simulate", *fleet, "--backfill", "3", "--end", END, "--truth", str(truth), *EVERY_FAULT], env)
    assert "telegrams from 200 units acknowledged" in run.stdout
    for kind in (
        "dropout",
        "duplicate",
        "out_of_order",
        "clock_skew",
        "future",
        "no_data",
        "malformed",
        "replacement",
        "reset",
        "spike",
        "death",
        "unknown",
    ):
        assert f"{kind} " in run.stdout, kind
    found = re.search(r"([\d,]+) telegrams from 200 units acknowledged", run.stdout)
    assert found is not None
    sent = int(found[1].replace(",", ""))
    wait_until(lambda: acknowledged(metrics) >= sent, 30, lambda: f"smame acknowledged {acknowledged(metrics)}/{sent}")
    assert stop(proc) == 0

    verify = smame(["verify", "--truth", str(truth)], env, check=False)
    assert verify.returncode == 0, verify.stdout
    assert "OK: 0 mismatches in 28,800 slots of 200 units" in verify.stdout
    for kind in ("clean", "dropout", "replacement", "reset", "spike", "rollover", "no_data", "death"):
        assert f"\n{kind} " in verify.stdout, kind

    with sqlite3.connect(workdir / "data" / "smame.db") as c:  # a wrong slot must not pass unnoticed
        c.execute(
            "UPDATE slots SET imp = imp + 1 "
            "WHERE (slot, unit) = (SELECT slot, unit FROM slots WHERE imp_q = 'A' LIMIT 1)"
        )
    tampered = smame(["verify", "--truth", str(truth)], env, check=False)
    assert tampered.returncode == 1
    assert "MISMATCH: 1 mismatches" in tampered.stdout


@pytest.mark.slow
def test_2000_units_on_their_own_connections(broker: Mosquitto, workdir: Path) -> None:
    env = smame_env(workdir, broker.port)
    fleet = ["--units", "2000", "--customers", "10"]
    smame(["simulate", *fleet, "--write-registry", str(workdir)], env)
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "subscribed to")
    run = smame(["simulate", *fleet, "--connections", "per-unit", "--backfill", "0.0625", "--clean", "--end", END], env)
    assert "8,000 telegrams from 2,000 units acknowledged" in run.stdout  # 1.5 hours: 4 readings each
    assert "over 2,000 connections" in run.stdout
    wait_until(lambda: readings(workdir) >= 8000, 30, lambda: f"{readings(workdir)} of 8000 stored", every=0.2)
    assert stop(proc) == 0
    assert readings(workdir) == 8000


def test_broker_down_is_retried_and_nothing_is_dropped(workdir: Path) -> None:
    mq = Mosquitto(workdir / "mq")
    mq.stop()
    env = smame_env(workdir, mq.port)
    log = workdir / "sim.log"
    with open(log, "wb") as out:
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smame.cli",
                "simulate",
                "--units",
                "30",
                "--backfill",
                "0.25",
                "--clean",
                "--end",
                END,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_log(log, "broker unreachable")
        mq.start()
        assert sim.wait(60) == 0
    finally:
        mq.stop()
    assert "390 telegrams from 30 units acknowledged" in log.read_text()  # 13 readings per unit


def test_bad_arguments_get_a_clear_error(workdir: Path) -> None:
    env = smame_env(workdir, 1883)
    for args, message in (
        (["--units", "many"], "'many' is not a whole number"),
        (["--speed", "-1"], "must not be negative"),
        (["--connections", "lots"], "'lots' is not a whole number"),
        (["--end", "2026-11-23T09:00"], "needs a UTC offset"),
    ):
        proc = smame(["simulate", *args], env, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


def test_sigterm_stops_a_paced_run_at_once_and_keeps_the_truth_whole(broker: Mosquitto, workdir: Path) -> None:
    env = smame_env(workdir, broker.port)
    log, truth = workdir / "sim.log", workdir / "truth.jsonl"
    with open(log, "wb") as out:  # a real-time run of a day would take a day
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smame.cli",
                "simulate",
                "--units",
                "20",
                "--days",
                "1",
                "--speed",
                "1",
                "--truth",
                str(truth),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    time.sleep(2)
    sim.send_signal(signal.SIGTERM)
    assert sim.wait(10) == 0
    assert "telegrams from 20 units acknowledged" in log.read_text() and truth.exists()


def test_a_live_fleet_answers_commands_from_its_first_units_and_resends_from_their_history(
    broker: Mosquitto, workdir: Path
) -> None:
    env = smame_env(workdir, broker.port, SMAME_EXPORT__ENABLED="false")
    fleet = ["--units", "20", "--customers", "2", "--clean"]
    smame(["simulate", *fleet, "--write-registry", str(workdir)], env)
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "subscribed to")
    live = subprocess.Popen(
        [sys.executable, "-m", "smame.cli", "simulate", *fleet, "--days", "0.125", "--speed", "0", "--follow"]
        + ["--answer", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: readings(workdir) >= 20 * 6, 30, lambda: f"{readings(workdir)} stored", every=0.2)
        units = [line.split(",")[0] for line in (workdir / "units.csv").read_text().splitlines()[1:]]
        answered = smame(["units", "cmd", "ping", "--unit", units[0], "--unit", units[1], "--wait", "20"], env).stdout
        assert answered.count(" done ") == 2 and '"fw":' in answered, answered
        frm, to = (time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - h * 3600)) for h in (2, 0))
        resent = smame(["units", "cmd", "resend", f"from={frm}", f"to={to}", "--unit", units[0], "--wait", "20"], env)
        assert " done " in resent.stdout and '"telegrams":1' in resent.stdout, resent.stdout  # 2 hours: one telegram
        silent = smame(["units", "cmd", "ping", "--unit", units[2], "--expires", "3", "--wait", "6"], env, check=False)
        assert silent.returncode == 1 and " expired " in silent.stdout  # a unit that does not answer commands
    finally:
        live.send_signal(signal.SIGINT)
        live.wait(30)
        assert stop(proc) == 0

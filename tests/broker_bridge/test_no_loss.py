"""kill -9 in the middle of a burst: after a restart every reading is stored exactly once, the slots are right,
on SQLite and on PostgreSQL."""

from __future__ import annotations

import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from tests.databases import count, query
from tests.helpers import (
    Mosquitto,
    at,
    publish,
    running,
    smame_env,
    start_smame,
    stop,
    telegram,
    wait_child,
    wait_log,
    wait_until,
    write_registry,
)

UNITS, ROUNDS = 1000, 21  # 21,000 telegrams, one reading each, in time order as a fleet sends them


def register(unit: int, k: int) -> int:
    return (unit * 7919 + k * (unit % 13 + 1) * 3) % 10**6


@pytest.mark.slow
def test_kill_9_mid_burst_loses_nothing_and_duplicates_nothing(
    broker: Mosquitto, workdir: Path, store_url: str
) -> None:
    write_registry(workdir, {f"K{u:04d}": f"C{u % 5}" for u in range(UNITS)})
    env = smame_env(
        workdir,
        broker.port,
        SMAME_BROKER__BATCH_SIZE="500",
        SMAME_BROKER__BATCH_DELAY_MS="50",
        SMAME_STORAGE__URL=store_url,
    )
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "subscribed to")
    writer = wait_child(proc, "smame-writer")

    t0 = at("2026-11-20", "00:00")
    rounds = [
        [
            (
                f"smame/v1/K{u:04d}/reading",
                telegram(f"K{u:04d}", [(t0 + timedelta(minutes=30 * k), register(u, k))], seq=k),
            )
            for u in range(UNITS)
        ]
        for k in range(ROUNDS)
    ]

    # The first round, and an export run (SIGHUP) of the files it makes: the export workers are running too.
    publish(broker.port, rounds[0])
    wait_until(lambda: count(store_url, "readings") >= UNITS, 60, every=0.02)
    proc.send_signal(signal.SIGHUP)
    helpers = [writer, wait_child(proc, "smame-export")]

    def publisher() -> None:
        for messages in rounds[1:]:
            publish(broker.port, messages)
            time.sleep(0.05)

    sender = threading.Thread(target=publisher)
    sender.start()
    wait_until(lambda: count(store_url, "readings") >= 4 * UNITS, 60, every=0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    killed_at = count(store_url, "readings")
    # nothing of the killed process lives on: the writer, the export workers
    wait_until(lambda: not any(running(pid) for pid in helpers), 10, lambda: f"still running: {helpers}", every=0.1)
    sender.join(120)
    assert 0 < killed_at < UNITS * ROUNDS, "the kill must land mid-burst"

    proc = start_smame(env, log)
    wait_until(
        lambda: count(store_url, "readings") >= UNITS * ROUNDS,
        120,
        lambda: f"{count(store_url, 'readings')} of {UNITS * ROUNDS} stored",
        every=0.2,
    )
    time.sleep(0.5)  # anything redelivered late would show up as an extra row or a conflict
    assert stop(proc) == 0

    assert count(store_url, "readings") == UNITS * ROUNDS
    assert count(store_url, "quarantine") == 0
    slots = {(u, s): (imp, q) for u, s, imp, q in query(store_url, "SELECT unit, slot, imp, imp_q FROM slots")}
    truth = {}
    for u in range(UNITS):
        for k in range(1, ROUNDS):
            delta = (register(u, k) - register(u, k - 1)) % 10**6
            truth[(f"K{u:04d}", int((t0 + timedelta(minutes=30 * k)).timestamp()))] = (delta, "A")
    assert slots == truth

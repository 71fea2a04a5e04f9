"""Ingest through a three-node RabbitMQ cluster (docs/cluster.md): a node killed under load loses nothing."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    STARTED,
    acknowledged,
    free_port,
    metrics_env,
    readings_in,
    real_processes,
    smame,
    smame_env,
    start_smame,
    stop,
    wait_log,
    wait_until,
)
from tests.rabbitmq import RabbitCluster

END = "2026-11-23T09:00:00+09:00"
UNITS, DAYS = 320, 2  # 31,040 telegrams (97 a unit), one reading each


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    real_processes()
    c = RabbitCluster(tmp_path_factory.mktemp("rabbit"))
    yield c
    c.close()


def cluster_env(workdir: Path, cluster: RabbitCluster, metrics: int) -> dict[str, str]:
    return smame_env(
        workdir,
        0,
        SMAME_BROKER__URL=cluster.url,
        SMAME_BROKER__KIND="rabbitmq",
        SMAME_BROKER__RECONNECT_MIN_S="0.2",
        SMAME_BROKER__RECONNECT_MAX_S="1",
        **metrics_env(metrics),
    )


def node_of(log: Path, cluster: RabbitCluster) -> int:
    """Which of the cluster's nodes smame connected to last (from its log)."""
    port = int(re.findall(r"connected to 127\.0\.0\.1:(\d+) as", log.read_text())[-1])
    return next(i for i, n in enumerate(cluster.nodes) if n.mqtt_port == port)


def test_kill_9_of_the_node_smame_reads_from_mid_burst_loses_nothing(cluster: RabbitCluster, workdir: Path) -> None:
    metrics = free_port()
    env = cluster_env(workdir, cluster, metrics)
    fleet = ["--units", str(UNITS), "--customers", "4"]
    smame(["simulate", *fleet, "--write-registry", str(workdir)], env)
    log, db = workdir / "smame.log", workdir / "data" / "smame.db"
    proc = start_smame(env, log)
    wait_log(log, "subscribed to", 30)
    truth = workdir / "truth.jsonl"
    with open(workdir / "simulate.log", "wb") as out:
        # the units learn every node (broker.url) and move to the next when theirs dies, as smame does
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smame.cli",
                "simulate",
                *fleet,
                "--backfill",
                str(DAYS),
                "--end",
                END,
                "--clean",
                "--truth",
                str(truth),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    STARTED.append(sim)
    wait_until(lambda: acknowledged(metrics) >= 8000, 120, lambda: f"acknowledged {acknowledged(metrics)}")
    victim = node_of(log, cluster)
    cluster.nodes[victim].kill()
    killed = time.monotonic()
    try:
        time.sleep(1)  # commits under way when it died end first
        before = readings_in(db)
        wait_until(lambda: readings_in(db) > before + 500, 10, lambda: f"stored {readings_in(db) - before} since")
        resumed = time.monotonic() - killed
        assert node_of(log, cluster) != victim
        assert sim.wait(180) == 0, (workdir / "simulate.log").read_text()[-2000:]
        found = re.search(
            rf"([\d,]+) telegrams from {UNITS} units acknowledged", (workdir / "simulate.log").read_text()
        )
        assert found is not None
        sent = int(found[1].replace(",", ""))  # one reading each
        assert sent >= UNITS * DAYS * 48
        wait_until(lambda: readings_in(db) >= sent, 60, lambda: f"stored {readings_in(db)} of {sent}")
        assert stop(proc) == 0
        verify = smame(["verify", "--truth", str(truth)], env, check=False)
        assert verify.returncode == 0, verify.stdout
        assert f"OK: 0 mismatches in {UNITS * DAYS * 48:,} slots of {UNITS} units" in verify.stdout
        assert readings_in(db) == sent  # each once
        assert resumed < 10
    finally:
        cluster.nodes[victim].start()
        cluster.nodes[victim].wait()
        cluster.wait_clustered()

"""Ingest through a three-node RabbitMQ cluster (docs/cluster.md): a node killed under load loses nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as expected
from selenium.webdriver.support.ui import WebDriverWait

from broker_bridge.cluster import queue_name
from tests.databases import PostgresDatabase, count
from tests.helpers import (
    STARTED,
    acknowledged,
    first_start,
    free_port,
    metrics_env,
    readings_in,
    real_processes,
    scrape,
    smame,
    smame_env,
    start_smame,
    stop,
    wait_log,
    wait_until,
)
from tests.rabbitmq import RabbitCluster
from tests.web.test_console import PASSWORD

END = "2026-11-23T09:00:00+09:00"
UNITS, DAYS = 320, 2  # 31,040 telegrams (97 a unit), one reading each: the burst
FEW = 120  # the other faults' fleet (11,640 telegrams): each is about the cluster, not the burst's size


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


def simulate(
    env: dict[str, str], fleet: list[str], truth: Path, log: Path, days: int = DAYS, speed: float = 0
) -> subprocess.Popen[bytes]:
    """The fleet's `days` published through the cluster as fast as it takes them, or at `speed` simulated seconds
    a second (the units learn every node from broker.url and move to the next when theirs dies, as smame does),
    its truth written."""
    pace = ["--days", str(days), "--speed", str(speed)]
    command = [sys.executable, "-m", "smame.cli", "simulate", *fleet, *pace, "--end", END]
    with open(log, "wb") as out:
        sim = subprocess.Popen(
            [*command, "--clean", "--truth", str(truth)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    STARTED.append(sim)
    return sim


def healthz(port: int) -> dict[str, Any]:
    """smame's /healthz answer."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
        return cast(dict[str, Any], json.loads(answer.read()))


def sent_of(log: Path) -> int:
    """How many telegrams the simulator's units were acknowledged (from its summary)."""
    found = re.search(r"([\d,]+) telegrams from \d+ units acknowledged", log.read_text())
    assert found is not None
    return int(found[1].replace(",", ""))


def smame_and_fleet(
    workdir: Path, env: dict[str, str], units: int = UNITS, days: int = DAYS, speed: float = 0
) -> tuple[subprocess.Popen[bytes], Path, Path, subprocess.Popen[bytes]]:
    """`smame run` on the cluster with a simulated fleet of `units` as its registry, then the fleet's `days`
    publishing (at `speed`, 0: at once): smame, its log, its truth file and the simulator."""
    fleet = ["--units", str(units), "--customers", "4"]
    smame(["simulate", *fleet, "--write-registry", str(workdir)], env)
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "subscribed to", 30)
    truth = workdir / "truth.jsonl"
    return proc, log, truth, simulate(env, fleet, truth, workdir / "simulate.log", days, speed)


def test_kill_9_of_the_node_smame_reads_from_mid_burst_loses_nothing(cluster: RabbitCluster, workdir: Path) -> None:
    metrics = free_port()
    env = cluster_env(workdir, cluster, metrics)
    proc, log, truth, sim = smame_and_fleet(workdir, env)
    db = workdir / "data" / "smame.db"
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
        sent = sent_of(workdir / "simulate.log")  # one reading each
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


def test_kill_9_of_the_queue_leader_is_told_and_loses_nothing(
    cluster: RabbitCluster, workdir: Path, browser: webdriver.Chrome
) -> None:
    metrics, web = free_port(), free_port()
    env = cluster_env(workdir, cluster, metrics)
    queue = queue_name(env["SMAME_BROKER__CLIENT_ID"])
    # smame's session (and so its quorum queue) first, to know which node will lead it
    subprocess.run(
        ["mosquitto_sub", "-V", "311", "-p", str(cluster.nodes[0].mqtt_port), "-c", "-i"]
        + [env["SMAME_BROKER__CLIENT_ID"], "-q", "1", "-t", "smame/v1/+/reading", "-E"],
        check=True,
        timeout=30,
    )
    leader = next(i for i, n in enumerate(cluster.nodes) if n.name == cluster.queue(queue)["leader"])
    watcher = cluster.nodes[(leader + 1) % 3]
    env |= {
        "SMAME_BROKER__MANAGEMENT_URL": watcher.management_url,
        "SMAME_BROKER__USERNAME": "guest",
        "SMAME_BROKER__PASSWORD": "guest",
        "SMAME_BROKER__WATCH_S": "1",
        "SMAME_ALERTS__CHECK_S": "1",
        "SMAME_ALERTS__BROKER_DOWN_S": "2",
        "SMAME_WEB__ENABLED": "true",
        "SMAME_WEB__PORT": str(web),
    }
    fleet = ["--units", str(FEW), "--customers", "4"]
    smame(["simulate", *fleet, "--write-registry", str(workdir)], env)
    first_start(workdir)
    smame(["operators", "add", "alice", "--password-stdin"], env, stdin=PASSWORD + "\n")
    log, db = workdir / "smame.log", workdir / "data" / "smame.db"
    proc = start_smame(env, log)
    wait_log(log, "subscribed to", 30)
    wait_until(lambda: scrape(metrics).get('smame_broker_queue_replicas{state="online"}') == 3, 30)
    assert scrape(metrics)[f'smame_broker_queue_leader{{node="{cluster.nodes[leader].name}"}}'] == 1
    truth = workdir / "truth.jsonl"
    sim = simulate(env, fleet, truth, workdir / "simulate.log")
    wait_until(lambda: acknowledged(metrics) >= 3000, 120, lambda: f"acknowledged {acknowledged(metrics)}")
    cluster.nodes[leader].kill()
    gone = f"127.0.0.1:{cluster.nodes[leader].mqtt_port}"
    try:
        # told: the node down, the queue on two replicas of three, a new leader, an alert
        wait_until(lambda: scrape(metrics).get(f'smame_broker_node_up{{node="{gone}"}}') == 0, 30)
        wait_until(lambda: scrape(metrics).get('smame_broker_queue_replicas{state="online"}') == 2, 30)
        wait_until(lambda: scrape(metrics).get('smame_alert_active{alert="broker_cluster"}') == 1, 30)
        others = [n.name for i, n in enumerate(cluster.nodes) if i != leader]
        wait_until(lambda: healthz(metrics)["broker"]["queue"]["leader"] in others, 30)  # elected
        health = healthz(metrics)
        assert health["broker"]["nodes"][gone].startswith("unreachable since")
        # the operators' console says it too
        browser.get(f"http://127.0.0.1:{web}/login")
        browser.find_element(By.NAME, "name").send_keys("alice")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.CSS_SELECTOR, "form.login button").click()
        table = WebDriverWait(browser, 15).until(expected.presence_of_element_located((By.ID, "broker")))
        states = {
            r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")[1].text
            for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")
        }
        assert states[gone].startswith("unreachable since") and list(states.values()).count("up") == 2, states
        said = browser.find_element(By.ID, "broker-queue").text
        assert "2 of 3 replicas online" in said and cluster.nodes[leader].name not in said, said
        assert health["status"] == "ok"  # ingest goes on: a broker node down is told, not a failing smame
        assert sim.wait(180) == 0, (workdir / "simulate.log").read_text()[-2000:]
        sent = sent_of(workdir / "simulate.log")
        wait_until(lambda: readings_in(db) >= sent, 60, lambda: f"stored {readings_in(db)} of {sent}")
        verify = smame(["verify", "--truth", str(truth)], env, check=False)
        assert verify.returncode == 0, verify.stdout
        assert readings_in(db) == sent
    finally:
        cluster.nodes[leader].start()
        cluster.nodes[leader].wait()
        cluster.wait_clustered()
    wait_until(lambda: scrape(metrics).get(f'smame_broker_node_up{{node="{gone}"}}') == 1, 30)
    assert stop(proc) == 0


def test_a_rolling_restart_of_every_node_under_load_loses_nothing(cluster: RabbitCluster, workdir: Path) -> None:
    metrics = free_port()
    env = cluster_env(workdir, cluster, metrics)
    # a half hour of the fleet every half second for 48 s: the load goes on while the nodes restart
    proc, log, truth, sim = smame_and_fleet(workdir, env, FEW, days=2, speed=3600)
    db = workdir / "data" / "smame.db"
    wait_until(lambda: acknowledged(metrics) >= 500, 120, lambda: f"acknowledged {acknowledged(metrics)}")
    queue = queue_name(env["SMAME_BROKER__CLIENT_ID"])
    for node in cluster.nodes:  # as an operator upgrades them: one at a time, each back in the queue before the next
        node.stop()
        node.start()
        node.wait()
        cluster.wait_clustered()
        wait_until(
            lambda: cluster.queue(queue).get("online", "").count("@") == 3, 60, lambda: str(cluster.queue(queue))
        )
    assert sim.wait(300) == 0, (workdir / "simulate.log").read_text()[-2000:]
    sent = sent_of(workdir / "simulate.log")
    wait_until(lambda: readings_in(db) >= sent, 120, lambda: f"stored {readings_in(db)} of {sent}")
    assert stop(proc) == 0
    verify = smame(["verify", "--truth", str(truth)], env, check=False)
    assert verify.returncode == 0, verify.stdout
    assert readings_in(db) == sent
    assert len(re.findall(r"connected to 127\.0\.0\.1:\d+ as", log.read_text())) >= 2  # it followed the restarts


def test_a_leader_failover_and_a_broker_node_lost_at_once_lose_nothing(
    cluster: RabbitCluster, workdir: Path, postgres: PostgresDatabase
) -> None:
    url = postgres.fresh_url()
    envs = {
        name: cluster_env(workdir, cluster, free_port())
        | {"SMAME_DATA_DIR": str(workdir / name), "SMAME_STORAGE__URL": url, "SMAME_BROKER__CLIENT_ID": "smame-ha"}
        for name in ("a", "b")
    }
    fleet = ["--units", str(FEW), "--customers", "4"]
    smame(["simulate", *fleet, "--write-registry", str(workdir)], envs["a"])
    log_a, log_b = workdir / "a.log", workdir / "b.log"
    a = start_smame(envs["a"], log_a)
    wait_log(log_a, "subscribed to", 30)
    b = start_smame(envs["b"], log_b)
    wait_log(log_b, "standing by", 30)
    truth = workdir / "truth.jsonl"
    sim = simulate(envs["a"], fleet, truth, workdir / "simulate.log")
    wait_until(lambda: count(url, "readings") >= 3000, 120, lambda: f"stored {count(url, 'readings')}")
    victim = node_of(log_a, cluster)
    a.kill()  # the leading smame and the broker node it reads from, at once
    cluster.nodes[victim].kill()
    lost = time.monotonic()
    try:
        wait_until(lambda: "subscribed to" in log_b.read_text(), 30, lambda: log_b.read_text()[-2000:])
        took_over = time.monotonic() - lost
        assert node_of(log_b, cluster) != victim
        assert sim.wait(180) == 0, (workdir / "simulate.log").read_text()[-2000:]
        sent = sent_of(workdir / "simulate.log")
        wait_until(lambda: count(url, "readings") >= sent, 120, lambda: f"stored {count(url, 'readings')} of {sent}")
        assert stop(b) == 0
        verify = smame(["verify", "--truth", str(truth)], envs["b"], check=False)
        assert verify.returncode == 0, verify.stdout
        assert count(url, "readings") == sent  # each once
        assert took_over < 10, took_over
    finally:
        cluster.nodes[victim].start()
        cluster.nodes[victim].wait()
        cluster.wait_clustered()

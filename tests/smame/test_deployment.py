"""The compose stack, checked as far as this machine can without a Docker engine: the compose file validates,
Prometheus accepts its configuration and rules, the shipped smame settings load, every metric the rules and
the dashboard use exists, and the image installs smame the way the README documents."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from kernel.settings import load_settings
from monitoring.metrics import SmameCollector, Sources
from tests.helpers import ROOT, default_app, smame, smame_env


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: .ci/run installs it")
        pytest.skip(f"{name} is not installed (apt-get install {'prometheus' if name == 'promtool' else name})")
    return path


def test_compose_file_validates_with_a_provisioned_broker(tmp_path: Path) -> None:
    stack = tmp_path / "stack"
    stack.mkdir()
    shutil.copy(ROOT / "docker-compose.yml", stack)
    shutil.copytree(ROOT / "deploy", stack / "deploy", ignore=shutil.ignore_patterns("broker", "registry"))
    env = smame_env(tmp_path, 1883)
    smame(
        ["simulate", "--units", "20", "--customers", "2", "--write-registry", str(stack / "deploy" / "registry")], env
    )
    smame(
        [
            "provision",
            "--registry",
            str(stack / "deploy" / "registry" / "units.csv"),
            "--out",
            str(stack / "deploy" / "broker"),
            "--conf-dir",
            "/mosquitto/config",
            "--tls",
        ],
        env,
    )
    compose = tool("docker-compose")
    for args in ([], ["--profile", "simulator"], ["--profile", "ha"]):
        proc = subprocess.run([compose, *args, "config", "--services"], cwd=stack, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    # (Debian's docker-compose lists the services of every profile)
    assert set(proc.stdout.split()) >= {"mosquitto", "smame", "prometheus", "grafana", "mailpit", "simulator"}
    assert {"postgres", "smame-b"} <= set(proc.stdout.split())
    # both nodes share the store, the broker's client id and the settings; each has its own files
    (stack / ".env").write_text("SMAME_STORAGE_URL=postgresql://smame:pw@postgres:5432/smame\n")
    proc = subprocess.run([compose, "--profile", "ha", "config"], cwd=stack, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("SMAME_STORAGE__URL: postgresql://smame:pw@postgres:5432/smame") == 2
    assert "smame-b-data" in proc.stdout and "tcp_keepalives_idle=5" in proc.stdout
    # each node announces in its passive replies the ports published for it, each on the same port outside
    services = yaml.safe_load(proc.stdout)["services"]
    for name, wanted in (("smame", "60000-60099"), ("smame-b", "60100-60199")):
        announced = services[name]["environment"].get("SMAME_FTP__PASSIVE_PORTS", "60000-60099")
        low, high = (int(p) for p in announced.split("-"))
        mapped = {p["target"]: p["published"] for p in services[name]["ports"] if isinstance(p, dict)}
        assert announced == wanted and all(mapped.get(port) == port for port in range(low, high + 1)), name
    conf = (stack / "deploy" / "broker" / "mosquitto.conf").read_text()
    assert "password_file /mosquitto/config/passwd" in conf and "require_certificate true" in conf
    # the cluster profile: three RabbitMQ nodes, each its own name and data, sharing one secret; smame told to use them
    nodes = "mqtt://rabbitmq-1:1883,mqtt://rabbitmq-2:1883,mqtt://rabbitmq-3:1883"
    (stack / ".env").write_text(f"SMAME_BROKER_URL={nodes}\nSMAME_BROKER_KIND=rabbitmq\nSMAME_RABBITMQ_COOKIE=s3cret\n")
    proc = subprocess.run([compose, "--profile", "cluster", "config"], cwd=stack, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    rabbits = [services[f"rabbitmq-{i}"] for i in (1, 2, 3)]
    assert [r["hostname"] for r in rabbits] == ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"]
    assert len({str(r["volumes"]) for r in rabbits}) == 3
    assert {r["environment"]["RABBITMQ_ERLANG_COOKIE"] for r in rabbits} == {"s3cret"}
    assert services["smame"]["environment"]["SMAME_BROKER__URL"] == nodes
    assert services["smame"]["environment"]["SMAME_BROKER__KIND"] == "rabbitmq"
    rabbit_conf = (stack / "deploy" / "rabbitmq" / "rabbitmq.conf").read_text()
    for i in (1, 2, 3):
        assert f"cluster_formation.classic_config.nodes.{i} = rabbit@rabbitmq-{i}" in rabbit_conf


def test_prometheus_accepts_its_configuration_and_rules() -> None:
    promtool = tool("promtool")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        proc = subprocess.run([promtool, *args], cwd=ROOT / "deploy" / "prometheus", capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_rules_over_a_leader_and_a_standby_fire_from_the_leader_only() -> None:
    promtool = tool("promtool")
    proc = subprocess.run(
        [promtool, "test", "rules", "two_nodes_test.yml"],
        cwd=ROOT / "tests" / "smame" / "prometheus",
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def compose_environment() -> dict[str, str]:
    """The smame service's SMAME_ variables with the compose file's defaults filled in."""
    text = (ROOT / "docker-compose.yml").read_text()
    out = {}
    for name, value in re.findall(r"^\s+(SMAME_[A-Z0-9_]+): (.*)$", text, re.M):
        out[name] = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value.strip())
    return {k: v for k, v in out.items() if v}


def test_the_shipped_settings_load_with_the_compose_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = compose_environment()
    assert env["SMAME_BROKER__URL"] == "mqtt://mosquitto:1883"
    for key in [k for k in os.environ if k.startswith("SMAME_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = load_settings(ROOT / "deploy" / "smame.toml")
    assert s.registry.units == Path("/etc/smame/registry/units.csv") and s.mail.smtp_url == "smtp://mailpit:1025"
    assert s.data_dir == Path("/var/lib/smame") and s.ftp.masquerade_address == "127.0.0.1"


def test_every_metric_the_rules_and_dashboard_use_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = default_app(tmp_path, monkeypatch)
    try:
        registry = CollectorRegistry()
        assert app.monitor is not None and app.gateway is not None and app.exporter is not None
        registry.register(
            SmameCollector(
                Sources(
                    app.bridge.stats,
                    app.writer.totals,
                    lambda: 1,
                    app.exporter.stats,
                    app.gateway.accounts,
                    app.gateway.bans,
                    app.monitor,
                )
            )
        )
        # family names: a labelled family has no samples until something is counted
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        names = {m.name + s for m in registry.collect() for s in suffixes.get(m.type, [""])}
    finally:
        app.exporter.close()
        app.monitor.close()
    used = set(re.findall(r"smame_[a-z_]+", (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()))
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "smame.json").read_text())
    used |= {n for p in dashboard["panels"] for t in p["targets"] for n in re.findall(r"smame_[a-z_]+", t["expr"])}
    assert used and used <= names, used - names


def test_the_image_installs_smame_as_the_readme_says_and_pins_every_dependency() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    readme = (ROOT / "README.md").read_text()
    for command in ("pip install --no-cache-dir -r deploy/requirements.txt", "pip install --no-cache-dir --no-deps ."):
        assert command in dockerfile and command in readme, command
    pins = {
        re.split(r"==", line)[0].lower().replace("_", "-")
        for line in (ROOT / "deploy" / "requirements.txt").read_text().splitlines()
        if "==" in line
    }
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=;\[ ]", d)[0].lower().replace("_", "-") for d in wanted}
    assert names <= pins, names - pins


def test_the_image_copies_every_package_the_project_installs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\w+) \1$", dockerfile, re.M))
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {pattern.rstrip("*") for pattern in found["include"]}
    assert packages == {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages <= copied, packages - copied

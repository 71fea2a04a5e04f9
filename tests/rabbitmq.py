"""A private RabbitMQ cluster for tests and benchmarks: Debian's rabbitmq-server, three nodes (by default) on free
loopback ports, each with its own data directory, node name and Erlang cookie, clustered at first boot
(classic_config peer discovery), the MQTT and management plugins on, each persistent MQTT session on a quorum
queue. The system's own RabbitMQ is never touched."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

from smame.demo import free_port, wait_port

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the script itself: /usr/sbin's wrapper switches to its own user
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
START_S = 120.0


def available() -> bool:
    """Whether RabbitMQ is installed here."""
    return os.path.exists(SERVER) and shutil.which("erl") is not None


class RabbitNode:
    """One node: its name, its ports and its process (started by the cluster)."""

    def __init__(self, workdir: Path, name: str, cookie: str, config: str) -> None:
        self.name, self.cookie, self.dir = name, cookie, workdir
        self.amqp_port, self.mqtt_port, self.dist_port = free_port(), free_port(), free_port()
        self.http_port = free_port()  # the management API
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}\n"
            f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.http_port}\n" + config
        )
        (workdir / "enabled_plugins").write_text("[rabbitmq_mqtt,rabbitmq_management].\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The node's MQTT listener."""
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def management_url(self) -> str:
        """The node's management API (guest may use it from loopback)."""
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        """Start the node's process (not waiting for it)."""
        env = {
            **os.environ,
            "HOME": str(self.dir),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": f"-setcookie {self.cookie}",
        }
        (self.dir / "pid").unlink(missing_ok=True)
        with open(self.dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [SERVER], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait(self, seconds: float = START_S) -> None:
        """Wait until the node has booted: its listeners open before its definitions (users) are loaded, and a
        client that comes in between is turned away."""
        wait_port(self.mqtt_port, seconds)
        wait_port(self.http_port, seconds)
        self.ctl("await_startup", "--timeout", str(int(seconds)), timeout=seconds + 10)

    @property
    def pid(self) -> int | None:
        """The Erlang VM's process id (from its pid file), None before it has written it."""
        try:
            return int((self.dir / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """kill -9 the node: no goodbye to its peers or clients."""
        for pid in (self.pid, self.proc.pid if self.proc else None):
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc is not None:
            self.proc.wait(30)

    def stop(self) -> None:
        """Stop the node the way an operator does (rabbitmqctl stop), or kill it when it does not."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.ctl("stop", timeout=60)
            self.proc.wait(30)
        except (subprocess.SubprocessError, OSError):
            self.kill()

    def ctl(self, *args: str, timeout: float = 30) -> str:
        """Run rabbitmqctl against this node; its output."""
        done = subprocess.run(
            [CTL, "-n", self.name, "--erlang-cookie", self.cookie, *args],
            env={**os.environ, "HOME": str(self.dir)},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode:
            raise subprocess.CalledProcessError(done.returncode, args, done.stdout, done.stderr)
        return done.stdout


class RabbitCluster:
    """`size` RabbitMQ nodes clustered on loopback; `close` stops them all and removes nothing (the test's
    directory holds their logs)."""

    def __init__(self, workdir: Path, size: int = 3, config: str = "", anonymous: bool = True) -> None:
        tag = secrets.token_hex(3)
        cookie = secrets.token_hex(16)
        names = [f"smame{tag}r{i + 1}@localhost" for i in range(size)]
        common = (
            "mqtt.durable_queue_type = quorum\n"
            # as `smame provision` writes it: the default of 10 unacknowledged messages would hold smame's batches
            # of thousands to 10 telegrams each
            "mqtt.prefetch = 20000\n"
            f"mqtt.allow_anonymous = {str(anonymous).lower()}\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "cluster_formation.peer_discovery_backend = classic_config\n"
            + "".join(f"cluster_formation.classic_config.nodes.{i + 1} = {n}\n" for i, n in enumerate(names))
            + config
        )
        self.nodes = [RabbitNode(workdir / f"r{i + 1}", n, cookie, common) for i, n in enumerate(names)]
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                node.wait()
            self.wait_clustered()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """broker.url naming every node."""
        return ",".join(n.url for n in self.nodes)

    def wait_clustered(self, seconds: float = START_S) -> None:
        """Wait until every running node sees all the others running."""
        deadline = time.monotonic() + seconds
        running = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        while True:
            try:
                status = running[0].ctl("cluster_status", "--formatter", "json")
                if all(n.name in status.split('"running_nodes"')[1].split("]")[0] for n in running):
                    return
            except (subprocess.SubprocessError, OSError, IndexError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"RabbitMQ nodes did not form a cluster within {seconds:.0f} s")
            time.sleep(0.5)

    def queue(self, name: str) -> dict[str, str]:
        """A queue's type, messages, leader, members and those online, as the first running node sees them ({} if
        none)."""
        node = next(n for n in self.nodes if n.proc is not None and n.proc.poll() is None)
        columns = ("name", "type", "messages", "leader", "members", "online")
        out = node.ctl("list_queues", *columns, "--no-table-headers", "-q")
        for line in out.splitlines():
            cells = line.split("\t")
            if cells[0] == name:
                return dict(zip(columns, cells, strict=False))
        return {}

    def close(self) -> None:
        """Stop every node (killed: nothing of theirs is kept)."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.kill()

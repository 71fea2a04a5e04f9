"""What a node sees of the broker's cluster (docs/cluster.md): whether each of its nodes takes a connection, and,
with RabbitMQ's management API, the replicas of smame's queue and which of them leads. Looked at every
`broker.watch_s`; read by /healthz, the metrics, the console's nodes panel (through the node's beat) and the
monitor's `broker_cluster` alert."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from broker_bridge.bridge import BrokerTarget, probe_node

log = logging.getLogger("smame.cluster")
MANAGEMENT_TIMEOUT_S = 5.0
ANSWER_MAX = 1 << 20  # a queue's description is a few KiB; more is not read


@dataclass
class NodeSeen:
    """One broker node as last looked at."""

    up: bool
    since: float  # when it went up or down, as far as this node saw (epoch)
    error: str = ""  # why it did not take the connection


@dataclass
class QueueSeen:
    """smame's queue on a RabbitMQ cluster: its replicas (members), those online, the leader, what waits in it."""

    leader: str = ""
    members: list[str] = field(default_factory=list)
    online: list[str] = field(default_factory=list)
    messages: int = 0
    error: str = ""  # why the management API did not say


def queue_name(client_id: str) -> str:
    """The queue RabbitMQ's MQTT plugin keeps a persistent QoS 1 session's messages in."""
    return f"mqtt-subscription-{client_id}qos1"


def parse_queue(body: bytes) -> QueueSeen:
    """A queue's replicas and leader from the management API's answer (GET /api/queues/{vhost}/{name}); ValueError
    when it is no JSON object (a field of the wrong type counts as absent)."""
    q = json.loads(body)
    if not isinstance(q, dict):
        raise ValueError("not a JSON object")
    members, online = q.get("members"), q.get("online")
    members = [str(m) for m in members] if isinstance(members, list) else []
    online = [str(m) for m in online] if isinstance(online, list) else []
    messages = q.get("messages")
    return QueueSeen(str(q.get("leader") or ""), members, online, messages if isinstance(messages, int) else 0)


class ClusterWatch:
    """Looks at the broker's nodes (and smame's queue, with `management_url`) every `every_s`."""

    def __init__(
        self,
        target: BrokerTarget,
        management_url: str | None,
        every_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.target = target
        self.management_url = management_url.rstrip("/") if management_url else None
        self.every_s = every_s
        self.clock = clock
        self.nodes: dict[str, NodeSeen] = {}
        self.queue: QueueSeen | None = None

    async def run(self) -> None:
        """Look now and every `every_s` until cancelled."""
        while True:
            await self.look()
            await asyncio.sleep(self.every_s)

    async def look(self) -> None:
        """Probe every node at once, then ask the management API about smame's queue."""
        now = self.clock()
        errors = await asyncio.gather(*(probe_node(self.target, n, "watch") for n in self.target.nodes))
        for (host, port), error in zip(self.target.nodes, errors, strict=True):
            name, up = f"{host}:{port}", not error
            seen = self.nodes.get(name)
            if seen is None or seen.up != up:
                if seen is not None:
                    log.warning("broker node %s is %s", name, "up again" if up else f"unreachable: {error}")
                seen = self.nodes[name] = NodeSeen(up, now)
            seen.error = error
        if self.management_url is not None:
            loop = asyncio.get_running_loop()
            try:
                self.queue = await loop.run_in_executor(None, self._ask_queue)
            except Exception as exc:  # unreachable, refused, garbled: said, not raised
                self.queue = QueueSeen(error=f"{type(exc).__name__}: {exc}"[:300])

    def _ask_queue(self) -> QueueSeen:
        assert self.management_url is not None
        url = f"{self.management_url}/api/queues/%2F/{urllib.parse.quote(queue_name(self.target.client_id), safe='')}"
        request = urllib.request.Request(url)
        if self.target.username is not None:
            pair = f"{self.target.username}:{self.target.password or ''}".encode()
            request.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
        with urllib.request.urlopen(request, timeout=MANAGEMENT_TIMEOUT_S) as answer:
            return parse_queue(answer.read(ANSWER_MAX))

    def problems(self, down_after_s: float) -> list[str]:
        """What an operator must hear of: nodes unreachable for over `down_after_s`, a queue with replicas
        offline or no leader. Each a sentence."""
        now = self.clock()
        out = [
            f"broker node {name} unreachable for {(now - seen.since) / 60:.0f} min: {seen.error}"
            for name, seen in sorted(self.nodes.items())
            if not seen.up and now - seen.since > down_after_s
        ]
        q = self.queue
        if q is not None and not q.error:
            offline = sorted(set(q.members) - set(q.online))
            if offline:
                out.append(
                    f"smame's queue has {len(q.online)} of {len(q.members)} replicas online ({', '.join(offline)} "
                    "offline): one more node lost and it stops"
                    if len(q.online) * 2 > len(q.members)
                    else f"smame's queue has {len(q.online)} of {len(q.members)} replicas online: no majority, "
                    "ingest stops until a node is back"
                )
            if not q.leader:
                out.append("smame's queue has no leader")
        return out

    def node_states(self) -> dict[str, bool]:
        """Each node (host:port) and whether it took a connection when last looked at."""
        return {name: seen.up for name, seen in self.nodes.items()}

    def queue_state(self) -> tuple[str, int, int] | None:
        """smame's queue: its leader, replicas and replicas online (None: no management API, or it did not say)."""
        q = self.queue
        return None if q is None or q.error else (q.leader, len(q.members), len(q.online))

    def about(self) -> dict[str, object]:
        """The cluster as /healthz and the node's beat show it."""
        out: dict[str, object] = {
            "nodes": {
                name: "up"
                if seen.up
                else f"unreachable since {datetime.fromtimestamp(seen.since, UTC):%Y-%m-%dT%H:%M:%SZ}: {seen.error}"
                for name, seen in self.nodes.items()
            }
        }
        if self.queue is not None:
            q = self.queue
            out["queue"] = (
                {"error": q.error}
                if q.error
                else {"leader": q.leader, "members": q.members, "online": q.online, "messages": q.messages}
            )
        return out

"""What the broker's cluster watch tells an operator, from what it saw (the real cluster: test_cluster.py)."""

from __future__ import annotations

import asyncio

import pytest

from broker_bridge.bridge import BrokerTarget
from broker_bridge.cluster import ClusterWatch, NodeSeen, QueueSeen, parse_queue
from tests.helpers import free_port


def watch(now: list[float], management: str | None = None) -> ClusterWatch:
    target = BrokerTarget(
        nodes=(("127.0.0.1", free_port()), ("127.0.0.1", free_port())),
        client_id="smame-ingest",
        username=None,
        password=None,
        topic="smame/v1/+/reading",
        session_expiry=60,
        keepalive=30,
        batch_size=10,
        batch_delay=0.05,
        reconnect_min=0.1,
        reconnect_max=1.0,
    )
    return ClusterWatch(target, management, 15, lambda: now[0])


def test_a_node_down_is_told_only_past_the_grace_and_a_queue_short_of_replicas_says_what_is_left() -> None:
    now = [1000.0]
    w = watch(now)
    w.nodes = {"mq1:1883": NodeSeen(True, 0), "mq2:1883": NodeSeen(False, 990, "connection refused")}
    assert w.problems(30) == []  # down for 10 s: a restart may be under way
    now[0] = 1100
    assert w.problems(30) == ["broker node mq2:1883 unreachable for 2 min: connection refused"]
    w.queue = QueueSeen("r1", ["r1", "r2", "r3"], ["r1", "r3"], 5)
    assert w.problems(300)[0].startswith("smame's queue has 2 of 3 replicas online (r2 offline): one more node")
    w.queue = QueueSeen("", ["r1", "r2", "r3"], ["r1"], 5)
    assert w.problems(300) == [
        "smame's queue has 1 of 3 replicas online: no majority, ingest stops until a node is back",
        "smame's queue has no leader",
    ]
    assert w.node_states() == {"mq1:1883": True, "mq2:1883": False}
    assert w.queue_state() == ("", 3, 1)


@pytest.mark.parametrize("body", [b"[]", b"not json", b"\xff" * 100, b"null"])
def test_a_management_answer_that_is_no_object_is_refused_with_a_reason(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_queue(body)


def test_fields_of_the_wrong_type_count_as_absent() -> None:
    assert parse_queue(b'{"members": 3, "online": "r1", "leader": null, "messages": "9"}') == QueueSeen()


async def test_nodes_that_refuse_are_down_and_an_unreachable_management_api_is_said() -> None:
    w = watch([1000.0], management=f"http://127.0.0.1:{free_port()}")
    await asyncio.wait_for(w.look(), 15)
    assert set(w.node_states().values()) == {False}
    assert w.queue is not None and "Connection refused" in w.queue.error
    assert w.queue_state() is None
    assert "queue" in w.about() and w.about()["queue"] == {"error": w.queue.error}

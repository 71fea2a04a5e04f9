"""Commands to units: their arguments and answers (kernel.commands) and how the store keeps them, on both backends."""

from __future__ import annotations

import json
import random
from pathlib import Path

import msgspec
import pytest

from aggregator.backends import open_url
from aggregator.store import CommandRow
from kernel.commands import (
    ANSWER_MAX,
    REFUSALS,
    AnswerRefused,
    CommandError,
    State,
    check_args,
    command_payload,
    parse_arg_pairs,
    read_answer,
)
from tests.databases import sqlite_plan

NOW = 1_800_000_000


def test_each_operation_takes_its_arguments_and_names_what_is_wrong() -> None:
    assert check_args("ping", {}) == {}
    assert check_args("set", parse_arg_pairs(["interval_min=15", "brokers=mqtts://a:8883, mqtts://b:8883"])) == {
        "interval_min": 15,
        "brokers": ["mqtts://a:8883", "mqtts://b:8883"],
    }
    assert check_args("resend", {"from": "2026-12-01T00:00:00+09:00", "to": "2026-12-01T06:00:00+09:00"}) == {
        "from": "2026-12-01T00:00:00+09:00",
        "to": "2026-12-01T06:00:00+09:00",
    }
    sha = "ab" * 32
    assert check_args("fw", {"version": "2.4.0", "url": "https://x/fw.bin", "sha256": sha, "size": 10})["size"] == 10
    for op, args, words in [
        ("format", {}, "unknown operation"),
        ("ping", {"x": 1}, "takes no arguments"),
        ("set", {}, "at least one of"),
        ("set", {"interval_min": 7}, "interval_min 7"),
        ("set", {"brokers": "ftp://a"}, "no mqtt://"),
        ("set", {"colour": "red"}, "colour"),
        ("resend", {"from": "2026-12-02T00:00:00+09:00", "to": "2026-12-01T00:00:00+09:00"}, "before to"),
        ("resend", {"from": "2026-12-01T00:00:00", "to": "2026-12-01T06:00:00"}, "offset"),
        ("fw", {"version": "2.4.0", "url": "https://x", "sha256": "nope", "size": 1}, "sha256"),
    ]:
        with pytest.raises(CommandError, match=words):
            check_args(op, args)
    with pytest.raises(CommandError, match="key=value"):
        parse_arg_pairs(["interval_min"])


def test_a_units_answer_is_read_or_refused_with_a_reason_never_raised() -> None:
    ok = read_answer("smame/v1/U1/res", b'{"v":1,"id":"c1","status":"done","detail":"fine","state":{"fw":"2"}}')
    assert not isinstance(ok, AnswerRefused)
    assert (ok.unit, ok.id, ok.status, ok.detail, ok.state) == ("U1", "c1", "done", "fine", '{"fw":"2"}')
    # a state the decoder only skipped over: bytes that are no UTF-8 inside it are found here, not in the store
    odd = read_answer("smame/v1/U1/res", b'{"v":1,"id":"c1","status":"done","state":{"a":"\xff"}}')
    assert not isinstance(odd, AnswerRefused) and odd.status == "done" and "not kept" in odd.state
    for topic, payload, words in [
        ("smame/v1/U1/reading", b"{}", "not a unit's answer topic"),
        ("smame/v1/U1/res", b"x" * (ANSWER_MAX + 1), "over the"),
        ("smame/v1/U1/res", b"[1]", "not an answer"),
        ("smame/v1/U1/res", b'{"v":2,"id":"c1","status":"done"}', "unknown version"),
        ("smame/v1/U1/res", b'{"v":1,"id":"c 1","status":"done"}', "command id"),
        ("smame/v1/U1/res", b'{"v":1,"id":"c1","status":"great"}', "unknown status"),
    ]:
        got = read_answer(topic, payload)
        assert isinstance(got, AnswerRefused) and words in got.detail and got.reason in REFUSALS
    rng = random.Random(7)
    good = b'{"v":1,"id":"c1","status":"done","detail":"d","state":{"a":[1,2]}}'
    for _ in range(3000):  # cut, flipped and spliced answers: each read or refused
        b = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        got = read_answer("smame/v1/U1/res", bytes(b[: rng.randint(0, len(b))]))
        if isinstance(got, AnswerRefused):  # each refusal under one of a few reasons: a metric's label, bounded
            assert got.reason in REFUSALS
            continue
        assert got.status in ("accepted", "done", "failed", "rejected")
        if got.state:  # what the store is given is an object's JSON text
            assert "not kept" in got.state or isinstance(msgspec.json.decode(got.state), dict)


def test_a_command_is_sent_as_the_contract_says() -> None:
    sent = msgspec.json.decode(command_payload("c1", "set", {"interval_min": 15}, NOW))
    assert sent == {"v": 1, "id": "c1", "op": "set", "args": {"interval_min": 15}, "expires": "2027-01-15T08:00:00Z"}


def row(command_id: str, unit: str, expires: int = NOW + 3600, op: str = "ping") -> CommandRow:
    return CommandRow(command_id, unit, op, "{}", NOW, expires, "cli:alice", "host1", State.QUEUED, NOW, NOW, 0, "", "")


def test_the_store_keeps_commands_through_their_states(store_url: str) -> None:
    with open_url(store_url) as store:
        store.add_commands(
            [row("c1", "U1"), row("c2", "U2"), row("c3", "U3", expires=NOW + 10), row("c4", "U4")],
            [(NOW, "cli:alice", "host1", "command ping", "U1", "c1")],
        )
        assert [c.id for c in store.due_commands(NOW, 10)] == ["c1", "c2", "c3", "c4"]
        assert len(store.due_commands(NOW, 2)) == 2
        # c1 taken by the broker; c2's unit had no session: queued, due again later
        store.commands_published([("c1", True, "", 0), ("c2", False, "no session", NOW + 300)], NOW)
        assert store.command("c1").state == State.SENT  # type: ignore[union-attr]
        c2 = store.command("c2")
        assert c2 is not None and (c2.state, c2.tries, c2.detail) == (State.QUEUED, 1, "no session")
        assert [c.id for c in store.due_commands(NOW + 1, 10)] == ["c3", "c4"]
        assert "c2" in [c.id for c in store.due_commands(NOW + 300, 10)]

        ok = read_answer("smame/v1/U1/res", b'{"v":1,"id":"c1","status":"done","state":{"fw":"2.3.0"}}')
        stray = read_answer("smame/v1/U9/res", b'{"v":1,"id":"c4","status":"done"}')  # another unit's command
        assert not isinstance(ok, AnswerRefused) and not isinstance(stray, AnswerRefused)
        assert store.answer_commands([ok, stray], NOW + 2) == [True, False]
        c1 = store.command("c1")
        assert c1 is not None and (c1.state, json.loads(c1.answer)) == (State.DONE, {"fw": "2.3.0"})
        late = read_answer("smame/v1/U1/res", b'{"v":1,"id":"c1","status":"accepted"}')
        assert not isinstance(late, AnswerRefused)
        assert store.answer_commands([late], NOW + 3) == [False]  # after its final answer: nothing changes

        assert store.expire_commands(NOW + 10) == ["c3"]
        after = read_answer("smame/v1/U3/res", b'{"v":1,"id":"c3","status":"done","detail":"late"}')
        assert not isinstance(after, AnswerRefused)
        assert store.answer_commands([after], NOW + 11) == [True]  # what the unit did wins over the expiry
        assert store.command("c3").state == State.DONE  # type: ignore[union-attr]

        assert store.cancel_command("c4", NOW + 12, "cli:bob", "host2")
        assert not store.cancel_command("c1", NOW + 12, "cli:bob", "host2")  # in the unit's hands already
        assert [c.id for c in store.commands("U4")] == ["c4"]
        actions = [(who, action, target) for _, _, who, _, action, target, _ in store.audit()]
        assert actions[0] == ("cli:bob", "command cancelled", "c4")
        assert ("unit U1", "command done", "c1") in actions and ("smame", "command expired", "c3") in actions
        assert ("smame", "command sent", "c1") in actions and ("cli:alice", "command ping", "U1") in actions


def test_the_scheduled_look_for_due_commands_seeks_the_queue_not_every_command(tmp_path: Path) -> None:
    with open_url(f"sqlite:///{tmp_path / 's.db'}") as store:
        due = "SELECT id FROM commands WHERE state = 'queued' AND next_try <= ? AND expires > ? ORDER BY next_try, id"
        assert "commands_due" in sqlite_plan(store, due + " LIMIT ?", (NOW, NOW, 10))
        lapsed = "SELECT id FROM commands WHERE state IN ('queued', 'sent') AND expires <= ?"
        assert "commands_open" in sqlite_plan(store, lapsed, (NOW,))


def test_an_answer_with_any_text_a_unit_can_send_is_kept_on_both_backends(store_url: str) -> None:
    with open_url(store_url) as store:
        store.add_commands([row("c1", "U1")], [])
        payload = b'{"v":1,"id":"c1","status":"failed","detail":"nul \\u0000 here \xe2\x9c\x93"}'
        a = read_answer("smame/v1/U1/res", payload)
        assert not isinstance(a, AnswerRefused)
        assert store.answer_commands([a], NOW + 1) == [True]
        kept = store.command("c1")
        assert kept is not None and (kept.state, kept.detail) == (State.FAILED, "nul  here \u2713")


def test_commands_are_listed_by_unit_and_state_and_ended_ones_are_forgotten_after_their_keep(store_url: str) -> None:
    day = 86400
    with open_url(store_url) as store:
        old = store.queue_commands("ping", "{}", ["U1", "U2"], NOW - 500 * day, NOW - 499 * day, "cli:alice", "h")
        recent = store.queue_commands("reboot", "{}", ["U1"], NOW - day, NOW + day, "console:bob", "203.0.113.9")
        assert len({c.id for c in old + recent}) == 3  # a new id each
        assert [c.id for c in store.commands("U1")] == [recent[0].id, old[0].id]  # newest first
        store.expire_commands(NOW - 499 * day)  # the old ones ended long ago, ...
        waiting = store.queue_commands("ping", "{}", ["U3"], NOW - 450 * day, NOW + day, "cli:alice", "h")
        assert {c.id for c in store.commands(state=State.EXPIRED)} == {old[0].id, old[1].id}
        assert [c.unit for c in store.commands("U1", state=State.QUEUED)] == ["U1"]

        # the audit log is searched by who, action, target or the start of its detail
        assert {e[2] for e in store.audit(about="console:bob")} == {"console:bob"}
        assert [e[5] for e in store.audit(about="command reboot")] == ["U1"]
        assert [e[4] for e in store.audit(about=recent[0].id)] == ["command reboot"]
        assert store.audit(about="nobody") == []
        newest = store.audit(limit=1)
        assert store.audit(limit=1, before_id=newest[0][0])[0][0] < newest[0][0]

        # a year and more later: the ended commands and old entries go, a command still waiting stays
        # entries: the old ones asked and expired (4), the waiting one asked (1)
        assert store.prune_commands(NOW - 400 * day) == (2, 5)
        assert {c.id for c in store.commands(limit=10)} == {recent[0].id, waiting[0].id}
        assert all(e[1] >= NOW - 400 * day for e in store.audit())
        assert store.prune_commands(NOW - 400 * day) == (0, 0)

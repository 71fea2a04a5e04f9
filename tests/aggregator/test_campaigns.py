"""Firmware campaigns: the plan's rules (kernel.firmware) and the leader's pass (aggregator.campaigns) on both
backends, the units' answers given through the store as the commands' service keeps them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from aggregator.backends import open_url
from aggregator.campaigns import campaign_pass, change_phase, create_campaign
from aggregator.store import Store
from kernel.commands import AnswerRefused, CommandError, State, read_answer
from kernel.firmware import Phase, Plan, Step, check_plan, should_abort, to_start, unit_token, wave_sizes
from kernel.registry import Registry, load_registry
from tests.helpers import write_registry

NOW = 1_800_000_000
IMAGE = bytes(range(256)) * 40
BASE = "https://smame.example.jp:8443"


def test_waves_start_one_after_another_and_a_rate_fills_each_minute() -> None:
    plan = check_plan([1, 10, 50, 100], 0, 3600, 0.1, 10)
    assert wave_sizes(plan, 1000) == [10, 100, 500, 1000]
    assert wave_sizes(plan, 50) == [1, 5, 25, 50]  # a wave tries one unit at least
    sizes = wave_sizes(plan, 1000)
    assert to_start(plan, sizes, 1000, 0, 0, 0) == 10
    assert to_start(plan, sizes, 1000, 10, 3, 0) == 0  # the first wave has not ended
    assert to_start(plan, sizes, 1000, 10, 0, 0) == 90
    assert to_start(plan, sizes, 1000, 100, 0, 0) == 400
    assert to_start(plan, sizes, 1000, 1000, 0, 0) == 0
    rate = check_plan([], 30, 3600, 0.1, 10)
    assert to_start(rate, wave_sizes(rate, 1000), 1000, 40, 25, 12) == 18  # 30 a minute, 12 started in it
    for args, words in [
        (([10, 5, 100], 0, 3600, 0.1, 10), "rising"),
        (([1, 10], 0, 3600, 0.1, 10), "the last 100"),
        (([100], 0, 4, 0.1, 10), "timeout"),
        (([100], 0, 3600, 0.0, 10), "abort share"),
        (([100], -1, 3600, 0.1, 10), "rate"),
    ]:
        with pytest.raises(CommandError, match=words):
            check_plan(*args)  # type: ignore[arg-type]


def test_a_campaign_aborts_once_enough_units_ended_and_too_many_failed() -> None:
    plan = Plan(abort_share=0.2, abort_min=10)
    assert should_abort(plan, {Step.FAILED: 5, Step.DONE: 4}) == ""  # 9 ended: not judged yet
    assert should_abort(plan, {Step.FAILED: 2, Step.DONE: 8}) == ""  # 20%: not over it
    assert should_abort(plan, {Step.FAILED: 3, Step.DONE: 8, Step.SENT: 50}).startswith("3 of 11 units ended failed")


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    write_registry(tmp_path, {f"U{i:02}": "C1" if i < 20 else "C2" for i in range(30)})
    return load_registry(tmp_path / "units.csv", tmp_path / "customers.toml")


def answer(
    store: Store, unit: str, command_id: str, status: str, state: str = "null", detail: str = "", at: int = NOW + 15
) -> None:
    payload = json.dumps({"v": 1, "id": command_id, "status": status, "detail": detail})[:-1] + f',"state":{state}}}'
    a = read_answer(f"smame/v1/{unit}/res", payload.encode())
    assert not isinstance(a, AnswerRefused)
    store.answer_commands([a], at)


def fw_commands(store: Store, campaign: str) -> dict[str, tuple[str, dict[str, object]]]:
    return {
        c.unit: (c.id, json.loads(c.args))
        for c in store.commands(limit=1000)
        if c.op == "fw" and c.who == f"smame:campaign {campaign}"
    }


def test_a_campaign_runs_in_waves_judges_its_units_and_ends(store_url: str, registry: Registry) -> None:
    with open_url(store_url) as store:
        with pytest.raises(CommandError, match="no firmware '2.4.0'"):
            create_campaign(store, registry, "2.4.0", {"customer": "C1"}, Plan(), NOW, "cli:alice", "h")
        store.add_firmware("2.4.0", hashlib.sha256(IMAGE).hexdigest(), IMAGE, NOW, "cli:alice", "h")
        assert store.firmware_image("2.4.0") == IMAGE
        plan = check_plan([10, 100], 0, 3600, 0.5, 4)
        c = create_campaign(store, registry, "2.4.0", {"customer": "C1"}, plan, NOW, "cli:alice", "h")
        assert c.total == 20 and store.campaign_counts(c.id) == {Step.PENDING: 20}

        assert campaign_pass(store, NOW, BASE) == [f"campaign {c.id}: 2 units started"]
        first = fw_commands(store, c.id)
        assert len(first) == 2
        unit, (command_id, args) = next(iter(first.items()))
        assert args == {
            "version": "2.4.0",
            "url": f"{BASE}/fw/{c.id}/{unit}/{unit_token(c.secret, c.id, unit)}.bin",
            "sha256": hashlib.sha256(IMAGE).hexdigest(),
            "size": len(IMAGE),
        }
        assert campaign_pass(store, NOW + 5, BASE) == []  # the first wave has not ended
        other, (other_id, _) = list(first.items())[1]
        answer(store, unit, command_id, "accepted")
        answer(store, unit, command_id, "done", '{"fw":"2.4.0"}')
        answer(store, other, other_id, "failed", "null", "verify: sha256 differs")
        campaign_pass(store, NOW + 10, BASE)  # both judged; the second wave begins
        done = {u: (st, stage) for _, u, st, _, _, stage, _ in store.campaign_units(c.id) if st != Step.PENDING}
        assert done[unit] == (Step.DONE, "") and done[other] == (Step.FAILED, "verify")
        assert sum(st == Step.SENT for st, _ in done.values()) == 18

        # a unit answering done on its old version did not boot the new one; a lost answer is asked for
        fws = fw_commands(store, c.id)
        rest = [u for u, (st, _) in done.items() if st == Step.SENT]
        answer(store, rest[0], fws[rest[0]][0], "done", '{"fw":"2.3.0"}')
        for u in rest[1:4]:
            answer(store, u, fws[u][0], "done", '{"fw":"2.4.0"}')
        campaign_pass(store, NOW + 20, BASE)
        counts = store.campaign_counts(c.id)
        assert (counts[Step.DONE], counts[Step.FAILED], counts[Step.SENT]) == (4, 2, 14)
        failed = {u: stage for _, u, _, _, _, stage, _ in store.campaign_units(c.id, Step.FAILED)}
        assert failed[rest[0]] == "boot"

        # past the timeout, the rest are asked their version: one says the new (its answer was lost), the others
        # never answer and fail; more than half failed once four ended: the campaign aborts
        campaign_pass(store, NOW + 3700, BASE)
        probes = {c.unit: c.id for c in store.commands(limit=1000) if c.op == "ping"}
        assert set(probes) == set(rest[4:])
        answer(store, rest[4], probes[rest[4]], "done", '{"fw":"2.4.0","interval_min":30}', at=NOW + 3700)
        said = campaign_pass(store, NOW + 3701, BASE)
        assert store.campaign_counts(c.id)[Step.DONE] == 5
        store.expire_commands(NOW + 3700 + 600)
        said = campaign_pass(store, NOW + 4400, BASE)
        assert said[0].startswith(f"campaign {c.id} aborted: 15 of 20 units ended failed")
        got = store.campaign(c.id)
        assert got is not None and got.phase == Phase.ABORTED
        timed_out = {stage for _, _, _, _, _, stage, _ in store.campaign_units(c.id, Step.FAILED)}
        assert timed_out == {"verify", "boot", "timeout"}


def test_an_operator_pauses_resumes_and_cancels_and_nothing_queued_is_sent_after(
    store_url: str, registry: Registry
) -> None:
    with open_url(store_url) as store:
        store.add_firmware("2.4.0", hashlib.sha256(IMAGE).hexdigest(), IMAGE, NOW, "cli:alice", "h")
        c = create_campaign(store, registry, "2.4.0", {"units": ["U01", "U02", "U03"]}, Plan(), NOW, "cli:a", "h")
        assert change_phase(store, c.id, "pause", NOW, "console:bob", "203.0.113.9") == Phase.PAUSED
        assert campaign_pass(store, NOW, BASE) == []  # paused: nothing started
        with pytest.raises(CommandError, match="is paused: it cannot pause"):
            change_phase(store, c.id, "pause", NOW, "console:bob", "h")
        assert change_phase(store, c.id, "resume", NOW, "console:bob", "h") == Phase.RUNNING
        campaign_pass(store, NOW + 1, BASE)
        fws = fw_commands(store, c.id)
        assert len(fws) == 3
        store.commands_published([(fws["U01"][0], True, "", 0)], NOW + 2)  # one with the broker, two queued
        assert change_phase(store, c.id, "cancel", NOW + 3, "console:bob", "h") == Phase.CANCELLED
        assert {u: store.command(i).state for u, (i, _) in fws.items()} == {  # type: ignore[union-attr]
            "U01": State.SENT,
            "U02": State.CANCELLED,
            "U03": State.CANCELLED,
        }
        assert store.campaign_counts(c.id) == {Step.SENT: 1, Step.SKIPPED: 2}
        assert store.due_commands(NOW + 10, 10) == []
        with pytest.raises(CommandError, match="no campaign"):
            change_phase(store, "nope", "cancel", NOW, "console:bob", "h")
        actions = [a for _, _, _, _, a, _, _ in store.audit(about=c.id)]
        assert actions[:4] == ["campaign cancelled", "campaign running", "campaign paused", "campaign started"]


def test_a_campaign_targets_the_units_on_a_version_and_starts_them_at_its_rate(
    store_url: str, registry: Registry
) -> None:
    with open_url(store_url) as store:
        store.add_firmware("2.4.0", hashlib.sha256(IMAGE).hexdigest(), IMAGE, NOW, "cli:alice", "h")
        pings = store.queue_commands("ping", "{}", ["U01", "U02", "U21"], NOW, NOW + 600, "cli:alice", "h")
        for c, fw in zip(pings, ("2.3.0", "2.2.9", "2.3.0"), strict=True):
            answer(store, c.unit, c.id, "done", f'{{"fw":"{fw}"}}')
        with pytest.raises(CommandError, match="holds no unit"):
            create_campaign(store, registry, "2.4.0", {"from_version": "1.0"}, Plan(), NOW, "cli:a", "h")
        plan = check_plan([], 1, 3600, 0.5, 10)  # one unit a minute
        c = create_campaign(store, registry, "2.4.0", {"from_version": "2.3.0"}, plan, NOW, "cli:a", "h")
        assert sorted(u for _, u, *_ in store.campaign_units(c.id)) == ["U01", "U21"]
        assert campaign_pass(store, NOW, BASE) == [f"campaign {c.id}: 1 units started"]
        assert campaign_pass(store, NOW + 30, BASE) == []  # the minute's one is out
        assert campaign_pass(store, NOW + 61, BASE) == [f"campaign {c.id}: 1 units started"]

"""Desired configuration (aggregator.desired) on both backends: the scopes merged, the reported configuration kept
from answers, and `set` sent when it differs, not again while it is open or after a refusal until the unit comes
back online or the wanted configuration changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.backends import open_url
from aggregator.desired import WHO, check_target, config_pass, steps_now, wanted
from aggregator.store import Store
from kernel.commands import AnswerRefused, CommandError, read_answer
from kernel.reading import Status
from kernel.registry import Registry, load_registry
from kernel.settings import DevicesSettings
from tests.helpers import write_registry

NOW = 1_800_000_000
SETTINGS = DevicesSettings()


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    write_registry(tmp_path, {"U1": "C1", "U2": "C1", "U3": "C2"})
    units = tmp_path / "units.csv"
    units.write_text("unit_id,customer_id,group\nU1,C1,roof\nU2,C1,\nU3,C2,roof\n")
    return load_registry(units, tmp_path / "customers.toml")


def answer(store: Store, unit: str, command_id: str, status: str, state: str, at: int) -> None:
    payload = f'{{"v":1,"id":"{command_id}","status":"{status}","state":{state}}}'
    a = read_answer(f"smame/v1/{unit}/res", payload.encode())
    assert not isinstance(a, AnswerRefused)
    assert store.answer_commands([a], at) == [True]


def test_the_narrower_scope_wins_key_by_key(registry: Registry) -> None:
    desired = {
        ("fleet", ""): {"interval_min": 30, "diag_every": 1},
        ("customer", "C1"): {"interval_min": 15},
        ("group", "roof"): {"diag_every": 4},
        ("unit", "U2"): {"interval_min": 60},
    }
    units = registry.units
    assert wanted(units["U1"], desired) == {"interval_min": 15, "diag_every": 4}
    assert wanted(units["U2"], desired) == {"interval_min": 60, "diag_every": 1}
    assert wanted(units["U3"], desired) == {"interval_min": 30, "diag_every": 4}
    assert check_target(registry, "group", "roof") == "roof" and check_target(registry, "fleet", "x") == ""
    for scope, target, words in [
        ("group", "attic", "no unit's group"),
        ("customer", "C9", "customer 'C9'"),
        ("unit", "U9", "unit 'U9'"),
        ("rack", "", "scope 'rack'"),
    ]:
        with pytest.raises(CommandError, match=words):
            check_target(registry, scope, target)


def test_units_out_of_step_are_sent_set_once_and_again_only_when_back_online(
    store_url: str, registry: Registry
) -> None:
    with open_url(store_url) as store:
        assert config_pass(store, registry, NOW, SETTINGS) == []  # nothing wanted: nothing sent
        store.want("customer", "C1", {"interval_min": 15}, "cli:alice", "h", NOW)
        store.want("group", "roof", {"diag_every": 4}, "console:bob", "203.0.113.9", NOW)
        sent = {c.unit: c for c in config_pass(store, registry, NOW, SETTINGS)}
        assert {u: c.args for u, c in sent.items()} == {
            "U1": '{"diag_every":4,"interval_min":15}',  # never reported: all it wants
            "U2": '{"interval_min":15}',
            "U3": '{"diag_every":4}',
        }
        assert all(c.op == "set" and c.who == WHO for c in sent.values())
        assert config_pass(store, registry, NOW + 60, SETTINGS) == []  # open: not sent twice

        answer(store, "U1", sent["U1"].id, "done", '{"interval_min":15,"diag_every":4,"brokers":[]}', NOW + 1)
        answer(store, "U2", sent["U2"].id, "done", '{"interval_min":15,"diag_every":1}', NOW + 1)
        answer(store, "U3", sent["U3"].id, "rejected", "null", NOW + 1)  # its firmware cannot
        steps = steps_now(store, registry)
        assert [(s.unit, s.differs, s.last_try[3] if s.last_try else None) for s in steps] == [
            ("U3", {"diag_every": 4}, "rejected")
        ]
        assert config_pass(store, registry, NOW + 120, SETTINGS) == []  # refused: not asked over and over

        # U3 comes back online (a site visit, new firmware): asked again; so is U1 when what is wanted changes
        store.record_statuses([Status("U3", NOW + 200, False), Status("U3", NOW + 300, True)])
        store.want("unit", "U1", {"interval_min": 5}, "cli:alice", "h", NOW + 300)
        again = {c.unit: c.args for c in config_pass(store, registry, NOW + 360, SETTINGS)}
        assert again == {"U1": '{"interval_min":5}', "U3": '{"diag_every":4}'}

        # a unit that reports another configuration in a ping's answer is out of step again
        ping = store.queue_commands("ping", "{}", ["U2"], NOW + 400, NOW + 9999, "cli:alice", "h")[0]
        answer(store, "U2", ping.id, "done", '{"interval_min":30,"fw":"2.3.0"}', NOW + 401)
        assert [s.unit for s in steps_now(store, registry) if s.unit == "U2"] == ["U2"]

        store.want("customer", "C1", None, "cli:alice", "h", NOW + 500)
        store.want("unit", "U1", None, "cli:alice", "h", NOW + 500)
        assert [(s, t) for s, t, *_ in store.desired()] == [("group", "roof")]
        actions = [a for _, _, _, _, a, _, _ in store.audit()]
        assert actions.count("configuration wanted") == 3 and actions.count("configuration cleared") == 2

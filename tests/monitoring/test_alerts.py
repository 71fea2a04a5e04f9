"""The alert state machine: said once when it starts, repeated on schedule, said once when it clears."""

from __future__ import annotations

from monitoring.alerts import Active, silent_units_text, step


def test_an_alert_fires_once_repeats_on_schedule_and_clears_once() -> None:
    active: dict[str, Active] = {}
    said = []
    for t, holding in [
        (0, {"disk_low": "9% free"}),
        (30, {"disk_low": "8% free"}),
        (3599, {"disk_low": "8% free"}),
        (3600, {"disk_low": "7% free"}),
        (3700, {"disk_low": "7% free"}),
        (3800, {}),
        (3900, {}),
    ]:
        active, notices = step(active, holding, t, repeat_s=3600)
        said += [(t, n.name, n.state) for n in notices]
    assert said == [(0, "disk_low", "firing"), (3600, "disk_low", "repeat"), (3800, "disk_low", "resolved")]


def test_no_repeat_when_repeat_is_off_and_each_alert_is_separate() -> None:
    active, first = step({}, {"a": "x", "b": "y"}, 0, repeat_s=0)
    active, later = step(active, {"a": "x", "b": "y"}, 10**6, repeat_s=0)
    active, cleared = step(active, {"a": "x"}, 10**6 + 1, repeat_s=0)
    assert sorted((n.name, n.state) for n in first) == [("a", "firing"), ("b", "firing")]
    assert later == []
    assert [(n.name, n.state) for n in cleared] == [("b", "resolved")]
    assert cleared[0].text == "cleared after 11 days 13 h; it was: y"
    assert set(active) == {"a"}


def test_state_carried_over_a_restart_announces_nothing_again() -> None:
    active, notices = step({}, {"broker_unreachable": "down"}, 100, repeat_s=3600)
    restored = {k: Active(**{"since": v.since, "text": v.text, "said": v.said}) for k, v in active.items()}
    _, again = step(restored, {"broker_unreachable": "down"}, 200, repeat_s=3600)
    assert len(notices) == 1 and again == []


def test_keys_differ_between_start_repeat_and_end_and_between_episodes() -> None:
    active, a = step({}, {"x": "t"}, 0, 10)
    active, b = step(active, {"x": "t"}, 10, 10)
    active, c = step(active, {}, 11, 10)
    active, d = step(active, {"x": "t"}, 12, 10)
    keys = [n.key for n in a + b + c + d]
    assert len(set(keys)) == 4
    assert [n.subject for n in a + b + c] == ["[smame] ALERT: x", "[smame] STILL: x", "[smame] RESOLVED: x"]


def test_many_silent_units_make_one_grouped_text() -> None:
    silent = {f"U{i}": ("C1" if i < 30 else "C2" if i < 35 else f"K{i}") for i in range(50)}
    text = silent_units_text(silent, 10_000, 7200, limit=3)
    assert text.startswith("50 of 10000 units have sent no reading for over 2 h 00 min")
    assert "by customer: C1 30, C2 5, K35 1 and 14 more customers" in text


def test_a_condition_not_known_yet_keeps_its_state() -> None:
    active, _ = step({}, {"broker_unreachable": "down"}, 0, 0)
    # just restarted: the broker is not connected, but not for long enough to tell
    kept, notices = step(active, {}, 100, 0, unknown={"broker_unreachable"})
    assert notices == [] and kept == active
    # nor does "unknown" raise an alert that was not on
    none, notices = step({}, {}, 100, 0, unknown={"broker_unreachable"})
    assert notices == [] and none == {}
    _, notices = step(kept, {}, 200, 0)
    assert [(n.name, n.state) for n in notices] == [("broker_unreachable", "resolved")]

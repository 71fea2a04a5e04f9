"""Gap repair (aggregator.repair) on both backends: gaps found from slots the ingest left estimated or missing,
asked for once with `resend`, paced, and counted by the report's query."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from aggregator.backends import open_url
from aggregator.ingest import Ingestor
from aggregator.repair import WHO, repair_pass, runs
from kernel.commands import State, check_args
from kernel.settings import DevicesSettings
from kernel.timegrid import Grid
from monitoring.daily import repair_section
from tests.aggregator.test_ingest import T0, Directory, H, reading
from tests.databases import sqlite_plan

NOW = T0 + 48 * H  # a day after the first reading
SETTINGS = DevicesSettings(repair_after_s=3600, repair_per_s=2.0)


def test_runs_of_consecutive_slots_by_unit() -> None:
    slots = [("U1", 10 * H), ("U1", 11 * H), ("U1", 13 * H), ("U2", 13 * H), ("U2", 14 * H)]
    assert list(runs(slots)) == [("U1", 10 * H, 11 * H), ("U1", 13 * H, 13 * H), ("U2", 13 * H, 14 * H)]
    assert list(runs([])) == []


def test_a_gap_is_asked_for_once_from_the_reading_before_it_to_the_one_after(store_url: str) -> None:
    ing = Ingestor(open_url(store_url), Directory(), Grid("Asia/Tokyo"))
    store = ing.store
    try:
        # U1: readings every half hour but 4..7 (the broker lost them; slots 4..8 estimated); U2: two lost in the
        # last two hours (late telegrams may still fill it); U3: a meter replaced between two readings a slot apart
        u1 = [reading(k, 100 + 10 * k) for k in range(12) if k not in (4, 5, 6, 7)]
        u2 = [reading(k, 100 + 10 * k, unit="U2") for k in range(48) if k not in (45, 46)]
        u3 = [reading(0, 500, unit="U3"), reading(1, 7, unit="U3", meter="M2"), reading(2, 17, unit="U3", meter="M2")]
        ing.commit(u1 + u2 + u3, [], NOW)
        unfilled = store.unfilled_slots(0, NOW)
        assert [(u, (t - T0) // H) for u, t in unfilled if u == "U1"] == [("U1", k) for k in range(4, 9)]

        asked = repair_pass(store, NOW, SETTINGS)
        assert [c.unit for c in asked] == ["U1"]  # U2's hole is younger than repair_after_s; U3 lacks no reading
        c = asked[0]
        args = json.loads(c.args)
        assert check_args("resend", args) == args  # what the operator's own `resend` would send
        assert (datetime.fromisoformat(args["from"]).timestamp(), datetime.fromisoformat(args["to"]).timestamp()) == (
            T0 + 3 * H,
            T0 + 8 * H,
        )
        assert (c.op, c.who, c.state) == ("resend", WHO, State.QUEUED)
        assert store.command(c.id) is not None
        assert ("smame:repair", "command resend", "U1") in [(w, a, t) for _, _, w, _, a, t, _ in store.audit()]

        assert repair_pass(store, NOW + 600, SETTINGS) == []  # asked once: not again on the next pass
        later = repair_pass(store, NOW + 2 * 3600, SETTINGS)  # U2's hole is now old enough
        assert [(r.unit, datetime.fromisoformat(json.loads(r.args)["from"]).timestamp()) for r in later] == [
            ("U2", T0 + 44 * H)
        ]
        assert repair_pass(store, NOW + 2 * 3600, SETTINGS) == []

        # half of U1's gap resent: the rest lies inside the range asked for, so it is not asked again
        ing.commit([reading(4, 140), reading(5, 150)], [], NOW + 3 * 3600)
        assert repair_pass(store, NOW + 4 * 3600, SETTINGS) == []
        kept = store.repairs(0, NOW + 10 * 3600)
        assert [(u, (f - T0) // H, (t - T0) // H, n) for u, f, t, n, _ in kept] == [("U1", 3, 8, 5), ("U2", 44, 47, 3)]

        # the daily report's count: two gaps, eight half hours asked for, the two resent ones actual now
        section = repair_section(store, NOW, NOW + 86400)
        assert section is not None and (section.gaps, section.units, section.slots, section.actual) == (2, 2, 8, 2)
        assert section.line().endswith("0 answered; 2 half hours repaired (actual now), 6 not (yet)")
        assert repair_section(store, NOW + 86400, NOW + 2 * 86400) is None
    finally:
        store.close()


def test_many_gaps_go_out_at_the_repair_pace(store_url: str) -> None:
    ing = Ingestor(open_url(store_url), Directory(), Grid("Asia/Tokyo"))
    try:
        units = [f"U{i}" for i in range(10)]
        ing.commit([reading(k, 100 + k, unit=u) for u in units for k in range(8) if k != 3], [], NOW)
        asked = repair_pass(ing.store, NOW, SETTINGS)
        assert len(asked) == 10
        assert [c.next_try - NOW for c in asked] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # 2 a second
        assert {c.id for c in ing.store.due_commands(NOW, 100)} == {c.id for c in asked[:2]}
        assert all(c.expires == c.next_try + SETTINGS.expiry_s for c in asked)
    finally:
        ing.store.close()


def test_the_pass_reads_only_the_unfilled_slots(tmp_path: Path) -> None:
    with open_url(f"sqlite:///{tmp_path / 's.db'}") as store:
        sql = "SELECT unit, slot FROM slots WHERE imp_q IN ('E', 'M') AND slot > ? AND slot <= ? ORDER BY unit, slot"
        assert "slots_unfilled" in sqlite_plan(store, sql, (0, NOW))

"""Batches into a real store, SQLite and PostgreSQL: idempotence, order, late data, conflicts, change log."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import postgres
from aggregator.backends import open_url
from aggregator.ingest import Ingestor
from aggregator.sqlite import SqliteStore
from aggregator.store import StoreError
from kernel.meter import Flag, Limits
from kernel.reading import Diag, Incoming, Reading, read_diag
from kernel.timegrid import Grid

T0 = 1_795_000_000 - 1_795_000_000 % 1800  # a JST half hour
H = 1800


class Directory:
    """Two units of one customer, 50 kW contracts."""

    def customer_of(self, unit: str) -> str:
        return "C1"

    def limits_of(self, unit: str) -> Limits:
        return Limits(Fraction(25), 48)


def reading(
    k: int, fwd: int | None, rev: int | None = 0, unit: str = "U1", meter: str = "M1", flags: int = 0
) -> Incoming:
    r = Reading(unit, T0 + k * H, meter, fwd, rev, 1, 1, 6, k, T0 + k * H + 5, flags)
    return Incoming(r, T0 + k * H + 7, f"smame/v1/{unit}/reading", b"{}")


def open_ingestor(url: str) -> Ingestor:
    return Ingestor(open_url(url), Directory(), Grid("Asia/Tokyo"))


@pytest.fixture
def ing(store_url: str) -> Iterator[Ingestor]:
    i = open_ingestor(store_url)
    yield i
    i.store.close()


def table(ing: Ingestor, unit: str = "U1") -> dict[int, tuple[object, ...]]:
    return {(r.slot - T0) // H: (r.imp, r.imp_q, r.imp_flags, r.exp, r.exp_q) for r in ing.store.slots(unit, 0, 2**62)}


def test_live_readings_make_actual_slots(ing: Ingestor) -> None:
    out = ing.commit([reading(0, 100), reading(1, 110), reading(2, 125)], [], T0)
    assert out.stored == 3
    assert table(ing) == {1: (10, "A", 0, 0, "A"), 2: (15, "A", 0, 0, "A")}
    assert out.changed == {("C1", "2026-11-18")} or len(out.changed) == 1


def test_same_reading_again_changes_nothing(ing: Ingestor) -> None:
    ing.commit([reading(0, 100), reading(1, 110)], [], T0)
    before = table(ing)
    out = ing.commit([reading(1, 110), reading(0, 100)], [], T0)
    assert (out.stored, out.duplicates, out.slots) == (0, 2, 0)
    assert table(ing) == before
    assert ing.store.reading_count() == 2


def test_conflicting_value_keeps_the_first_and_quarantines_the_second(ing: Ingestor) -> None:
    ing.commit([reading(0, 100), reading(1, 110)], [], T0)
    out = ing.commit([reading(1, 999)], [], T0)
    assert out.quarantined["conflict"] == 1
    assert table(ing)[1] == (10, "A", Flag.CONFLICT, 0, "A")
    [q] = ing.store.quarantine("conflict")
    assert "got meter=M1 fwd=999" in q.detail and "kept meter=M1 fwd=110" in q.detail


def test_conflict_inside_one_batch(ing: Ingestor) -> None:
    out = ing.commit([reading(0, 100), reading(1, 110), reading(1, 111)], [], T0)
    assert (out.stored, out.quarantined["conflict"]) == (2, 1)
    assert table(ing)[1][:3] == (10, "A", Flag.CONFLICT)


def test_late_reading_turns_estimates_into_actuals(ing: Ingestor) -> None:
    ing.commit([reading(0, 100), reading(4, 140)], [], T0)
    assert [table(ing)[k][1] for k in (1, 2, 3, 4)] == ["E"] * 4
    ing.commit([reading(2, 130)], [], T0)  # a day of backlog arrives
    t = table(ing)
    assert [(t[k][0], t[k][1]) for k in (1, 2, 3, 4)] == [(15, "E"), (15, "E"), (5, "E"), (5, "E")]
    ing.commit([reading(1, 101), reading(3, 139)], [], T0)
    t = table(ing)
    assert [(t[k][0], t[k][1]) for k in (1, 2, 3, 4)] == [(1, "A"), (29, "A"), (9, "A"), (1, "A")]


def test_open_gap_stays_missing_until_the_unit_speaks(ing: Ingestor) -> None:
    ing.commit([reading(0, 100), reading(1, 110)], [], T0)
    assert set(table(ing)) == {1}
    ing.commit([reading(5, 150)], [], T0)
    assert {k: v[1] for k, v in table(ing).items()} == {1: "A", 2: "E", 3: "E", 4: "E", 5: "E"}


def test_late_reading_newer_than_a_registers_last_value_is_chained_to(ing: Ingestor) -> None:
    # Found by smame verify in an accelerated demo: the import register had no value at slot 2, the
    # reading of slot 1 came late, and slot 3's reading was paired with slot 0 instead of slot 1.
    ing.commit([reading(0, 100)], [], T0)
    ing.commit([reading(2, None)], [], T0)
    ing.commit([reading(1, 110)], [], T0)
    ing.commit([reading(3, 140)], [], T0)
    t = table(ing)
    assert [(t[k][0], t[k][1]) for k in (1, 2, 3)] == [(10, "A"), (15, "E"), (15, "E")]


def test_no_data_register_is_estimated_from_its_neighbours(ing: Ingestor) -> None:
    ing.commit([reading(0, 100, 50), reading(1, 110, None), reading(2, 120, 70)], [], T0)
    t = table(ing)
    assert (t[1][0], t[1][1], t[1][3], t[1][4]) == (10, "A", 10, "E")
    assert (t[2][3], t[2][4]) == (10, "E")


def test_meter_replacement_leaves_the_slot_missing_and_flagged(ing: Ingestor) -> None:
    ing.commit([reading(0, 900_000), reading(1, 900_010), reading(2, 5, meter="M2"), reading(3, 9, meter="M2")], [], T0)
    t = table(ing)
    assert t[2][:3] == (None, "M", Flag.REPLACEMENT)
    assert t[3][:2] == (4, "A")


def test_state_survives_a_restart(store_url: str) -> None:
    first = open_ingestor(store_url)
    first.commit([reading(0, 100), reading(1, 110)], [], T0)
    first.store.close()
    again = open_ingestor(store_url)
    again.commit([reading(2, 130)], [], T0)
    assert table(again)[2][:2] == (20, "A")
    again.store.close()


def test_a_live_slot_stored_already_is_updated_not_refused(ing: Ingestor) -> None:
    # The live case writes the next slot without looking (PostgreSQL copies it straight in); a slot stored
    # beyond the unit's newest reading (a store put together by hand, say) must not make the batch fail.
    ing.commit([reading(k, 100 + k * 10, unit=u) for k in (0, 1) for u in ("U1", "U2")], [], T0)
    with ing.store.transaction():
        ing.store.upsert_slots(("imp", "exp"), [(T0 + 2 * H, "U1", 99, "E", 0, 99, "E", 0, "M1", 1, 1)])
    out = ing.commit([reading(2, 125, unit="U1"), reading(2, 121, unit="U2")], [], T0)
    assert (out.stored, out.slots) == (2, 2)
    assert table(ing)[2] == (15, "A", 0, 0, "A")
    assert table(ing, "U2")[2] == (11, "A", 0, 0, "A")


def test_newest_reading_of_each_unit(ing: Ingestor, monkeypatch: pytest.MonkeyPatch) -> None:
    # what the monitor's scan asks of the whole fleet at once; a few units a statement to cross the chunks' edges
    monkeypatch.setattr(postgres, "_UNITS_A_STATEMENT", 2)
    ing.commit([reading(k, 100 + k, unit=u) for k in (0, 1, 60) for u in ("U1", "b-2")], [], T0)
    ing.commit([reading(3, 100, unit="U3"), reading(70, 200, unit="u1")], [], T0)
    units = ["U1", "b-2", "U3", "u1", "NEVER", "U1 "]
    assert ing.store.last_readings(units) == {
        "U1": T0 + 60 * H,
        "b-2": T0 + 60 * H,
        "U3": T0 + 3 * H,
        "u1": T0 + 70 * H,
        "NEVER": None,
        "U1 ": None,
    }


def test_changed_days_are_reported_per_customer_and_day(ing: Ingestor) -> None:
    last, _ = ing.store.changes_since(0)
    ing.commit([reading(0, 100), reading(1, 110)], [], T0)
    newest, changed = ing.store.changes_since(last)
    assert changed == {("C1", Grid("Asia/Tokyo").day_of(T0 + H).isoformat())}
    assert ing.store.changes_since(newest) == (newest, set())


series = st.lists(
    st.tuples(
        st.sampled_from([1, 1, 1, 2, 3, 49, 60]),
        st.integers(0, 300),
        st.booleans(),
        st.integers(0, 12),
        st.sampled_from(["fwd", "rev", None, None, None, None]),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(series, st.randoms(use_true_random=False), st.integers(1, 12))
def test_any_order_and_any_duplication_give_the_same_slots(
    steps: list[tuple[int, int, bool, int, str | None]], rnd: random.Random, batches: int
) -> None:
    k, value, meter, items = 0, 999_000, 1, []  # starts near the wrap of a 6-digit register
    for gap, energy, solar, event, no_data in steps:
        k += gap
        value += energy
        if event == 0:  # meter replaced: a new serial and a register starting afresh
            meter, value = meter + 1, energy
        fwd = None if no_data == "fwd" else value % 10**6
        rev = None if no_data == "rev" or not solar else (value // 3) % 10**6
        items.append(reading(k, fwd, rev, meter=f"M{meter}"))
    with tempfile.TemporaryDirectory() as d:
        truth = open_ingestor(f"sqlite:///{d}/a.db")
        truth.commit(items, [], T0)
        expected = table(truth)
        truth.store.close()

        shuffled = items + rnd.sample(items, k=len(items) // 2)
        rnd.shuffle(shuffled)
        other = open_ingestor(f"sqlite:///{d}/b.db")
        cut = sorted(rnd.sample(range(1, len(shuffled)), k=min(batches - 1, len(shuffled) - 1)))
        for part in (shuffled[a:b] for a, b in zip([0, *cut], [*cut, len(shuffled)], strict=True)):
            other.commit(part, [], T0)
        assert table(other) == expected
        assert other.store.reading_count() == len(items)
        other.store.close()

        live = open_ingestor(f"sqlite:///{d}/c.db")  # in order, one reading a batch: the live case's own path
        for item in items:
            live.commit([item], [], T0)
        assert table(live) == expected
        live.store.close()


def test_two_writers_on_one_store_with_a_shared_subscription(tmp_path: Path) -> None:
    # MQTT 5 shared subscriptions hand a unit's telegrams to either ingest process, alternately here.
    writers = [Ingestor(SqliteStore(tmp_path / "t.db"), Directory(), Grid("Asia/Tokyo"), shared=True) for _ in range(2)]
    try:
        for k in range(9):
            writers[k % 2].commit([reading(k, 100 + 10 * k)], [], T0 + k * H)
            writers[k % 2].commit([reading(k, 100 + 10 * k)], [], T0 + k * H)  # a redelivery changes nothing
        assert table(writers[0]) == {k: (10, "A", 0, 0, "A") for k in range(1, 9)}
    finally:
        for w in writers:
            w.store.close()


def test_a_store_of_a_newer_smame_is_refused_naming_both_versions(store_url: str) -> None:
    with open_url(store_url) as store:
        store.set_meta("schema", "99")
        version = store.schema_version
    with pytest.raises(StoreError, match=f"has schema 99, newer than this smame's {version}: upgrade smame"):
        open_url(store_url)


def test_a_readings_diagnostics_are_stored_with_it_as_the_unit_sent_them(ing: Ingestor) -> None:
    sent = b'{"fw":"2.1.0","rsrp":-97, "sinr":4.5,"boot":12,"ce":9}'
    with_diag = reading(1, 110)
    with_diag = msgspec.structs.replace(with_diag, reading=msgspec.structs.replace(with_diag.reading, diag=sent))
    ing.commit([reading(0, 100), with_diag], [], T0)
    kept = dict(ing.store.execute("SELECT at, diag FROM readings WHERE unit = 'U1'").fetchall())
    assert kept[T0] is None
    blob = bytes(kept[T0 + H])  # (memoryview on PostgreSQL)
    assert blob == sent and read_diag(blob) == Diag(fw="2.1.0", rsrp=-97, sinr=4.5, boot=12, dropped=1)

"""What a real store answers about a unit's stored readings, SQLite and PostgreSQL, against the readings
themselves: its newest and oldest, each register's newest point, a time's neighbours, before and after
retention; and an SQLite store of schema 1 (readings keyed by unit) opened by this code."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.backends import open_url
from aggregator.slots import Point
from aggregator.sqlite import SqliteStore, check_copy
from aggregator.store import REGISTERS, Store
from tests.aggregator.test_ingest import T0, H, open_ingestor, reading, table

Stored = dict[str, dict[int, tuple[int | None, int | None]]]  # unit -> at -> (fwd, rev)

# a unit's readings: half-hour steps apart, some far apart (more ends than one look-up statement takes), either
# register sometimes without a value, one unit that never sends `rev`
steps = st.lists(
    st.tuples(st.sampled_from([1, 1, 1, 2, 5, 97, 300]), st.sampled_from(["both", "both", "fwd", "rev"])),
    min_size=1,
    max_size=25,
)


def rows_of(stored: Stored) -> list[tuple[object, ...]]:
    return [
        (unit, at, "M1", fwd, rev, 1, 1, 6, 0, 0, at + 5, at + 7, None)
        for unit, series in stored.items()
        for at, (fwd, rev) in series.items()
    ]


def expected_neighbour(series: dict[int, tuple[int | None, int | None]], at: int, reg: int, before: bool) -> int | None:
    times = [t for t, v in series.items() if v[reg] is not None and (t < at if before else t > at)]
    return (max if before else min)(times, default=None)


def check(store: Store, stored: Stored, probes: list[int]) -> None:
    units = [*stored, "NEVER"]
    assert store.last_readings(units) == {u: max(stored[u]) if stored.get(u) else None for u in units}
    assert store.first_readings(units) == {u: min(stored[u]) if stored.get(u) else None for u in units}
    points = store.last_points(units)
    for unit in units:
        series = stored.get(unit, {})
        assert store.last_at(unit) == (max(series) if series else None)
        assert store.first_at(unit) == (min(series) if series else None)
        for i, reg in enumerate(REGISTERS):
            newest = expected_neighbour(series, 2**62, i, before=True)
            point = points[unit][1 + i]
            assert (None if point is None else (point.at, point.value)) == (
                None if newest is None else (newest, series[newest][i])
            )
            for at in probes:
                for before in (True, False):
                    found = store.neighbour(unit, at, reg, before)
                    want = expected_neighbour(series, at, i, before)
                    assert (None if found is None else found.at) == want, (unit, reg, at, before)
                    if found is not None:
                        assert found == Point(want, series[want][i], "M1", 6, 1, 1, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(steps, min_size=1, max_size=3),
    st.integers(0, 40),
    st.lists(st.integers(-5, 2000), max_size=6),
    st.integers(0, 3000),
)
def test_what_the_store_says_of_a_units_readings_is_what_they_are(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    fleet: list[list[tuple[int, str]]],
    batch: int,
    probes_k: list[int],
    prune_k: int,
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'smame.db'}"
    else:
        url = request.getfixturevalue("postgres").fresh_url()
    stored: Stored = {}
    for u, unit_steps in enumerate(fleet):
        k, series = 0, stored.setdefault(f"U{u}", {})
        for gap, has in unit_steps:
            k += gap
            sends_rev = u != 1 and has != "fwd"
            series[T0 + k * H] = (None if has == "rev" else k, k if sends_rev else None)
    rows = rows_of(stored)
    rows.sort(key=lambda r: (r[1] * 7919) % 10007)  # neither in time nor in unit order
    probes = [T0 + k * H + d for k in probes_k for d in (-1, 0, 1)]
    with open_url(url) as store:
        for i in range(0, len(rows), batch or len(rows)):  # several transactions, each a few units' readings
            with store.transaction():
                store.insert_readings(rows[i : i + (batch or len(rows))])
        check(store, stored, probes)

        before = T0 + prune_k * H
        store.prune(before)
        kept = {u: {at: v for at, v in s.items() if at >= before} for u, s in stored.items()}
        check(store, kept, probes)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_readings_appended_as_a_live_batch_leave_every_units_span_true(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # A live batch's readings each come after its unit's newest, with both registers; the store must stay true
    # also when that was wrong for a unit (one stored later, one never stored, one register never valued).
    url = (
        f"sqlite:///{tmp_path / 'smame.db'}" if backend == "sqlite" else request.getfixturevalue("postgres").fresh_url()
    )
    stored: Stored = {
        "LIVE": {T0: (1, 1), T0 + H: (2, 2)},
        "ONLY_FWD": {T0: (1, None), T0 + H: (2, None)},
        "LATER": {T0: (1, 1), T0 + 9 * H: (9, 9)},
    }
    batches: list[Stored] = [
        {"LIVE": {T0 + 2 * H: (3, 3)}},  # what a live batch is: the span's end moves
        {"ONLY_FWD": {T0 + 2 * H: (3, 3)}},  # its span has no first `rev`
        {"LATER": {T0 + 2 * H: (3, 3)}, "NEW": {T0 + 5 * H: (5, 5)}},  # newer stored; no span
    ]
    probes = [T0 + k * H + d for k in range(11) for d in (-1, 0, 1)]
    with open_url(url) as store:
        with store.transaction():
            store.insert_readings(rows_of(stored))
        for batch in batches:
            with store.transaction():
                store.append_readings(rows_of(batch))
            for unit, series in batch.items():
                stored.setdefault(unit, {}).update(series)
            check(store, stored, probes)


V1_COLUMNS = "unit, at, meter, fwd, rev, e1, coef, digits, flags, seq, sent, received"
V1_READINGS = """CREATE TABLE readings (
    unit TEXT NOT NULL, at BIGINT NOT NULL, meter TEXT NOT NULL,
    fwd BIGINT, rev BIGINT, e1 INTEGER NOT NULL, coef INTEGER NOT NULL, digits INTEGER NOT NULL,
    flags INTEGER NOT NULL DEFAULT 0, seq BIGINT NOT NULL, sent BIGINT NOT NULL, received BIGINT NOT NULL,
    PRIMARY KEY (unit, at)) WITHOUT ROWID"""


def test_a_store_of_schema_1_is_migrated_on_opening_and_ingest_goes_on(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'smame.db'}"
    ing = open_ingestor(url)
    ing.commit([reading(k, 100 + 10 * k, unit=u) for k in range(4) for u in ("U1", "U2")], [], T0)
    before = table(ing)
    ing.store.close()
    # what smame of schema 1 left: readings keyed (unit, at), no spans
    db = sqlite3.connect(tmp_path / "smame.db", isolation_level=None)
    db.executescript(
        f"BEGIN; ALTER TABLE readings RENAME TO r2; {V1_READINGS}; INSERT INTO readings SELECT {V1_COLUMNS} "
        "FROM r2; DROP TABLE r2; DROP TABLE reading_span; UPDATE meta SET value = '1' WHERE key = 'schema'; COMMIT;"
    )
    db.close()

    ing = open_ingestor(url)
    try:
        assert ing.store.get_meta("schema") == str(SqliteStore.schema_version)
        key = [
            r[1]
            for r in sorted(ing.store.execute("PRAGMA table_info(readings)").fetchall(), key=lambda r: r[5])
            if r[5]
        ]
        assert key == ["at", "unit"]
        assert ing.store.reading_count() == 8
        assert ing.store.last_readings(["U1", "U2"]) == {"U1": T0 + 3 * H, "U2": T0 + 3 * H}
        assert ing.store.first_readings(["U1"]) == {"U1": T0}
        ing.commit([reading(4, 140), reading(2, 120)], [], T0)  # the next one and a duplicate
        assert table(ing) == {**before, 4: (10, "A", 0, 0, "A")}
    finally:
        ing.store.close()


def test_a_prune_told_to_stop_ends_after_a_transaction_and_the_next_finishes_it(store_url: str) -> None:
    # smame's stop during the daily retention: the prune returns between transactions, and what it left (a unit's
    # span reaching back before its oldest reading) still answers true once the next prune has run
    stored: Stored = {f"U{u}": {T0 + k * H: (k, k if u else None) for k in range(3 * 48)} for u in range(3)}
    before = T0 + 2 * 48 * H
    kept = {u: {at: v for at, v in series.items() if at >= before} for u, series in stored.items()}
    checks: list[bool] = []

    def stop_now() -> bool:  # asked after each transaction: the first time, the prune must end
        checks.append(True)
        return True

    with open_url(store_url) as store:
        with store.transaction():
            store.insert_readings(rows_of(stored))
        old = store.execute("SELECT count(*) FROM readings WHERE at < ?", (before,)).fetchone()[0]
        readings, _ = store.prune(before, stop_now)
        left = store.execute("SELECT count(*) FROM readings WHERE at < ?", (before,)).fetchone()[0]
        assert len(checks) == 1 and 0 < readings == old - left < old  # one transaction's worth went
        store.prune(before)
        assert store.execute("SELECT count(*) FROM readings WHERE at < ?", (before,)).fetchone()[0] == 0
        check(store, kept, [T0 + k * H + d for k in (0, 50, 95, 96, 97, 143, 200) for d in (-1, 0, 1)])


def test_a_store_from_before_quarantine_noted_what_it_concerns_is_migrated_and_says_it_from_then(
    store_url: str,
) -> None:
    refused = (T0, "smame/v1/U1/reading", "U1", "future", "too far", b"{}")
    with open_url(store_url) as store:
        store.add_quarantine([(*refused, T0 + 400 * 86400)])
        # what the previous schema left: no `concerns` column
        old = "1" if store_url.startswith("postgresql") else "2"
        store.execute("ALTER TABLE quarantine DROP COLUMN concerns")
        store.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (old,))
    with open_url(store_url) as store:
        assert store.get_meta("schema") == str(type(store).schema_version)
        store.add_quarantine([(*refused[:3], "conflict", "kept the first", b"{}", T0 - H)])
        assert [q.concerns for q in store.quarantine()] == [T0 - H, None]  # the old row does not know
        arrived, about, _ = store.quarantine_between(T0 - 86400, T0 + 1)
        assert (arrived, about) == ({"future": 1, "conflict": 1}, {"conflict": 1})
    if store_url.startswith("sqlite"):
        check_copy(Path(store_url.removeprefix("sqlite:///")))  # migrated, it is smame's schema to the letter

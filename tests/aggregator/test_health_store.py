"""What the store keeps of units' health and risk, on both backends: kept a day at a time, read back, pruned
with the slots; on PostgreSQL the health records sit in a partition a day, and a store of schema 3 is
migrated to them."""

from __future__ import annotations

from collections import Counter

import psycopg

from aggregator.backends import open_url
from aggregator.copy import copy_store, fingerprint
from aggregator.postgres import PostgresStore
from aggregator.sqlite import SqliteStore
from aggregator.store import HEALTH_COLUMNS
from tests.databases import PostgresDatabase, query, sqlite_plan

DAY = 86400
D0 = 1_795_000_000 - 1_795_000_000 % DAY


def record(unit: str, rsrp: float) -> tuple[object, ...]:
    values: dict[str, object] = dict.fromkeys(HEALTH_COLUMNS, 0)
    values |= {"rsrp": rsrp, "fw": "2.4.1", "cell": "c1", "delay_p50": None}
    return (unit, *values.values())


def test_health_and_risk_are_kept_a_day_at_a_time_and_go_with_the_slots(store_url: str) -> None:
    with open_url(store_url) as store:
        for k in range(3):
            store.keep_health(D0 + k * DAY, ["unit", *HEALTH_COLUMNS], [record("A", -90 - k), record("B", -80)])
        store.keep_health(D0 + 2 * DAY, ["unit", *HEALTH_COLUMNS], [record("A", -99)])  # made again: replaced
        rows = store.health_records(D0 + DAY, D0 + 2 * DAY, ["rsrp", "fw"])
        assert sorted(rows) == [
            (D0 + DAY, "A", -91.0, "2.4.1"),
            (D0 + DAY, "B", -80.0, "2.4.1"),
            (D0 + 2 * DAY, "A", -99.0, "2.4.1"),
        ]
        store.keep_risk(D0 + DAY, 2, [("A", 1.5, "[]")], [("fleet", "disconnects", 2, 2, "1 more")], D0 + 2 * DAY)
        store.keep_risk(D0 + 2 * DAY, 1, [("A", 2.5, '[{"signal": "rsrp"}]')], [], D0 + 3 * DAY)
        store.keep_risk(D0 + 2 * DAY, 1, [("A", 3.0, "[]"), ("B", 1.0, "[]")], [], D0 + 3 * DAY)  # again: replaced
        assert store.at_risk(D0) == [
            (D0 + DAY, "A", 1.5, "[]"),
            (D0 + 2 * DAY, "A", 3.0, "[]"),
            (D0 + 2 * DAY, "B", 1.0, "[]"),
        ]
        assert store.at_risk(D0, "B") == [(D0 + 2 * DAY, "B", 1.0, "[]")]
        assert store.risk_days(D0) == [(D0 + DAY, 2, 1, D0 + 2 * DAY), (D0 + 2 * DAY, 1, 2, D0 + 3 * DAY)]
        assert store.health_events(D0) == [(D0 + DAY, "fleet", "disconnects", 2, 2, "1 more")]
        store.prune(D0 + 2 * DAY)
        assert [d for d, *_ in store.health_records(D0, D0 + 9 * DAY, ["rsrp"])] == [D0 + 2 * DAY]
        assert store.at_risk(D0) == [(D0 + 2 * DAY, "A", 3.0, "[]"), (D0 + 2 * DAY, "B", 1.0, "[]")]
        assert [d for d, *_ in store.risk_days(D0)] == [D0 + 2 * DAY] and store.health_events(D0) == []


def test_postgresql_keeps_a_partition_of_health_a_day_and_migrates_a_store_of_schema_3(
    postgres: PostgresDatabase,
) -> None:
    url = postgres.fresh_url()
    with open_url(url) as store:
        store.keep_health(D0, ["unit", *HEALTH_COLUMNS], [record("A", -90)])
        store.record_statuses([])
    parts = [
        r[0]
        for r in query(
            url,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'unit_health' "
            "AND p.relnamespace = current_schema()::regnamespace",
        )
    ]
    assert len(parts) == 1 and parts[0].startswith("unit_health_")
    # the same store as schema 3 left it: one table of records, connection events' ids always generated
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE unit_health")
        conn.execute(
            f"CREATE TABLE unit_health (day BIGINT NOT NULL, unit TEXT NOT NULL, "
            f"{', '.join(f'{c} TEXT' if c in ('fw', 'cell') else f'{c} DOUBLE PRECISION' for c in HEALTH_COLUMNS)}, "
            "PRIMARY KEY (day, unit))"
        )
        conn.execute("CREATE INDEX unit_health_unit ON unit_health (unit, day)")
        zeros = "readings, late, seq_gaps, restarts, no_data, diag_dropped, disconnects"
        for day, unit, rsrp in ((D0, "A", -91), (D0 + DAY, "B", -92)):
            conn.execute(
                f"INSERT INTO unit_health (day, unit, rsrp, {zeros}) "
                f"VALUES ({day}, '{unit}', {rsrp}, 0, 0, 0, 0, 0, 0, 0)"
            )
        conn.execute("ALTER TABLE connection_events ALTER COLUMN id SET GENERATED ALWAYS")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    with open_url(url) as store:
        assert sorted(store.health_records(D0, D0 + DAY, ["rsrp"])) == [(D0, "A", -91.0), (D0 + DAY, "B", -92.0)]
        store.keep_health(D0 + 2 * DAY, ["unit", *HEALTH_COLUMNS], [record("C", -93)])
        store.execute("INSERT INTO connection_events (id, unit, at, online) VALUES (99, 'A', 1, false)")
    assert query(url, "SELECT value FROM meta WHERE key = 'schema'") == [(str(PostgresStore.schema_version),)]
    assert (
        len(
            query(
                url,
                "SELECT 1 FROM pg_partitioned_table t JOIN pg_class c ON c.oid = t.partrelid "
                "WHERE c.relname = 'unit_health' AND c.relnamespace = current_schema()::regnamespace",
            )
        )
        == 1
    )
    assert query(
        url,
        "SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'unit_health' "
        "AND p.relnamespace = current_schema()::regnamespace",
    ) == [(3,)]


def test_a_store_copied_to_postgresql_takes_its_health_and_connections_along(
    tmp_path: object, postgres: PostgresDatabase
) -> None:
    source_url = f"sqlite:///{tmp_path}/s.db"
    with open_url(source_url) as source, open_url(postgres.fresh_url()) as target:
        source.keep_health(D0, ["unit", *HEALTH_COLUMNS], [record("A", -90), record("B", -95)])
        source.keep_risk(D0, 2, [("A", 1.5, "[]")], [("cell c1", "rsrp", 2, 2, "9 dB")], D0 + DAY)
        from kernel.reading import Status

        source.record_statuses([Status("A", D0 + 5, False), Status("A", D0 + 9, True)])
        counts = copy_store(source, target)
        assert counts["unit_health"] == 2 and counts["connection_events"] == 2 and counts["health_events"] == 1
        for table in ("unit_health", "unit_risk", "risk_days", "health_events", "connection_events", "unit_status"):
            assert fingerprint(source, table) == fingerprint(target, table), table
        target.record_statuses([Status("A", D0 + 20, False)])  # ids go on after the copied ones
        assert [at for at, _ in target.connection_events("A", 0, D0 + DAY)] == [D0 + 5, D0 + 9, D0 + 20]


def test_a_days_rows_and_records_are_read_and_replaced_a_range_of_units_at_a_time(store_url: str) -> None:
    day = D0 - D0 % 1800
    with open_url(store_url) as store:
        with store.transaction():
            store.insert_readings(
                (u, day + k * 1800, "M1", k, 0, 1, 1, 6, 0, k, day + k * 1800, day + k * 1800 + 5, None)
                for u in ("A", "B", "C", "D")
                for k in range(48)
            )
            store.insert_readings([("B", day + DAY, "M1", 48, 0, 1, 1, 6, 0, 48, day + DAY, day + DAY, None)])
        middle = store.health_rows(day, day + DAY, ("B", "D"))
        assert {(u, n) for u, n in Counter(r[0] for r in middle).items()} == {
            ("B", 48),
            ("C", 48),
        }  # not the next day's
        assert {r[0] for r in store.health_rows(day, day + DAY, (None, "B"))} == {"A"}
        assert {r[0] for r in store.health_rows(day, day + DAY, ("D", None))} == {"D"}
        assert len(store.health_rows(day, day + DAY)) == 4 * 48
        store.keep_health(day, ["unit", *HEALTH_COLUMNS], [record(u, -90) for u in "ABCD"])
        store.keep_health(day, ["unit", *HEALTH_COLUMNS], [record("C", -99)], ("B", "D"))  # B has none now
        assert sorted(store.health_records(day, day, ["rsrp"])) == [
            (day, "A", -90.0),
            (day, "C", -99.0),
            (day, "D", -90.0),
        ]
        if isinstance(store, SqliteStore):  # each half hour sought with the range, not the day's rows read
            said: list[str] = []
            store.db.set_trace_callback(said.append)
            store.health_rows(day, day + DAY, ("B", "D"))
            store.db.set_trace_callback(None)
            assert "SEARCH readings USING PRIMARY KEY (at=? AND unit>? AND unit<?)" in sqlite_plan(store, said[-1])

"""A customer's end of contract: every stored day exported with a manifest `sha256sum -c` checks, then a purge
that leaves no row of the customer or its units in any table, no file and no login, with its receipt."""

from __future__ import annotations

import re
import subprocess
import time
from datetime import timedelta
from pathlib import Path

from aggregator.backends import open_url
from aggregator.ingest import Ingestor
from aggregator.sqlite import SqliteStore
from aggregator.store import PURGED_BY_CUSTOMER
from kernel.reading import Incoming, Reading
from kernel.registry import load_registry
from kernel.timegrid import Grid
from tests.helpers import first_start, smame, smame_env, write_registry

GRID = Grid("Asia/Tokyo")
UNITS = {"U1": "C1", "U2": "C1", "U3": "C2"}
PASSWORD = "a-long-password-1"


def stored(workdir: Path) -> None:
    """Two days of every unit's readings 60 days ago (past the files' 45 days) and the two days before today."""
    registry = load_registry(workdir / "units.csv", workdir / "customers.toml")
    today = GRID.day_of(int(time.time()))
    ingest = Ingestor(open_url(f"sqlite:///{workdir / 'data' / 'smame.db'}"), registry, GRID)
    try:
        for back in (61, 60, 2, 1):
            start = GRID.day_start(today - timedelta(days=back))
            batch = [
                Incoming(Reading(u, at, "M1", 1000 + (at - start) // 1800, 0, 1, 1, 6, 0, at), at, "t", b"{}")
                for u in UNITS
                for at in range(start, start + 86400 + 1, 1800)
            ]
            ingest.commit(batch, [], int(time.time()))
    finally:
        ingest.store.close()


def test_a_customer_is_exported_whole_and_then_purged_with_a_receipt(workdir: Path) -> None:
    write_registry(workdir, UNITS)
    env = smame_env(workdir, 1883)
    first_start(workdir)
    stored(workdir)
    smame(["users", "add", "C1", "c1-files", "--password-stdin"], env, stdin=PASSWORD + "\n")
    smame(["tokens", "add", "C1"], env)
    smame(["tokens", "add", "C2"], env)
    smame(["export", "--all"], env)
    assert (workdir / "data" / "export" / "C1").is_dir()

    out = workdir / "handover"
    said = smame(["customers", "export", "C1", "--all", "--out", str(out)], env).stdout
    files = sorted(p.name for p in (out / "C1").glob("C1_*.csv"))
    today = GRID.day_of(int(time.time()))
    first = today - timedelta(days=61)  # past the 45 days of files: every day the store holds, gaps and all
    assert len(files) == 62 and files[0] == f"C1_{first:%Y%m%d}.csv", files
    assert f"62 days ({first} to {today}), 62 files" in said, said
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out / "C1", capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 62, check.stdout + check.stderr
    assert not (out / ".smame-co2").exists()
    again = smame(["customers", "export", "C1", "--all", "--out", str(out)], env, check=False)
    assert again.returncode == 2 and "is not empty" in again.stderr

    unconfirmed = smame(["customers", "remove", "C1", "--purge"], env, check=False)
    assert unconfirmed.returncode == 2 and "give --yes" in unconfirmed.stderr
    receipt = smame(["customers", "remove", "C1", "--purge", "--yes"], env).stdout
    # 4 days of 49 readings each for 2 units, less the 4 midnights sent twice (the second kept in quarantine)
    assert re.search(r"readings\s+388 rows", receipt) and re.search(r"api_tokens\s+1 rows", receipt), receipt
    assert re.search(r"logins\s+1\b", receipt) and re.search(r"units\s+2\b", receipt)

    with open_url(f"sqlite:///{workdir / 'data' / 'smame.db'}") as store:
        # every table of the store with a unit's or a customer's column: none forgotten by the purge's lists
        tables = [t for (t,) in store.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()]
        for table in tables:
            columns = {row[1] for row in store.execute(f"PRAGMA table_info({table})").fetchall()}
            if "unit" in columns:
                left = store.execute(f"SELECT count(*) FROM {table} WHERE unit IN ('U1', 'U2')").fetchone()[0]
                assert left == 0 and table in SqliteStore.unit_tables, table
            if "customer" in columns:
                assert store.execute(f"SELECT count(*) FROM {table} WHERE customer = 'C1'").fetchone()[0] == 0, table
                assert table in PURGED_BY_CUSTOMER, table
        assert store.execute("SELECT count(*) FROM desired WHERE target IN ('C1', 'U1', 'U2')").fetchone()[0] == 0
        assert store.execute("SELECT count(*) FROM readings WHERE unit = 'U3'").fetchone()[0] == 194  # C2's kept
        entries = {a: (t, d) for _, _, _, _, a, t, d in store.audit(20, None, "")}
        assert entries["customer exported"][0] == "C1" and entries["customer exported"][1].startswith("62 files, ")
        target, detail = entries["customer purged"]
        assert target == "C1" and "readings 388" in detail and "units 2" in detail
    assert not (workdir / "data" / "export" / "C1").exists() and (workdir / "data" / "export" / "C2").is_dir()
    assert "C1" not in (workdir / "customers.toml").read_text()
    assert (workdir / "units.csv").read_text().splitlines()[1:] == ["U3,C2,,,"]
    listed = smame(["users", "list"], env).stdout
    assert "c1-files" not in listed
    again = smame(["customers", "remove", "C1", "--purge", "--yes"], env, check=False)
    assert again.returncode == 2 and "no customer C1" in again.stderr


def test_the_purge_deletes_only_the_customers_rows_on_either_backend(tmp_path: Path, store_url: str) -> None:
    write_registry(tmp_path, UNITS)
    registry = load_registry(tmp_path / "units.csv", tmp_path / "customers.toml")
    start = GRID.day_start(GRID.day_of(int(time.time())) - timedelta(days=3))
    ingest = Ingestor(open_url(store_url), registry, GRID)
    try:
        batch = [
            Incoming(Reading(u, at, "M1", 1000 + (at - start) // 1800, 0, 1, 1, 6, 0, at), at, "t", b"{}")
            for u in UNITS
            for at in range(start, start + 86400 + 1, 1800)
        ]
        ingest.commit(batch, [], int(time.time()))
        store = ingest.store
        with store.transaction():
            store.execute(
                "INSERT INTO desired (scope, target, config, who, origin, at) VALUES "
                "('customer', 'C1', '{}', 'x', '', 1), ('unit', 'U3', '{}', 'x', '', 1)"
            )
        counts = store.purge_customer("C1", ["U1", "U2"])
        assert (counts["readings"], counts["slots"], counts["desired"]) == (98, 96, 1)
        assert store.execute("SELECT count(*) FROM readings WHERE unit IN ('U1', 'U2')").fetchone()[0] == 0
        assert store.execute("SELECT count(*) FROM readings WHERE unit = 'U3'").fetchone()[0] == 49
        assert store.execute("SELECT count(*) FROM slots WHERE unit = 'U3'").fetchone()[0] == 48
        assert store.execute("SELECT count(*) FROM changes WHERE customer = 'C2'").fetchone()[0] > 0
        assert store.execute("SELECT scope FROM desired").fetchall() == [("unit",)]
    finally:
        ingest.store.close()

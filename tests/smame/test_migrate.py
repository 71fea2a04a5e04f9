"""`smame migrate --to postgresql://...`: an SQLite store copied whole into PostgreSQL, checked, and usable."""

from __future__ import annotations

from pathlib import Path

from aggregator.backends import open_url
from aggregator.ingest import Ingestor
from kernel.reading import Refused
from kernel.registry import load_registry
from monitoring.outbox_table import OutboxTable
from tests.csv_export.test_exporter import GRID, NOW, history
from tests.databases import PostgresDatabase
from tests.helpers import smame, smame_env, write_registry


def test_an_sqlite_store_moves_to_postgresql_whole_and_goes_on_from_there(
    workdir: Path, postgres: PostgresDatabase
) -> None:
    write_registry(workdir, {"U1": "C1", "U2": "C2"})
    registry = load_registry(workdir / "units.csv", workdir / "customers.toml")
    source_url = f"sqlite:///{workdir / 'data' / 'smame.db'}"
    with open_url(source_url) as store:
        Ingestor(store, registry, GRID).commit(
            history(["U1", "U2"], 3, skip={("U1", int(NOW) - 86400)}),  # a gap: estimated slots too
            [Refused.of(int(NOW), "smame/v1/X/reading", "X", "not_json", "bad", b"{")],
            int(NOW),
        )
        store.set_meta("export.cursor", "7")
        OutboxTable(store).enqueue("report:2026-11-20:mail", "mail", b"payload", NOW)
        slots = store.slots("U1", 0, 2**62)
        changes, _ = store.changes_since(0)

    target = postgres.fresh_url()
    env = smame_env(workdir, 1883)
    out = smame(["migrate", "--to", target], env).stdout
    assert "checksum" in out and "on both sides" in out

    with open_url(target) as store:
        assert store.slots("U1", 0, 2**62) == slots
        assert store.get_meta("export.cursor") == "7"
        assert [q.reason for q in store.quarantine()] == ["not_json"]
        assert OutboxTable(store).counts()["pending"] == 1
        # ids go on after the copied ones: the export's change cursor sees what is new, nothing twice
        store.add_changes([("C1", "2026-11-22")], int(NOW))
        newest, changed = store.changes_since(changes)
        assert newest == changes + 1 and changed == {("C1", "2026-11-22")}
        assert not OutboxTable(store).enqueue("report:2026-11-20:mail", "mail", b"again", NOW)  # sent once

    again = smame(["migrate", "--to", target], env, check=False)
    assert again.returncode == 2 and "holds data already" in again.stderr
    wrong = smame(["migrate", "--to", f"sqlite:///{workdir / 'x.db'}"], env, check=False)
    assert wrong.returncode == 2 and "--to must be a postgresql:// URL" in wrong.stderr

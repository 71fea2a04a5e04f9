"""`smame backup` copies the database while smame runs: the copy is whole and consistent."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.helpers import (
    Mosquitto,
    at,
    first_start,
    publish,
    smame,
    smame_env,
    start_smame,
    stop,
    telegram,
    wait_log,
    wait_readings,
    write_registry,
)


def test_online_backup_while_smame_runs(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"B1": "C1"})
    env = smame_env(workdir, broker.port)
    proc = start_smame(env, workdir / "smame.log")
    try:
        wait_log(workdir / "smame.log", "subscribed to")
        publish(
            broker.port,
            [("smame/v1/B1/reading", telegram("B1", [(at("2026-11-20", f"{h:02d}:00"), 10 * h)])) for h in range(24)],
        )
        wait_readings(workdir / "data" / "smame.db", 24)
        assert "copied" in smame(["backup", str(workdir / "copy.db")], env).stdout
    finally:
        assert stop(proc) == 0
    with sqlite3.connect(workdir / "copy.db") as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert c.execute("SELECT count(*) FROM readings").fetchone()[0] == 24
        # hourly readings: 23 closed pairs, each an hour of two slots (one estimated, one closing)
        assert c.execute("SELECT count(*) FROM slots WHERE unit = 'B1' AND imp IS NOT NULL").fetchone()[0] == 46
    assert not (workdir / "copy.db.tmp").exists()


def test_a_copy_carrying_a_trigger_a_view_or_a_changed_table_is_refused(workdir: Path) -> None:
    write_registry(workdir, {"R1": "C1"})
    env = smame_env(workdir, 1883)
    first_start(workdir)
    good = workdir / "good.db"
    smame(["backup", str(good)], env)
    assert "is whole" in smame(["backup", "--verify", str(good)], env).stdout
    hostile = {
        "trigger": "CREATE TRIGGER eat AFTER INSERT ON readings BEGIN DELETE FROM readings; END",
        "view": "CREATE VIEW v AS SELECT 1",
        "table": "CREATE TABLE extra (x)",
    }
    for kind, sql in hostile.items():
        copy = workdir / f"{kind}.db"
        copy.write_bytes(good.read_bytes())
        with sqlite3.connect(copy) as c:
            c.execute(sql)
        for command in (["backup", "--verify", str(copy)], ["restore", str(copy)]):
            said = smame(command, env, check=False)
            assert said.returncode == 2 and f"not smame's schema: a {kind} " in said.stderr, (command, said.stderr)
    changed = workdir / "changed.db"
    changed.write_bytes(good.read_bytes())
    with sqlite3.connect(changed) as c:  # the same name, another definition: a default a restore would keep
        c.executescript(
            "DROP TABLE api_tokens; CREATE TABLE api_tokens (id TEXT PRIMARY KEY, customer TEXT, "
            "name TEXT, hash TEXT DEFAULT 'x', created BIGINT);"
        )
    said = smame(["restore", str(changed)], env, check=False)
    assert said.returncode == 2 and "the table api_tokens defined otherwise than smame's" in said.stderr
    assert "restored" in smame(["restore", str(good)], env).stdout  # a true copy still goes in

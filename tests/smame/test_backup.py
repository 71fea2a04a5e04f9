"""`smame backup` copies the database while smame runs: the copy is whole and consistent."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from aggregator.backends import open_url
from aggregator.copy import fingerprint
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
from tests.smame.test_customers import UNITS, stored


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


def test_a_backup_restored_on_a_fresh_machine_gives_back_the_same_slots_and_files(workdir: Path) -> None:
    # the drill of docs/operations.md ("Disaster recovery"): machine A's store copied, A lost; B has only the copy
    # and the registry files kept off the machine, and must serve the same slots and the same customer files
    a, b = workdir / "a", workdir / "b"
    write_registry(a, UNITS)
    first_start(a)
    stored(a)
    env_a = smame_env(a, 1883)
    smame(["export", "--all"], env_a)
    smame(["users", "add", "C1", "c1-files", "--password-stdin"], env_a, stdin="a-long-password-1\n")
    smame(["backup", str(workdir / "offsite.db")], env_a)
    b.mkdir()
    for name in ("units.csv", "customers.toml"):
        shutil.copy(a / name, b / name)
    env_b = smame_env(b, 1883)
    restored = smame(["restore", str(workdir / "offsite.db")], env_b).stdout
    assert restored.startswith(f"restored {b / 'data' / 'smame.db'}")
    smame(["export", "--all"], env_b)
    with (
        open_url(f"sqlite:///{a / 'data' / 'smame.db'}") as one,
        open_url(f"sqlite:///{b / 'data' / 'smame.db'}") as two,
    ):
        assert fingerprint(one) == fingerprint(two) and fingerprint(one)[0] > 0
    files_a = {p.relative_to(a / "data" / "export"): p.read_bytes() for p in (a / "data" / "export").rglob("C*_*")}
    files_b = {p.relative_to(b / "data" / "export"): p.read_bytes() for p in (b / "data" / "export").rglob("C*_*")}
    assert len(files_a) > 10 and files_a == files_b

"""`smame backup` copies the database while smame runs: the copy is whole and consistent."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.helpers import (
    Mosquitto,
    at,
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

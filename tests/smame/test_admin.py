"""Admin commands never corrupt and never mislead: each mistake gets one line that says what to fix."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from pathlib import Path

from aggregator.backends import open_url
from kernel.registry import load_registry
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
    yesterday,
)

PASSWORD = "long-enough-pass\n"


def refused(args: list[str], env: dict[str, str], stdin: str = "") -> str:
    """Run a command that must fail with exit 2 and one line on stderr; return that line."""
    proc = smame(args, env, check=False, stdin=stdin)
    assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr.strip()


def test_removing_the_last_login_then_adding_one_keeps_the_file_loadable(workdir: Path) -> None:
    write_registry(workdir, {"U1": "C1"})
    env = smame_env(workdir, 1883)
    smame(["users", "add", "C1", "alice", "--password-stdin"], env, stdin=PASSWORD)
    smame(["users", "remove", "alice"], env)
    smame(["users", "add", "C1", "bob", "--password-stdin"], env, stdin=PASSWORD)
    assert smame(["users", "list"], env).stdout.split() == ["C1", "bob", "password"]
    smame(["users", "passwd", "C1", "bob", "--password-stdin"], env, stdin="another-long-pass\n")
    registry = load_registry(workdir / "units.csv", workdir / "customers.toml")  # what smame itself loads
    assert [u.name for u in registry.customers["C1"].users] == ["bob"]


def test_a_write_that_smame_would_refuse_to_load_is_never_made(workdir: Path) -> None:
    write_registry(workdir, {"U1": "C1"})
    customers = workdir / "customers.toml"
    customers.write_text('[customers.C1]\nlayout = "diagonal"\n')  # wrong already: refused, and left as it is
    env = smame_env(workdir, 1883)
    line = refused(["users", "add", "C1", "alice", "--password-stdin"], env, PASSWORD)
    assert "not written" in line and "layout" in line
    assert customers.read_text() == '[customers.C1]\nlayout = "diagonal"\n'
    customers.write_text("[customers.C1\n")
    assert "cannot be read" in refused(["users", "list"], env)


def test_reading_commands_need_a_store_and_a_unit_that_exists(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"U1": "C1"})
    env = smame_env(workdir, broker.port)
    db = workdir / "data" / "smame.db"
    for args in (["slots", "--unit", "U1", "--date", "2026-11-20"], ["quarantine"], ["report"], ["backup", "x.db"]):
        assert "no database at" in refused(args, env)
    assert not db.exists()  # and none was made
    assert "invalid choice: 'bogus'" in smame(["quarantine", "--reason", "bogus"], env, check=False).stderr
    proc = start_smame(env, workdir / "smame.log")
    wait_log(workdir / "smame.log", "subscribed to")
    assert stop(proc) == 0
    assert "is neither in" in refused(["slots", "--unit", "NOSUCH", "--date", "2026-11-20"], env)


def test_backup_verify_and_restore(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"R1": "C1"})
    env = smame_env(workdir, broker.port)
    db = workdir / "data" / "smame.db"
    log = workdir / "smame.log"
    day = yesterday().isoformat()
    proc = start_smame(env, log)
    try:
        wait_log(log, "subscribed to")
        publish(broker.port, [("smame/v1/R1/reading", telegram("R1", [(at(day, f"{h:02d}:00"), h)])) for h in range(6)])
        wait_readings(db, 6)
        assert "the live database itself" in refused(["backup", str(db)], env)
        smame(["backup", str(workdir / "copy.db")], env)
        in_use = f"is in use by smame run (pid {proc.pid}): stop it first"
        assert in_use in refused(["restore", str(workdir / "copy.db")], env)
        publish(broker.port, [("smame/v1/R1/reading", telegram("R1", [(at(day, "10:00"), 10)]))])
        wait_readings(db, 7)
    finally:
        assert stop(proc) == 0
    assert "is whole: 6 readings" in smame(["backup", "--verify", str(workdir / "copy.db")], env).stdout
    broken = workdir / "broken.db"
    broken.write_bytes((workdir / "copy.db").read_bytes()[:5000])
    assert "broken.db" in refused(["backup", "--verify", str(broken)], env)
    assert "broken.db" in refused(["restore", str(broken)], env)
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*) FROM readings").fetchone()[0] == 7  # a refused restore changed nothing
    assert "restored" in smame(["restore", str(workdir / "copy.db")], env).stdout
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*) FROM readings").fetchone()[0] == 6


def test_every_bad_line_of_units_csv_is_said_at_once(workdir: Path) -> None:
    write_registry(workdir, {"U1": "C1"})
    lines = ["unit_id,customer_id,meter_id,contract_kw,label", "U1,C1,,,"]
    lines += [f"X{i},NOPE,,," for i in range(23)] + ["U1,C1,,,", "bad id,C1,,,", "U2,C1,,-3,"]
    (workdir / "units.csv").write_text("\n".join(lines) + "\n")
    proc = smame(["export"], smame_env(workdir, 1883), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    said = proc.stderr.splitlines()
    assert said[0].endswith(f"26 bad lines in {workdir / 'units.csv'}:")
    assert len(said) == 1 + 20 + 1 and said[-1] == "... and 6 more"
    assert said[1] == f"{workdir / 'units.csv'}:3: customer_id 'NOPE' is not in the customers file"


def test_commands_run_where_no_store_is_refuse_and_create_none(workdir: Path) -> None:
    # a new operator in the wrong directory: no database there, and none must be left behind
    write_registry(workdir, {"U1": "C1"})
    customers = workdir / "customers.toml"
    customers.write_text(customers.read_text() + "co2_columns = true\n")
    env = smame_env(workdir, 1883)
    db = workdir / "data" / "smame.db"
    for args, stdin in (
        (["operators", "add", "alice", "--password-stdin"], PASSWORD),
        (["tokens", "add", "C1"], ""),
        (["export", "--all"], ""),
        (["emissions", "--customer", "C1", "--month", f"{yesterday():%Y-%m}"], ""),
        (["units"], ""),
        (["report"], ""),
    ):
        said = refused(args, env, stdin=stdin)
        assert said.startswith(f"smame: no database at {db}: run this where smame runs"), (args, said)
        assert not db.exists() and not (workdir / "data" / "export").exists(), args


def test_the_store_its_copies_and_the_customers_files_are_smames_alone_whatever_the_umask(
    broker: Mosquitto, workdir: Path
) -> None:
    write_registry(workdir, {"R1": "C1"})
    env = smame_env(workdir, broker.port)
    data = workdir / "data"
    old = os.umask(0o022)  # a shell's usual: smame's processes start with it
    try:
        proc = start_smame(env, workdir / "smame.log")
        try:
            wait_log(workdir / "smame.log", "subscribed to")
            publish(broker.port, [("smame/v1/R1/reading", telegram("R1", [(at(yesterday().isoformat(), "10:00"), 1)]))])
            wait_readings(data / "smame.db", 1)
            smame(["backup", str(workdir / "copy.db")], env)
            smame(["export", "--all"], env)
        finally:
            assert stop(proc) == 0
    finally:
        os.umask(old)
    made = [data / "smame.db", workdir / "copy.db", *(data / "export").rglob("*")]
    made += [p for p in data.iterdir() if p.name.startswith("smame.db")]
    modes = {str(p.relative_to(workdir)): stat.S_IMODE(p.stat().st_mode) for p in made}
    assert any(p.endswith(".csv") for p in modes) and "data/smame.db" in modes, modes
    wide = {p: oct(m) for p, m in modes.items() if m & 0o077}
    assert not wide, wide  # neither group nor others may read a reading


def test_customers_logins_lifted_bans_and_restores_are_in_the_audit_log_when_there_is_a_store(workdir: Path) -> None:
    write_registry(workdir, {"U1": "C1"})
    env = smame_env(workdir, 1883)
    added = smame(["users", "add", "C1", "alice", "--password-stdin"], env, stdin=PASSWORD)  # no store yet
    assert "not in the audit log" in added.stderr and not (workdir / "data" / "smame.db").exists()
    first_start(workdir)
    smame(["users", "add", "C1", "bob", "--password-stdin"], env, stdin=PASSWORD)
    smame(["users", "passwd", "C1", "bob", "--password-stdin"], env, stdin="another-long-pass\n")
    smame(["users", "remove", "bob"], env)
    with open_url(f"sqlite:///{workdir / 'data' / 'smame.db'}") as store:
        store.keep_bans([("192.0.2.9", "FTP", time.time(), time.time() + 600, "node-1")])
    smame(["bans", "remove", "192.0.2.9"], env)
    copy = workdir / "copy.db"
    smame(["backup", str(copy)], env)
    smame(["restore", str(copy)], env)
    with open_url(f"sqlite:///{workdir / 'data' / 'smame.db'}") as store:
        entries = [(a, t, d) for _, _, w, _, a, t, d in reversed(store.audit(20, None, "")) if w.startswith("cli:")]
    assert [(a, t) for a, t, _ in entries] == [
        ("login added", "bob"),
        ("login's password changed", "bob"),
        ("login removed", "bob"),
        ("ban lifted", "192.0.2.9"),
        ("store restored", str(workdir / "data" / "smame.db")),
    ]
    assert entries[0][2] == "customer C1; password"

"""TLS and passwords, against a Mosquitto that accepts nothing else."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.helpers import (
    Mosquitto,
    at,
    publish,
    secure_broker,
    smame,
    smame_env,
    start_smame,
    stop,
    telegram,
    wait_log,
    wait_until,
    write_registry,
)


@pytest.fixture
def tls_broker(workdir: Path) -> tuple[Mosquitto, Path]:
    users = {"smame-ingest": "s3cret-ingest", "U000000": "pw-0", "U000001": "pw-1", "tester": "pw-t"}
    mq, ca = secure_broker(workdir / "broker", users)
    yield mq, ca
    mq.stop()


def test_ingest_over_tls_with_a_password(tls_broker: tuple[Mosquitto, Path], workdir: Path) -> None:
    mq, ca = tls_broker
    write_registry(workdir, {"T1": "C1"})
    env = smame_env(
        workdir,
        mq.port,
        SMAME_BROKER__URL=f"mqtts://127.0.0.1:{mq.port}",
        SMAME_BROKER__CA_FILE=str(ca),
        SMAME_BROKER__USERNAME="smame-ingest",
        SMAME_BROKER__PASSWORD="s3cret-ingest",
    )
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "subscribed to")
    publish(
        mq.port,
        [("smame/v1/T1/reading", telegram("T1", [(at("2026-11-20", "10:00"), 1), (at("2026-11-20", "10:30"), 9)]))],
        auth=("tester", "pw-t"),
        ca=ca,
    )

    def slots() -> int:
        with sqlite3.connect(workdir / "data" / "smame.db") as c:
            return int(c.execute("SELECT count(*) FROM slots").fetchone()[0])

    wait_until(lambda: slots() == 1, 10)
    assert stop(proc) == 0
    assert "s3cret" not in log.read_text()  # the password is never logged
    assert "  21 10:00-10:30         0.8 A" in smame(["slots", "--unit", "T1", "--date", "2026-11-20"], env).stdout


def test_wrong_password_is_reported_and_retried(tls_broker: tuple[Mosquitto, Path], workdir: Path) -> None:
    mq, ca = tls_broker
    write_registry(workdir, {"T1": "C1"})
    env = smame_env(
        workdir,
        mq.port,
        SMAME_BROKER__URL=f"mqtts://127.0.0.1:{mq.port}",
        SMAME_BROKER__CA_FILE=str(ca),
        SMAME_BROKER__USERNAME="smame-ingest",
        SMAME_BROKER__PASSWORD="wrong",
        SMAME_BROKER__RECONNECT_MAX_S="0.5",
    )
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "not authorized")
    wait_until(lambda: log.read_text().count("unreachable") >= 2, 10)  # still trying, not crashed
    assert stop(proc) == 0


def test_untrusted_broker_certificate_is_refused(tls_broker: tuple[Mosquitto, Path], workdir: Path) -> None:
    mq, _ = tls_broker
    write_registry(workdir, {"T1": "C1"})
    env = smame_env(
        workdir,
        mq.port,
        SMAME_BROKER__URL=f"mqtts://127.0.0.1:{mq.port}",
        SMAME_BROKER__USERNAME="smame-ingest",
        SMAME_BROKER__PASSWORD="s3cret-ingest",
    )
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "CERTIFICATE_VERIFY_FAILED")
    assert stop(proc) == 0


def test_units_log_in_with_their_own_credentials(tls_broker: tuple[Mosquitto, Path], workdir: Path) -> None:
    mq, ca = tls_broker
    creds = workdir / "credentials.csv"
    creds.write_text("unit_id,password\nU000000,pw-0\nU000001,pw-1\n")
    env = smame_env(workdir, mq.port, SMAME_BROKER__CA_FILE=str(ca))
    common = [
        "simulate",
        "--units",
        "2",
        "--backfill",
        "0.0625",
        "--clean",
        "--connections",
        "per-unit",
        "--broker",
        f"mqtts://127.0.0.1:{mq.port}",
        "--end",
        "2026-11-23T09:00:00+09:00",
    ]
    run = smame([*common, "--credentials", str(creds)], env)
    assert "8 telegrams from 2 units acknowledged" in run.stdout
    creds.write_text("unit_id,password\nU000000,pw-0\nU000001,nope\n")
    refused = smame([*common, "--credentials", str(creds)], env, check=False)
    assert refused.returncode == 1
    assert "not authorized" in refused.stderr and "check the units' credentials" in refused.stderr

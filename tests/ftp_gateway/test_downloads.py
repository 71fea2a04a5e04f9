"""Which file a customer last downloaded, over which protocol and login, is kept in the store by `smame run`."""

from __future__ import annotations

from pathlib import Path

from aggregator.sqlite import SqliteStore
from ftp_gateway.downloads import Downloads
from tests.ftp_gateway.test_gateway import PASSWORDS, Gateway, ftps, retr, sftp, write_files
from tests.helpers import (
    Mosquitto,
    free_port,
    gateway_env,
    smame,
    smame_env,
    start_smame,
    stop,
    wait_log,
    write_registry,
)


def test_noted_downloads_merge_back_when_the_store_could_not_take_them() -> None:
    now = [100.0]
    noted = Downloads(lambda: now[0])
    noted.note("C1", "C1_20261123.csv", "ftp", "alice")
    taken = noted.take()
    assert taken == [("C1", "C1_20261123.csv", 100, "ftp", "alice", 1)] and noted.take() == []
    now[0] = 200.0
    noted.note("C1", "C1_20261123.csv", "sftp", "alice-2")
    noted.restore(taken)  # older than what was noted since: the newest stays, the counts add up
    assert noted.take() == [("C1", "C1_20261123.csv", 200, "sftp", "alice-2", 2)]


def test_downloads_over_ftps_and_sftp_are_kept_in_the_store(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"U1": "C1", "U2": "C2"})
    export = write_files(workdir)
    ftp, sftp_port = free_port(), free_port()
    env = smame_env(workdir, broker.port, **gateway_env(ftp, sftp_port))
    smame(["users", "add", "C1", "alice", "--password-stdin"], env, stdin=PASSWORDS["alice"] + "\n")
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    try:
        wait_log(log, "sftp: listening")
        wait_log(log, "ftp: listening")
        gateway = Gateway(env, ftp, sftp_port, export, log, proc)
        client = ftps(gateway)
        assert retr(client, "C1_20261123.csv") == b"unit_id\nC1-data\n"
        client.quit()
        wait_log(log, "ftp: download user=alice")
        files = sftp(gateway)
        with files.open("C1_20261123.csv") as f:
            f.read()
        files.close()
        wait_log(log, "sftp: download user=alice")
        assert stop(proc) == 0  # what was noted since the last write goes to the store on the way out
    finally:
        stop(proc)
    with SqliteStore(workdir / "data" / "smame.db") as store:
        (at, via, who, count) = store.downloads("C1")["C1_20261123.csv"]
        assert (via, who, count) == ("sftp", "alice", 2) and at > 0
        assert store.downloads("C2") == {}

"""The export service and `smame export` on a real store and real files."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest

from aggregator.backends import open_url
from aggregator.ingest import Ingestor
from aggregator.sqlite import SqliteStore
from csv_export.days import slots_query
from csv_export.exporter import SUCCEEDED, Exporter, ExportStopped
from csv_export.files import path_of, read_cursor, write_cursor, write_if_changed
from kernel.reading import KEEP, Incoming, Reading, Refused
from kernel.registry import load_registry
from kernel.timegrid import SLOT, Grid
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

GRID = Grid("Asia/Tokyo")
NOW = datetime.fromisoformat("2026-11-23T12:05:00+09:00").timestamp()
TODAY = date(2026, 11, 23)


def reading(unit: str, at: int, fwd: int) -> Incoming:
    return Incoming(
        Reading(unit, at, f"SM-{unit}", fwd, 0, 1, 1, 6, 1, at + 5), at + 7, f"smame/v1/{unit}/reading", b"{}"
    )


def history(units: list[str], days: int, skip: set[tuple[str, int]] = frozenset()) -> list[Incoming]:
    """Readings every half hour for `days` days before NOW; `skip` leaves some out."""
    end = GRID.floor(NOW)
    out = []
    for unit in units:
        for k, when in enumerate(range(end - days * 86400, end + 1, SLOT)):
            if (unit, when) not in skip:
                out.append(reading(unit, when, 1000 + 7 * k))
    return out


@pytest.fixture
def setup(workdir: Path, store_url: str) -> Iterator[tuple[Exporter, Ingestor, Path]]:
    """An ingestor and an exporter on one store, each on a connection of its own, on each backend."""
    write_registry(workdir, {"U1": "C1", "U2": "C2"})
    (workdir / "customers.toml").write_text('[customers.C1]\n[customers.C2]\nlayout = "wide"\n[customers.C3]\n')
    registry = load_registry(workdir / "units.csv", workdir / "customers.toml")
    ingest = Ingestor(open_url(store_url), registry, GRID)
    root = workdir / "export"
    exporter = Exporter(open_url(store_url), lambda: registry, GRID, root, 45, 120)
    yield exporter, ingest, root
    ingest.store.close()
    exporter.close()


def snapshot(root: Path) -> dict[Path, tuple[bytes, int]]:
    """The customers' files (in their directories) with their bytes and times."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.glob("*/*")) if p.is_file()}


def test_a_late_reading_ten_days_back_rewrites_that_file_and_no_other(setup: tuple[Exporter, Ingestor, Path]) -> None:
    exporter, ingest, root = setup
    late_at = GRID.day_start(TODAY - timedelta(days=10)) + 20 * SLOT
    ingest.commit(history(["U1", "U2"], 12, skip={("U1", late_at)}), [], int(NOW))
    first = exporter.scheduled(NOW)
    assert len(first.written) == 2 * 13  # C1 and C2 for 13 days; C3 has no units, so no data and no file
    assert not path_of(root, "C3", TODAY).exists()
    before = snapshot(root)
    target = path_of(root, "C1", TODAY - timedelta(days=10))
    assert ",E\n" in target.read_text()

    assert exporter.scheduled(NOW).written == []  # nothing changed: nothing written
    ingest.commit([reading("U1", late_at, 1000 + 7 * (late_at - (GRID.floor(NOW) - 12 * 86400)) // SLOT)], [], int(NOW))
    again = exporter.scheduled(NOW)
    assert again.written == [target]
    after = snapshot(root)
    changed = {p for p in after if after[p] != before[p]}
    assert changed == {target, target.with_name(target.name + ".sha256")}
    assert ",E\n" not in target.read_text()
    assert (
        subprocess.run(["sha256sum", "-c", target.name + ".sha256"], cwd=target.parent, capture_output=True).returncode
        == 0
    )


def test_files_rendered_from_a_newer_store_than_the_restored_one_still_get_its_late_data(
    setup: tuple[Exporter, Ingestor, Path],
) -> None:
    # The store restored from an older copy (`smame restore`) under an export directory whose cursor has seen
    # changes the copy lacks: what comes in now must still reach the files.
    exporter, ingest, root = setup
    late_at = GRID.day_start(TODAY - timedelta(days=10)) + 20 * SLOT
    ingest.commit(history(["U1", "U2"], 12, skip={("U1", late_at)}), [], int(NOW))
    exporter.scheduled(NOW)
    write_cursor(root, read_cursor(root) + 1000)
    ingest.commit([reading("U1", late_at, 1000 + 7 * (late_at - (GRID.floor(NOW) - 12 * 86400)) // SLOT)], [], int(NOW))
    target = path_of(root, "C1", TODAY - timedelta(days=10))
    assert exporter.scheduled(NOW).written == [target]
    assert ",E\n" not in target.read_text()


def test_a_backlog_older_than_the_first_reading_gets_its_files(setup: tuple[Exporter, Ingestor, Path]) -> None:
    # The first day with data is remembered between runs; a unit's backlog from before it (a unit that was
    # installed, then sent what it had stored) must still get its days' files.
    exporter, ingest, root = setup
    ingest.commit(history(["U1"], 2), [], int(NOW))
    assert {p.name for p in exporter.scheduled(NOW).written} == {f"C1_2026112{d}.csv" for d in (1, 2, 3)}
    backlog = [r for r in history(["U1"], 5) if r.reading.at < GRID.day_start(TODAY - timedelta(days=2))]
    ingest.commit(backlog, [], int(NOW))
    assert {p.name for p in exporter.scheduled(NOW).written} == {f"C1_2026112{d}.csv" for d in (0, 1)} | {
        "C1_20261118.csv",
        "C1_20261119.csv",
    }


def test_todays_file_holds_the_slots_closed_so_far(setup: tuple[Exporter, Ingestor, Path]) -> None:
    exporter, ingest, root = setup
    ingest.commit(history(["U1"], 1), [], int(NOW))
    exporter.scheduled(NOW)  # 12:05 JST with 120 s grace: slots up to 12:00 are closed
    lines = path_of(root, "C1", TODAY).read_text().splitlines()
    assert len(lines) == 1 + 24 and lines[-1].startswith("U1,SM-U1,2026-11-23,24,11:30,12:00,0.7,")


def test_retention_keeps_45_days_and_deletes_the_46th(setup: tuple[Exporter, Ingestor, Path]) -> None:
    exporter, _, root = setup
    for back in (44, 45, 46, 47):
        write_if_changed(path_of(root, "C1", TODAY - timedelta(days=back)), b"x\n")
    other = root / "C1" / "notes.txt"
    other.write_text("not ours")
    result = exporter.scheduled(NOW)
    kept = {p.name for p in (root / "C1").iterdir()}
    assert "C1_20261009.csv" in kept and "C1_20261010.csv" in kept  # 45 and 44 days back
    assert "C1_20261008.csv" not in kept and "C1_20261007.csv" not in kept  # 46 and 47 days back
    assert "C1_20261008.csv.sha256" not in kept and "notes.txt" in kept
    assert len(result.deleted) == 4


def test_a_reader_never_sees_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "C1" / "C1_20261123.csv"
    versions = [("a" * 200_000 + "\n").encode(), ("b" * 300_000 + "\n").encode()]
    write_if_changed(path, versions[0])
    seen: list[bytes] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            seen.append(path.read_bytes())

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(200):
        write_if_changed(path, versions[i % 2])
    done.set()
    thread.join()
    assert len(seen) > 10 and all(s in versions for s in seen)


def test_export_command_dates_and_customers(workdir: Path, setup: tuple[Exporter, Ingestor, Path]) -> None:
    _, ingest, root = setup
    ingest.commit(history(["U1", "U2"], 3), [], int(NOW))
    env = smame_env(workdir, 1883, SMAME_STORAGE__URL=ingest.store.url, SMAME_EXPORT__DIR=str(root))
    out = smame(["export", "--date", "2026-11-21", "--customer", "C2"], env).stdout
    assert "1 files written" in out and "C2_20261121.csv" in out
    assert smame(["export", "--date", "2026-11-21", "--customer", "C2"], env).stdout.startswith(
        "0 files written, 1 unchanged"
    )
    out = smame(["export", "--from", "2026-11-20", "--to", "2026-11-22"], env).stdout
    assert out.startswith("5 files written, 1 unchanged")  # 2 customers with units x 3 days, one already there
    smame(["export", "--all"], env)  # the window ends today, by the real clock: no file before the first reading
    days = {p.name.split("_")[1][:8] for p in root.glob("*/*.csv")}
    assert min(days) == "20261120" and not (root / "C3").exists()  # 2026-11-20 12:00; C3 has no units
    bad = smame(["export", "--customer", "C9"], env, check=False)
    assert bad.returncode == 2 and "unknown customer C9" in bad.stderr
    bad = smame(["export", "--from", "2026-11-20"], env, check=False)
    assert bad.returncode == 2 and "--from and --to go together" in bad.stderr


def test_a_failed_write_keeps_the_previous_file_and_the_next_run_retries(
    workdir: Path, setup: tuple[Exporter, Ingestor, Path]
) -> None:
    # The process may write no file over 1 KB: writes fail as on a full disk, with a real OSError.
    _, ingest, root = setup
    ingest.commit(
        history(["U1"], 2, skip={("U1", GRID.day_start(TODAY - timedelta(days=1)) + 10 * SLOT)}), [], int(NOW)
    )
    env = smame_env(workdir, 1883, SMAME_STORAGE__URL=ingest.store.url, SMAME_EXPORT__DIR=str(root))
    smame(["export", "--date", "2026-11-22", "--customer", "C1"], env)
    target = path_of(root, "C1", date(2026, 11, 22))
    old = target.read_bytes()
    ingest.commit([reading("U1", GRID.day_start(TODAY - timedelta(days=1)) + 10 * SLOT, 999_999)], [], int(NOW))

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))

    failed = subprocess.run(
        [*_smame_cmd(), "export", "--date", "2026-11-22", "--customer", "C1"],
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=small_files,
    )
    assert failed.returncode == 1 and "File too large" in failed.stderr
    assert target.read_bytes() == old
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name, target.name + ".sha256"]
    smame(["export", "--date", "2026-11-22", "--customer", "C1"], env)
    assert target.read_bytes() != old


def _smame_cmd() -> list[str]:
    return [sys.executable, "-m", "smame.cli"]


def test_unusable_export_directory_is_reported_and_ingest_goes_on(workdir: Path, broker: Mosquitto) -> None:
    write_registry(workdir, {"E1": "C1"})
    blocker = workdir / "not-a-directory"
    blocker.write_text("")
    env = smame_env(workdir, broker.port, SMAME_EXPORT__DIR=str(blocker / "export"))
    first_start(workdir)
    bad = smame(["export"], env, check=False)
    assert bad.returncode == 1 and "is not usable (setting export.dir)" in bad.stderr
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "export failed, will retry (or at once on SIGHUP)")
    wait_log(log, "subscribed to")
    publish(broker.port, [("smame/v1/E1/reading", telegram("E1", [(at("2026-11-20", "10:00"), 1)]))])
    wait_readings(workdir / "data" / "smame.db", 1)
    blocker.unlink()  # the operator fixes it and says so: the export runs at once, not at the next half hour
    proc.send_signal(signal.SIGHUP)
    wait_log(log, "export: 1 files written")
    assert stop(proc) == 0


def test_runs_are_scheduled_after_each_half_hour_plus_grace(setup: tuple[Exporter, Ingestor, Path]) -> None:
    exporter, _, _ = setup
    at_1205 = datetime.fromisoformat("2026-11-23T12:05:00+09:00").timestamp()
    assert exporter.delay(at_1205) == 25 * 60 + 120  # next: 12:30 plus 2 minutes
    at_1201 = datetime.fromisoformat("2026-11-23T12:01:00+09:00").timestamp()
    assert exporter.delay(at_1201) == 60  # 12:00's run is still due at 12:02


def test_database_retention_deletes_only_what_is_older(workdir: Path, setup: tuple[Exporter, Ingestor, Path]) -> None:
    exporter, ingest, _ = setup
    ingest.commit(history(["U1", "U2"], 8), [], int(NOW))
    store = exporter.store
    keep = Exporter(store, exporter.registry, GRID, exporter.root, 45, 120, db_retention_days=5)
    before = int(NOW) - 5 * 86400
    old_readings = store.execute("SELECT count(*) FROM readings WHERE at < ?", (before,)).fetchone()[0]
    total = store.reading_count()
    assert old_readings > 0
    keep.scheduled(NOW)
    assert store.reading_count() == total - old_readings
    assert store.execute("SELECT count(*) FROM slots WHERE slot < ?", (before,)).fetchone()[0] == 0
    assert store.execute("SELECT count(*) FROM slots WHERE slot >= ?", (before,)).fetchone()[0] > 0


def test_the_quarantine_is_pruned_by_age(setup: tuple[Exporter, Ingestor, Path]) -> None:
    exporter, ingest, _ = setup
    refused = [
        Refused.of(int(NOW) - age * 86400, "smame/v1/X/reading", "X", "not_json", "bad", b"x" * 100_000)
        for age in (100, 91, 89, 0)
    ]
    ingest.commit([], refused, int(NOW))
    store = exporter.store
    assert [len(q.payload) for q in store.quarantine()] == [KEEP] * 4  # an excerpt, never the whole payload
    Exporter(store, exporter.registry, GRID, exporter.root, 45, 120, quarantine_days=90).scheduled(NOW)
    assert sorted(int(NOW) - q.received for q in store.quarantine()) == [0, 89 * 86400]


def test_a_day_whose_first_rows_have_no_values_exports(workdir: Path) -> None:
    # The worker's reader types each column from the first rows it sees; nulls first must not break it.
    units = {f"N{u:04d}": "C1" for u in range(3000)}
    write_registry(workdir, units)
    registry = load_registry(workdir / "units.csv", workdir / "customers.toml")
    store = SqliteStore(workdir / "smame.db")
    ends = GRID.day_slots(TODAY)
    rows = [(end, u, None, "M", 0, None, "M", 0, None, None, None) for end in ends[:2] for u in units]
    rows += [(end, u, 12, "A", 0, 3, "E", 0, "SM-9", 0x01, 1) for end in ends[2:] for u in units]
    with store.transaction():
        store.upsert_slots(("imp", "exp"), rows)
        store.insert_readings([(u, ends[0] - SLOT, "SM-9", 0, 0, 1, 1, 6, 0, 0, 0, 0, None) for u in units])
    exporter = Exporter(store, lambda: registry, GRID, workdir / "export", 45, 120)
    try:
        result = exporter.export([("C1", TODAY)], NOW)
    finally:
        exporter.close()
    [path] = result.written
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + 3000 * 24  # today up to 12:00
    assert lines[1] == "N0000,SM-9,2026-11-23,1,00:00,00:30,,,M"  # the day's serial, shown from its start
    assert lines[3] == "N0000,SM-9,2026-11-23,3,01:00,01:30,1.2,0.3,E"


def test_a_killed_export_worker_fails_one_run_and_the_next_has_new_workers(
    setup: tuple[Exporter, Ingestor, Path],
) -> None:
    import os
    import signal as signals
    from concurrent.futures.process import BrokenProcessPool

    exporter, ingest, root = setup
    ingest.commit(history(["U1", "U2"], 1), [], int(NOW))
    exporter.export([("C1", TODAY)], NOW)  # the workers run
    assert exporter._pool is not None
    for pid in list(exporter._pool._processes):  # as the out-of-memory killer would
        os.kill(pid, signals.SIGKILL)
    with pytest.raises(BrokenProcessPool):
        for _ in range(50):  # the pool notices at the next submission or result
            exporter.export([("C1", TODAY - timedelta(days=1))], NOW)
    result = exporter.export([("C1", TODAY), ("C2", TODAY)], NOW)
    assert result.days == 1 and path_of(root, "C2", TODAY).exists()


def test_closing_the_exporter_ends_a_run_under_way_unfinished(setup: tuple[Exporter, Ingestor, Path]) -> None:
    # smame's stop closes the exporter while a long catch-up run may be rendering: the run must end within a
    # moment, not hold the stop until its deadline, and must not record a success it did not have.
    exporter, ingest, root = setup
    ingest.commit(history(["U1", "U2"], 12), [], int(NOW))
    first_day, closed = threading.Event(), threading.Event()

    def progress(done: int, total: int) -> None:
        if done == 1:
            first_day.set()
            closed.wait(10)

    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(
                exporter.export(
                    [(c, TODAY - timedelta(days=k)) for k in range(13) for c in ("C1", "C2")], NOW, progress
                )
            )
        except Exception as exc:
            outcome.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    assert first_day.wait(30)
    exporter.close()
    closed.set()
    runner.join(5)
    assert not runner.is_alive(), "the run went on after the exporter was closed"
    assert [type(x) for x in outcome] == [ExportStopped]
    with open_url(exporter.store.url) as store:
        assert store.get_meta(SUCCEEDED) == ""  # no success recorded


async def test_a_failed_export_is_retried_soon_at_once_on_sighup_and_after_an_export_by_hand(
    workdir: Path, setup: tuple[Exporter, Ingestor, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import csv_export.exporter as exporter_module

    monkeypatch.setattr(exporter_module, "RETRY_MIN_S", 0.3)  # a minute in production
    monkeypatch.setattr(exporter_module, "POLL_S", 0.1)
    good, ingest, root = setup
    ingest.commit(history(["U1"], 1), [], int(NOW))
    blocker = workdir / "blocked"
    blocker.write_text("a file where the export directory should be\n")
    t0 = time.time()
    service = Exporter(
        SqliteStore(workdir / "smame.db"),
        good.registry,
        GRID,
        blocker / "export",
        45,
        120,
        clock=lambda: NOW + time.time() - t0,
    )
    runner = asyncio.create_task(service.run())
    try:
        await _until(lambda: service.stats.failures == 1)
        assert "not usable" in service.stats.last_error
        blocker.unlink()  # fixed: the retry a moment later succeeds (not the run at the next half hour)
        await _until(lambda: not service.stats.last_error)
        assert service.stats.failures == 1 and (blocker / "export").is_dir()

        shutil.rmtree(blocker)
        blocker.write_text("broken again\n")
        service.retry_now()  # what SIGHUP does: a run now
        await _until(lambda: service.stats.failures == 2)

        monkeypatch.setattr(exporter_module, "RETRY_MIN_S", 3600.0)  # from now on its own retries are far off
        service.retry_now()
        await _until(lambda: service.stats.failures == 3)
        blocker.unlink()  # fixed, and the operator runs `smame export`:
        await asyncio.get_running_loop().run_in_executor(None, good.scheduled, service.clock())
        await _until(lambda: not service.stats.last_error, timeout=5)  # the service sees it and runs again now
        assert service.stats.failures == 3
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        service.close()


async def _until(done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "not done in time"
        await asyncio.sleep(0.05)


def test_a_days_job_seeks_its_own_units_slots_and_reads_no_other_units_rows(store_url: str) -> None:
    # the plan of the export's query, as the store's planner makes it for a fleet: a job of 50 units of 2,000
    # must not go through the other units' rows of the day (with a million units that made the export quadratic)
    day = GRID.day_start(date(2026, 11, 22))
    units = [f"U{u:05d}" for u in range(2000)]
    with open_url(store_url) as store:
        with store.transaction():
            store.insert_rows(
                "slots",
                ["slot", "unit", "imp", "imp_q", "exp", "exp_q", "meter", "e1", "coef"],
                [(day + k * SLOT, u, 10, "A", 0, "A", "M", 1, 1) for k in range(1, 49) for u in units],
            )
        postgres = store_url.startswith("postgresql")
        query = slots_query(day, day + 48 * SLOT, units[100:150], "ascii" if postgres else "unicode")
        if not postgres:  # (PostgreSQL's planner reads a table this small whole, by choice: its plan at a fleet's
            # scale, an index scan on both keys for a job of a small share, is in docs/performance.md)
            plan = " ".join(str(r[-1]) for r in store.execute("EXPLAIN QUERY PLAN " + query).fetchall())
            assert "SEARCH slots USING PRIMARY KEY (slot=? AND unit=?)" in plan, plan
        assert len(store.execute(query).fetchall()) == 48 * 50

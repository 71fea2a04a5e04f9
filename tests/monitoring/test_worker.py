"""The monitor's long jobs in a process of their own: what comes back, and what a job that fails, dies, hangs or
is asked to stop costs the rest."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from aggregator.backends import open_url
from aggregator.store import Store
from kernel.child import Stopped
from monitoring.worker import JobFailed, Worker


def note(store: Store, text: str, stopping: Callable[[], bool]) -> tuple[int, str]:
    store.set_meta("note", text)
    return os.getpid(), Path("/proc/self/comm").read_text().strip()


def fail(store: Store, stopping: Callable[[], bool]) -> None:
    store.execute("SELECT * FROM no_such_table")


def die(store: Store, stopping: Callable[[], bool]) -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would


def hang(store: Store, seconds: float, stopping: Callable[[], bool]) -> None:
    time.sleep(seconds)  # stuck: never asks whether to stop


def steps(store: Store, started: Path, stopping: Callable[[], bool]) -> int:
    started.touch()
    done = 0
    while not stopping():
        time.sleep(0.05)
        done += 1
        store.set_meta("steps", str(done))  # each step kept
    raise Stopped


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    url = f"sqlite:///{tmp_path / 'smame.db'}"
    open_url(url).close()
    return Worker(functools.partial(open_url, url))


def run(worker: Worker, job: Callable[..., object], *args: object, limit_s: float = 60) -> object:
    return asyncio.run(worker.run(job, *args, limit_s=limit_s))


def test_a_job_runs_in_a_process_of_its_own_on_its_own_connection(worker: Worker, tmp_path: Path) -> None:
    pid, name = run(worker, note, "made elsewhere")  # type: ignore[misc]
    assert pid != os.getpid() and name == "smame-monitor"  # what ps and top show
    with open_url(f"sqlite:///{tmp_path / 'smame.db'}") as store:
        assert store.get_meta("note") == "made elsewhere"


def test_a_job_that_fails_dies_or_hangs_is_said_and_the_next_one_runs(worker: Worker) -> None:
    with pytest.raises(JobFailed) as failed:
        run(worker, fail)
    assert str(failed.value) == "OperationalError: no such table: no_such_table"
    assert "in fail" in failed.value.detail  # the traceback, for the log
    with pytest.raises(JobFailed, match="its process could not start: .*pickle"):  # said, not raised as it is
        run(worker, note, lambda: "a local function")
    with pytest.raises(JobFailed, match=r"ended without an answer \(killed by signal 9\)"):
        run(worker, die)
    began = time.monotonic()
    with pytest.raises(JobFailed, match="ran for more than 1 s and was ended"):
        run(worker, hang, 60.0, limit_s=1)
    assert time.monotonic() - began < 30  # not the minute it would have hung
    assert not worker._running  # nothing left behind
    assert run(worker, note, "again")[1] == "smame-monitor"  # type: ignore[index]


def test_closing_stops_a_job_between_its_steps_and_kills_one_that_does_not_listen(
    worker: Worker, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    outcome: list[BaseException] = []

    def in_thread(on: Worker, job: Callable[..., object], *args: object) -> None:
        try:
            run(on, job, *args)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=in_thread, args=(worker, steps, started))
    thread.start()
    while not started.exists():
        time.sleep(0.05)
    time.sleep(0.3)
    worker.close()
    thread.join(10)
    assert isinstance(outcome.pop(), Stopped)
    with open_url(f"sqlite:///{tmp_path / 'smame.db'}") as store:
        assert int(store.get_meta("steps")) > 1  # what it did before stopping stays
    with pytest.raises(Stopped):  # closed: no job starts
        run(worker, note, "late")

    stubborn = Worker(worker.opener)
    thread = threading.Thread(target=in_thread, args=(stubborn, hang, 600.0))
    thread.start()
    while not stubborn._running or next(iter(stubborn._running)).pid is None:
        time.sleep(0.05)
    time.sleep(1)  # the job is under way
    began = time.monotonic()
    stubborn.close()
    assert time.monotonic() - began < 10  # killed after a grace, not waited for
    thread.join(10)
    assert isinstance(outcome.pop(), Stopped)  # not a failure of the job

"""Where the monitor's long jobs run (the units' health pass, the daily report): a job is a function
`job(store, *args, stopping)` that reads and writes the store, and returns what the monitor needs of it.

`Worker` runs each job in a process of its own, on a connection of its own. At a million units these jobs are
minutes of Python: on a thread of smame's process they would take the interpreter lock from ingest's event loop
(measured: the broker's keepalive lost near the end of a daily report) and leave their peak in smame's heap.
A process a job gives all of its memory back when the job ends, and one that hangs or runs out of time is
killed without touching the rest. `OnStoreThread` runs them on the monitor's store thread, in this process
(the monitor's own tests)."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Protocol, TypeVar

from aggregator.store import Store
from kernel.child import Stopped, become_child

T = TypeVar("T")
STOP_GRACE_S = 3.0  # how long a stopping smame waits for a job to stop between its steps before killing it


class JobFailed(Exception):
    """A job did not return: an error in it, its process killed (out of memory), or out of time. The message
    says why in a line; `detail` has the job's traceback when it raised."""

    def __init__(self, why: str, detail: str = "") -> None:
        super().__init__(why)
        self.detail = detail


class Runner(Protocol):
    async def run(self, job: Callable[..., T], *args: Any, limit_s: float) -> T:
        """`job(store, *args, stopping)`'s result; raise JobFailed saying why there is none, Stopped when the
        runner was closed meanwhile."""
        ...

    def close(self) -> None:
        """Have a job under way stop (`stopping()` turns true) and end; no job runs after."""
        ...


class OnStoreThread:
    """Runs jobs on a store's thread, in this process; `limit_s` is not enforced."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._closing = False

    async def run(self, job: Callable[..., T], *args: Any, limit_s: float) -> T:
        try:
            return await self.store.call(job, self.store, *args, lambda: self._closing)
        except Stopped:
            raise
        except Exception as exc:
            raise JobFailed(f"{type(exc).__name__}: {exc}", traceback.format_exc()) from exc

    def close(self) -> None:
        self._closing = True


class Worker:
    """Runs each job in a new process (spawned: forking a process that runs threads is unsafe) named `name`,
    on a store that `opener()` opens there (it must pickle: a module's function, or a partial of one)."""

    def __init__(self, opener: Callable[[], Store], name: str = "smame-monitor") -> None:
        self.opener = opener
        self.name = name
        self._context = multiprocessing.get_context("spawn")
        self._stop = self._context.Event()
        self._running: set[BaseProcess] = set()  # until their outcome is read, even when the caller stopped waiting

    async def run(self, job: Callable[..., T], *args: Any, limit_s: float) -> T:
        if self._stop.is_set():
            raise Stopped
        reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_serve, args=(writer, self._stop, self.name, self.opener, job, args), daemon=True
        )
        loop = asyncio.get_running_loop()
        self._running.add(process)
        try:
            # spawning pickles the arguments (a million units' ids: a third of a second): not on the event loop
            await loop.run_in_executor(None, process.start)
        except BaseException as exc:
            self._running.discard(process)
            reader.close()
            if isinstance(exc, Exception):  # out of processes or memory, or an argument that does not pickle
                raise JobFailed(f"its process could not start: {type(exc).__name__}: {exc}") from exc
            raise
        finally:
            writer.close()  # the child's copy is then the only one: when the child ends, the pipe ends
        return await loop.run_in_executor(None, self._outcome, reader, process, limit_s)

    def _outcome(self, reader: Connection, process: BaseProcess, limit_s: float) -> Any:
        """What the job in `process` sent, waited for up to `limit_s`; raise JobFailed (or Stopped) when it
        sent none."""
        try:
            if not reader.poll(limit_s):
                process.kill()
                raise JobFailed(f"it ran for more than {limit_s:.0f} s and was ended")
            kind, value = reader.recv()
        except (EOFError, OSError):
            process.join()
            if self._stop.is_set():  # killed by close(): not a failure of the job
                raise Stopped from None
            code = process.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise JobFailed(f"its process ended without an answer ({how})") from None
        finally:
            reader.close()
            process.join()
            self._running.discard(process)
        if kind == "stopped":
            raise Stopped
        if kind == "failed":
            raise JobFailed(*value)
        return value

    def close(self) -> None:
        self._stop.set()
        deadline = time.monotonic() + STOP_GRACE_S
        for process in list(self._running):
            if process.pid is None:  # not started yet: it will not be (`run` sees the stop first)
                continue
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()


def _serve(
    writer: Connection,
    stop: Any,
    name: str,
    opener: Callable[[], Store],
    job: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    """The job's process: open the store, run the job and send back what came of it."""
    become_child(name)
    answer: tuple[str, Any]
    try:
        with opener() as store:
            answer = ("done", job(store, *args, stop.is_set))
    except Stopped:
        answer = ("stopped", None)
    except Exception as exc:  # its text and where it arose: not the exception, which may not pickle
        answer = ("failed", (f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    writer.send(answer)
    writer.close()

"""The ingest writer: a process of its own that commits batches, beside the process that receives them.

Validating telegrams and committing them each hold the interpreter lock most of the time they run; in one
process they take turns on one core. Here the receiving process decodes and validates while this one
commits the batch before, so the two run on two cores. The receiver sends a batch over a pipe and sends
its PUBACKs only after this process has replied, which it does after COMMIT: a crash of either process at
any point leaves the batch unacknowledged and the broker delivers it again. Two batches may be in the pipe:
while the store writes one (on a thread of this process), the next is planned from the cached states of its
units, and nothing behind a batch that failed is committed.

The writer lives only as long as its pipe: it ignores SIGINT and SIGTERM (the receiver decides when
to stop, and a Ctrl-C reaches the whole process group), finishes the commits in hand, and exits when the
receiver closes the pipe or dies.

It is started as `python -m aggregator.writer` with its end of a socket pair, not through multiprocessing's
spawn, which would import the parent's main module (the whole CLI, half a second of CPU) before the first
commit; this imports the aggregator alone. Its directory of units comes as plain data (`UnitTable`).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

import msgspec

from aggregator.backends import is_postgres, open_url
from aggregator.ingest import CACHE_UNITS, Ingestor, Outcome, Plan, UnitTable
from aggregator.sqlite import file_identity, sqlite_path
from aggregator.store import Deposed
from kernel.child import name_process
from kernel.reading import Incoming, Refused, Status
from kernel.timegrid import Grid

_COMMIT, _RELOAD, _OK, _FAILED, _DEPOSED = b"C", b"R", b"K", b"E", b"D"
WRITER_CACHE_MIB = 16  # SQLite page cache of the ingest connection (see Store)
WRITER_SWITCH_S = 0.0005  # the writer's interpreter lock switch interval (see _serve)


class _Batch(msgspec.Struct, array_like=True):
    readings: list[Incoming]
    refused: list[Refused]
    now: int
    statuses: list[Status] = []


class _Done(msgspec.Struct, array_like=True):
    stored: int
    duplicates: int
    slots: int
    quarantined: dict[str, int]


class WriterError(RuntimeError):
    """The writer could not start, a commit failed, or the process is gone; the message says which."""


class Writer:
    """The receiving side: starts the writer process and hands it batches in order, up to two at once. It may be
    started again after `close` (a node that leads again)."""

    def __init__(self, url: str, synchronous: str, grid: Grid, units: UnitTable, shared: bool = False) -> None:
        self.path: Path | None = None if is_postgres(url) else sqlite_path(url)  # the store's file, if it has one
        self._args = (url, synchronous, grid, shared)
        self._units = units
        self.totals = Outcome()  # since start, for the metrics
        self._process: subprocess.Popen[bytes] | None = None
        self._exited: int | None = None  # a descriptor readable once the process has ended (Linux pidfd)
        self._conn: Connection | None = None
        # One thread sends on the pipe, in the order commits were asked for, and another reads the replies,
        # which come in the same order: each reply settles the oldest waiting commit, even when the coroutine
        # that awaited it was cancelled.
        self._pipe = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        self._waiting: deque[Future[None]] = deque()
        self._replies: threading.Thread | None = None
        self._closed = False
        self._fence: tuple[str, int] | None = None
        self.identity: tuple[int, int] | None = None  # the store file's (SQLite), once the writer has it open

    async def start(self, fence: tuple[str, int] | None = None) -> None:
        """Start the process and wait until its store is open; raises WriterError with its reason. With
        `fence` (the leader's application name, its epoch) the writer's session carries that name, and each
        commit first checks that the node still leads in that epoch: one that does not raises Deposed."""
        if self._closed:
            self._pipe = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
            self._closed = False
        self._fence = fence
        await asyncio.get_running_loop().run_in_executor(self._pipe, self._start)

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:  # closed here once inherited, so that the writer's death reads as end-of-file
            # no fork: the receiver has threads and an event loop
            self._process = subprocess.Popen(
                [sys.executable, "-m", "aggregator.writer", str(theirs.fileno())], pass_fds=[theirs.fileno()]
            )
        self._exited = os.pidfd_open(self._process.pid)
        self._conn = Connection(ours.detach())
        self._send(pickle.dumps((*self._args, self._units, self._fence)))
        reply = self._receive()
        if reply[:1] != _OK:
            self._process.wait(10)
            raise WriterError(reply[1:].decode())
        if self.path is not None:
            self.identity = file_identity(self.path)
        self._replies = threading.Thread(target=self._read_replies, name="writer-replies", daemon=True)
        self._replies.start()

    async def commit(
        self, readings: list[Incoming], refused: list[Refused], now: int, statuses: list[Status] | None = None
    ) -> None:
        """Commit a batch (with units' status messages) in the writer and count it in `totals`; returns when it
        is durable (raises WriterError when it is not, Deposed when another node leads). Batches are committed
        in the order this is called; a second may be sent while the first commits."""
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(self._pipe, self._send_batch, readings, refused, now, statuses or [])
        await asyncio.wrap_future(reply)

    @property
    def pid(self) -> int | None:
        """The writer process's id, once started."""
        return None if self._process is None else self._process.pid

    async def watch(self) -> None:
        """Wait while the writer lives; raise WriterError when it dies (even with no batch to commit)."""
        loop = asyncio.get_running_loop()
        dead: asyncio.Future[None] = loop.create_future()
        fd = self._exited
        assert fd is not None, "watch() before start()"
        loop.add_reader(fd, _settle, dead)
        try:
            await dead
        finally:
            loop.remove_reader(fd)
        raise WriterError(f"the writer process is gone ({self._exit()})")

    def reload(self, units: UnitTable) -> None:
        """Use this directory of units from the next batch on."""
        self._units = units
        if not self._closed:  # a SIGHUP while stopping
            self._pipe.submit(self._reload)

    def _reload(self) -> None:
        if self._conn is not None:  # else the process starts with the new one
            self._send(_RELOAD + pickle.dumps(self._units))

    def abort(self) -> None:
        """Kill a writer that commits nothing (stopped, or stuck on a disk or a lock), then close as `close` does:
        what it had in hand was never acknowledged, and the broker delivers it again."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        self.close()

    def close(self) -> None:
        """Let the writer finish the commit in hand and exit; wait for it. A writer still opening the store (one
        that waits on a lock held elsewhere) has nothing in hand: it is killed, not waited for."""
        self._closed = True
        if self._process is not None and self._replies is None and self._process.poll() is None:
            self._process.kill()  # its start, on the pipe's thread, then ends with the process
        self._pipe.shutdown(wait=True)
        if self._conn is not None:
            # end-of-file for the writer, which replies to what it has and exits; its replies are still read
            _shut_write(self._conn.fileno())
        if self._process is not None:
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:  # stuck (a disk that does not answer): it holds nothing unacknowledged
                self._process.kill()
                self._process.wait()
        if self._replies is not None:
            self._replies.join()  # the pipe has ended with the process
            self._replies = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._exited is not None:
            os.close(self._exited)
            self._exited = None

    def _send_batch(
        self, readings: list[Incoming], refused: list[Refused], now: int, statuses: list[Status]
    ) -> Future[None]:
        """Send a batch (on the pipe's thread); the future settles with its reply."""
        done: Future[None] = Future()
        self._waiting.append(done)  # before sending: the reply may come at once
        try:
            self._send(_COMMIT + _encode(_Batch(readings, refused, now, statuses)))
        except WriterError as exc:
            self._waiting.remove(done)
            done.set_exception(exc)
        return done

    def _read_replies(self) -> None:
        """Settle each waiting commit with its reply, oldest first, until the pipe ends; then fail the rest."""
        while True:
            try:
                reply = self._receive()
            except WriterError as exc:
                while self._waiting:
                    _settle_commit(self._waiting.popleft(), exc)
                return
            done = self._waiting.popleft()
            if reply[:1] == _DEPOSED:
                _settle_commit(done, Deposed(reply[1:].decode()))
            elif reply[:1] != _OK:
                _settle_commit(done, WriterError(f"commit failed in the writer process: {reply[1:].decode()}"))
            else:
                result = _decode_done(reply[1:])
                t = self.totals
                t.stored += result.stored
                t.duplicates += result.duplicates
                t.slots += result.slots
                t.quarantined.update(result.quarantined)
                _settle_commit(done, None)

    def _send(self, message: bytes) -> None:
        assert self._conn is not None
        try:
            self._conn.send_bytes(message)
        except OSError as exc:
            raise WriterError(f"the writer process is gone ({self._exit()}): {exc}") from None

    def _receive(self) -> bytes:
        assert self._conn is not None
        try:
            return self._conn.recv_bytes()
        except (EOFError, OSError):
            raise WriterError(f"the writer process is gone ({self._exit()})") from None

    def _exit(self) -> str:
        assert self._process is not None
        try:
            code = self._process.wait(1)
        except subprocess.TimeoutExpired:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def _shut_write(fd: int) -> None:
    """Shut the sending side of a socket (not closed: its other side is still read)."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # the writer is gone already
        pass
    finally:
        sock.detach()


def _settle_commit(done: Future[None], error: BaseException | None) -> None:
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_encode = msgspec.msgpack.Encoder().encode
_decode_batch = msgspec.msgpack.Decoder(_Batch).decode
_decode_done = msgspec.msgpack.Decoder(_Done).decode


def _serve(conn: Connection) -> None:
    """The writer process: open the store its first message names, then commit each batch received and
    reply, until the pipe closes."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # Two threads here: on PostgreSQL one plans the next batch in Python while the other waits on the store. At
    # the default 5 ms, the one whose store call returned waits up to that long for the interpreter lock after
    # each statement while the other plans (docs/performance.md, "2026-12-04: two batches in flight").
    sys.setswitchinterval(WRITER_SWITCH_S)
    name_process("smame-writer")
    try:
        url, synchronous, grid, shared, units, fence = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):  # the receiver is gone already
        return
    try:
        # a leader's session is named so that a node taking over can end it (see aggregator.leadership)
        name = "smame writer" if fence is None else fence[0]
        store = open_url(url, synchronous, cache_mib=WRITER_CACHE_MIB, application_name=name)
    except Exception as exc:  # any reason the store cannot open is told to the receiver
        conn.send_bytes(_FAILED + str(exc).encode())
        return
    ingestor = Ingestor(
        store, units, grid, cache_limit=cache_limit(units), shared=shared, epoch=None if fence is None else fence[1]
    )
    conn.send_bytes(_OK)
    try:
        # SQLite writes in this process and takes the interpreter lock back for each row: planning beside it
        # made its writing slower (docs/performance.md, "2026-12-04: two batches in flight"); PostgreSQL
        # writes in its server.
        failed = _commit_all(conn, ingestor, overlap=is_postgres(url))
    finally:
        store.close()
    if failed is not None:
        _refuse_all(conn, failed)


def cache_limit(units: UnitTable) -> int:
    """Units whose last points the writer keeps: every unit of the registry (and a quarter more, for units
    removed since), at least CACHE_UNITS. With fewer than the fleet, the cache emptied whenever it was full, and
    in each half hour's burst most batches read their units' last points from the store again."""
    return max(CACHE_UNITS, len(units.units) * 5 // 4)


def _commit_all(conn: Connection, ingestor: Ingestor, overlap: bool) -> bytes | None:
    """Commit each batch received and reply, in order, until the pipe closes (None) or a commit fails (its
    reply). Batches are written by the applying thread. With `overlap`, one that `Ingestor.plan` makes from
    its cache alone is written while this thread reads and plans the next (the receiver sends one ahead), so
    that the store works on one batch while the next is prepared; any other batch reads the store and waits
    until those before it are written. Without, each batch is written before the next is read."""
    jobs: queue.Queue[Plan | _Batch | None] = queue.Queue(maxsize=1)  # beside the one being written
    applier = _Applier(conn, ingestor, jobs)
    thread = threading.Thread(target=applier.run, name="apply")
    thread.start()
    try:
        while applier.failed is None:
            try:
                message = conn.recv_bytes()
            except (EOFError, OSError):  # the receiver closed the pipe or died
                return None
            if message[:1] == _RELOAD:
                table: UnitTable = pickle.loads(message[1:])
                ingestor.units = table  # replaced whole: from the next batch on
                ingestor.cache_limit = cache_limit(table)
                continue
            batch = _decode_batch(message[1:])
            try:
                planned = ingestor.plan(batch.readings, batch.refused, batch.now, batch.statuses)
            except Exception:  # committed as any other batch, which says why it cannot be
                planned = None
            if planned is not None:
                jobs.put(planned)
            else:  # it reads the store and changes the cache: nothing is planned until it is done
                jobs.put(batch)
            if planned is None or not overlap:
                jobs.join()
        return applier.failed
    finally:
        jobs.put(None)
        thread.join()


class _Applier:
    """The thread that writes batches in the order received and replies to each; after a failed one it
    replies with the same failure to every batch after it."""

    def __init__(self, conn: Connection, ingestor: Ingestor, jobs: queue.Queue[Plan | _Batch | None]) -> None:
        self.conn, self.ingestor, self.jobs = conn, ingestor, jobs
        self.failed: bytes | None = None

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                self._write(job)
            except OSError:  # the receiver is gone: the main thread learns it from the pipe
                pass
            finally:
                self.jobs.task_done()

    def _write(self, job: Plan | _Batch) -> None:
        if self.failed is not None:
            self.conn.send_bytes(self.failed)
            return
        try:
            if isinstance(job, Plan):
                outcome = self.ingestor.apply(job)
            else:
                outcome = self.ingestor.commit(job.readings, job.refused, job.now, job.statuses)
            self.ingestor.store.check_identity()  # committed into a file that is gone: acknowledge nothing
        except Deposed as exc:  # rolled back: another node leads now
            self.failed = _DEPOSED + str(exc).encode()
        except Exception:  # rolled back; the receiver stops and nothing of the batch is acknowledged
            self.failed = _FAILED + traceback.format_exc(limit=-3).encode()
        else:
            self.conn.send_bytes(
                _OK + _encode(_Done(outcome.stored, outcome.duplicates, outcome.slots, dict(outcome.quarantined)))
            )
            return
        self.conn.send_bytes(self.failed)


def _refuse_all(conn: Connection, failed: bytes) -> None:
    """After a failed commit, give every later batch the same answer until the receiver closes the pipe: the
    process stays until then, so that the receiver learns why from the reply, not from the process's end."""
    while True:
        try:
            message = conn.recv_bytes()
            if message[:1] == _COMMIT:
                conn.send_bytes(failed)
        except (EOFError, OSError):
            return


if __name__ == "__main__":  # started by Writer, with its end of the socket pair
    _serve(Connection(int(sys.argv[1])))

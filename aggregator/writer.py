"""The ingest writer: a process of its own that commits batches, beside the process that receives them.

Validating telegrams and committing them each hold the interpreter lock most of the time they run; in one
process they take turns on one core. Here the receiving process decodes and validates while this one
commits the batch before, so the two run on two cores. The receiver sends a batch over a pipe and sends
its PUBACKs only after this process has replied, which it does after COMMIT: a crash of either process at
any point leaves the batch unacknowledged and the broker delivers it again.

The writer lives only as long as its pipe: it ignores SIGINT and SIGTERM (the receiver decides when
to stop, and a Ctrl-C reaches the whole process group), finishes the commit in hand, and exits when the
receiver closes the pipe or dies.

It is started as `python -m aggregator.writer` with its end of a socket pair, not through multiprocessing's
spawn, which would import the parent's main module (the whole CLI, half a second of CPU) before the first
commit; this imports the aggregator alone. Its directory of units comes as plain data (`UnitTable`).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

import msgspec

from aggregator.backends import is_postgres, open_url
from aggregator.ingest import Ingestor, Outcome, UnitTable
from aggregator.sqlite import file_identity, sqlite_path
from aggregator.store import Deposed
from kernel.meter import Limits
from kernel.reading import Incoming, Refused
from kernel.timegrid import Grid

_COMMIT, _RELOAD, _OK, _FAILED, _DEPOSED = b"C", b"R", b"K", b"E", b"D"
WRITER_CACHE_MIB = 16  # SQLite page cache of the ingest connection (see Store)


class _Batch(msgspec.Struct, array_like=True):
    readings: list[Incoming]
    refused: list[Refused]
    now: int


class _Done(msgspec.Struct, array_like=True):
    stored: int
    duplicates: int
    slots: int
    quarantined: dict[str, int]


class WriterError(RuntimeError):
    """The writer could not start, a commit failed, or the process is gone; the message says which."""


class Writer:
    """The receiving side: starts the writer process and hands it batches, one at a time, in order. It may be
    started again after `close` (a node that leads again)."""

    def __init__(self, url: str, synchronous: str, grid: Grid, units: UnitTable, shared: bool = False) -> None:
        self.path: Path | None = None if is_postgres(url) else sqlite_path(url)  # the store's file, if it has one
        self._args = (url, synchronous, grid, shared)
        self._units = units
        self.totals = Outcome()  # since start, for the metrics
        self._process: subprocess.Popen[bytes] | None = None
        self._exited: int | None = None  # a descriptor readable once the process has ended (Linux pidfd)
        self._conn: Connection | None = None
        # One thread owns the pipe: a request and its reply are never interleaved with another's,
        # even when the coroutine that awaited a commit was cancelled.
        self._pipe = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
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

    async def commit(self, readings: list[Incoming], refused: list[Refused], now: int) -> None:
        """Commit a batch in the writer and count it in `totals`; returns when it is durable (raises WriterError
        when it is not)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pipe, self._commit, readings, refused, now)

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

    def close(self) -> None:
        """Let the writer finish the commit in hand and exit; wait for it."""
        self._closed = True
        self._pipe.shutdown(wait=True)
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:  # stuck (a disk that does not answer): it holds nothing unacknowledged
                self._process.kill()
                self._process.wait()
        if self._exited is not None:
            os.close(self._exited)
            self._exited = None

    def _commit(self, readings: list[Incoming], refused: list[Refused], now: int) -> None:
        self._send(_COMMIT + _encode(_Batch(readings, refused, now)))
        reply = self._receive()
        if reply[:1] == _DEPOSED:
            raise Deposed(reply[1:].decode())
        if reply[:1] != _OK:
            raise WriterError(f"commit failed in the writer process: {reply[1:].decode()}")
        done = _decode_done(reply[1:])
        t = self.totals
        t.stored, t.duplicates, t.slots = t.stored + done.stored, t.duplicates + done.duplicates, t.slots + done.slots
        t.quarantined.update(done.quarantined)

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


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_encode = msgspec.msgpack.Encoder().encode
_decode_batch = msgspec.msgpack.Decoder(_Batch).decode
_decode_done = msgspec.msgpack.Decoder(_Done).decode


class _Directory:
    """The directory of units in force in the writer; replaced whole on reload."""

    def __init__(self, current: UnitTable) -> None:
        self.current = current

    def customer_of(self, unit: str) -> str:
        return self.current.customer_of(unit)

    def limits_of(self, unit: str) -> Limits:
        return self.current.limits_of(unit)


def _serve(conn: Connection) -> None:
    """The writer process: open the store its first message names, then commit each batch received and
    reply, until the pipe closes."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        Path("/proc/self/comm").write_text("smame-writer")  # what ps and top show
    except OSError:
        pass
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
    directory = _Directory(units)
    ingestor = Ingestor(store, directory, grid, shared=shared, epoch=None if fence is None else fence[1])
    conn.send_bytes(_OK)
    try:
        failed = _commit_all(conn, ingestor, directory)
    finally:
        store.close()
    if failed is not None:
        _refuse_all(conn, failed)


def _commit_all(conn: Connection, ingestor: Ingestor, directory: _Directory) -> bytes | None:
    """Commit each batch received and reply, until the pipe closes (None) or a commit fails (its reply)."""
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):  # the receiver closed the pipe or died
            return None
        if message[:1] == _RELOAD:
            directory.current = pickle.loads(message[1:])
            continue
        batch = _decode_batch(message[1:])
        try:
            outcome = ingestor.commit(batch.readings, batch.refused, batch.now)
            ingestor.store.check_identity()  # committed into a file that is gone: acknowledge nothing
        except Deposed as exc:  # rolled back: another node leads now
            failed = _DEPOSED + str(exc).encode()
        except Exception:  # rolled back; the receiver stops and nothing of the batch is acknowledged
            failed = _FAILED + traceback.format_exc(limit=-3).encode()
        else:
            conn.send_bytes(
                _OK + _encode(_Done(outcome.stored, outcome.duplicates, outcome.slots, dict(outcome.quarantined)))
            )
            continue
        conn.send_bytes(failed)
        return failed


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

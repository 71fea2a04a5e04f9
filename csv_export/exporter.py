"""The export service: after each half hour (plus a grace period), rewrite the files whose data changed.

It asks the store which (customer, day) pairs changed since its cursor, has export workers render
each affected day with one scan of the store (`csv_export.days`, several days in parallel), writes
only files whose bytes differ, deletes files past retention and then advances the cursor. A failure
(disk full, directory gone) leaves the cursor where it was, so the next run retries; ingest is never
held up. It runs on its own SQLite connection and thread; rendering runs in the worker processes.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

from aggregator.store import Store
from csv_export.days import SHARE_UNITS, CustomerFiles, DayJob, worker_init, write_day
from csv_export.files import check_writable, expired, read_cursor, write_cursor
from csv_export.render import Layout
from kernel.registry import Customer, Registry, Unit
from kernel.timegrid import SLOT, Grid
from kernel.wake import wait_woken

log = logging.getLogger("smame.export")
SUCCEEDED = "export_succeeded"  # when any exporter (the service, `smame export`) last wrote files without error
RETRY_MIN_S = 60.0  # a failed run is tried again after a minute, then 2, 4, ... up to the next half hour
POLL_S = 10.0  # while failing: how often to look whether `smame export` has succeeded meanwhile


@dataclass
class ExportStats:
    """Counters the monitoring part reads."""

    runs: int = 0
    failures: int = 0
    files_written: int = 0
    files_deleted: int = 0
    last_success: float = 0.0
    last_error: str = ""


@dataclass
class RunResult:
    """What one export run did."""

    written: list[Path] = field(default_factory=list)
    unchanged: int = 0
    deleted: list[Path] = field(default_factory=list)
    days: int = 0


def layout_of(customer: Customer) -> Layout:
    """A customer's CSV options."""
    return Layout(customer.layout == "wide", customer.encoding, customer.newline, customer.include_export)


def shares(files: list[CustomerFiles], least: int) -> list[tuple[CustomerFiles, ...]]:
    """Customers' files in shares of at most SHARE_UNITS units (a customer with more is a share alone), and at
    least `least` shares when there are that many customers; each customer in exactly one share, in order."""
    weight = [len(f.units) + 1 for f in files]  # a customer without units still costs a file
    size = min(SHARE_UNITS, max(1, sum(weight) // least))
    out: list[list[CustomerFiles]] = []
    held = size  # weight of the last share: a full one to start with
    for f, w in zip(files, weight, strict=True):
        if held + w <= size:
            out[-1].append(f)
            held += w
        else:
            out.append([f])
            held = w
    while len(out) < min(least, len(files)):  # a large customer took a share alone: split the most crowded
        crowded = max(range(len(out)), key=lambda k: len(out[k]))
        half = len(out[crowded]) // 2
        out[crowded : crowded + 1] = [out[crowded][:half], out[crowded][half:]]
    return [tuple(share) for share in out]


class Exporter:
    """Renders and writes customer files; `run` is the scheduled service."""

    def __init__(
        self,
        store: Store,
        registry: Callable[[], Registry],
        grid: Grid,
        root: Path,
        retention_days: int,
        grace_s: int,
        db_retention_days: int = 0,
        on_failure: Callable[[str], None] = lambda msg: None,
        workers: int = 2,
        clock: Callable[[], float] = time.time,
        quarantine_days: int = 0,
    ) -> None:
        self.store = store
        self.registry = registry
        self.grid = grid
        self.root = root
        self.retention_days = retention_days
        self.grace_s = grace_s
        self.db_retention_days = db_retention_days
        self.quarantine_days = quarantine_days
        self.on_failure = on_failure
        self.stats = ExportStats()
        self.workers = workers
        self.clock = clock
        self._pool: ProcessPoolExecutor | None = None
        self._pruned: date | None = None
        self._first: dict[str, tuple[date, list[Unit]]] = {}  # see first_days
        self._wake: asyncio.Event | None = None  # made in run(), in its event loop

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers and close the store connection."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        self.store.close()

    # --- the work, run on the export store thread (rendering in the worker processes) --------------

    def export(
        self,
        pairs: Iterable[tuple[str, date]],
        now: float,
        progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> RunResult:
        """Render and write the given (customer, day) files as of `now` (today's file up to the last closed slot)."""
        upto = self.grid.floor(now - self.grace_s)
        registry = self.registry()
        pairs = [(c, d) for c, d in pairs if c in registry.customers]
        first = self.first_days(registry, pairs)
        by_day: dict[date, set[str]] = {}
        for customer, day in pairs:
            since = first.get(customer)
            if since is not None and since <= day <= self.grid.day_of(upto):
                by_day.setdefault(day, set()).add(customer)
        # A job is a share of a day's customers: at most SHARE_UNITS units (a worker holds its share's rows, so
        # memory stays bounded whatever the fleet), and when there are fewer days than workers (a scheduled
        # run, one day by hand) enough shares that every worker has one. Each job reads its own units' rows.
        least = max(1, self.workers // max(1, len(by_day)))
        jobs = [
            DayJob(self.store.url, day, tuple(self.grid.closed(day, upto)), share, str(self.root))
            for day, customers in sorted(by_day.items())
            for share in shares(
                [
                    CustomerFiles(
                        c, layout_of(registry.customers[c]), tuple((u.id, u.meter) for u in registry.units_of(c))
                    )
                    for c in sorted(customers)
                ],
                least,
            )
        ]
        result = RunResult()
        if jobs:
            self._write(jobs, len(by_day), result, progress)
        self.store.set_meta(SUCCEEDED, repr(now))
        return result

    def first_days(self, registry: Registry, pairs: list[tuple[str, date]]) -> dict[str, date]:
        """The first local day with data of each customer of `pairs` that has any: no file is written for a day
        before it (a new installation's --all would be 45 days of empty files).

        Looking it up costs a query per unit (half a second for 100,000 units), so it is remembered. A day asked
        for before the remembered one is looked up again (late data may have come in before the first), and so
        is a customer whose units changed; a first day that moves later (retention) only matters for days that
        are no longer exported."""
        earliest: dict[str, date] = {}
        for c, d in pairs:
            if c not in earliest or d < earliest[c]:
                earliest[c] = d
        out: dict[str, date] = {}
        for c, asked in earliest.items():
            units = registry.units_of(c)
            known = self._first.get(c)
            if known is None or known[1] is not units or asked < known[0]:
                firsts = [t for t in (self.store.first_at(u.id) for u in units) if t is not None]
                if not firsts:
                    self._first.pop(c, None)
                    continue
                known = self._first[c] = (self.grid.day_of(min(firsts) + SLOT), units)  # the first slot closes
            out[c] = known[0]
        return out

    def _write(self, jobs: list[DayJob], days: int, result: RunResult, progress: Callable[[int, int], None]) -> None:
        """Have the workers render and write the jobs; count what they did in `result`."""
        pool = self._workers()
        futures: dict[Future[tuple[list[Path], int]], date] = {}
        try:
            for job in jobs:  # a broken pool may say so here already, or only with a result
                futures[pool.submit(write_day, job)] = job.day
            parts_left = Counter(futures.values())
            for future in as_completed(futures):
                written, unchanged = future.result()
                result.written += written
                result.unchanged += unchanged
                parts_left[futures[future]] -= 1
                if not parts_left[futures[future]]:
                    progress(sum(1 for n in parts_left.values() if not n), days)
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)  # a worker died (killed, out of memory):
            self._pool = None  # new workers next run
            raise
        finally:
            for f in futures:
                f.cancel()
        result.written.sort()
        result.days = days

    def _workers(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: forking a process that runs threads (the event loop's helpers, SQLite's) is unsafe
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init
            )
        return self._pool

    def scheduled(self, now: float) -> RunResult:
        """One scheduled run: changed days, today's files of every customer, retention, then the cursor."""
        check_writable(self.root)
        cursor = read_cursor(self.root)
        newest, changed = self.store.changes_since(cursor)
        today = self.grid.day_of(self.grid.floor(now - self.grace_s))
        local_today = datetime.fromtimestamp(now, self.grid.zone).date()
        first_kept = local_today - timedelta(days=self.retention_days)
        pairs = {(c, date.fromisoformat(d)) for c, d in changed}
        pairs = {(c, d) for c, d in pairs if d >= first_kept}
        pairs |= {(c, today) for c in self.registry().customers}
        result = self.export(pairs, now)
        for old in expired(self.root, local_today, self.retention_days):
            old.unlink(missing_ok=True)
            result.deleted.append(old)
        write_cursor(self.root, newest)
        self._prune(now)
        return result

    def _prune(self, now: float) -> None:
        day = datetime.fromtimestamp(now, self.grid.zone).date()
        if self._pruned == day:
            return
        self._pruned = day
        if self.quarantine_days:
            refused = self.store.prune_quarantine(int(now) - self.quarantine_days * 86400)
            if refused:
                log.info(
                    "quarantine retention: deleted %d refused telegrams older than %d days",
                    refused,
                    self.quarantine_days,
                )
        if not self.db_retention_days:
            return
        readings, slots = self.store.prune(int(now) - self.db_retention_days * 86400)
        if readings or slots:
            log.info(
                "database retention: deleted %d readings and %d slots older than %d days",
                readings,
                slots,
                self.db_retention_days,
            )

    # --- the service ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run after every half hour plus the grace period, for ever. A failure is logged, alerted and retried
        after a minute, then twice as long each time up to the next half hour; `retry_now` (SIGHUP) retries at
        once, and a success of `smame export` meanwhile clears it."""
        self._wake = asyncio.Event()
        backoff = RETRY_MIN_S
        while True:
            if await self.run_once() is not None:
                backoff = RETRY_MIN_S
                await self._sleep(self.delay(self.clock()))
                continue
            failed_at = self.clock()
            until = failed_at + min(backoff, self.delay(failed_at))
            backoff = min(backoff * 2, SLOT)
            while self.stats.last_error and (left := until - self.clock()) > 0:
                if await self._sleep(min(left, POLL_S)):
                    break  # asked to retry now
                if float(await self.store.call(self.store.get_meta, SUCCEEDED, "0")) > failed_at:
                    log.info("export: `smame export` has written files since the failure: running again now")
                    break

    def retry_now(self) -> None:
        """Run again at once (SIGHUP: the operator has fixed something)."""
        if self._wake is not None:
            self._wake.set()

    async def _sleep(self, seconds: float) -> bool:
        """Wait; True when `retry_now` cut the wait short."""
        assert self._wake is not None
        return await wait_woken(self._wake, seconds)

    async def run_once(self) -> RunResult | None:
        """One scheduled run on the store thread, with its outcome counted."""
        self.stats.runs += 1
        try:
            result = await self.store.call(self.scheduled, self.clock())
        except (OSError, BrokenProcessPool) as exc:
            self.stats.failures += 1
            self.stats.last_error = str(exc)
            log.error("export failed, will retry (or at once on SIGHUP): %s", exc)
            self.on_failure(str(exc))
            return None
        self.stats.files_written += len(result.written)
        self.stats.files_deleted += len(result.deleted)
        self.stats.last_success = self.clock()
        self.stats.last_error = ""
        if result.written or result.deleted:
            log.info(
                "export: %d files written, %d unchanged, %d deleted by retention",
                len(result.written),
                result.unchanged,
                len(result.deleted),
            )
        return result

    def delay(self, now: float) -> float:
        """Seconds until the next slot end plus the grace period."""
        nxt = self.grid.floor(now - self.grace_s) + SLOT + self.grace_s
        return max(1.0, nxt - now)

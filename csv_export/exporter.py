"""The export service: after each half hour (plus a grace period), rewrite the files whose data changed.

It asks the store which (customer, day) pairs changed since its cursor, has export workers render
each affected day with one scan of the store (`csv_export.days`, several days in parallel), writes
only files whose bytes differ, deletes files past retention and then advances the cursor. For customers
with emissions it also renders the days whose emission factors changed since the directory's files were
written (a correction, a factor newly published, the customer's supplier changed) and writes the monthly
CO2 summary of every month it touched. A failure
(disk full, directory gone) leaves the cursor where it was, so the next run retries; ingest is never
held up. It runs on its own SQLite connection and thread; rendering runs in the worker processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from pathlib import Path

from aggregator.store import Store
from csv_export.files import check_writable, expired, read_cursor, write_cursor, write_if_changed
from csv_export.jobs import SHARE_UNITS, SUMMARY_NAME, TOTALS_DIR, CustomerFiles, DayJob, Layout, month_of, summary_path
from kernel.emissions import fiscal_year
from kernel.heap import trim_heap
from kernel.registry import Customer, Registry, Unit
from kernel.timegrid import SLOT, Grid
from kernel.wake import wait_woken

log = logging.getLogger("smame.export")
SUCCEEDED = "export_succeeded"  # when any exporter (the service, `smame export`) last wrote files without error
RETRY_MIN_S = 60.0  # a failed run is tried again after a minute, then 2, 4, ... up to the next half hour
POLL_S = 10.0  # while failing: how often to look whether `smame export` has succeeded meanwhile
STOP_POLL_S = 0.2  # how soon a run under way sees that the exporter is closing


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
    seconds: float = 0.0  # a scheduled run's time, from its start on the store thread (its wait there not counted)


FACTORS_SEEN = "factors.json"  # in TOTALS_DIR: the emission factors the directory's files were rendered with


def layout_of(customer: Customer) -> Layout:
    """A customer's CSV options (without a day's emission factors)."""
    return Layout(customer.layout == "wide", customer.encoding, customer.newline, customer.include_export)


def factors_in_force(registry: Registry, first: date, last: date) -> dict[str, dict[str, str]]:
    """Per customer with emissions, per fiscal year from `first` to `last`, what its days are rendered with."""
    out: dict[str, dict[str, str]] = {}
    for c in registry.customers.values():
        if not c.co2_columns:
            continue
        for fiscal in range(fiscal_year(first), fiscal_year(last) + 1):
            day = max(first, date(fiscal, 4, 1))
            out.setdefault(c.id, {})[str(fiscal)] = repr(registry.day_factors(c.id, day))
    return out


def refactored(
    seen: dict[str, dict[str, str]], now: dict[str, dict[str, str]], first: date, last: date
) -> set[tuple[str, date]]:
    """The (customer, day) pairs from `first` to `last` whose emission factors differ between `seen` and `now`
    (a customer that turned emissions on or off included)."""
    out = set()
    for customer in seen.keys() | now.keys():
        before, after = seen.get(customer, {}), now.get(customer, {})
        changed = {int(fy) for fy in before.keys() | after.keys() if before.get(fy) != after.get(fy)}
        if not changed:
            continue
        day = first
        while day <= last:
            if fiscal_year(day) in changed:
                out.add((customer, day))
            day += timedelta(days=1)
    return out


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


class ExportStopped(Exception):
    """The exporter was closed while a run was under way: the run ended unfinished, without moving the export
    cursor or the time of the last success, so the next run (after a restart) does its work again."""


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
        self._closing = threading.Event()

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End a run under way (it raises `ExportStopped`; the workers finish the jobs they have begun, and the
        one job the pool has queued to them, the rest are cancelled), stop the workers and close the store
        connection. Closing again does nothing."""
        if self._closing.is_set():
            return
        self._closing.set()
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
        files_from: date | None = None,
    ) -> RunResult:
        """Render and write the given (customer, day) files as of `now` (today's file up to the last closed slot),
        then the CO2 summary of each month they touched. Days before `files_from` only update their month's
        summary (their files are past retention)."""
        upto = self.grid.floor(now - self.grace_s)
        registry = self.registry()
        pairs = [
            (c, d)
            for c, d in pairs
            if c in registry.customers and (files_from is None or d >= files_from or registry.customers[c].co2_columns)
        ]
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
            DayJob(
                self.store.url,
                day,
                tuple(self.grid.closed(day, upto)),
                share,
                str(self.root),
                files_from is None or day >= files_from,
            )
            for day, customers in sorted(by_day.items())
            for share in shares(
                [
                    CustomerFiles(
                        c,
                        replace(layout_of(registry.customers[c]), co2=registry.day_factors(c, day)),
                        tuple((u.id, u.meter) for u in registry.units_of(c)),
                    )
                    for c in sorted(customers)
                ],
                least,
            )
        ]
        result = RunResult()
        if jobs:
            self._write(jobs, len(by_day), result, progress)
        months = {(c, month_of(d)) for d, cs in by_day.items() for c in cs if registry.customers[c].co2_columns}
        for customer, month in sorted(months):
            self._summarize(registry.customers[customer], month, result)
        self.store.set_meta(SUCCEEDED, repr(now))
        return result

    def _summarize(self, customer: Customer, month: date, result: RunResult) -> None:
        """Write a customer's CO2 summary of a month from its days' totals, if its bytes changed."""
        from csv_export.co2 import month_summary, summary_bytes  # polars: see `_workers`

        summary = month_summary(self.root, customer, month)
        if summary is None:
            return
        path = summary_path(self.root, customer.id, month)
        if write_if_changed(path, summary_bytes(summary, layout_of(customer))):
            result.written.append(path)
        else:
            result.unchanged += 1

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
        from csv_export.days import write_day  # polars: see `_workers`

        pool = self._workers()
        futures: dict[Future[tuple[list[Path], int]], date] = {}
        try:
            for job in jobs:  # a broken pool may say so here already, or only with a result
                futures[pool.submit(write_day, job)] = job.day
            parts_left = Counter(futures.values())
            pending = set(futures)
            while pending:
                # not as_completed(): the futures that close() cancels would never come out of it, and smame's
                # stop would wait for this thread until its deadline
                done, pending = wait(pending, STOP_POLL_S, FIRST_COMPLETED)
                if self._closing.is_set():
                    log.info(
                        "export: stopped with %d of %d jobs not done; the next run does them",
                        len(pending),
                        len(futures),
                    )
                    raise ExportStopped("the exporter was closed during a run")
                for future in done:
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
        # The modules that render load polars (0.15-0.25 s): this process loads them when it first renders, not
        # when smame starts, where they would delay ingest's connection to the broker.
        from csv_export.days import worker_init

        if self._pool is None:
            # spawn: forking a process that runs threads (the event loop's helpers, SQLite's) is unsafe
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init
            )
        return self._pool

    def scheduled(self, now: float) -> RunResult:
        """One scheduled run: changed days, today's files of every customer, retention, then the cursor."""
        began = time.monotonic()
        check_writable(self.root)
        cursor = read_cursor(self.root)
        newest, changed = self.store.changes_since(cursor)
        today = self.grid.day_of(self.grid.floor(now - self.grace_s))
        local_today = datetime.fromtimestamp(now, self.grid.zone).date()
        first_kept = self.first_kept(now)
        # a month's CO2 summary is kept while any of its days' files is: its days are summed from the 1st
        first_summed = month_of(first_kept)
        registry = self.registry()
        pairs = {(c, date.fromisoformat(d)) for c, d in changed}
        pairs = {
            (c, d)
            for c, d in pairs
            if d >= first_kept or (d >= first_summed and c in registry.customers and registry.customers[c].co2_columns)
        }
        pairs |= {(c, today) for c in registry.customers}
        in_force = factors_in_force(registry, first_summed, today)
        seen = self._factors_seen()
        pairs |= {(c, d) for c, d in refactored(seen, in_force, first_summed, today) if c in registry.customers}
        result = self.export(pairs, now, files_from=first_kept)
        for old in [*expired(self.root, local_today, self.retention_days), *self._expired_co2(first_kept, registry)]:
            old.unlink(missing_ok=True)
            result.deleted.append(old)
        if in_force != seen:
            seen_path = self.root / TOTALS_DIR / FACTORS_SEEN
            write_if_changed(seen_path, json.dumps(in_force, sort_keys=True).encode(), with_checksum=False)
        write_cursor(self.root, newest)
        self._prune(now)
        result.seconds = time.monotonic() - began
        return result

    def first_kept(self, now: float) -> date:
        """The first local day whose files are kept as of `now` (with 45 days: today and the 45 before it)."""
        return datetime.fromtimestamp(now, self.grid.zone).date() - timedelta(days=self.retention_days)

    def _factors_seen(self) -> dict[str, dict[str, str]]:
        """The emission factors the directory's files were last rendered with ({} when unknown)."""
        try:
            seen = json.loads((self.root / TOTALS_DIR / FACTORS_SEEN).read_text())
        except (OSError, ValueError):
            return {}
        return seen if isinstance(seen, dict) else {}

    def _expired_co2(self, first_kept: date, registry: Registry) -> list[Path]:
        """Monthly summaries whose month ended before `first_kept`, and days' totals before its month; all of
        them for a customer that no longer has emissions (its summaries would no longer be brought up to date)."""
        out = []
        first_summed = f"{month_of(first_kept):%Y%m%d}"

        def gone(customer: str) -> bool:
            return customer not in registry.customers or not registry.customers[customer].co2_columns

        for customer_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if customer_dir.name == TOTALS_DIR:
                for kept in sorted(customer_dir.glob("*/*.csv")):
                    if kept.stem.isdigit() and (kept.stem < first_summed or gone(kept.parent.name)):
                        out.append(kept)
                continue
            for f in customer_dir.iterdir():
                m = SUMMARY_NAME.match(f.name)
                if m and (m["month"] < f"{first_kept:%Y%m}" or gone(m["customer"])):
                    out.append(f)
        return sorted(out)

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
        readings, slots = self.store.prune(int(now) - self.db_retention_days * 86400, self._closing.is_set)
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
        await self.store.call(trim_heap)  # what planning the run freed goes back to the system, as the workers' does
        self.stats.files_written += len(result.written)
        self.stats.files_deleted += len(result.deleted)
        self.stats.last_success = self.clock()
        self.stats.last_error = ""
        if result.written or result.deleted:
            log.info(
                "export: %d files written, %d unchanged, %d deleted by retention, in %.1f s",
                len(result.written),
                result.unchanged,
                len(result.deleted),
                result.seconds,
            )
        return result

    def delay(self, now: float) -> float:
        """Seconds until the next slot end plus the grace period."""
        nxt = self.grid.floor(now - self.grace_s) + SLOT + self.grace_s
        return max(1.0, nxt - now)

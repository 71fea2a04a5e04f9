"""The ingest writer's work alone, in-process: the benchmark's telegrams, decoded beforehand, committed by the
`Ingestor` in batches, on SQLite (the baseline, in the same run) and on PostgreSQL; wall time a telegram, split by
the store's calls, and the CPU of this process (the writer's Python; the rest is waiting for the database).

    .venv/bin/python -m bench.store --telegrams 200000 --units 10000 [--days 10] \\
        --storage postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python -m bench.store --telegrams 200000 --diag compare [--rounds 3]

With `--days N` each store first holds N days of every unit's readings and slots before the load (written
directly, not timed): a store in service, which is what a restart after an outage commits into.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

from aggregator.backends import open_url
from aggregator.ingest import Ingestor, UnitTable
from bench.history import prefill
from bench.ingest import DEFAULT_BATCH, drop_schemas, fleet, store_url
from broker_bridge.telegram import Rules, decode
from kernel.meter import Limits
from kernel.reading import Incoming
from kernel.timegrid import Grid

CALLS = ("insert_readings", "append_readings", "insert_slots", "upsert_slots", "add_changes", "last_points")
GRID = Grid("Asia/Tokyo")


class _Fleet:
    """Twenty customers, 25 kWh a half hour at most (a 50 kW contract)."""

    limits = Limits(Fraction(25))

    def customer_of(self, unit: str) -> str:
        return f"C{int(unit[1:]) % 20:02d}"

    def limits_of(self, unit: str) -> Limits:
        return self.limits


def batches(telegrams: int, units: int, size: int, diag: bool = False) -> list[list[Incoming]]:
    """The load of `bench.ingest` (with `diag`: each telegram carrying the unit's diagnostics), decoded as the
    receiving process would, in batches of `size` telegrams."""
    known = {f"U{u:06d}" for u in range(units)}
    rules = Rules(GRID.on_boundary)
    received = int(time.time())
    out: list[list[Incoming]] = [[]]
    for topic, payload in fleet(units, telegrams, diag):
        decoded = decode(topic, payload, received, known, rules)
        if decoded.rejects:
            raise SystemExit(f"the load has a telegram the decoder refuses: {decoded.rejects[0]}")
        if len(out[-1]) == size:
            out.append([])
        out[-1].extend(Incoming(r, received, topic, payload) for r in decoded.readings)
    return out


def run(url: str, load: list[list[Incoming]], units: int, days: int = 0) -> tuple[float, float, Counter[str]]:
    """Wall and CPU seconds to commit the load into the store at `url` (empty, or holding `days` of history),
    and the seconds in each store call (`commit`: the COMMIT itself)."""
    spent: Counter[str] = Counter()
    store = open_url(url)
    try:
        if days:
            prefill(store, (i.reading for batch in load for i in batch), days)
        for name in (c for c in CALLS if hasattr(store, c)):  # an older smame, measured for comparison, has fewer
            setattr(store, name, _timed(spent, name, getattr(store, name)))
        transaction = store.transaction

        @contextmanager
        def timed_transaction() -> Iterator[None]:
            with transaction():
                yield
                started = time.perf_counter()
            spent["commit"] += time.perf_counter() - started

        store.transaction = timed_transaction  # type: ignore[method-assign]
        fleet_units = _Fleet()
        ingestor = Ingestor(store, UnitTable.of(fleet_units, [f"U{u:06d}" for u in range(units)]), GRID)
        now = int(time.time())
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in load:
            ingestor.commit(batch, [], now)
        return time.perf_counter() - wall, time.process_time() - cpu, spent
    finally:
        store.close()


_inside: list[str] = []  # the timed call running: one it makes (SQLite's insert_slots upserts) is its own time


def _timed(spent: Counter[str], name: str, call: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any) -> Any:
        if _inside:
            return call(*args)
        _inside.append(name)
        started = time.perf_counter()
        try:
            return call(*args)
        finally:
            spent[name] += time.perf_counter() - started
            _inside.pop()

    return timed


def compare_diag(telegrams: int, units: int, size: int, days: int, rounds: int) -> None:
    """The store's own cost of keeping each telegram's `diag` (no MQTT, no pipe, no decoding in the time): the
    same readings committed into SQLite without and with it, `rounds` times each, the order swapped each round,
    compared by their medians. What `bench.ingest --diag compare` finds beyond this is the rest of smame's."""
    loads = {False: batches(telegrams, units, size), True: batches(telegrams, units, size, diag=True)}
    n = sum(map(len, loads[False]))
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="smame-bench-") as tmp:
        for k in range(rounds):
            for diag in (False, True) if k % 2 == 0 else (True, False):
                work = Path(tmp) / f"{k}-{diag}"
                (work / "data").mkdir(parents=True)
                wall, cpu, _ = run(store_url(work, None), loads[diag], units, days)
                times[diag].append((wall, cpu))
                print(
                    f"SQLite, {'with' if diag else 'without'} diag: {n / wall:,.0f} readings/s, "
                    f"{wall / n * 1e6:.1f} us a reading (CPU {cpu / n * 1e6:.1f} us)"
                )
    wall = {d: statistics.median(w for w, _ in t) for d, t in times.items()}
    cpu = {d: statistics.median(c for _, c in t) for d, t in times.items()}
    print(f"diag in every telegram against none, the store alone, {rounds} round(s), medians (with / without):")
    print(f"  commit      {wall[True] / wall[False]:.3f}  (+{(wall[True] - wall[False]) / n * 1e6:.2f} us a reading)")
    print(f"  commit cpu  {cpu[True] / cpu[False]:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--telegrams", type=int, default=200_000)
    ap.add_argument("--units", type=int, default=10_000)
    ap.add_argument(
        "--batch", type=int, default=DEFAULT_BATCH, help="telegrams a commit (default: smame's broker.batch_size)"
    )
    ap.add_argument("--days", type=int, default=0, help="days of history each store holds before the load")
    ap.add_argument("--storage", metavar="URL", help="postgresql://... : a database to measure in")
    ap.add_argument(
        "--diag",
        choices=("none", "compare"),
        default="none",
        help="compare: SQLite only, the load without and with every unit's diag in every telegram",
    )
    ap.add_argument("--rounds", type=int, default=3, help="with --diag compare: rounds of both, order swapped")
    args = ap.parse_args()
    if args.diag == "compare":
        compare_diag(args.telegrams, args.units, args.batch, args.days, args.rounds)
        return
    if not (args.storage or "").startswith(("postgresql://", "postgres://")):
        sys.exit("--storage: give a postgresql:// URL (or --diag compare, on SQLite alone)")
    load = batches(args.telegrams, args.units, args.batch)
    n = sum(map(len, load))
    print(
        f"load: {n} readings of {args.units} units in batches of {args.batch}, decoded beforehand, "
        f"into stores holding {args.days} days"
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="smame-bench-") as tmp:
        try:
            for name, storage in (("SQLite", None), ("PostgreSQL", args.storage)):
                work = Path(tmp) / name
                (work / "data").mkdir(parents=True)
                results[name] = run(store_url(work, storage), load, args.units, args.days)
        finally:
            drop_schemas(args.storage)
    for name, (wall, cpu, spent) in results.items():
        print(
            f"{name}: {n / wall:,.0f} readings/s, {wall / n * 1e6:.1f} us a reading, of it this process's CPU "
            f"{cpu / n * 1e6:.1f} us"
        )
        for call, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
            print(f"  {call:<18} {seconds / n * 1e6:6.1f} us")
    base, ours = results["SQLite"][0], results["PostgreSQL"][0]
    print(f"ratio PostgreSQL / SQLite (readings a second): {base / ours:.2f}")


if __name__ == "__main__":
    main()

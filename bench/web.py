"""How fast the web server answers on a fleet's store: a unit's 45 days of slots, a customer's units, and the
console's fleet page.

    .venv/bin/python -m bench.web [--units 10000] [--customers 200] [--days 45] [--requests 50] [--load]

Fills an SQLite store with every unit's slots for `--days` days (as bench.export does), serves the API over
HTTP on a free port exactly as `smame run` does (uvicorn on its own thread and loop), and times requests
from a client process-side thread: the store's own query for the same slots is the baseline, from the same
run. The issue's goal is 200 ms for a unit's 45 days. With `--load`, another process ingests readings into the
same store flat out (every unit's next half hour, in batches of 1,000, through the Ingestor as the writer
does) while the requests are timed: harsher than the ingest benchmark's rate, on the same two cores.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import tempfile
import time
import urllib.request
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from aggregator.ingest import Ingestor
from aggregator.sqlite import SqliteStore
from bench.export import fill
from ftp_gateway.accounts import Bans
from kernel.reading import Incoming, Reading
from kernel.registry import Customer, Registry, Unit
from kernel.timegrid import SLOT, Grid
from tests.helpers import serving
from web.access import Operators, Sessions, Tokens
from web.app import build_app
from web.context import WebContext
from web.server import WebServer

GOAL_MS = 200.0


def timed(url: str, token: str, cookie: str = "") -> float:
    headers = {"Cookie": f"smame_session={cookie}"} if cookie else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, headers=headers)
    t = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()
    return (time.perf_counter() - t) * 1000


def ingest(path: Path, registry: Registry, start: int, stop: multiprocessing.synchronize.Event, done: Any) -> None:
    """Commit every unit's next half-hour reading, 1,000 units a batch, until told to stop; count readings."""
    store = SqliteStore(path, "NORMAL")
    ingestor = Ingestor(store, registry, Grid("Asia/Tokyo"))
    units = sorted(registry.units)
    k = 0
    while not stop.is_set():
        at = start + k * SLOT
        for i in range(0, len(units), 1000):
            batch = [
                Incoming(
                    Reading(u, at, f"SM-{u}", 1000 + 9 * k, 0, 1, 1, 6, k, at + 5),
                    at + 7,
                    f"smame/v1/{u}/reading",
                    b"{}",
                )
                for u in units[i : i + 1000]
            ]
            ingestor.commit(batch, [], at + 7)
            with done.get_lock():
                done.value += len(batch)
            if stop.is_set():
                break
        k += 1
    store.close()


def figures(name: str, ms: list[float], baseline: float | None = None) -> None:
    ms = sorted(ms)
    p95 = ms[int(len(ms) * 0.95) - 1]
    extra = f", x{statistics.median(ms) / baseline:.1f} the store's query" if baseline else ""
    print(
        f"{name}: median {statistics.median(ms):.1f} ms, p95 {p95:.1f} ms, max {ms[-1]:.1f} ms "
        f"({statistics.median(ms) / GOAL_MS:.2f} of the {GOAL_MS:.0f} ms goal{extra})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=10_000)
    ap.add_argument("--customers", type=int, default=200)
    ap.add_argument("--days", type=int, default=45)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--load", action="store_true", help="time the requests while another process ingests")
    args = ap.parse_args()
    grid = Grid("Asia/Tokyo")
    today = date(2026, 11, 23)
    now = grid.day_start(today + timedelta(days=1)) + 300.0
    first = today - timedelta(days=args.days - 1)
    units = {f"U{u:06d}": Unit(f"U{u:06d}", f"C{u % args.customers:03d}", f"SM-U{u:06d}") for u in range(args.units)}
    registry = Registry(units, {c: Customer(id=c) for c in {u.customer for u in units.values()}})
    rnd = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="smame-web-") as tmp:
        path = Path(tmp) / "smame.db"
        store = SqliteStore(path, "NORMAL")
        started = time.perf_counter()
        rows = fill(store, grid, list(units), first, args.days)
        tokens = {c: Tokens(store).add(c, "bench", int(now)) for c in registry.customers}
        Operators(store).add("bench", "bench-password", int(now))
        session, _ = Sessions(store).open("bench", int(now))
        took = time.perf_counter() - started
        print(f"store: {rows:,} slots ({args.units:,} units x {args.days} days) in {took:.0f} s")
        ends = [e for d in range(args.days) for e in grid.day_slots(first + timedelta(days=d))]
        picks = [rnd.choice(list(units)) for _ in range(args.requests)]
        base = []
        for unit in picks:
            t = time.perf_counter()
            store.slots_at(unit, ends)
            base.append((time.perf_counter() - t) * 1000)
        store.close()

        served = SqliteStore(path, "NORMAL")
        ctx = WebContext(served, lambda: registry, grid, Path(tmp) / "export", Bans(), lambda: now)
        stop, done = multiprocessing.Event(), multiprocessing.Value("q", 0)
        writer = multiprocessing.Process(target=ingest, args=(path, registry, int(now) + 3600, stop, done))
        if args.load:
            writer.start()
        started = time.perf_counter()
        with serving(WebServer(lambda: build_app(ctx), "127.0.0.1", 0)) as port:
            root = f"http://127.0.0.1:{port}/api/v1"
            span = f"from={first}&to={today}"
            slots = [timed(f"{root}/units/{u}/slots?{span}", tokens[units[u].customer]) for u in picks]
            customers = [rnd.choice(sorted(registry.customers)) for _ in range(args.requests)]
            lists = [timed(f"{root}/units", tokens[c]) for c in customers]
            page = f"http://127.0.0.1:{port}/"
            counted = timed(page, "", cookie=session)  # the first counts completeness by customer (kept a minute)
            pages = [timed(page, "", cookie=session) for _ in range(args.requests // 5)]
            silent = [timed(page + "?state=silent&q=U0000", "", cookie=session) for _ in range(args.requests // 5)]
            owners = [f"http://127.0.0.1:{port}/customers/{c}" for c in customers[: args.requests // 5]]
            maps = [timed(url, "", cookie=session) for url in owners]
        took = time.perf_counter() - started
        if args.load:
            stop.set()
            writer.join()
            print(f"ingest beside the requests: {done.value / took:,.0f} readings/s")
        served.close()
    figures("baseline, the store's query for a unit's slots", base)
    figures(f"GET a unit's {args.days} days of slots ({len(ends):,})", slots, statistics.median(base))
    figures(f"GET a customer's units ({args.units // args.customers} each)", lists)
    figures(f"the console's fleet page ({args.units:,} units, first page)", pages)
    figures("the fleet page searched and filtered", silent)
    figures(f"a customer's page ({args.units // args.customers} units x {args.days} days, files)", maps)
    print(f"the fleet page counting today's and yesterday's completeness: {counted:.1f} ms")


if __name__ == "__main__":
    main()

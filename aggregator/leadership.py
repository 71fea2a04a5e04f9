"""Which of the nodes sharing a PostgreSQL store leads: holds the ingest session, reports and alerts.

Leadership is a session advisory lock on a connection of its own (with TCP keepalives), and an epoch: the
`epoch` row of `meta`, raised by each new leader in the transaction that records it in the `leader` row.
Every ingest commit reads the epoch row `FOR SHARE` in its own transaction and is refused when it is not the
one its node was elected with (`Store.check_epoch`); raising the epoch waits for any such transaction in
flight, so no commit of an old epoch can land after a new one.

The leader writes its beat into the `leader` row every `period` seconds and gives up (`Deposed`) when a beat
fails, finds another epoch, or takes longer than `lease_s`. A standby tries the lock every `period`; when the
lock is held but the leader's beat has not changed for `stale_s` seconds (a stopped process, a machine cut
off without the server noticing), it ends the leader's sessions (`pg_terminate_backend`), which releases the
lock and rolls back whatever the old leader had in flight; the server then keeps it apart by the epoch. All
sessions a node uses as leader (its writer's, its monitor's) carry the application name `leader_name(node)`,
so that they can be ended together; the lock's own session is found through `pg_locks`.

Leadership also follows the ability to ingest. Every round each node writes its row in `nodes`: its beat by
the server's clock, its role and epoch, what keeps it from ingesting (`fault`: "" when nothing does), how far
its clock is from the server's, and what the app adds (export, registry reload, version). A standby asks
`probe` (can it reach the broker?) before it tries the lock, and a leader asks `ingest_fault` (off the broker,
or its commits stalled) at each beat. A leader with a fault gives leadership up as soon as another node with
a fresh beat has none; a node with a fault does not take leadership while another one is fit, and takes it
when none is, since someone must lead to tell the operators. A clock further than `max_offset_s` from the
server's is the one fault that forbids leading outright: such a node would acknowledge readings it judged by a
wrong "now".
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

import psycopg

from aggregator.postgres import connect_args
from aggregator.store import Deposed

log = logging.getLogger("smame.leadership")

LOCK_KEY = 0x736D616D654C  # "smameL": the leader's advisory lock
TERMINATE_WAIT_MS = 5000  # how long ending a stale leader's sessions waits for them to be gone
PROBE_EVERY_S = 5.0  # a standby asks whether it could ingest (reaches the broker) this often


# the `leader` row's value: who leads, in which epoch, and its last beat by the server's clock
_LEADER_ROW = (
    "json_build_object('node', %s::text, 'epoch', %s::bigint, 'beat', extract(epoch FROM clock_timestamp()))::text"
)


def leader_name(node: str) -> str:
    """The application name of the sessions node `node` uses as leader (PostgreSQL keeps 63 bytes of it)."""
    return f"smame leader {node}"[:63]


class Leadership:
    """One node's view of leadership, with its own connection; `acquire` and `hold` are its two states."""

    def __init__(
        self,
        url: str,
        node: str,
        period: float = 1.0,
        lease_s: float = 3.0,
        stale_s: float = 4.0,
        *,
        probe: Callable[[], Awaitable[str]] | None = None,
        ingest_fault: Callable[[], str] = lambda: "",
        report: Callable[[], dict[str, object]] = dict,
        clock: Callable[[], float] = time.time,
        max_offset_s: float = 30.0,
        hold_off_s: float = 10.0,
    ) -> None:
        self.url = url
        self.node = node
        self.session = leader_name(node)  # the application name of this node's sessions as leader
        self.period = period
        self.lease_s = lease_s  # a leader whose beat has not gone through for this long gives up
        self.stale_s = stale_s  # a standby ends the sessions of a leader whose beat stood still this long
        self.epoch: int | None = None  # this node's epoch while it leads
        self.leader: dict[str, object] = {}  # the `leader` row as last read: node, epoch, beat
        self.last_error = ""  # why the store could not be reached, while it cannot
        self.decided = asyncio.Event()  # set once this node knows whether it leads or stands by
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._seen: tuple[object, float] | None = None  # (the leader's beat, when it was first seen)
        self._ended = False  # the last round ended a stale leader's sessions
        self.probe = probe  # "" when this node could ingest now (reaches the broker), else why not
        self.ingest_fault = ingest_fault  # while leading: "" when ingest works, else why not
        self.report = report  # more of this node's state, for its row
        self.clock = clock
        self.max_offset_s = max_offset_s
        self.hold_off_s = hold_off_s  # after handing over, how long this node leaves the lock to the others
        self.since = 0.0  # when this node last began to lead (its clock)
        # when it took over from a leader that did not stop cleanly: that node, the age of its last beat, its row
        self.took_over: tuple[str, float, dict[str, object]] | None = None
        self.fault = ""  # what keeps this node from ingesting, as last found ("" when nothing)
        self.clock_offset: float | None = None  # this node's clock minus the server's, as last measured
        self._probed: tuple[float, str] | None = None  # (when, what) the last probe said
        self._held_off_until = 0.0  # monotonic: no try for the lock before this, unless no other node is fit

    @property
    def leading(self) -> bool:
        return self.epoch is not None

    async def acquire(self) -> int:
        """Wait until this node leads; return its epoch."""
        while True:
            try:
                async with asyncio.timeout(self.lease_s + TERMINATE_WAIT_MS / 1000):
                    epoch = await self._try() if await self._may_lead() else None
            except (psycopg.Error, OSError, TimeoutError) as exc:
                error = str(exc).strip() or "no answer"
                if error != self.last_error:  # said once, not every second
                    log.warning("leadership: cannot reach the store, trying again: %s", error)
                self.last_error = error
                await self._drop()
                epoch = None
            else:
                self.last_error = ""
            self.epoch = epoch
            self.decided.set()
            if epoch is not None:
                return epoch
            if not self._ended:  # after ending a stale leader's sessions the lock is free: try again at once
                await asyncio.sleep(self.period)

    async def hold(self) -> None:
        """Beat while this node leads; raise Deposed (and forget the epoch) as soon as it may not."""
        assert self.epoch is not None, "hold() before acquire()"
        try:
            while True:
                try:
                    async with asyncio.timeout(self.lease_s):
                        ok = await self._beat(self.epoch)
                        hand_over = ok and bool(self.fault) and (self._clock_wrong() or await self._others_fit())
                except (psycopg.Error, OSError, TimeoutError) as exc:
                    raise Deposed(f"lost the store: {str(exc).strip() or 'no answer within the lease'}") from None
                if not ok:
                    raise Deposed("another node has raised the epoch")
                if hand_over:
                    self._held_off_until = time.monotonic() + self.hold_off_s
                    raise Deposed(f"handing over: {self.fault}")
                await asyncio.sleep(self.period)
        except BaseException:
            self.epoch = None
            await self._drop()  # ends the session, so the lock goes with it
            raise

    async def close(self) -> None:
        """Give leadership up at once (a stopping node): its row goes, its session ends and the lock with it."""
        self.epoch = None
        await self._drop()  # the lock goes first: a standby may take over while the row is deleted
        try:
            async with asyncio.timeout(self.lease_s):
                conn = await self._connection()
                await conn.execute("DELETE FROM nodes WHERE node = %s", (self.node,))
        except (psycopg.Error, OSError, TimeoutError):  # its row ages instead: the leader sees it gone
            pass
        await self._drop()

    # --- fitness ----------------------------------------------------------------------------------------

    async def _may_lead(self) -> bool:
        """A standby's round before the lock: write this node's row, and say whether it may try the lock now."""
        conn = await self._connection()
        fault = await self._probe()
        await self._write_row(conn, fault)  # measures the clock, which may add to the fault
        if self._clock_wrong():
            return False
        if self.fault or time.monotonic() < self._held_off_until:
            return not await self._others_fit()  # someone must lead, if only to tell the operators
        return True

    async def _probe(self) -> str:
        if self.probe is None:
            return ""
        now = time.monotonic()
        if self._probed is None or now - self._probed[0] >= PROBE_EVERY_S or self._probed[1]:
            self._probed = (now, await self.probe())
        return self._probed[1]

    def _clock_wrong(self) -> bool:
        return self.clock_offset is not None and abs(self.clock_offset) > self.max_offset_s

    async def _write_row(self, conn: psycopg.AsyncConnection[tuple[object, ...]], fault: str) -> None:
        """This node's row, with its beat by the server's clock; measures this node's clock against it and sets
        `fault` (the clock's first: it alone forbids leading). The row tells the clock as last measured."""
        state = {"role": "leader" if self.leading else "standby", "epoch": self.epoch, **self.report()}
        state |= {"fault": self._with_clock(fault), "clock_offset": self.clock_offset}
        before = self.clock()
        row = await (
            await conn.execute(
                "INSERT INTO nodes(node, beat, state) VALUES (%s, extract(epoch FROM clock_timestamp()), %s) "
                "ON CONFLICT (node) DO UPDATE SET beat = excluded.beat, state = excluded.state RETURNING beat",
                (self.node, json.dumps(state)),
            )
        ).fetchone()
        after = self.clock()
        assert row is not None
        self.clock_offset = round((before + after) / 2 - float(str(row[0])), 3)
        fault = self._with_clock(fault)
        if fault != self.fault:
            (log.warning if fault else log.info)(
                "leadership: %s", f"this node cannot ingest: {fault}" if fault else "this node can ingest again"
            )
        self.fault = fault

    def _with_clock(self, fault: str) -> str:
        if not self._clock_wrong():
            return fault
        assert self.clock_offset is not None
        ahead = "ahead of" if self.clock_offset > 0 else "behind"
        return (
            f"this node's clock is {abs(self.clock_offset):.0f} s {ahead} the store's (node.max_clock_offset_s "
            f"{self.max_offset_s:.0f}): it does not lead until the clock is set right"
        )

    async def _others_fit(self) -> bool:
        """Whether another node with a fresh beat can ingest."""
        conn = await self._connection()
        row = await (
            await conn.execute(
                "SELECT count(*) FROM nodes WHERE node <> %s AND beat > extract(epoch FROM clock_timestamp()) - %s "
                "AND state::json->>'fault' = ''",
                (self.node, self.stale_s),
            )
        ).fetchone()
        return bool(row and row[0])

    # --- the statements -------------------------------------------------------------------------------

    async def _connection(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            # not named as a leader's session: a standby's must survive the ending of its node's former ones
            self._conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, **connect_args(f"smame node {self.node}"[:63])
            )
        return self._conn

    async def _drop(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.close()
            except (psycopg.Error, OSError):
                pass

    async def _try(self) -> int | None:
        """One standby round: the lock, or a look at whether the leader still beats."""
        self._ended = False
        conn = await self._connection()
        got = (await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))).fetchone() or [False])[0]
        if not got:
            await self._watch(conn)
            return None
        previous = await self._read(conn)
        self.took_over = None
        if previous.get("node") not in (None, self.node):
            row = await (
                await conn.execute(
                    "SELECT extract(epoch FROM clock_timestamp()) - beat, state FROM nodes WHERE node = %s",
                    (str(previous["node"]),),
                )
            ).fetchone()
            if row is not None:  # a leader that stopped cleanly took its row with it: nothing to tell
                self.took_over = (str(previous["node"]), float(str(row[0])), _as_dict(str(row[1])))
            # whatever the last leader still has open ends now: a writer stopped inside a transaction would
            # otherwise hold raising the epoch up for as long as it is stopped
            await self._end_sessions(conn, str(previous["node"]))
        async with conn.transaction():
            await conn.execute("INSERT INTO meta(key, value) VALUES ('epoch', '0') ON CONFLICT (key) DO NOTHING")
            row = await (
                await conn.execute(
                    "UPDATE meta SET value = (value::bigint + 1)::text WHERE key = 'epoch' RETURNING value"
                )
            ).fetchone()
            assert row is not None
            epoch = int(str(row[0]))
            await conn.execute(
                f"INSERT INTO meta(key, value) VALUES ('leader', {_LEADER_ROW}) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (self.node, epoch),
            )
        self.leader = {"node": self.node, "epoch": epoch}
        self.since = self.clock()
        self._seen = None
        log.warning("leadership: this node (%s) leads now, epoch %d", self.node, epoch)
        return epoch

    async def _watch(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        """Standing by: end the leader's sessions when its beat has stood still for `stale_s`."""
        seen = await self._read(conn)
        if seen.get("node") != self.leader.get("node") or seen.get("epoch") != self.leader.get("epoch"):
            log.info("leadership: standing by; %s leads (epoch %s)", seen.get("node"), seen.get("epoch"))
        self.leader = seen
        beat, now = seen.get("beat"), time.monotonic()
        if self._seen is None or self._seen[0] != beat:
            self._seen = (beat, now)
            return
        if now - self._seen[1] < self.stale_s:
            return
        node = str(self.leader.get("node", ""))
        log.warning(
            "leadership: the leader %s has not beaten for %.0f s: ending its sessions to take over",
            node,
            now - self._seen[1],
        )
        holders = await (
            await conn.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND ((classid::bigint << 32) | objid::bigint) = %s",
                (LOCK_KEY,),
            )
        ).fetchall()
        for (pid,) in holders:
            await conn.execute("SELECT pg_terminate_backend(%s, %s)", (pid, TERMINATE_WAIT_MS))
        if node:
            await self._end_sessions(conn, node)
        self._seen = None
        self._ended = True

    async def _end_sessions(self, conn: psycopg.AsyncConnection[tuple[object, ...]], node: str) -> None:
        ended = await (
            await conn.execute(
                "SELECT count(pg_terminate_backend(pid, %s)) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                (TERMINATE_WAIT_MS, leader_name(node)),
            )
        ).fetchone()
        if ended and ended[0]:
            log.warning("leadership: ended %d sessions of the former leader %s", ended[0], node)

    async def _beat(self, epoch: int) -> bool:
        conn = await self._connection()
        await self._write_row(conn, self.ingest_fault())
        cur = await conn.execute(
            f"UPDATE meta SET value = {_LEADER_ROW} WHERE key = 'leader' "
            "AND (SELECT value FROM meta WHERE key = 'epoch') = %s",
            (self.node, epoch, str(epoch)),
        )
        return cur.rowcount == 1

    async def _read(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> dict[str, object]:
        row = await (await conn.execute("SELECT value FROM meta WHERE key = 'leader'")).fetchone()
        return {} if row is None else _as_dict(str(row[0]))


def _as_dict(text: str) -> dict[str, object]:
    try:
        found = json.loads(text)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}

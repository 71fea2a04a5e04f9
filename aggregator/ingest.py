"""One batch of readings -> one transaction of readings, slots, change log and quarantine.

Runs in the writer process (`aggregator.writer`). The live case (each unit's next reading, once
per half hour) needs no read: the last point of each register of each unit is cached, and the
batch is written with one statement per table; such a batch is planned (`plan`) while the store
writes the one before (`apply`). Late, duplicate and conflicting readings look their neighbours
up in the store, inside the same transaction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aggregator.slots import Point, SlotValue, max_raw, pair_slots
from aggregator.store import REGISTERS, Store
from kernel.meter import ACTUAL, Flag, Limits
from kernel.reading import Incoming, Reading, Reason, Refused, Status
from kernel.timegrid import SLOT, Grid


class UnitDirectory(Protocol):
    """What the aggregator needs to know about a unit."""

    def customer_of(self, unit: str) -> str: ...

    def limits_of(self, unit: str) -> Limits: ...


@dataclass(frozen=True, slots=True)
class UnitTable:
    """A directory of units as plain data (customer and limits of each): what the writer process is sent."""

    units: dict[str, tuple[str, Limits]]

    @classmethod
    def of(cls, directory: UnitDirectory, units: Iterable[str]) -> UnitTable:
        """The table of `units` as `directory` describes them; units with equal limits share one object."""
        # by the object first: a directory that gives one object for equal limits (the registry) costs no hash of
        # them (Python code, over Fractions) for each unit; each object is held, so that its id is not reused
        by_id: dict[int, tuple[Limits, Limits]] = {}
        by_value: dict[Limits, Limits] = {}
        table = {}
        for unit in units:
            given = directory.limits_of(unit)
            held = by_id.get(id(given))
            if held is None:
                held = by_id[id(given)] = (given, by_value.setdefault(given, given))
            table[unit] = (directory.customer_of(unit), held[1])
        return cls(table)

    def customer_of(self, unit: str) -> str:
        return self.units[unit][0]

    def limits_of(self, unit: str) -> Limits:
        return self.units[unit][1]


@dataclass(slots=True)
class Outcome:
    """What one committed batch did."""

    stored: int = 0
    duplicates: int = 0
    slots: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    changed: set[tuple[str, str]] = field(default_factory=set)
    connection_events: int = 0  # units whose connection changed (status topic)


@dataclass(slots=True)
class _UnitState:
    """What the writer keeps of a unit between batches (fields, not a dict: a fleet holds one per unit)."""

    last_at: int | None  # newest reading of any register
    fwd: Point | None  # newest point of each register, named as in REGISTERS
    rev: Point | None


@dataclass(slots=True)
class Plan:
    """A batch whose every reading is its unit's live case, made into rows from the cache alone: what `apply`
    writes."""

    readings: list[tuple[Any, ...]]
    live: list[tuple[Any, ...]]  # slot rows of both registers
    changed: set[tuple[str, str]]
    refused: list[Refused]
    now: int
    statuses: Sequence[Status] = ()


# (slot end, unit) -> [import SlotValue, export SlotValue, meter, e1, coef]
_SlotRows = dict[tuple[int, str], list[Any]]
_COLUMN = {"fwd": 0, "rev": 1}


CACHE_UNITS = 200_000  # units whose last points an Ingestor keeps, unless told more (the writer: its registry)


class Ingestor:
    """Commits batches of readings and keeps slots in step with them."""

    def __init__(
        self,
        store: Store,
        units: UnitDirectory,
        grid: Grid,
        cache_limit: int = CACHE_UNITS,
        shared: bool = False,
        epoch: int | None = None,
    ) -> None:
        self.store = store
        # the epoch this node leads in (`aggregator.leadership`): each transaction checks it before it writes
        self.epoch = epoch
        self.units = units
        self.grid = grid
        self.cache_limit = cache_limit
        # Other processes write to the store too (a shared subscription): a cached unit state is checked
        # against the store in each transaction, which holds the write lock, before it is trusted.
        self.shared = shared
        self._cache: dict[str, _UnitState] = {}

    def commit(
        self, readings: list[Incoming], refused: list[Refused], now: int, statuses: Sequence[Status] = ()
    ) -> Outcome:
        """Store a batch atomically: valid readings, input refused before the store saw it, and units' status
        messages (each change of a unit's connection kept as an event)."""
        planned = self.plan(readings, refused, now, statuses)
        if planned is not None:
            try:
                return self.apply(planned)
            except BaseException:
                self._cache.clear()  # it holds the states of the rolled-back batch
                raise
        outcome = Outcome()
        by_unit: dict[str, list[Incoming]] = {}
        for item in readings:
            by_unit.setdefault(item.reading.unit, []).append(item)
        refused = list(refused)
        rows: list[tuple[Any, ...]] = []
        slot_rows: _SlotRows = {}
        live: list[tuple[Any, ...]] = []  # slots of both registers made by `_next`, ready to write
        try:
            with self.store.transaction():
                if self.epoch is not None:
                    self.store.check_epoch(self.epoch)
                # states of units not in the cache, in one query; with other writers, also of units whose
                # cached state the store no longer bears out (checked while the transaction holds the write lock)
                missing = [
                    u
                    for u in by_unit
                    if (state := self._cache.get(u)) is None or (self.shared and state.last_at != self.store.last_at(u))
                ]
                if missing:
                    for unit, (last_at, fwd, rev) in self.store.last_points(missing).items():
                        self._cache[unit] = _UnitState(last_at, fwd, rev)
                for unit, items in by_unit.items():
                    state = self._cache[unit]
                    first = items[0].reading
                    if len(items) == 1 and (state.last_at is None or first.at > state.last_at):
                        rows.append(_row(first, items[0].received))
                        if not self._next(unit, state, first, live):
                            self._chain(unit, state, [first], None, slot_rows)
                    else:
                        self._unit(unit, state, items, refused, outcome, slot_rows)
                if rows:
                    self.store.insert_readings(rows)
                    outcome.stored += len(rows)
                self._write_slots(slot_rows, live, outcome)
                if outcome.changed:
                    self.store.add_changes(sorted(outcome.changed), now)
                self._quarantine(refused, outcome)
                if statuses:
                    outcome.connection_events = self.store.record_statuses(statuses)
        except BaseException:
            self._cache.clear()  # it may hold states of the rolled-back batch
            raise
        if len(self._cache) > self.cache_limit:
            self._cache.clear()
        return outcome

    def plan(
        self, readings: list[Incoming], refused: list[Refused], now: int, statuses: Sequence[Status] = ()
    ) -> Plan | None:
        """The batch's rows without a look at the store, when each reading is the only one of its unit in the
        batch and its unit's live case from the cached state (see `_live_slot`); the cache then holds the
        states as if the batch were committed, for the next batch to be planned before `apply` returns. None,
        with nothing changed, for any other batch, or with other writers (`commit` takes those)."""
        if self.shared:
            return None
        cache = self._cache
        if len(cache) > self.cache_limit:
            cache.clear()
            return None
        live = []
        units: set[str] = set()
        for item in readings:
            r = item.reading
            state = cache.get(r.unit)
            if state is None or state.last_at is None or r.at <= state.last_at or r.unit in units:
                return None
            row = self._live_slot(r.unit, state, r)
            if row is None:
                return None
            live.append(row)
            units.add(r.unit)
        changed: set[tuple[str, str]] = set()
        self._changed(live, changed, {})
        for item in readings:  # last: nothing above may leave the cache half advanced
            _advance(cache[item.reading.unit], item.reading)
        rows = [_row(item.reading, item.received) for item in readings]
        return Plan(rows, live, changed, list(refused), now, statuses)

    def apply(self, plan: Plan) -> Outcome:
        """Write a planned batch in one transaction (after checking the epoch, as `commit` does). It does not
        touch the cache, which may already hold the states of batches planned after it: should it raise, the
        caller must clear the cache (`commit` does) or plan nothing more."""
        outcome = Outcome(changed=plan.changed)
        with self.store.transaction():
            if self.epoch is not None:
                self.store.check_epoch(self.epoch)
            if plan.readings:
                self.store.append_readings(plan.readings)
                outcome.stored = len(plan.readings)
            if plan.live:
                self.store.insert_slots(plan.live)
                outcome.slots = len(plan.live)
            if plan.changed:
                self.store.add_changes(sorted(plan.changed), plan.now)
            self._quarantine(plan.refused, outcome)
            if plan.statuses:
                outcome.connection_events = self.store.record_statuses(plan.statuses)
        return outcome

    def _quarantine(self, refused: list[Refused], outcome: Outcome) -> None:
        """Keep the refused input with its reasons (in the batch's transaction) and count it in `outcome`."""
        if refused:
            rows = ((r.received, r.topic, r.unit, r.reason, r.detail, r.payload, r.concerns) for r in refused)
            self.store.add_quarantine(rows)
            outcome.quarantined.update(r.reason for r in refused)

    def _next(self, unit: str, state: _UnitState, r: Reading, live: list[tuple[Any, ...]]) -> bool:
        """The live case, every half hour for every unit, without the general machinery: appends the slot row
        of both registers and advances the unit's state; returns False (nothing done) for anything else, which
        `_chain` then handles."""
        row = self._live_slot(unit, state, r)
        if row is None:
            return False
        live.append(row)
        _advance(state, r)
        return True

    def _live_slot(self, unit: str, state: _UnitState, r: Reading) -> tuple[Any, ...] | None:
        """The slot row of `r` if it is the live case: both registers' next reading one slot after the last,
        same meter and scale, a plausible delta; else None. Changes nothing."""
        fwd, rev = state.fwd, state.rev
        if fwd is None or rev is None or r.fwd is None or r.rev is None:
            return None
        if r.at - fwd.at != SLOT or fwd.at != rev.at:
            return None
        if r.meter != fwd.meter or r.digits != fwd.digits or r.e1 != fwd.e1 or r.coef != fwd.coef:
            return None
        ceiling = max_raw(self.units.limits_of(unit), r.e1, r.coef)
        d_imp, d_exp = r.fwd - fwd.value, r.rev - rev.value
        if not (0 <= d_imp <= ceiling and 0 <= d_exp <= ceiling):
            return None
        return (r.at, unit, d_imp, ACTUAL, r.flags, d_exp, ACTUAL, r.flags, r.meter, r.e1, r.coef)

    def _chain(
        self,
        unit: str,
        state: _UnitState,
        fresh: list[Reading],
        start: dict[str, Point | None] | None,
        slot_rows: _SlotRows,
    ) -> None:
        """Slots closed by readings newer than anything stored, each paired with the one before."""
        limits = self.units.limits_of(unit)
        for reg in REGISTERS:
            prev = getattr(state, reg) if start is None else start[reg]
            column = _COLUMN[reg]
            for r in fresh:
                value = r.fwd if column == 0 else r.rev
                if value is None:
                    continue
                point = Point(r.at, value, r.meter, r.digits, r.e1, r.coef, r.flags)
                if prev is not None:
                    _merge(slot_rows, unit, column, pair_slots(prev, point, limits), point)
                prev = point
            setattr(state, reg, prev)
        state.last_at = fresh[-1].at

    def _unit(
        self,
        unit: str,
        state: _UnitState,
        items: list[Incoming],
        refused: list[Refused],
        outcome: Outcome,
        slot_rows: _SlotRows,
    ) -> None:
        """The general case: several readings, duplicates, conflicts, late readings."""
        items.sort(key=lambda item: item.reading.at)
        fresh: list[Reading] = []  # newer than anything stored
        late: list[int] = []  # times whose neighbours must be looked up (late inserts, conflicts)
        seen: dict[int, Reading] = {}
        conflicts: list[int] = []
        rows = []
        for item in items:
            r = item.reading
            existing = seen.get(r.at)
            if existing is None and state.last_at is not None and r.at <= state.last_at:
                existing = self._stored(unit, r.at)
            if existing is not None:
                if _values(existing) == _values(r):
                    outcome.duplicates += 1
                else:
                    refused.append(_conflict(item, existing))
                    conflicts.append(r.at)
                continue
            seen[r.at] = r
            rows.append(_row(r, item.received))
            if state.last_at is not None and r.at < state.last_at:
                late.append(r.at)
            else:
                fresh.append(r)
        if rows:  # now, so that the neighbour look-ups below see them
            self.store.insert_readings(rows)
            outcome.stored += len(rows)
        for at in conflicts:  # the first value stays; its slot carries the conflict flag
            self.store.add_reading_flags(unit, at, Flag.CONFLICT)
        late.extend(conflicts)
        if fresh:
            # A late point inserted in this batch may now precede the first fresh one.
            start = (
                {reg: self.store.neighbour(unit, fresh[0].at, reg, before=True) for reg in REGISTERS} if late else None
            )
            self._chain(unit, state, fresh, start, slot_rows)
        if late:
            self._around(unit, state, late, slot_rows)

    def _around(self, unit: str, state: _UnitState, times: list[int], slot_rows: _SlotRows) -> None:
        """Recompute the slots on both sides of stored readings."""
        limits = self.units.limits_of(unit)
        for reg in REGISTERS:
            pairs: dict[tuple[int, int], tuple[Point, Point]] = {}
            for at in times:
                here = self.store.neighbour(unit, at - 1, reg, before=False)
                if here is None or here.at != at:
                    continue  # this register has no value at that time
                newest = getattr(state, reg)
                if newest is None or here.at >= newest.at:  # newer readings had no value for this register
                    setattr(state, reg, here)
                before = self.store.neighbour(unit, at, reg, before=True)
                after = self.store.neighbour(unit, at, reg, before=False)
                if before is not None:
                    pairs[(before.at, at)] = (before, here)
                if after is not None:
                    pairs[(at, after.at)] = (here, after)
            for a, b in pairs.values():
                _merge(slot_rows, unit, _COLUMN[reg], pair_slots(a, b, limits), b)

    def _stored(self, unit: str, at: int) -> Reading | None:
        row = self.store.reading(unit, at)
        if row is None:
            return None
        meter, fwd, rev, e1, coef, digits, flags = row
        return Reading(unit, at, meter, fwd, rev, e1, coef, digits, 0, 0, flags)

    def _changed(self, live: list[tuple[Any, ...]], changed: set[tuple[str, str]], days: dict[int, str]) -> None:
        """Add the (customer, local day) of each live slot row to `changed`; `days` caches slot end -> day."""
        customer_of = self.units.customer_of
        for row in live:
            end = row[0]  # not `end, unit, *_ = row`, which copies the rest of the row into a list
            day = days.get(end)
            if day is None:
                day = days[end] = self.grid.day_of(end).isoformat()
            changed.add((customer_of(row[1]), day))

    def _write_slots(self, slot_rows: _SlotRows, live: list[tuple[Any, ...]], outcome: Outcome) -> None:
        both: list[tuple[Any, ...]] = []
        imp_only: list[tuple[Any, ...]] = []
        exp_only: list[tuple[Any, ...]] = []
        days: dict[int, str] = {}
        customer_of = self.units.customer_of
        changed = outcome.changed
        self._changed(live, changed, days)
        for (end, unit), (imp, exp, meter, e1, coef) in slot_rows.items():
            if imp is not None and exp is not None:
                both.append(
                    (end, unit, imp.value, imp.quality, imp.flags, exp.value, exp.quality, exp.flags, meter, e1, coef)
                )
            elif imp is not None:
                imp_only.append((end, unit, imp.value, imp.quality, imp.flags, meter, e1, coef))
            else:
                exp_only.append((end, unit, exp.value, exp.quality, exp.flags, meter, e1, coef))
            day = days.get(end)
            if day is None:
                day = days[end] = self.grid.day_of(end).isoformat()
            changed.add((customer_of(unit), day))
        if live:
            self.store.insert_slots(live)
            outcome.slots += len(live)
        for registers, rows in ((("imp", "exp"), both), (("imp",), imp_only), (("exp",), exp_only)):
            if rows:
                self.store.upsert_slots(registers, rows)
                outcome.slots += len(rows)


def _advance(state: _UnitState, r: Reading) -> None:
    """A unit's state after its live-case reading `r` (both registers present)."""
    assert r.fwd is not None and r.rev is not None
    state.fwd = Point(r.at, r.fwd, r.meter, r.digits, r.e1, r.coef, r.flags)
    state.rev = Point(r.at, r.rev, r.meter, r.digits, r.e1, r.coef, r.flags)
    state.last_at = r.at


def _row(r: Reading, received: int) -> tuple[Any, ...]:
    return (r.unit, r.at, r.meter, r.fwd, r.rev, r.e1, r.coef, r.digits, r.flags, r.seq, r.sent, received, r.diag)


def _merge(slot_rows: _SlotRows, unit: str, column: int, slots: list[SlotValue], closer: Point) -> None:
    for s in slots:
        row = slot_rows.get((s.end, unit))
        if row is None:
            row = slot_rows[(s.end, unit)] = [None, None, closer.meter, closer.e1, closer.coef]
        else:
            row[2:] = closer.meter, closer.e1, closer.coef
        row[column] = s


def _values(r: Reading) -> tuple[Any, ...]:
    return (r.meter, r.fwd, r.rev, r.e1, r.coef, r.digits)


def _conflict(item: Incoming, old: Reading) -> Refused:
    new = item.reading
    detail = (
        f"at {new.at}: got meter={new.meter} fwd={new.fwd} rev={new.rev}, "
        f"kept meter={old.meter} fwd={old.fwd} rev={old.rev}"
    )
    return Refused.of(item.received, item.topic, new.unit, Reason.CONFLICT, detail, item.payload, new.at)

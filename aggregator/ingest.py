"""One batch of readings -> one transaction of readings, slots, change log and quarantine.

Runs on the store thread. The hot path (each unit's next reading in time) needs no read:
the last point of each register of each unit is cached. Late, duplicate and conflicting
readings look their neighbours up in the store, inside the same transaction.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aggregator.slots import Flag, Limits, Point, SlotValue, pair_slots
from aggregator.store import REGISTERS, Store
from aggregator.timegrid import Grid
from broker_bridge.telegram import Incoming, Reading, Reason, Refused


class UnitDirectory(Protocol):
    """What the aggregator needs to know about a unit."""

    def customer_of(self, unit: str) -> str: ...

    def limits_of(self, unit: str) -> Limits: ...


@dataclass(slots=True)
class Outcome:
    """What one committed batch did."""

    stored: int = 0
    duplicates: int = 0
    slots: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    changed: set[tuple[str, str]] = field(default_factory=set)


@dataclass(slots=True)
class _UnitState:
    last_at: int | None
    last: dict[str, Point | None]


_SLOT_REGISTER = {"fwd": "imp", "rev": "exp"}


class Ingestor:
    """Commits batches of readings and keeps slots in step with them."""

    def __init__(self, store: Store, units: UnitDirectory, grid: Grid, cache_limit: int = 200_000) -> None:
        self.store = store
        self.units = units
        self.grid = grid
        self.cache_limit = cache_limit
        self._cache: dict[str, _UnitState] = {}

    def commit(self, readings: list[Incoming], refused: list[Refused], now: int) -> Outcome:
        """Store a batch atomically: valid readings, and input refused before the store saw it."""
        outcome = Outcome()
        by_unit: dict[str, list[Incoming]] = defaultdict(list)
        for item in readings:
            by_unit[item.reading.unit].append(item)
        refused = list(refused)
        try:
            with self.store.transaction():
                slot_rows: dict[tuple[int, str], dict[str, Any]] = {}
                for unit, items in by_unit.items():
                    self._unit(unit, items, refused, outcome, slot_rows)
                self._write_slots(slot_rows, outcome)
                if outcome.changed:
                    self.store.add_changes(sorted(outcome.changed), now)
                if refused:
                    self.store.add_quarantine(
                        (r.received, r.topic, r.unit, r.reason, r.detail, r.payload) for r in refused
                    )
        except BaseException:
            self._cache.clear()  # it may hold states of the rolled-back batch
            raise
        for r in refused:
            outcome.quarantined[r.reason] += 1
        if len(self._cache) > self.cache_limit:
            self._cache.clear()
        return outcome

    def _state(self, unit: str) -> _UnitState:
        state = self._cache.get(unit)
        if state is None:
            last_at = self.store.last_at(unit)
            last = {
                reg: (None if last_at is None else self.store.neighbour(unit, last_at + 1, reg, before=True))
                for reg in REGISTERS
            }
            state = self._cache[unit] = _UnitState(last_at, last)
        return state

    def _unit(
        self,
        unit: str,
        items: list[Incoming],
        refused: list[Refused],
        outcome: Outcome,
        slot_rows: dict[tuple[int, str], dict[str, Any]],
    ) -> None:
        state = self._state(unit)
        items.sort(key=lambda item: item.reading.at)
        fresh: list[Reading] = []  # newer than anything stored: the hot path
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
            rows.append((unit, r.at, r.meter, r.fwd, r.rev, r.e1, r.coef, r.digits, r.flags, r.seq, r.sent, item.received))
            if state.last_at is not None and r.at < state.last_at:
                late.append(r.at)
            else:
                fresh.append(r)
        if rows:
            self.store.insert_readings(rows)
            outcome.stored += len(rows)
        for at in conflicts:  # the first value stays; its slot carries the conflict flag
            self.store.add_reading_flags(unit, at, Flag.CONFLICT)
        late.extend(conflicts)

        limits = self.units.limits_of(unit)
        for reg in REGISTERS:
            pairs: dict[tuple[int, int], tuple[Point, Point]] = {}
            prev = state.last[reg]
            if late and fresh:  # a late point may now precede the first fresh one
                prev = self.store.neighbour(unit, fresh[0].at, reg, before=True)
            for r in fresh:
                value = r.fwd if reg == "fwd" else r.rev
                if value is None:
                    continue
                point = Point(r.at, value, r.meter, r.digits, r.e1, r.coef, r.flags)
                if prev is not None:
                    pairs[(prev.at, point.at)] = (prev, point)
                prev = point
            if fresh:
                state.last[reg] = prev
            for at in late:
                here = self.store.neighbour(unit, at - 1, reg, before=False)
                if here is None or here.at != at:
                    continue  # this register has no value at that time
                before = self.store.neighbour(unit, at, reg, before=True)
                after = self.store.neighbour(unit, at, reg, before=False)
                if before is not None:
                    pairs[(before.at, here.at)] = (before, here)
                if after is not None:
                    pairs[(here.at, after.at)] = (here, after)
            column = _SLOT_REGISTER[reg]
            for a, b in pairs.values():
                for s in pair_slots(a, b, limits):
                    _merge(slot_rows, unit, column, s, b)
        if fresh:
            state.last_at = fresh[-1].at

    def _stored(self, unit: str, at: int) -> Reading | None:
        row = self.store.reading(unit, at)
        if row is None:
            return None
        meter, fwd, rev, e1, coef, digits, flags = row
        return Reading(unit, at, meter, fwd, rev, e1, coef, digits, 0, 0, flags)

    def _write_slots(self, slot_rows: dict[tuple[int, str], dict[str, Any]], outcome: Outcome) -> None:
        groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = defaultdict(list)
        days: dict[int, str] = {}
        for (end, unit), row in slot_rows.items():
            registers = tuple(r for r in ("imp", "exp") if r in row)
            values: list[Any] = [end, unit]
            for r in registers:
                s: SlotValue = row[r]
                values += [s.value, s.quality, s.flags]
            values += [row["meter"], row["e1"], row["coef"]]
            groups[registers].append(tuple(values))
            day = days.get(end)
            if day is None:
                day = days[end] = self.grid.day_of(end).isoformat()
            outcome.changed.add((self.units.customer_of(unit), day))
        for registers, rows in groups.items():
            self.store.upsert_slots(registers, rows)
            outcome.slots += len(rows)


def _merge(slot_rows: dict[tuple[int, str], dict[str, Any]], unit: str, column: str, s: SlotValue, closer: Point) -> None:
    row = slot_rows.setdefault((s.end, unit), {})
    row[column] = s
    row["meter"], row["e1"], row["coef"] = closer.meter, closer.e1, closer.coef


def _values(r: Reading) -> tuple[Any, ...]:
    return (r.meter, r.fwd, r.rev, r.e1, r.coef, r.digits)


def _conflict(item: Incoming, old: Reading) -> Refused:
    new = item.reading
    detail = (
        f"at {new.at}: got meter={new.meter} fwd={new.fwd} rev={new.rev}, "
        f"kept meter={old.meter} fwd={old.fwd} rev={old.rev}"
    )
    return Refused(item.received, item.topic, new.unit, Reason.CONFLICT, detail, item.payload)

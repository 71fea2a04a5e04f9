"""What a simulated unit's health says, half hour by half hour, and the truth of how it ends (pure).

Each unit draws from its own random stream. A few units carry a precursor (health.md): from its onset its
signals worsen until, at its failure time, it falls silent for good. Others die suddenly (no precursor) or
only look unwell: a weak but steady signal, a cell whose signal dips every evening, one reboot by an operator,
an hour without power at the site. A fleet-wide outage (the network or the broker away) touches every unit.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from kernel.reading import Diag

DAY = 86400
SLOT = 1800
PRECURSORS = ("signal_decay", "reboot_loop", "brown_out", "flapping_link", "meter_link", "clock_failure")
LOOKALIKES = ("weak_signal", "diurnal_dip", "operator_reboot", "power_cut")
FIRMWARE = (("2.4.1", 2), ("2.4.3", 5), ("2.5.0", 3))
CELL_UNITS = 40  # units a cell serves, about


@dataclass(frozen=True, slots=True)
class Condition:
    """What happens to one unit: a precursor (onset, then silence at `failure`), a sudden death (`failure`
    only), or a look-alike (`onset`: when it shows, no failure)."""

    unit: str
    kind: str
    onset: int | None
    failure: int | None


@dataclass(frozen=True, slots=True)
class HealthMix:
    """Shares of the fleet (each unit has at most one condition) and the precursors' length in days."""

    precursor: float = 0.03
    sudden_death: float = 0.01
    weak_signal: float = 0.03
    diurnal_dip: float = 0.1  # of the cells
    operator_reboot: float = 0.03
    power_cut: float = 0.02
    no_diag: float = 0.1  # old firmware: no `diag` at all
    lead_days: tuple[float, float] = (4.0, 10.0)


@dataclass(slots=True)
class Tick:
    """A unit's half hour: `silent` (nothing sent), `held` (the reading waits for the next telegram), or a
    telegram with its delay, telegrams lost before it, its clock error and its `diag`; `offline`, the times
    its link dropped during the half hour."""

    silent: bool = False
    held: bool = False
    delay: float = 0.0
    lost: int = 0
    restarted: bool = False
    no_data: bool = False
    clock: float = 0.0
    diag: Diag | None = None
    offline: tuple[float, ...] = ()


def plan(units: list[str], seed: int, start: int, end: int, mix: HealthMix) -> list[Condition]:
    """Each unit's condition over `start`..`end` (epochs): precursors fail between a third of the way and a few
    days past the end (those still degrade at the end), onsets `mix.lead_days` earlier; sudden deaths and
    look-alikes happen after the first third (the risk needs a baseline)."""
    rng = random.Random(f"health:{seed}")
    span = end - start
    out = []
    for unit in units:
        draw = rng.random()
        if draw < mix.precursor:
            failure = int(start + span / 2 + rng.uniform(0, span / 2 + 4 * DAY))
            onset = int(failure - rng.uniform(*mix.lead_days) * DAY)
            out.append(Condition(unit, rng.choice(PRECURSORS), onset, failure))
            continue
        draw -= mix.precursor
        at = int(start + span / 3 + rng.uniform(0, span * 2 / 3))
        for kind, share in (
            ("sudden_death", mix.sudden_death),
            ("weak_signal", mix.weak_signal),
            ("operator_reboot", mix.operator_reboot),
            ("power_cut", mix.power_cut),
        ):
            if draw < share:
                dies = kind == "sudden_death"
                out.append(Condition(unit, kind, None if dies else at, at if dies else None))
                break
            draw -= share
    return out


def cell_of(index: int, seed: int) -> str:
    """The cell serving the unit of `index` in the fleet (neighbours share one)."""
    return f"{seed % 1000:03d}-{index // CELL_UNITS:04d}"


def dipping(cell: str, seed: int, share: float) -> bool:
    """Whether a cell's signal dips every evening (a look-alike: busy hours, not a failing unit)."""
    return random.Random(f"dip:{seed}:{cell}").random() < share


class UnitHealth:
    """One unit's health over time: call `tick(t)` for each half hour ending at `t`, in order."""

    def __init__(
        self,
        unit: str,
        index: int,
        seed: int,
        condition: Condition | None,
        mix: HealthMix,
        outages: tuple[tuple[int, int], ...] = (),
    ) -> None:
        rng = self.rng = random.Random(f"unit-health:{seed}:{unit}")
        self.condition = condition
        self.kind = condition.kind if condition else ""
        self.outages = outages  # fleet-wide (start, end) epochs
        self.cell = cell_of(index, seed)
        self.dip = dipping(self.cell, seed, mix.diurnal_dip)
        self.diag_every = 0 if rng.random() < mix.no_diag else rng.choice((1, 2))  # telegrams between diags
        weak = self.kind == "weak_signal"
        self.rsrp = rng.uniform(-118, -108) if weak else max(-106.0, min(-65.0, rng.gauss(-88, 7)))
        self.noise = 4.0 if weak else 2.5
        self.sinr = max(-5.0, min(25.0, 9 + (self.rsrp + 88) * 0.4 + rng.gauss(0, 3)))
        self.vsup = rng.randint(3450, 3700)
        self.clock = rng.gauss(0, 2)
        self.boot = rng.randrange(0, 40)
        self.booted = 0.0
        self.fw = rng.choices([f for f, _ in FIRMWARE], [w for _, w in FIRMWARE])[0]
        self.reboot_rate = 0.05 if weak else 0.02  # a day
        self.drop_rate = 0.05  # links lost a day
        self.att_chance = 0.15 if weak else 0.03  # of an attach attempt before a telegram
        self.day_shift = 0.0
        self.day = -1
        self.telegrams = 0
        self.dead = False
        self.held = 0  # half hours its site is still without power
        self.holding = False  # its link is down: readings wait
        self.boot_pending = False  # it boots when power comes back

    def _intensity(self, t: int) -> float:
        c = self.condition
        if c is None or c.onset is None or c.failure is None or t < c.onset:
            return 0.0
        return min(1.0, (t - c.onset) / (c.failure - c.onset))

    def tick(self, t: int, hour: int) -> Tick:
        """The half hour ending at `t` (epoch), `hour` its local hour."""
        rng, c = self.rng, self.condition
        if self.dead or (c is not None and c.failure is not None and t >= c.failure):
            self.dead = True
            return Tick(silent=True)
        if t // DAY != self.day:  # the radio's level wanders a little from day to day
            self.day = t // DAY
            self.day_shift = rng.gauss(0, 1.0)
        p = self._intensity(t)
        kind = self.kind if p > 0 else ""
        offline: list[float] = []
        reboot_rate, drop_rate = self.reboot_rate, self.drop_rate
        if kind == "reboot_loop":
            reboot_rate += 30 * p * p
        elif kind == "brown_out":
            reboot_rate += 10 * p * p
        elif kind == "flapping_link":
            drop_rate += 24 * p * p
        restarted = rng.random() < reboot_rate / 48
        held = rng.random() < drop_rate / 48
        if c is not None and c.onset is not None and c.onset <= t < c.onset + SLOT:
            if self.kind == "operator_reboot":
                restarted = True
            elif self.kind == "power_cut":
                self.held, self.boot_pending = 2, True  # an hour without power, then it boots
        for start, end in self.outages:
            held = held or (start < t and t - SLOT < end)
        if self.held:
            self.held -= 1
            held = True
        if held:
            if not self.holding:  # the link drops once however long it stays down
                offline.append(t - SLOT + rng.uniform(0, SLOT))
            self.holding = True
            return Tick(held=True, offline=tuple(offline))
        self.holding = False
        if restarted:
            offline.append(t - rng.uniform(0, SLOT))  # a reboot drops the link
        if self.boot_pending:  # power is back: it boots (its link dropped when the power went)
            restarted, self.boot_pending = True, False
        if restarted:
            self.boot += 1
            self.booted = t - rng.uniform(0, SLOT)
        self.telegrams += 1
        rsrp = self.rsrp + self.day_shift + rng.gauss(0, self.noise)
        sinr = self.sinr + rng.gauss(0, 2)
        if self.dip and 17 <= hour < 23:
            rsrp -= 12
            sinr -= 6
        att = 1 if rng.random() < self.att_chance else 0
        vsup = self.vsup + rng.gauss(0, 15)
        clock = self.clock + rng.gauss(0, 1)
        no_data = rng.random() < 0.002
        if kind == "signal_decay":
            rsrp -= 26 * p
            sinr -= 12 * p
            att += 1 if rng.random() < 2 * p else 0
        elif kind == "brown_out":
            vsup -= 650 * p
        elif kind == "flapping_link":
            att += 1 if rng.random() < p else 0
        elif kind == "meter_link":
            no_data = no_data or rng.random() < 0.7 * p**1.5
        elif kind == "clock_failure":
            clock += 900 * p * p
        if restarted:
            att += 1
        diag = None
        if self.diag_every and self.telegrams % self.diag_every == 0:
            rsrp_i = int(round(max(-140, min(-44, rsrp))))
            diag = Diag(
                fw=self.fw,
                rsrp=rsrp_i,
                rsrq=round(max(-20.0, min(-3.0, -10 + (rsrp + 88) * 0.15)), 1),
                sinr=round(max(-20.0, min(40.0, sinr)), 1),
                ce=0 if rsrp_i >= -105 else 1 if rsrp_i >= -118 else 2,
                cell=self.cell,
                boot=self.boot,
                up=max(0, int(t - self.booted)),
                vsup=int(max(0, vsup)),
                att=att,
            )
        return Tick(
            delay=rng.uniform(2.0, 25.0),
            lost=1 if rng.random() < 0.002 else 0,
            restarted=restarted,
            no_data=no_data,
            clock=clock,
            diag=diag,
            offline=tuple(offline),
        )


def outages(seed: int, start: int, end: int, count: int) -> tuple[tuple[int, int], ...]:
    """`count` fleet-wide outages of an hour (the mobile network or the broker away), after the first third."""
    rng = random.Random(f"outage:{seed}")
    span = end - start
    out = []
    for _ in range(count):
        at = start + int(span / 3 + rng.uniform(0, span * 2 / 3)) // SLOT * SLOT
        out.append((at, at + 3600))
    return tuple(out)


def degrading(condition: Condition | None, at: float, within: float = 7 * DAY) -> bool:
    """Whether a unit with `condition` fails within `within` of `at`, or is degrading at `at` (the truth a
    flag raised at `at` is held to)."""
    if condition is None or condition.failure is None:
        return False
    if condition.kind == "sudden_death":
        return at <= condition.failure <= at + within
    assert condition.onset is not None
    return condition.onset <= at + within and at <= condition.failure + DAY


def predictable(condition: Condition | None) -> bool:
    """Whether the unit's failure shows beforehand (a precursor): sudden deaths are not counted in recall."""
    return condition is not None and condition.kind in PRECURSORS


_encode = msgspec.json.Encoder().encode  # a `diag` as ingest keeps it: as the unit sent it


def fleet_days(
    units: int,
    days: int,
    seed: int,
    start: int,
    mix: HealthMix,
    fleet_outages: int = 0,
    conditions: list[Condition] | None = None,
) -> tuple[list[Condition], Iterator[tuple[int, list[tuple[Any, ...]], dict[str, list[int]]]]]:
    """A fleet's health without its meters: the conditions, and each day's (start, the readings as the store
    gives them to the health record, `Store.health_rows`, and the times each unit's link dropped). Days are
    whole days from `start`. A reading held back is received with the unit's next telegram; a reboot starts
    its `seq` again from 0. `conditions`: the units' conditions instead of those `plan` draws."""
    names = [f"U{i:06d}" for i in range(units)]
    end = start + days * DAY
    if conditions is None:
        conditions = plan(names, seed, start, end, mix)
    by_unit = {c.unit: c for c in conditions}
    cuts = outages(seed, start, end, fleet_outages)
    sims = [UnitHealth(u, i, seed, by_unit.get(u), mix, cuts) for i, u in enumerate(names)]
    seqs = [0] * units
    backlogs: list[list[int]] = [[] for _ in range(units)]

    def each_day() -> Iterator[tuple[int, list[tuple[Any, ...]], dict[str, list[int]]]]:
        for d in range(days):
            day = start + d * DAY
            rows: list[tuple[Any, ...]] = []
            offline: dict[str, list[int]] = {}
            for t in range(day + SLOT, day + DAY + 1, SLOT):
                hour = (t - SLOT) % DAY // 3600
                for i, sim in enumerate(sims):
                    tick = sim.tick(t, hour)
                    if tick.offline:
                        offline.setdefault(names[i], []).extend(int(at) for at in tick.offline)
                    if tick.silent:
                        continue
                    if tick.held:
                        backlogs[i].append(t)
                        continue
                    seqs[i] = 0 if tick.restarted else (seqs[i] + 1 + tick.lost) % 2**32
                    received = int(t + tick.delay)
                    sent = int(received + tick.clock)
                    rows += [(names[i], at, seqs[i], sent, received, False, None) for at in backlogs[i]]
                    backlogs[i] = []
                    blob = None if tick.diag is None else _encode(tick.diag)
                    rows.append((names[i], t, seqs[i], sent, received, tick.no_data, blob))
            yield day, rows, offline

    return conditions, each_day()

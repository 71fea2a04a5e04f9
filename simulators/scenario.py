"""What a simulated fleet sends, half hour by half hour, and what a perfect backend must conclude.

Pure: the clock and the seed are arguments. Each unit draws from its own random stream, so a
unit's telegrams do not depend on the others' and the same seed always gives the same bytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from broker_bridge.telegram import NO_DATA, WireReading, WireTelegram, encode
from kernel.reading import Diag
from simulators.fleet import RESOLUTIONS, SimUnit
from simulators.health import Condition, HealthMix, UnitHealth, outages, plan
from simulators.profiles import load_kw, solar_kw

SLOT = 1800
MAX_READINGS = 96
FUTURE_JUMP = 400 * 86400  # a bogus reading this far ahead is refused whatever the run's real time
CLOCK_AHEAD_MAX = 240  # a failing clock sent on the wire stays within smame's tolerance: its readings are taken


@dataclass(frozen=True, slots=True)
class Faults:
    """Fault rates: per unit and day (events), or per telegram (message faults)."""

    dropout: float = 0.0  # per unit-day: the link is lost 1 to 16 slots, then the backlog is sent
    duplicate: float = 0.0  # per telegram: sent twice
    out_of_order: float = 0.0  # per telegram: held back until after the next one
    clock_skew: float = 0.0  # per telegram: the unit's clock is 10 to 30 min behind the meter's
    future: float = 0.0  # per telegram: carries an extra reading far in the future
    no_data: float = 0.0  # per telegram: a register reads 0xFFFFFFFE
    malformed: float = 0.0  # per telegram: the payload is corrupted (its reading is lost)
    replacement: float = 0.0  # per unit-day: a new meter, register starting afresh
    reset: float = 0.0  # per unit-day: the register drops to zero
    spike: float = 0.0  # per unit-day: one half hour far above the contract
    death: float = 0.0  # per unit-day: the unit goes silent for good
    unknown: float = 0.0  # per slot, as a share of the fleet: telegrams from units not in the registry

    @classmethod
    def clean(cls) -> Faults:
        """No faults at all."""
        return cls()

    @classmethod
    def typical(cls) -> Faults:
        """Rates that show every fault within a few hundred unit-days."""
        return cls(
            dropout=0.08,
            duplicate=0.01,
            out_of_order=0.005,
            clock_skew=0.002,
            future=0.001,
            no_data=0.002,
            malformed=0.001,
            replacement=0.003,
            reset=0.003,
            spike=0.01,
            death=0.002,
            unknown=0.0005,
        )

    @classmethod
    def names(cls) -> list[str]:
        """The fault kinds, in declaration order."""
        return [f.name for f in fields(cls)]


@dataclass(frozen=True, slots=True)
class Send:
    """One MQTT message to publish at simulated time `at` (epoch seconds)."""

    at: float
    unit: str
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Fault:
    """An injected fault, for the truth file."""

    kind: str
    unit: str
    at: int  # epoch of the reading or slot it concerns
    detail: str = ""


@dataclass
class _Reading:
    at: int
    fwd: int
    rev: int
    meter: str
    fwd_known: bool = True  # False: sent as no-data, or never arrived
    rev_known: bool = True
    flags: set[str] = field(default_factory=set)
    kinds: set[str] = field(default_factory=set)


class UnitSim:
    """One unit's life: its meter, its link and its faults."""

    def __init__(
        self, unit: SimUnit, seed: int, faults: Faults, zone: ZoneInfo, record: bool, health: UnitHealth | None = None
    ) -> None:
        self.u = unit
        self.health = health  # its diagnostics, link drops, reboots and failure (None: a unit without them)
        self.diag: Diag | None = None  # what the next telegram carries
        self.rng = random.Random(f"unit:{seed}:{unit.id}")
        self.faults = faults
        self.zone = zone
        self.record = record
        self.fwd, self.rev = unit.start_fwd, unit.start_rev
        self.meter = unit.meter
        self.top = 10**unit.digits
        self.resolution = RESOLUTIONS[unit.e1] * unit.coef
        self.ceiling = int(unit.contract_kw * 0.5 / self.resolution)  # the backend's plausible slot maximum
        self.seq = self.rng.randrange(2**32)
        self.dead = False
        self.clock = 0.0  # how far its clock runs ahead
        self.dropout = 0
        self.backlog: list[_Reading] = []
        self.cloud = 1.0
        self.readings: list[_Reading] = []  # for the truth
        self.energy: dict[int, tuple[int, int]] = {}  # slot end -> true (import, export) raw
        self.resets: set[int] = set()  # slot ends whose slot holds a reset

    def _chance(self, per_day: float) -> bool:
        return per_day > 0 and self.rng.random() < per_day / 48

    def _hit(self, per_telegram: float) -> bool:
        return per_telegram > 0 and self.rng.random() < per_telegram

    def step(self, t: int, faults_out: list[Fault]) -> list[Send]:
        """Advance to the half hour ending at `t`; return what the unit publishes for it."""
        u, f = self.u, self.faults
        start = datetime.fromtimestamp(t - SLOT, self.zone)
        if start.hour == 0 and start.minute == 0:
            self.cloud = self.rng.choice((1.0, 1.0, 0.8, 0.5, 0.2))
        load = load_kw(u.profile, start, u.scale, self.rng)
        pv = solar_kw(u.solar_kwp, start, self.cloud) if u.solar_kwp else 0.0
        imp = round(max(load - pv, 0.0) * 0.5 / self.resolution)
        exp = round(max(pv - load, 0.0) * 0.5 / self.resolution)
        kinds: set[str] = set()
        if not self.dead and self._chance(f.spike):
            imp = int(self.ceiling * self.rng.uniform(1.3, 2.0)) + 1
            kinds.add("spike")
            faults_out.append(Fault("spike", u.id, t, f"{imp} raw, plausible at most {self.ceiling}"))
        self.energy[t] = (imp, exp)
        self.fwd = (self.fwd + imp) % self.top
        self.rev = (self.rev + exp) % self.top
        if not self.dead and self._chance(f.replacement):
            self.meter = f"{u.meter}-R{self.rng.randrange(1000, 9999)}"
            self.fwd, self.rev = self.rng.randrange(0, 50), 0
            kinds.add("replacement")
            faults_out.append(Fault("replacement", u.id, t, f"new meter {self.meter}"))
        elif not self.dead and self._chance(f.reset) and 200 * self.ceiling < self.fwd < self.top - 200 * self.ceiling:
            # Far from zero and from the wrap: within a day the register can neither climb back above the
            # old value nor pass for a rollover, so a perfect backend must see a reset.
            self.fwd = 0
            self.resets.add(t)
            kinds.add("reset")
            faults_out.append(Fault("reset", u.id, t))
        reading = _Reading(t, self.fwd, self.rev, self.meter, kinds=kinds)
        if self.record:
            self.readings.append(reading)
        if self.dead:
            reading.fwd_known = reading.rev_known = False
            reading.kinds.add("death")
            return []
        if self._chance(f.death):
            self.dead = True
            reading.fwd_known = reading.rev_known = False
            reading.kinds.add("death")
            faults_out.append(Fault("death", u.id, t))
            return []
        if self.dropout == 0 and self._chance(f.dropout):
            self.dropout = self.rng.randint(1, 16)
            faults_out.append(Fault("dropout", u.id, t, f"{self.dropout} half hours"))
        if self.health is not None:
            return self._health_step(t, start.hour, reading, faults_out)
        if self.dropout:
            return self._dropout_step(t, reading)
        return self._live(t, reading, faults_out)

    def _health_step(self, t: int, hour: int, reading: _Reading, faults_out: list[Fault]) -> list[Send]:
        """The half hour as the unit's health has it: silent for good after its failure, a reading held while
        its link is down (sent with the next one, as after a dropout), a reboot starting its `seq` again, a
        meter that answers no-data, a clock running ahead, its `diag`, and its status topic at each drop."""
        assert self.health is not None
        tick = self.health.tick(t, hour)
        u = self.u
        if tick.silent:
            self.dead = True
            reading.fwd_known = reading.rev_known = False
            reading.kinds.add("death")
            kind = self.health.kind or "failure"
            faults_out.append(Fault("failure", u.id, t, f"{kind}: silent from here"))
            return []
        status = f"smame/v1/{u.id}/status"
        sends = [Send(at, u.id, status, b"offline") for at in tick.offline]
        sends += [Send(at + 60, u.id, status, b"online") for at in tick.offline]
        if self.dropout:  # a dropout of the fault model holds it, whatever its health says
            return sends + self._dropout_step(t, reading)
        if tick.held:
            reading.kinds.add("dropout")
            self.backlog.append(reading)
            return sends
        if tick.restarted:
            self.seq = 2**32 - 1  # its counter starts again: the next telegram is 0
        self.seq = (self.seq + tick.lost) % 2**32
        if tick.no_data:
            reading.fwd_known = False
            reading.kinds.add("no_data")
            faults_out.append(Fault("no_data", u.id, t, "fwd (its meter link)"))
        self.diag = tick.diag
        self.clock = min(tick.clock, CLOCK_AHEAD_MAX)
        if self.backlog:
            self.backlog.append(reading)
            return sends + self._reconnect(t, reading)
        return sends + self._live(t, reading, faults_out)

    def _dropout_step(self, t: int, reading: _Reading) -> list[Send]:
        """A half hour of a dropout of the fault model: held, or sent with the backlog when it ends."""
        self.dropout -= 1
        reading.kinds.add("dropout")
        self.backlog.append(reading)
        return [] if self.dropout else self._reconnect(t, reading)

    def _live(self, t: int, r: _Reading, faults_out: list[Fault]) -> list[Send]:
        f = self.faults
        latency = self.rng.uniform(2.0, 25.0)
        wire = [self._wire(r)]
        sent = t + latency + self.clock
        if self._hit(f.no_data):
            which = self.rng.choice(("fwd", "rev"))
            if which == "fwd":
                r.fwd_known = False
            else:
                r.rev_known = False
            r.kinds.add("no_data")
            wire = [self._wire(r)]
            faults_out.append(Fault("no_data", self.u.id, t, which))
        if self._hit(f.clock_skew):
            skew = self.rng.randint(600, 1800)
            sent -= skew
            r.flags.add("clock_skew")
            r.kinds.add("clock_skew")
            faults_out.append(Fault("clock_skew", self.u.id, t, f"unit clock {skew} s behind the meter"))
        if self._hit(f.future):
            wire.append(WireReading(self._time(t + FUTURE_JUMP), 1, 0))
            faults_out.append(Fault("future", self.u.id, t + FUTURE_JUMP))
        payload = self._telegram(wire, sent, r.meter)
        if self._hit(f.malformed):
            payload = payload[: len(payload) // 2]
            r.fwd_known = r.rev_known = False
            r.kinds.add("malformed")
            faults_out.append(Fault("malformed", self.u.id, t))
        at = t + latency
        if self._hit(f.out_of_order):
            at += SLOT + self.rng.uniform(30, 120)
            r.kinds.add("out_of_order")
            faults_out.append(Fault("out_of_order", self.u.id, t))
        sends = [Send(at, self.u.id, self.topic, payload)]
        if self._hit(f.duplicate):
            sends.append(Send(at + self.rng.uniform(1, 20), self.u.id, self.topic, payload))
            r.kinds.add("duplicate")
            faults_out.append(Fault("duplicate", self.u.id, t))
        return sends

    def _reconnect(self, t: int, live: _Reading) -> list[Send]:
        # The live reading goes first; the missed ones follow from the meter's history, oldest first.
        at = t + self.rng.uniform(5.0, 40.0)
        sends = [Send(at, self.u.id, self.topic, self._telegram([self._wire(live)], at, live.meter))]
        missed, self.backlog = self.backlog[:-1], []
        for chunk in _chunks(missed):
            at += self.rng.uniform(0.5, 3.0)
            sends.append(
                Send(at, self.u.id, self.topic, self._telegram([self._wire(r) for r in chunk], at, chunk[0].meter))
            )
        return sends

    def resend(self, start: int, end: int, at: float) -> list[Send]:
        """What the unit sends when asked to `resend` (devices.md): the readings its meter's history holds with
        `start <= at <= end`, oldest first, as telegrams sent at `at` (a run that records its readings only)."""
        held = [r for r in self.readings if start <= r.at <= end]
        return [
            Send(at, self.u.id, self.topic, self._telegram([self._wire(r) for r in chunk], at, chunk[0].meter))
            for chunk in _chunks(held)
        ]

    @property
    def topic(self) -> str:
        return f"smame/v1/{self.u.id}/reading"

    def _time(self, epoch: int) -> datetime:
        return datetime.fromtimestamp(epoch, self.zone)

    def _wire(self, r: _Reading) -> WireReading:
        return WireReading(self._time(r.at), r.fwd if r.fwd_known else NO_DATA, r.rev if r.rev_known else NO_DATA)

    def _telegram(self, readings: list[WireReading], sent: float, meter: str) -> bytes:
        self.seq = (self.seq + 1) % 2**32
        u = self.u
        diag, self.diag = self.diag, None  # a diag goes with one telegram
        wire = WireTelegram(1, u.id, meter, self.seq, self._time(int(sent)), u.e1, u.digits, readings, u.coef, diag)
        return encode(wire)


def unknown_sends(
    t: int, units: int, rate: float, rng: random.Random, zone: ZoneInfo, faults_out: list[Fault]
) -> list[Send]:
    """Telegrams from units the registry does not know (a misconfigured or foreign unit)."""
    out = []
    expected = units * rate
    count = int(expected) + (1 if rng.random() < expected - int(expected) else 0)
    for _ in range(count):
        uid = f"X{rng.randrange(10**6):06d}"
        reading = WireReading(datetime.fromtimestamp(t, zone), rng.randrange(10**6), 0)
        payload = encode(WireTelegram(1, uid, "SM-UNKNOWN", 1, datetime.fromtimestamp(t + 5, zone), 1, 6, [reading], 1))
        out.append(Send(t + rng.uniform(2, 25), uid, f"smame/v1/{uid}/reading", payload))
        faults_out.append(Fault("unknown", uid, t))
    return out


class Scenario:
    """A fleet over time: call `step(t)` for each half hour in order."""

    def __init__(
        self,
        fleet: list[SimUnit],
        seed: int,
        faults: Faults,
        zone: str,
        record: bool = True,
        health: HealthMix | None = None,
        span: tuple[int, int] = (0, 0),
    ) -> None:
        """`health`: the units also send their `diag` and status, with the conditions `health.plan` draws over
        `span` (start, end epochs) and one fleet-wide outage of an hour in it (None: neither)."""
        self.zone = ZoneInfo(zone)
        self.conditions: list[Condition] = []
        units: list[UnitHealth | None] = [None] * len(fleet)
        if health is not None:
            self.conditions = plan([u.id for u in fleet], seed, span[0], span[1], health)
            of = {c.unit: c for c in self.conditions}
            cut = outages(seed, span[0], span[1], 1)
            units = [UnitHealth(u.id, i, seed, of.get(u.id), health, cut) for i, u in enumerate(fleet)]
        self.sims = [UnitSim(u, seed, faults, self.zone, record, h) for u, h in zip(fleet, units, strict=True)]
        self.faults = faults
        self.rng = random.Random(f"scenario:{seed}")
        self.injected: list[Fault] = []

    def start(self, t: int) -> list[Send]:
        """The first reading of every unit (it closes no slot the truth speaks of)."""
        return [s for sim in self.sims for s in sim._live(t, _first(sim, t), [])]

    def step(self, t: int) -> list[Send]:
        """What the fleet publishes for the half hour ending at `t`."""
        out: list[Send] = []
        for sim in self.sims:
            out.extend(sim.step(t, self.injected))
        out.extend(unknown_sends(t, len(self.sims), self.faults.unknown, self.rng, self.zone, self.injected))
        return out


def _chunks(readings: list[_Reading]) -> list[list[_Reading]]:
    """Readings in telegrams of up to MAX_READINGS, in order; a telegram names one meter, so a replacement
    among them starts a new one."""
    chunks: list[list[_Reading]] = []
    for r in readings:
        if chunks and chunks[-1][-1].meter == r.meter and len(chunks[-1]) < MAX_READINGS:
            chunks[-1].append(r)
        else:
            chunks.append([r])
    return chunks


def _first(sim: UnitSim, t: int) -> _Reading:
    r = _Reading(t, sim.fwd, sim.rev, sim.meter)
    if sim.record:
        sim.readings.append(r)
    return r


def floor_slot(epoch: float, zone: ZoneInfo) -> int:
    """The latest local half hour at or before `epoch`."""
    offset = datetime.fromtimestamp(int(epoch), zone).utcoffset() or timedelta(0)
    shift = int(offset.total_seconds())
    return (int(epoch) + shift) // SLOT * SLOT - shift

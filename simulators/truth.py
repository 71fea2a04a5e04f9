"""Ground truth: what a perfect backend concludes from what the fleet sent, and the check against it.

Written from aggregation.md, not from the aggregator's code, so that the two can disagree.
Energies come from the simulated load, not from register differences.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import msgspec

from simulators.scenario import SLOT, Fault, Scenario, UnitSim

# The quarantine reason each message fault must produce.
QUARANTINE = {"malformed": "not_json", "future": "future", "unknown": "unknown_unit"}


@dataclass(frozen=True, slots=True)
class TruthSlot:
    """The conclusion for one unit and slot: raw energies (None: missing), qualities, flags, fault kinds."""

    unit: str
    end: int
    imp: int | None
    imp_q: str
    exp: int | None
    exp_q: str
    flags: tuple[str, ...]
    kinds: tuple[str, ...]


def _spread(total: int, n: int) -> list[int]:
    return [total * k // n - total * (k - 1) // n for k in range(1, n + 1)]


def _register(sim: UnitSim, index: int, gap_cap: int) -> dict[int, tuple[int | None, str, set[str], set[str]]]:
    """Slot end -> (value, quality, flags, kinds) for one register of one unit."""
    unsent = {id(r) for r in sim.backlog}  # still offline at the end: the backlog never left the unit
    known = [r for r in sim.readings if (r.fwd_known if index == 0 else r.rev_known) and id(r) not in unsent]
    out: dict[int, tuple[int | None, str, set[str], set[str]]] = {}
    by_time = {r.at: r for r in sim.readings}
    for a, b in pairwise(known):
        n = (b.at - a.at) // SLOT
        ends = [a.at + SLOT * k for k in range(1, n + 1)]
        between = set().union(*(by_time[t].kinds for t in ends)) if n > 1 else set()
        last_flags = set(b.flags)
        if n > gap_cap:
            out[b.at] = (None, "M", last_flags, set(b.kinds))
            continue
        if b.meter != a.meter or (index == 0 and any(t in sim.resets for t in ends)):  # resets hit the import register
            flag = "replacement" if b.meter != a.meter else "reset"
            for t in ends:
                out[t] = (None, "M", last_flags | {flag} if t == b.at else set(), by_time[t].kinds | between)
            continue
        energies = [sim.energy[t][index] for t in ends]
        total = sum(energies)
        start = a.fwd if index == 0 else a.rev
        wraps = start + total >= sim.top
        if wraps and total > sim.ceiling * n:  # a drop that is no plausible wrap: the spec says reset
            for t in ends:
                out[t] = (None, "M", last_flags | {"reset"} if t == b.at else set(), by_time[t].kinds | between)
            continue
        parts = energies[:1] if n == 1 else _spread(total, n)
        quality = "A" if n == 1 else "E"
        cumulative = 0
        for t, part in zip(ends, parts, strict=True):
            flags: set[str] = set()
            kinds = by_time[t].kinds | between
            before, cumulative = cumulative, cumulative + part
            if wraps and before < sim.top - start <= cumulative:
                flags.add("rollover")
                kinds = kinds | {"rollover"}
            if part > sim.ceiling:
                flags.add("spike")
            if t == b.at:
                flags |= last_flags
            out[t] = (part, quality, flags, kinds)
    return out


def conclude(scenario: Scenario, end: int, gap_cap: int = 48) -> Iterator[TruthSlot]:
    """Every slot of every unit from its first reading to `end`, as a perfect backend stores it."""
    for sim in scenario.sims:
        if not sim.readings:
            continue
        imp, exp = _register(sim, 0, gap_cap), _register(sim, 1, gap_cap)
        kinds_at = {r.at: r.kinds for r in sim.readings}
        for t in range(sim.readings[0].at + SLOT, end + 1, SLOT):
            iv, iq, iflags, ikinds = imp.get(t, (None, "M", set(), set()))
            ev, eq, eflags, ekinds = exp.get(t, (None, "M", set(), set()))
            kinds = ikinds | ekinds | kinds_at.get(t, set())
            yield TruthSlot(sim.u.id, t, iv, iq, ev, eq, tuple(sorted(iflags | eflags)), tuple(sorted(kinds)))


def write_truth(path: Path, meta: dict[str, Any], faults: Iterable[Fault], slots: Iterable[TruthSlot]) -> int:
    """Write the truth as JSON lines: a meta line, the faults, then the slots. Returns the slot count."""
    enc = msgspec.json.Encoder()
    n = 0
    with path.open("wb") as f:
        f.write(enc.encode({"type": "meta", **meta}) + b"\n")
        for fault in faults:
            f.write(enc.encode({"type": "fault", **asdict(fault)}) + b"\n")
        for s in slots:
            f.write(enc.encode({"type": "slot", **asdict(s)}) + b"\n")
            n += 1
    return n


@dataclass
class Truth:
    """A truth file read back."""

    meta: dict[str, Any]
    faults: list[Fault]
    slots: list[TruthSlot]


def read_truth(path: Path) -> Truth:
    """Read a truth file written by `write_truth`."""
    dec = msgspec.json.Decoder()
    meta: dict[str, Any] = {}
    faults, slots = [], []
    with path.open("rb") as f:
        for line in f:
            obj = dec.decode(line)
            kind = obj.pop("type")
            if kind == "meta":
                meta = obj
            elif kind == "fault":
                faults.append(Fault(**obj))
            else:
                slots.append(
                    TruthSlot(
                        obj["unit"],
                        obj["end"],
                        obj["imp"],
                        obj["imp_q"],
                        obj["exp"],
                        obj["exp_q"],
                        tuple(obj["flags"]),
                        tuple(obj["kinds"]),
                    )
                )
    return Truth(meta, faults, slots)


Observed = tuple[int | None, str, int | None, str, tuple[str, ...]]


@dataclass
class Report:
    """Matches and mismatches per fault kind, and the first mismatches in full."""

    rows: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    examples: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        return sum(bad for _, bad in self.rows.values())

    def table(self) -> str:
        """A per-kind table for people."""
        lines = [f"{'kind':<14} {'checked':>9} {'match':>9} {'mismatch':>9}"]
        for kind in sorted(self.rows):
            good, bad = self.rows[kind]
            lines.append(f"{kind:<14} {good + bad:>9} {good:>9} {bad:>9}")
        return "\n".join(lines)


def compare(
    truth: Truth, stored: Callable[[str, int, int], dict[int, Observed]], quarantined: dict[str, int]
) -> Report:
    """Check every truth slot against the store, and the expected quarantine counts."""
    report = Report()
    by_unit: dict[str, list[TruthSlot]] = defaultdict(list)
    for s in truth.slots:
        by_unit[s.unit].append(s)
    for unit, slots in by_unit.items():
        got = stored(unit, slots[0].end - SLOT, slots[-1].end)
        for s in slots:
            want: Observed = (s.imp, s.imp_q, s.exp, s.exp_q, s.flags)
            have = got.get(s.end, (None, "M", None, "M", ()))
            ok = have == want
            for kind in s.kinds or ("clean",):
                report.rows[kind][0 if ok else 1] += 1
            if not ok and len(report.examples) < 20:
                report.examples.append(
                    f"{unit} slot ending {s.end} [{','.join(s.kinds) or 'clean'}]: expected {want}, stored {have}"
                )
    # a unit the broker refused (one unknown to the registry, on a provisioned broker) reaches no quarantine
    refused = set(truth.meta.get("refused_units") or ())
    kept_out = [f for f in truth.faults if f.kind in QUARANTINE and f.unit in refused]
    for f in kept_out:
        report.rows[f"refused by the broker:{f.kind}"][0 if f.kind == "unknown" else 1] += 1
        if f.kind != "unknown" and len(report.examples) < 20:
            report.examples.append(f"{f.unit}: its {f.kind} telegram was refused by the broker, a unit it should know")
    expected = Counter(QUARANTINE[f.kind] for f in truth.faults if f.kind in QUARANTINE and f.unit not in refused)
    for reason, n in expected.items():
        ok = quarantined.get(reason, 0) >= n
        report.rows[f"quarantine:{reason}"][0 if ok else 1] += 1
        if not ok:
            report.examples.append(f"quarantine {reason}: expected at least {n}, found {quarantined.get(reason, 0)}")
    return report

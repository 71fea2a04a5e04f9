"""The simulated fleet: deterministic, realistic, and with the faults it claims."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import date, timedelta
from itertools import pairwise
from pathlib import Path
from zoneinfo import ZoneInfo

from kernel.registry import load_registry
from simulators.fleet import make_fleet, write_factors, write_registry
from simulators.health import PRECURSORS, HealthMix
from simulators.run import PacedClock
from simulators.scenario import SLOT, Faults, Scenario, floor_slot

ZONE = "Asia/Tokyo"
END = floor_slot(1_795_400_000, ZoneInfo(ZONE))


def run(seed: int, faults: Faults, units: int = 50, days: int = 2) -> tuple[Scenario, list[tuple[float, str, bytes]]]:
    sc = Scenario(make_fleet(units, 4, seed), seed, faults, ZONE)
    start = END - days * 86400
    sends = sc.start(start)
    for t in range(start + SLOT, END + 1, SLOT):
        sends += sc.step(t)
    return sc, [(s.at, s.topic, s.payload) for s in sends]


def test_same_seed_same_telegrams_byte_for_byte() -> None:
    assert run(7, Faults.typical())[1] == run(7, Faults.typical())[1]
    assert run(7, Faults.typical())[1] != run(8, Faults.typical())[1]


def test_clean_fleet_sends_one_valid_telegram_per_unit_and_half_hour() -> None:
    sc, sends = run(3, Faults.clean(), units=20, days=1)
    assert sc.injected == []
    assert len(sends) == 20 * 49
    for _, topic, payload in sends:
        t = json.loads(payload)
        assert topic == f"smame/v1/{t['unit']}/reading" and t["v"] == 1 and len(t["readings"]) == 1
        assert 0 <= t["readings"][0]["fwd"] < 10 ** t["digits"]


def test_every_fault_kind_is_injected_at_its_rate() -> None:
    every = Faults(**{name: 0.2 for name in Faults.names()})
    sc, _ = run(5, every, units=100, days=3)
    kinds = Counter(f.kind for f in sc.injected)
    assert set(kinds) == set(Faults.names()), kinds


def test_fleet_is_varied_and_some_registers_wrap() -> None:
    fleet = make_fleet(2000, 20, 1)
    assert {u.profile for u in fleet} == {"residential", "shop", "office", "factory"}
    assert sum(1 for u in fleet if u.solar_kwp) > 100
    assert {u.e1 for u in fleet} >= {0x01, 0x02} and {u.digits for u in fleet} == {6, 8}
    assert len({u.customer for u in fleet}) == 20
    sc, _ = run(1, Faults.clean(), units=400, days=1)
    wrapped = [s for s in sc.sims if any(b.fwd < a.fwd for a, b in pairwise(s.readings))]
    assert wrapped, "some registers must roll over during a run"


def test_load_follows_the_day() -> None:
    sc, _ = run(2, Faults.clean(), units=300, days=1)
    night = sum(
        sim.energy[t][0]
        for sim in sc.sims
        if sim.u.profile == "office"
        for t in sim.energy
        if 2 <= (t // 3600 + 9) % 24 < 5
    )
    day = sum(
        sim.energy[t][0]
        for sim in sc.sims
        if sim.u.profile == "office"
        for t in sim.energy
        if 10 <= (t // 3600 + 9) % 24 < 13
    )
    assert day > 3 * night


def test_the_fleets_registry_and_factors_load_and_give_co2_for_any_day(tmp_path: Path) -> None:
    today = date.today() + timedelta(days=400)  # any date: the factors follow the day they are written for
    units, customers = write_registry(make_fleet(30, 4, 1), tmp_path)
    registry = load_registry(units, customers, factors_path=write_factors(tmp_path, today))
    assert registry.unknown_menus() == []
    with_co2 = sorted(c for c in registry.customers if registry.customers[c].co2_columns)
    assert with_co2 == ["C000", "C002"]
    for day in (today, today - timedelta(days=400)):  # this fiscal year's factors and last year's
        factors = registry.day_factors("C000", day)
        assert factors is not None and factors.location is not None and factors.market is not None
    this_year = registry.day_factors("C000", today)
    assert this_year is not None and this_year.market is not None
    assert str(this_year.market.t_per_kwh) == "0.000431"  # the correction, published later, is in force


def test_a_live_half_hour_is_published_when_it_ends_however_late_in_a_half_hour_the_run_began() -> None:
    slot_start = 1_795_000_000 - 1_795_000_000 % SLOT
    real = [slot_start + 25 * 60.0]  # `simulate --follow` started 25 minutes into a half hour
    stop = asyncio.Event()
    live = PacedClock(slot_start, 1.0, "Asia/Tokyo", stop, live_from=slot_start, real=lambda: real[0])
    assert live.wait(slot_start + SLOT) == 5 * 60  # at the half hour's end, not 30 minutes after the start
    real[0] = slot_start + SLOT + 3
    assert live.wait(slot_start + SLOT) < 0 and live.wait(slot_start + 2 * SLOT) == SLOT - 3
    # the past before `live_from` still runs at its speed: a day at 1800x is a half hour a second
    replay = PacedClock(slot_start - 86400, 1800.0, "Asia/Tokyo", stop, live_from=slot_start, real=lambda: real[0])
    assert replay.wait(slot_start - 86400 + SLOT) == 1.0


def test_with_health_units_send_their_diag_and_status_and_the_failing_fall_silent_in_the_truth() -> None:
    start = END - 6 * 86400
    mix = HealthMix(precursor=0.2)
    sc = Scenario(make_fleet(60, 4, 5), 5, Faults.clean(), ZONE, True, mix, (start, END))
    sends = sc.start(start)
    for t in range(start + SLOT, END + 1, SLOT):
        sends += sc.step(t)
    readings = [json.loads(s.payload) for s in sends if s.topic.endswith("/reading")]
    statuses = Counter(s.payload for s in sends if s.topic.endswith("/status"))
    with_diag = [t for t in readings if "diag" in t]
    assert len(with_diag) > len(readings) / 3 and statuses[b"offline"] == statuses[b"online"] > 60
    assert {"fw", "rsrp", "sinr", "boot", "vsup", "cell"} <= set(with_diag[0]["diag"])
    failed = [c for c in sc.conditions if c.kind in PRECURSORS and c.failure is not None and c.failure <= END]
    assert failed and all(c.onset is not None and c.onset < c.failure for c in failed)
    for c in failed:  # nothing sent after its failure, and the truth knows no reading of it
        assert all(s.at < c.failure + SLOT for s in sends if s.unit == c.unit)
        sim = next(s for s in sc.sims if s.u.id == c.unit)
        assert all(not r.fwd_known for r in sim.readings if r.at >= c.failure + SLOT)
    assert {f.kind for f in sc.injected} >= {"failure"}
    # the same seed, the same bytes; without health, no diag and no status (as before)
    again = Scenario(make_fleet(60, 4, 5), 5, Faults.clean(), ZONE, True, mix, (start, END))
    assert [s.payload for s in again.start(start)] == [s.payload for s in sends[:60]]
    assert all("diag" not in json.loads(p) for _, topic, p in run(3, Faults.clean(), 10, 1)[1])

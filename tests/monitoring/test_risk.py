"""The risk of each unit failing: every precursor caught a day ahead with its reasons, no look-alike and no
fleet-wide event taken for one (pure: the health simulator's telegrams, the day's records, the risk)."""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest

from bench.health import run
from monitoring.health import day_records, rows_frame
from monitoring.risk import Assessment, assess
from simulators.health import DAY, Condition, HealthMix, fleet_days, outages

START = 1_790_000_000 - 1_790_000_000 % DAY
UNITS = 40  # one cell
SUBJECT = "U000007"
QUIET = HealthMix(precursor=0, sudden_death=0, weak_signal=0, diurnal_dip=0, operator_reboot=0, power_cut=0)


def counts(offline: dict[str, list[int]]) -> dict[str, int]:
    return {unit: len(times) for unit, times in offline.items()}


def passes(
    conditions: list[Condition], days: int = 16, mix: HealthMix = QUIET, outages: int = 0, seed: int = 3
) -> list[Assessment]:
    """The assessment at the end of each day after a week of baseline."""
    _, stream = fleet_days(UNITS, days, seed, START, mix, outages, conditions)
    records: list[pl.DataFrame] = []
    out = []
    for d, (day, rows, disconnects) in enumerate(stream):
        records.append(day_records(rows_frame(rows), counts(disconnects)).with_columns(day=pl.lit(day, pl.Int64)))
        if d >= 7:
            out.append(assess(pl.concat(records), day))
    return out


@pytest.mark.parametrize(
    ("kind", "signals"),
    [
        ("signal_decay", {"rsrp", "sinr", "attaches"}),
        ("reboot_loop", {"reboots", "disconnects"}),
        ("brown_out", {"vsup_min", "reboots"}),
        ("flapping_link", {"disconnects", "attaches"}),
        ("meter_link", {"no_data"}),
        ("clock_failure", {"clock_offset"}),
    ],
)
def test_each_precursor_is_flagged_a_day_before_the_unit_falls_silent_with_its_reasons(
    kind: str, signals: set[str]
) -> None:
    failure = START + 14 * DAY + 7 * 3600
    result = passes([Condition(SUBJECT, kind, failure - 5 * DAY, failure)])
    flagged = [(a.day, u) for a in result for u in a.at_risk]
    assert {u.unit for _, u in flagged} == {SUBJECT}  # no other unit
    first_day, first = flagged[0]
    assert failure - (first_day + DAY) >= DAY  # flagged at the end of a day at least 24 h before the silence
    assert {r.signal for r in first.reasons} <= signals and first.risk >= 1
    assert all(any(ch.isdigit() for ch in r.words) for r in first.reasons)  # figures, not only words


@pytest.mark.parametrize("kind", ["weak_signal", "operator_reboot", "power_cut", "sudden_death"])
def test_a_look_alike_or_a_sudden_death_puts_no_unit_at_risk(kind: str) -> None:
    at = START + 11 * DAY + 5 * 3600
    dies = kind == "sudden_death"
    conditions = [Condition(f"U{i:06d}", kind, None if dies else at, at if dies else None) for i in range(0, 40, 4)]
    assert [u.unit for a in passes(conditions) for u in a.at_risk] == []


def test_a_cell_whose_signal_dips_every_evening_is_not_at_risk() -> None:
    evening = dataclasses.replace(QUIET, diurnal_dip=1.0)
    assert [u.unit for a in passes([], mix=evening) for u in a.at_risk] == []


def test_a_fleet_wide_outage_is_one_event_and_puts_no_unit_at_risk() -> None:
    [(start, _)] = outages(3, START, START + 16 * DAY, 1)
    outage = start - start % DAY  # (the day it falls in is one with a pass: day 10)
    result = passes([], outages=1)
    assert [u.unit for a in result for u in a.at_risk] == []
    events = [e for a in result for e in a.events]
    assert [(a.day, e.scope, e.signal) for a in result for e in a.events] == [(outage, "fleet", "disconnects")]
    assert events[0].units >= UNITS * 0.9 and events[0].of == UNITS
    assert events[0].words == "1 more disconnects than usual, as a median"


def test_a_unit_at_risk_still_stands_out_during_a_fleet_wide_outage() -> None:
    failure = START + 14 * DAY
    result = passes([Condition(SUBJECT, "reboot_loop", failure - 5 * DAY, failure)], outages=3, days=15)
    assert {u.unit for a in result for u in a.at_risk} == {SUBJECT}


def test_a_day_in_progress_expects_fewer_counts() -> None:
    failure = START + 14 * DAY
    _, stream = fleet_days(
        UNITS, 13, 3, START, QUIET, 0, [Condition(SUBJECT, "reboot_loop", failure - 5 * DAY, failure)]
    )
    records = pl.concat(
        [day_records(rows_frame(r), counts(d)).with_columns(day=pl.lit(day, pl.Int64)) for day, r, d in stream]
    )
    last = int(records["day"].max())
    whole, half = assess(records, last, 1.0), assess(records, last, 0.5)
    assert half.risk[SUBJECT] > whole.risk[SUBJECT] >= 1
    assert "today" in half.at_risk[0].reasons[0].words and "that day" in whole.at_risk[0].reasons[0].words


def test_units_with_a_weak_steady_signal_and_a_short_history_are_held_to_their_band_not_the_fleet() -> None:
    # a new installation: a day behind each unit; the weak-signal units attach five times as often as the
    # fleet, every day, and a morning of ten attempts is no news for them (held to the fleet, 9 were flagged)
    weak = dataclasses.replace(QUIET, weak_signal=0.08)
    truth, stream = fleet_days(600, 2, 2, START, weak)
    records = pl.concat(
        [day_records(rows_frame(r), counts(d)).with_columns(day=pl.lit(day, pl.Int64)) for day, r, d in stream]
    )
    weaklings = {c.unit for c in truth if c.kind == "weak_signal"}
    assert len(weaklings) >= 30
    for elapsed in (0.5, 1.0):  # at midday and at the end of the day
        result = assess(records, int(records["day"].max()), elapsed)
        assert not weaklings & {u.unit for u in result.at_risk}


def test_on_a_new_installations_first_day_the_day_itself_is_the_usual_and_a_failing_unit_still_stands_out() -> None:
    # no unit has a day behind it: before, every unit was held to a rate of nothing, and 5 weak-signal units
    # were flagged for their attach attempts
    weak = dataclasses.replace(QUIET, weak_signal=0.08)
    planned, _ = fleet_days(600, 1, 2, START, weak)
    failing = [Condition(u, kind, START - 3 * DAY, START + 2 * DAY) for u, kind in (("U000001", "flapping_link"),)]
    _, stream = fleet_days(600, 1, 2, START, weak, 0, [c for c in planned if c.unit != "U000001"] + failing)
    [(day, rows, disconnects)] = list(stream)
    records = day_records(rows_frame(rows), counts(disconnects)).with_columns(day=pl.lit(day, pl.Int64))
    for elapsed in (0.5, 1.0):
        assert [u.unit for u in assess(records, day, elapsed).at_risk] == ["U000001"]


def test_a_day_a_unit_reported_only_part_of_is_no_day_of_its_usual_counts() -> None:
    # the demo's case: the data start an hour and a half before the first whole day, which made a day of
    # baseline with almost nothing in it, and 9 weak-signal units flagged for their attach attempts against it
    truth, stream = fleet_days(600, 2, 2, START, dataclasses.replace(QUIET, weak_signal=0.08))
    days = []
    for day, rows, disconnects in stream:
        if day == START:
            rows = [r for r in rows if r[1] >= START + DAY - 5400]
            disconnects = {u: [t for t in ts if t >= START + DAY - 5400] for u, ts in disconnects.items()}
        days.append(day_records(rows_frame(rows), counts(disconnects)).with_columns(day=pl.lit(day, pl.Int64)))
    records = pl.concat(days)
    weaklings = {c.unit for c in truth if c.kind == "weak_signal"}
    for elapsed in (0.5, 1.0):
        assert not weaklings & {u.unit for u in assess(records, START + DAY, elapsed).at_risk}


def test_a_unit_with_no_history_is_held_to_the_fleet() -> None:
    records = pl.concat(
        [
            day_records(rows_frame(r), counts(d)).with_columns(day=pl.lit(day, pl.Int64))
            for day, r, d in fleet_days(UNITS, 9, 3, START, QUIET)[1]
        ]
    )
    last = int(records["day"].max())
    newcomer = records.filter(pl.col("day") == last, pl.col("unit") == SUBJECT).with_columns(
        unit=pl.lit("NEW"), reboots=pl.lit(6, pl.Int64), rsrp=pl.lit(-130.0)
    )
    result = assess(pl.concat([records, newcomer]), last)
    [new] = [u for u in result.at_risk if u.unit == "NEW"]
    assert [r.signal for r in new.reasons] == ["reboots"]  # its level has no baseline: not judged on it yet
    assert "against 0.0" in new.reasons[0].words


def test_the_small_benchmark_stays_above_its_floor() -> None:
    """CI's version of `bench.health`: a few hundred units over a fortnight, twice the precursors' share."""
    out = run(300, 16, 5, HealthMix(precursor=0.06), 1, None)
    assert out.predictable >= 5
    assert out.recall >= 0.8 and out.precision >= 0.8, out
    assert out.median_lead_h >= 24

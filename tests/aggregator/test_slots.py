"""The slot arithmetic of aggregation.md, rule by rule, on literal inputs."""

from __future__ import annotations

from fractions import Fraction
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.slots import Point, SlotValue, pair_slots, series_slots, spread
from kernel.meter import ACTUAL, ESTIMATED, MISSING, Flag, Limits, format_kwh

T0 = 1_795_000_000 - 1_795_000_000 % 1800
H = 1800
LIMITS = Limits(max_slot_kwh=Fraction(25), gap_cap=48)  # 50 kW contract; e1=0x01 -> 250 raw a slot


def p(k: int, value: int, meter: str = "M1", digits: int = 6, e1: int = 1, coef: int = 1, flags: int = 0) -> Point:
    return Point(T0 + k * H, value, meter, digits, e1, coef, flags)


def test_one_slot_apart_is_actual() -> None:
    assert pair_slots(p(0, 523101), p(1, 523118), LIMITS) == [SlotValue(T0 + H, 17, ACTUAL, 0)]


def test_rollover_is_modulo_digits_and_flagged() -> None:
    [s] = pair_slots(p(0, 999_990), p(1, 5), LIMITS)
    assert (s.value, s.quality, s.flags) == (15, ACTUAL, Flag.ROLLOVER)


def test_implausible_drop_is_a_reset_without_energy() -> None:
    out = pair_slots(p(0, 500_000), p(1, 100), LIMITS)
    assert out == [SlotValue(T0 + H, None, MISSING, Flag.RESET)]


def test_meter_replacement_starts_a_new_series() -> None:
    out = pair_slots(p(0, 500_000), p(2, 3, meter="M2"), LIMITS)
    assert [s.value for s in out] == [None, None]
    assert [s.quality for s in out] == [MISSING, MISSING]
    assert out[-1].flags == Flag.REPLACEMENT and out[0].flags == 0


def test_change_of_scale_without_new_serial_is_a_reset() -> None:
    out = pair_slots(p(0, 1000), p(1, 1010, e1=2), LIMITS)
    assert out == [SlotValue(T0 + H, None, MISSING, Flag.RESET)]


def test_spike_is_kept_and_flagged() -> None:
    [s] = pair_slots(p(0, 1000), p(1, 1000 + 251), LIMITS)
    assert (s.value, s.quality, s.flags) == (251, ACTUAL, Flag.SPIKE)
    [ok] = pair_slots(p(0, 1000), p(1, 1000 + 250), LIMITS)
    assert ok.flags == 0


def test_gap_is_estimated_and_sums_exactly() -> None:
    out = pair_slots(p(0, 1000), p(3, 1026), LIMITS)
    assert [s.value for s in out] == [8, 9, 9]
    assert {s.quality for s in out} == {ESTIMATED}
    assert [s.end for s in out] == [T0 + H, T0 + 2 * H, T0 + 3 * H]


def test_gap_longer_than_the_cap_stays_missing() -> None:
    out = pair_slots(p(0, 1000), p(49, 1490), LIMITS)
    assert out == [SlotValue(T0 + 49 * H, None, MISSING, 0)]
    assert [s.quality for s in pair_slots(p(0, 1000), p(48, 1480), LIMITS)] == [ESTIMATED] * 48


def test_rollover_inside_a_gap_flags_the_slot_where_the_register_wraps() -> None:
    out = pair_slots(p(0, 999_980), p(4, 20), LIMITS)  # 40 over 4 slots: 10 each, wraps in slot 2
    assert [s.value for s in out] == [10, 10, 10, 10]
    assert [bool(s.flags & Flag.ROLLOVER) for s in out] == [False, True, False, False]


def test_reading_flags_go_to_the_slot_the_reading_closes() -> None:
    out = pair_slots(p(0, 1000), p(2, 1010, flags=Flag.CLOCK_SKEW), LIMITS)
    assert [s.flags for s in out] == [0, Flag.CLOCK_SKEW]


def test_points_out_of_order_are_a_programming_error() -> None:
    with pytest.raises(ValueError):
        pair_slots(p(1, 1000), p(1, 1000), LIMITS)


@pytest.mark.parametrize(
    ("raw", "e1", "coef", "text"),
    [
        (17, 0x01, 1, "1.7"),
        (17, 0x00, 1, "17"),
        (5, 0x02, 1, "0.05"),
        (123, 0x03, 10, "1.23"),
        (7, 0x0A, 1, "70"),
        (0, 0x01, 1, "0.0"),
        (12345, 0x04, 3, "3.7035"),
    ],
)
def test_kwh_printed_with_the_meter_resolution(raw: int, e1: int, coef: int, text: str) -> None:
    assert format_kwh(raw, e1, coef) == text


@given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=1, max_value=500))
def test_spread_sums_exactly_and_is_level(total: int, n: int) -> None:
    parts = spread(total, n)
    assert sum(parts) == total and len(parts) == n
    assert max(parts) - min(parts) <= 1 and min(parts) >= 0


readings = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=60),
        st.integers(min_value=0, max_value=999_999),
        st.sampled_from(["M1", "M1", "M1", "M2"]),
    ),
    min_size=2,
    max_size=30,
)


@given(readings)
def test_no_slot_is_ever_negative_and_estimates_sum_to_the_register_difference(
    steps: list[tuple[int, int, str]],
) -> None:
    k, points = 0, []
    for gap, value, meter in steps:
        k += gap
        points.append(p(k, value, meter))
    for a, b in pairwise(points):
        out = pair_slots(a, b, LIMITS)
        assert all(s.value is None or s.value >= 0 for s in out)
        values = [s.value for s in out]
        if all(v is not None for v in values) and out[-1].end == b.at and len(out) == (b.at - a.at) // H:
            assert sum(values) % 10**6 == (b.value - a.value) % 10**6  # type: ignore[arg-type]
    assert len({s.end for s in series_slots(points, LIMITS)}) == len(series_slots(points, LIMITS))

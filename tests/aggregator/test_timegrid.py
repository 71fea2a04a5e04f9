"""Slots live on local half hours; days have 46, 48 or 50 of them."""

from __future__ import annotations

from datetime import date, datetime
from zoneinfo import ZoneInfo

import pytest

from kernel.timegrid import Grid, SlotLabel


def epoch(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp())


def test_tokyo_day_has_48_slots_from_midnight_to_24_00() -> None:
    g = Grid("Asia/Tokyo")
    ends = g.day_slots(date(2026, 11, 23))
    assert len(ends) == 48
    assert ends[0] == epoch("2026-11-23T00:30:00+09:00")
    assert g.label(ends[0]) == SlotLabel(date(2026, 11, 23), 1, "00:00", "00:30")
    assert g.label(ends[20]) == SlotLabel(date(2026, 11, 23), 21, "10:00", "10:30")
    assert g.label(ends[-1]) == SlotLabel(date(2026, 11, 23), 48, "23:30", "24:00")
    assert g.day_of(ends[-1]) == date(2026, 11, 23)


@pytest.mark.parametrize(("day", "count"), [(date(2026, 3, 29), 46), (date(2026, 10, 25), 50), (date(2026, 7, 1), 48)])
def test_daylight_saving_days(day: date, count: int) -> None:
    g = Grid("Europe/Berlin")
    ends = g.day_slots(day)
    assert len(ends) == count
    assert g.label(ends[-1]).end == "24:00"
    assert [g.label(e).index for e in ends] == list(range(1, count + 1))
    assert all(g.day_of(e) == day for e in ends)


def test_zone_where_midnight_does_not_exist() -> None:
    g = Grid("America/Santiago")  # clocks go from 24:00 to 01:00 on 2026-09-06
    ends = g.day_slots(date(2026, 9, 6))
    assert len(ends) == 46
    assert g.label(ends[0]).start == "01:00"


def test_quarter_hour_offset_zone_uses_local_half_hours() -> None:
    g = Grid("Asia/Kathmandu")  # UTC+05:45
    assert g.on_boundary(epoch("2026-11-23T10:30:00+05:45"))
    assert not g.on_boundary(epoch("2026-11-23T10:30:00+00:00"))
    assert len(g.day_slots(date(2026, 11, 23))) == 48


def test_boundaries() -> None:
    g = Grid("Asia/Tokyo")
    assert g.on_boundary(epoch("2026-11-23T10:00:00+09:00"))
    assert not g.on_boundary(epoch("2026-11-23T10:15:00+09:00"))
    assert not g.on_boundary(epoch("2026-11-23T10:00:01+09:00"))
    assert ZoneInfo("Asia/Tokyo") == g.zone

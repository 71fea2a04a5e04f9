"""Detection on a fixed day with every kind of problem, and `smame report` on a real store."""

from __future__ import annotations

import csv
import io
from datetime import date, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from aggregator.backends import open_url
from aggregator.ingest import Ingestor
from aggregator.sqlite import SqliteStore
from aggregator.store import SlotRow
from kernel.meter import Flag
from kernel.reading import Incoming, Reading
from kernel.registry import load_registry
from kernel.timegrid import SLOT, Grid
from monitoring import daily
from monitoring.detect import by_unit, detect
from monitoring.report import DailyReport, problems_csv, render_slack, render_text, subject
from tests.helpers import smame, smame_env, write_registry, yesterday

GRID = Grid("Asia/Tokyo")
DAY = date(2026, 11, 23)
ENDS = GRID.day_slots(DAY)
LABELS = [(e, GRID.label(e)) for e in ENDS]
NOW = GRID.day_start(DAY + timedelta(days=1)) + 8 * 3600  # 08:00 the next morning


def row(i: int, unit: str, imp: int | None, q: str, flags: int = 0) -> SlotRow:
    return SlotRow(ENDS[i - 1], unit, imp, q, flags, 0, q, 0, "SM", 1, 1)


def day_of_rows() -> list[SlotRow]:
    rows = []
    for i in range(1, 49):
        rows.append(row(i, "GOOD", 5, "A"))
        if i not in (10, 11, 12):  # GAPPY: a morning gap, then estimates, and every flag once
            q = "E" if 20 <= i <= 22 else "A"
            flags = {
                30: Flag.ROLLOVER,
                31: Flag.RESET,
                32: Flag.REPLACEMENT,
                33: Flag.SPIKE,
                34: Flag.CLOCK_SKEW,
                35: Flag.CONFLICT,
            }.get(i, 0)
            rows.append(
                row(
                    i,
                    "GAPPY",
                    None if flags in (Flag.RESET, Flag.REPLACEMENT) else 3,
                    "M" if flags in (Flag.RESET, Flag.REPLACEMENT) else q,
                    flags,
                )
            )
        rows.append(row(i, "IDLE", 0 if 1 <= i <= 16 else 4, "A"))  # nothing consumed 00:00-08:00
        solar = 17 <= i <= 32  # 08:00-16:00: its panels cover its load and export the rest, nothing imported
        rows.append(SlotRow(ENDS[i - 1], "SOLAR", 0 if solar else 6, "A", 0, 9 if solar else 0, "A", 0, "SM", 1, 1))
    return rows


def test_every_kind_of_problem_is_found() -> None:
    units = [("GOOD", "C1"), ("GAPPY", "C1"), ("IDLE", "C2"), ("DEAD", "C2"), ("NEW", "C2"), ("SOLAR", "C2")]
    last = {"GOOD": NOW - 600, "GAPPY": NOW - 600, "IDLE": NOW - 600, "DEAD": NOW - 3 * 86400, "SOLAR": NOW - 600}
    findings, problems = detect(DAY, LABELS, units, by_unit(day_of_rows()), last, NOW, zero_run=12)
    f = {x.unit: x for x in findings}
    assert not f["GOOD"].has_problems
    assert f["GAPPY"].missing == [10, 11, 12, 31, 32]
    assert f["GAPPY"].estimated == [20, 21, 22]
    assert dict(f["GAPPY"].flags) == {
        "rollover": 1,
        "reset": 1,
        "replacement": 1,
        "spike": 1,
        "clock_skew": 1,
        "conflict": 1,
    }
    assert f["IDLE"].zero_runs == [(1, 16)] and not f["IDLE"].missing
    assert not f["SOLAR"].has_problems  # exporting at midday is not "no consumption"
    assert f["DEAD"].missing == list(range(1, 49)) and f["DEAD"].silent_since == NOW - 3 * 86400
    # installed yesterday, never heard from: listed apart, not a unit with 48 missing slots
    assert f["NEW"].never_heard and not f["NEW"].missing and f["NEW"].silent_since is None
    missing = {(p.unit, p.index) for p in problems if p.problem == "missing"}
    assert missing == {("GAPPY", i) for i in (10, 11, 12, 31, 32)} | {("DEAD", i) for i in range(1, 49)}
    about = {"future": 1, "not_json": 3}  # refused readings of the day, one of which came the next morning
    report = DailyReport(DAY, "Asia/Tokyo", findings, problems, {"not_json": 2}, ["X1"], 48, quarantine_about=about)
    text = render_text(report)
    assert "units never heard from (1): NEW" in text and "NEW (C2)" not in text
    assert (
        subject(report) == f"[smame] daily report {DAY}: 2 of 5 units with missing data (53 slots), 1 never heard from"
    )
    assert "GAPPY (C1): missing 5: slots 10-12, 31-32; estimated 3: slots 20-22" in text
    assert "DEAD (C2): silent since" in text and "IDLE (C2): no consumption: slots 1-16" in text
    quarantined = (
        "quarantined telegrams and readings: arrived on the day: not_json 2; about the day: future 1, not_json 3"
    )
    assert quarantined in text and "unknown units that tried to send (1): X1" in text
    # Slack's short list: the worst first, each saying what is wrong with it
    slack = render_slack(report).split("Worst units (3 with problems):\n")[1].splitlines()
    assert slack[0].startswith("• `DEAD` (C2): silent since 2026-11-21 08:00, 48 slots missing"), slack
    flags = "clock_skew 1, conflict 1, replacement 1, reset 1, rollover 1, spike 1"
    assert slack[1] == f"• `GAPPY` (C1): 5 slots missing, {flags}, 3 estimated"
    assert slack[2] == "• `IDLE` (C2): no consumption for 16 slots"
    lines = problems_csv(problems).decode().splitlines()
    assert (
        lines[0] == "customer,unit_id,date,slot,start,end,problem"
        and "C1,GAPPY,2026-11-23,10,04:30,05:00,missing" in lines
    )


def test_the_report_read_a_share_of_units_at_a_time_finds_what_the_whole_day_shows(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A large fleet's day is read a share of units at a time; the shares' edges must lose or double nothing,
    # whichever units of the registry have rows (a unit without, a stored unit no longer registered), and
    # whatever order the database sorts text in.
    store = open_url(store_url)
    rows = [msgspec.structs.replace(r, unit=f"{r.unit}{k}") for k in range(4) for r in day_of_rows()]
    rows += [msgspec.structs.replace(r, unit=u) for r in day_of_rows()[:3] for u in ("b-1", "B1", "a_2")]
    with store.transaction():
        store.upsert_slots(("imp", "exp"), [msgspec.structs.astuple(r) for r in rows])
    units = {u: "C1" for u in {r.unit for r in rows} if u != "IDLE3"} | {"QUIET": "C2"}
    write_registry(tmp_path, units)
    registry = load_registry(tmp_path / "units.csv", tmp_path / "customers.toml")
    whole = detect(DAY, LABELS, sorted(units.items()), by_unit(rows), store.last_readings(units), NOW)
    for share in (1, 2, 5, 2000):
        monkeypatch.setattr(daily, "SHARE", share)
        report = daily.build_report(store, GRID, registry, DAY, NOW)
        assert (report.findings, report.problems) == whole
    store.close()


def test_report_command_on_a_real_store(workdir: Path) -> None:
    day = yesterday()  # the report reads the real clock: silent units are judged against now
    write_registry(workdir, {"R1": "C1", "R2": "C1"})
    registry = load_registry(workdir / "units.csv", workdir / "customers.toml")
    (workdir / "data").mkdir()
    store = SqliteStore(workdir / "data" / "smame.db")
    ingest = Ingestor(store, registry, GRID)
    start = GRID.day_start(day)
    gap = {start + k * SLOT for k in range(10, 40)}  # R2 silent 05:00-20:00, within the 24 h cap: estimated
    readings = []
    for unit in ("R1", "R2"):
        for k in range(0, 49):
            at = start + k * SLOT
            if unit == "R2" and at in gap:
                continue
            r = Reading(unit, at, "SM", 100 + k, 0, 1, 1, 6, k, at)
            readings.append(Incoming(r, at + 5, f"smame/v1/{unit}/reading", b"{}"))
    ingest.commit(readings, [], int(datetime.now().timestamp()))
    store.close()
    env = smame_env(workdir, 1883)
    out = smame(["report", "--date", day.isoformat(), "--csv", str(workdir / "problems.csv")], env).stdout
    assert "R2 (C1): estimated 31: slots 10-40" in out
    assert "R1 (C1)" not in out
    rows = list(csv.DictReader(io.StringIO((workdir / "problems.csv").read_text())))
    assert {(r["unit_id"], int(r["slot"])) for r in rows} == {("R2", i) for i in range(10, 41)}

"""`smame units`: the fleet on the command line, each unit's newest reading and state."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from aggregator.backends import open_url
from aggregator.ingest import Ingestor
from aggregator.store import HEALTH_COLUMNS
from kernel.reading import Incoming, Reading
from kernel.registry import load_registry
from kernel.timegrid import SLOT, Grid
from monitoring.fleet import LATE_AFTER_S, state_of
from tests.helpers import smame, smame_env, write_registry
from tests.smame.test_admin import refused

GRID = Grid("Asia/Tokyo")


def test_state_boundaries() -> None:
    assert state_of(None, 1000, 7200) == "never heard"
    assert state_of(1000, 1000 + LATE_AFTER_S, 7200) == "reporting"
    assert state_of(1000, 1000 + LATE_AFTER_S + 1, 7200) == "late"
    assert state_of(1000, 1000 + 7200, 7200) == "late"
    assert state_of(1000, 1000 + 7201, 7200) == "silent"


def test_units_shows_each_units_last_reading_and_state_and_filters(workdir: Path) -> None:
    write_registry(workdir, {"U1": "C1", "U2": "C1", "U3": "C1", "U4": "C2"})
    env = smame_env(workdir, 1883)
    registry = load_registry(workdir / "units.csv", workdir / "customers.toml")
    newest = GRID.floor(time.time())
    ages = {"U1": 0, "U3": 2 * SLOT, "U2": 8 * SLOT}  # reporting, late (1 to 1.5 h), silent (4 h); U4 never
    (workdir / "data").mkdir()
    with open_url(f"sqlite:///{workdir / 'data' / 'smame.db'}") as store:
        readings = [
            Incoming(Reading(u, newest - age, "SM", 100, 0, 1, 1, 6, 1, newest - age), newest, "t", b"{}")
            for u, age in ages.items()
        ]
        Ingestor(store, registry, GRID).commit(readings, [], int(time.time()))
    lines = smame(["units"], env).stdout.splitlines()
    assert lines[0] == "4 units: 1 reporting, 1 late, 1 silent, 1 never heard"
    states = {line.split()[0]: line.split(maxsplit=3)[3] for line in lines[1:]}
    assert states == {"U1": "reporting", "U2": "silent", "U3": "late", "U4": "never heard"}
    assert "+09:00" in lines[1]  # times in the settings' zone
    assert [line.split()[0] for line in smame(["units", "--silent"], env).stdout.splitlines()[1:]] == ["U2"]
    only = smame(["units", "--customer", "C2"], env).stdout.splitlines()
    assert only[0].startswith("1 units") and only[1].split()[0] == "U4"
    assert "C9" in refused(["units", "--customer", "C9"], env)


def test_units_by_firmware_or_signal_band_as_their_newest_day_of_health_says(workdir: Path) -> None:
    write_registry(workdir, {"U1": "C1", "U2": "C1", "U3": "C2", "U4": "C2"})
    env = smame_env(workdir, 1883)
    (workdir / "data").mkdir()
    today = GRID.day_start(datetime.fromtimestamp(time.time(), GRID.zone).date())
    days: dict[int, list[tuple[object, ...]]] = {}
    for day, unit, fw, rsrp in (
        (today, "U1", "2.4.3", -85.0),
        (today, "U2", "2.5.0", -104.0),
        (today - 86400, "U3", "2.4.3", -112.0),  # yesterday's is its newest
        (today - 3 * 86400, "U4", "2.4.3", -70.0),  # too old: not in the inventory of now
    ):
        record = dict.fromkeys(HEALTH_COLUMNS, 0) | {"readings": 40, "fw": fw, "rsrp": rsrp}
        days.setdefault(day, []).append((unit, *record.values()))
    with open_url(f"sqlite:///{workdir / 'data' / 'smame.db'}") as store:
        for day, records in days.items():
            store.keep_health(day, ["unit", *HEALTH_COLUMNS], records)
    lines = smame(["units", "--firmware", "2.4.3"], env).stdout.splitlines()
    assert lines[0].startswith("2 units") and [line.split()[0] for line in lines[1:]] == ["U1", "U3"]
    assert lines[1].endswith("firmware 2.4.3, RSRP -85 dBm (good)")
    poor = smame(["units", "--signal", "poor"], env).stdout.splitlines()
    assert [line.split()[0] for line in poor[1:]] == ["U2", "U3"]
    both = smame(["units", "--signal", "poor", "--firmware", "2.5.0", "--customer", "C1"], env).stdout.splitlines()
    assert [line.split()[0] for line in both[1:]] == ["U2"]
    wrong = smame(["units", "--signal", "bad"], env, check=False)
    assert wrong.returncode == 2 and "argument --signal: invalid choice: 'bad'" in wrong.stderr

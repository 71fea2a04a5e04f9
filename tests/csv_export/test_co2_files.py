"""CO2 in the exported files on a real store: each fiscal year's factor, the monthly summary, corrections."""

from __future__ import annotations

import csv
import io
import signal
import time
from collections.abc import Iterator
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from aggregator.backends import open_url
from aggregator.ingest import Ingestor
from csv_export.exporter import Exporter
from csv_export.files import path_of
from csv_export.jobs import summary_path
from kernel.emissions import fiscal_year
from kernel.reading import Incoming, Reading
from kernel.registry import Registry, load_registry
from kernel.timegrid import SLOT, Grid
from monitoring.daily import build_report
from monitoring.report import render_slack, render_text
from tests.helpers import (
    Mosquitto,
    at,
    publish,
    smame,
    smame_env,
    start_smame,
    stop,
    telegram,
    wait_log,
    wait_readings,
    wait_until,
    write_registry,
    yesterday,
)

GRID = Grid("Asia/Tokyo")
NOW = datetime.fromisoformat("2027-04-02T12:05:00+09:00").timestamp()
HEADER = "supplier,menu,fiscal_year,basic_t_per_kwh,adjusted_t_per_kwh,published\n"
FY2026 = "national,average,2026,0.000423,0.000423,2025-12-20\nA電力,B,2026,0.000450,0.000400,2025-12-20\n"
FY2027 = "national,average,2027,0.000410,0.000410,2026-12-18\n"
MARCH = [date(2027, 3, d) for d in (29, 30, 31)]
APRIL = [date(2027, 4, d) for d in (1, 2)]


class Files:
    """An exporter whose registry (and factors file) a test can change, as SIGHUP would."""

    def __init__(self, workdir: Path, store_url: str) -> None:
        self.workdir = workdir
        write_registry(workdir, {"U1": "C1", "U2": "C2"})
        (workdir / "customers.toml").write_text(
            '[customers.C1]\nsupplier = "A電力"\nmenu = "B"\nco2_columns = true\n[customers.C2]\n'
        )
        self.factors(FY2026 + FY2027)
        self.ingest = Ingestor(open_url(store_url), self.registry, GRID)
        self.root = workdir / "export"
        self.exporter = Exporter(open_url(store_url), lambda: self.registry, GRID, self.root, 45, 120)
        end = GRID.floor(NOW)
        readings = [
            Incoming(Reading(u, t, f"SM-{u}", 1000 + 9 * k, 0, 1, 1, 6, 1, t + 5), t + 7, f"smame/v1/{u}/reading", b"")
            for u in ("U1", "U2")
            for k, t in enumerate(range(end - 4 * 86400, end + 1, SLOT))
        ]
        self.ingest.commit(readings, [], int(NOW))

    def factors(self, rows: str) -> None:
        (self.workdir / "factors.csv").write_text(HEADER + rows)
        w = self.workdir
        self.registry: Registry = load_registry(w / "units.csv", w / "customers.toml", factors_path=w / "factors.csv")

    def rows(self, day: date) -> list[dict[str, str]]:
        return list(csv.DictReader(io.StringIO(path_of(self.root, "C1", day).read_text())))

    def summary(self, month: date) -> dict[str, dict[str, str]]:
        text = summary_path(self.root, "C1", month).read_text()
        return {r["unit_id"]: r for r in csv.DictReader(io.StringIO(text))}


@pytest.fixture
def files(workdir: Path, store_url: str) -> Iterator[Files]:
    f = Files(workdir, store_url)
    yield f
    f.ingest.store.close()
    f.exporter.close()


def test_each_fiscal_year_uses_its_own_factor_and_a_missing_one_stays_empty(files: Files) -> None:
    files.exporter.scheduled(NOW)
    last_of_march, first_of_april = files.rows(date(2027, 3, 31))[-1], files.rows(date(2027, 4, 1))[0]
    assert last_of_march["import_kwh"] == first_of_april["import_kwh"] == "0.9"
    assert (last_of_march["co2_location_kg"], last_of_march["co2_market_kg"]) == ("0.381", "0.360")  # FY2026
    assert (first_of_april["co2_location_kg"], first_of_april["co2_market_kg"]) == ("0.369", "")  # FY2027
    assert "co2_location_kg" not in path_of(files.root, "C2", date(2027, 4, 1)).read_text()  # C2 did not ask
    assert not summary_path(files.root, "C2", date(2027, 4, 1)).exists()

    march, april = files.summary(date(2027, 3, 1)), files.summary(date(2027, 4, 1))
    assert set(march) == {"U1", "(total)"}
    assert march["(total)"]["location_t_per_kwh"] == "0.000423" and march["(total)"]["market_published"] == "2025-12-20"
    assert april["(total)"]["co2_market_kg"] == "" and april["(total)"]["co2_location_kg"] != ""
    assert "no market-based factor for fiscal year 2027 (A電力/B)" in april["(total)"]["note"]
    # the half hours so far: 2 days less the 24 still to come on April 2; none missing or estimated
    assert (april["U1"]["slots"], april["U1"]["missing_slots"], april["U1"]["estimated_share"]) == ("72", "0", "0.0000")


def test_a_corrected_factor_rewrites_exactly_the_days_of_its_fiscal_year(files: Files) -> None:
    files.exporter.scheduled(NOW)
    assert files.exporter.scheduled(NOW).written == []  # nothing changed: nothing written
    files.factors(FY2026 + FY2027 + "A電力,B,2026,0.000450,0.000390,2026-02-01\n")  # a correction of FY2026
    written = files.exporter.scheduled(NOW).written
    assert sorted(written) == sorted(
        [path_of(files.root, "C1", d) for d in MARCH] + [summary_path(files.root, "C1", date(2027, 3, 1))]
    )
    assert files.rows(date(2027, 3, 31))[-1]["co2_market_kg"] == "0.351"  # 0.9 kWh x 0.390 kg
    assert files.summary(date(2027, 3, 1))["(total)"]["market_published"] == "2026-02-01"

    files.factors(
        FY2026 + FY2027 + "A電力,B,2026,0.000450,0.000390,2026-02-01\nA電力,B,2027,0.0004,0.00037,2026-12-18\n"
    )
    written = files.exporter.scheduled(NOW).written
    assert sorted(written) == sorted(
        [path_of(files.root, "C1", d) for d in APRIL] + [summary_path(files.root, "C1", date(2027, 4, 1))]
    )
    assert files.rows(date(2027, 4, 1))[0]["co2_market_kg"] == "0.333"
    assert files.summary(date(2027, 4, 1))["(total)"]["note"] == ""


def test_emissions_command_brings_the_summary_up_to_date_and_prints_it(workdir: Path) -> None:
    day = yesterday()  # by the real clock, which the command runs on
    fiscal = fiscal_year(day)
    write_registry(workdir, {"U1": "C1", "U2": "C2"})
    (workdir / "customers.toml").write_text(
        '[customers.C1]\nsupplier = "S"\nmenu = "M"\nco2_columns = true\nencoding = "cp932"\n[customers.C2]\n'
    )
    (workdir / "factors.csv").write_text(HEADER + f"national,average,{fiscal},0.000423,0.000423,2025-12-20\n")
    registry = load_registry(workdir / "units.csv", workdir / "customers.toml", factors_path=workdir / "factors.csv")
    url = f"sqlite:///{workdir / 'data' / 'smame.db'}"
    (workdir / "data").mkdir()
    start = GRID.day_start(day)
    with open_url(url) as store:
        Ingestor(store, registry, GRID).commit(
            [
                Incoming(Reading("U1", t, "SM-1", 100 + 3 * k, 0, 1, 1, 6, 1, t + 5), t + 7, "smame/v1/U1/reading", b"")
                for k, t in enumerate(range(start, start + 86400 + 1, SLOT))
            ],
            [],
            int(time.time()),
        )
    env = smame_env(workdir, 1883, SMAME_EMISSIONS__FACTORS=str(workdir / "factors.csv"))
    out = smame(["emissions", "--customer", "C1", "--month", f"{day:%Y-%m}"], env).stdout
    rows = {r["unit_id"]: r for r in csv.DictReader(io.StringIO(out))}
    assert set(rows) == {"U1", "(total)"}
    assert Decimal(rows["(total)"]["import_kwh"]) == Decimal("14.4")  # 48 half hours of 0.3 kWh
    assert "no market-based factor for fiscal year" in rows["(total)"]["note"]
    files = sorted((workdir / "data" / "export" / "C1").glob("C1_*.csv"))
    summed = sum(
        (
            Decimal(r["co2_location_kg"])
            for f in files
            if "_co2" not in f.name
            for r in csv.DictReader(io.StringIO(f.read_bytes().decode("cp932")))
            if r["co2_location_kg"] and r["date"].startswith(f"{day:%Y-%m}")
        ),
        Decimal(0),
    )
    assert Decimal(rows["(total)"]["co2_location_kg"]) == summed == 48 * Decimal("0.127")  # 126.9 g each
    for args, says in (
        (["--customer", "C2", "--month", f"{day:%Y-%m}"], "customer C2 has no emissions: set co2_columns = true"),
        (["--customer", "C9", "--month", f"{day:%Y-%m}"], "unknown customer C9"),
        (["--customer", "C1", "--month", "2026-1"], "'2026-1' is not a month YYYY-MM"),
        (["--customer", "C1", "--month", f"{day.year + 2}-01"], f"{day.year + 2}-01 has not begun"),
    ):
        bad = smame(["emissions", *args], env, check=False)
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr, (args, bad.stderr)


@pytest.mark.parametrize("day", [date(2027, 3, 31), date(2027, 4, 1)])
def test_the_daily_report_gives_each_customers_co2_as_its_file_adds_up(files: Files, day: date) -> None:
    files.exporter.scheduled(NOW)
    report = build_report(files.ingest.store, GRID, files.registry, day, int(NOW))
    rows = files.rows(day)

    def kg(column: str) -> str:
        return f"{sum((Decimal(r[column]) for r in rows if r[column]), Decimal(0)):.3f}"

    assert [c.customer for c in report.co2] == ["C1"]  # C2 did not ask for emissions
    market = f"{kg('co2_market_kg')} kg" if day.month == 3 else "no factor for fiscal year 2027"
    line = f"C1: location-based {kg('co2_location_kg')} kg, market-based {market} (43.2 kWh imported)"
    assert line in render_text(report) and line.split(": ", 1)[1] in render_slack(report)


def test_a_running_smame_rewrites_the_days_of_a_corrected_factor_on_sighup(broker: Mosquitto, workdir: Path) -> None:
    day = yesterday()
    fiscal = fiscal_year(day)
    write_registry(workdir, {"H1": "C1"})
    (workdir / "customers.toml").write_text('[customers.C1]\nsupplier = "S"\nmenu = "M"\nco2_columns = true\n')
    factors = workdir / "factors.csv"
    factors.write_text(
        HEADER + f"national,average,{fiscal},0.000423,0.000423,2025-12-20\nS,M,{fiscal},0,0.0004,2025-12-20\n"
    )
    env = smame_env(workdir, broker.port, SMAME_EMISSIONS__FACTORS=str(factors))
    log = workdir / "smame.log"
    proc = start_smame(env, log)
    wait_log(log, "subscribed to")
    text = day.isoformat()
    publish(broker.port, [("smame/v1/H1/reading", telegram("H1", [(at(text, "10:00"), 10), (at(text, "10:30"), 15)]))])
    wait_readings(workdir / "data" / "smame.db", 2)
    csv_file = path_of(workdir / "data" / "export", "C1", day)

    def slot_21() -> tuple[str, str]:
        rows = csv.DictReader(io.StringIO(csv_file.read_text())) if csv_file.exists() else []
        return next(((r["co2_location_kg"], r["co2_market_kg"]) for r in rows if r["slot"] == "21"), ("", ""))

    proc.send_signal(signal.SIGHUP)  # an export run now, not at the next half hour
    wait_until(lambda: slot_21() == ("0.212", "0.200"), 20, lambda: str(slot_21()))  # 0.5 kWh

    good = factors.read_text()
    factors.write_text(good + f"S,M,{fiscal},0.1,0.000448,{fiscal}-02-01\n")  # basic 0.1: kg, not t-CO2/kWh
    proc.send_signal(signal.SIGHUP)
    wait_log(log, "registry reload refused")  # the factors in force stay
    factors.write_text(good + f"S,M,{fiscal},0,0.000448,{fiscal}-02-01\n")  # the correction, published later
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: slot_21() == ("0.212", "0.224"), 20, lambda: str(slot_21()))
    assert stop(proc) == 0
    summary = summary_path(workdir / "data" / "export", "C1", day.replace(day=1)).read_text()
    assert f",0.000448,{fiscal}-02-01," in summary


def test_a_customer_that_turns_emissions_off_gets_files_without_them_and_no_stale_summary(files: Files) -> None:
    files.exporter.scheduled(NOW)
    march = summary_path(files.root, "C1", date(2027, 3, 1))
    assert march.exists() and "co2_market_kg" in files.rows(MARCH[0])[0]
    (files.workdir / "customers.toml").write_text('[customers.C1]\nsupplier = "A電力"\nmenu = "B"\n[customers.C2]\n')
    files.factors(FY2026 + FY2027)
    result = files.exporter.scheduled(NOW)
    assert sorted(result.written) == [path_of(files.root, "C1", d) for d in MARCH + APRIL]
    assert "co2_market_kg" not in files.rows(MARCH[0])[0]
    assert march in result.deleted and not march.exists() and not list(files.root.glob("C1/*_co2.csv*"))

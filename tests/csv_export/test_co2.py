"""CO2 emissions: the factors file, the columns in the files, and the monthly summary as the sum of the days."""

from __future__ import annotations

import csv
import io
import random
import re
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.store import SlotRow
from csv_export.co2 import TOTAL_ROW, month_summary, summary_bytes, totals_bytes
from csv_export.jobs import Layout, totals_path
from csv_export.render import render, render_with_totals, slots_frame
from kernel.emissions import DayFactors, Factor, FactorsError, fiscal_year, grams, kwh_e4, parse_factors
from kernel.registry import Customer, RegistryError, load_registry
from kernel.timegrid import Grid
from tests.csv_export.sample import DAY, LABELS, UNITS, slots

GOLDEN = Path(__file__).parent / "golden"
FACTORS = DayFactors(
    2026, Factor(Decimal("0.000423"), date(2025, 12, 20)), Factor(Decimal("0.000381"), date(2026, 1, 9))
)
HEADER = "supplier,menu,fiscal_year,basic_t_per_kwh,adjusted_t_per_kwh,published\n"


def test_factors_file_later_published_row_is_the_correction() -> None:
    factors = parse_factors(
        HEADER + "national,average,2026,0.000423,0.000423,2025-12-20\n"
        "東京電力エナジーパートナー,スタンダードS,2026,0.000450,0.000410,2025-12-20\n"
        "東京電力エナジーパートナー,スタンダードS,2026,0.000450,0.000381,2026-01-09\n"
        "\n",
        Path("f.csv"),
    )
    assert factors.location(2026) == Factor(Decimal("0.000423"), date(2025, 12, 20))
    assert factors.market("東京電力エナジーパートナー", "スタンダードS", 2026) == Factor(
        Decimal("0.000381"), date(2026, 1, 9)
    )
    assert factors.location(2027) is None and factors.market("東京電力エナジーパートナー", "x", 2026) is None


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("national,average,26,0.0004,0.0004,2025-12-20", "f.csv:2: fiscal_year '26' must be a year"),
        ("national,average,2026,0.434,0.434,2025-12-20", "f.csv:2: basic_t_per_kwh '0.434' is 10 kg-CO2/kWh or more"),
        ("national,average,2026,-0.0004,0.0004,2025-12-20", "f.csv:2: basic_t_per_kwh '-0.0004' must be a decimal"),
        ("national,average,2026,0.0004,NaN,2025-12-20", "f.csv:2: adjusted_t_per_kwh 'NaN' must be a decimal"),
        ("national,average,2026,0.0004,0.00040000001,2025-12-20", "f.csv:2: adjusted_t_per_kwh '0.00040000001' has"),
        ("national,average,2026,0.0004,0.0004,20/12/2025", "f.csv:2: published '20/12/2025' must be a date"),
        ("national,,2026,0.0004,0.0004,2025-12-20", "f.csv:2: menu must be 1 to 200 characters"),
        ("national,average,2026,0.0004", "f.csv:2: 4 fields, expected 6"),
    ],
)
def test_a_bad_factors_line_is_named_with_its_field(line: str, says: str) -> None:
    with pytest.raises(FactorsError) as err:
        parse_factors(HEADER + line + "\n", Path("f.csv"))
    assert says in str(err.value)


def test_every_bad_line_at_once_and_a_repeated_date_refused() -> None:
    text = HEADER + "x,y,1999,0,0,2025-01-01\nx,y,2026,0,0,2025-01-01\nx,y,2026,0.0001,0,2025-01-01\nx,y,2030,0,0,bad\n"
    with pytest.raises(FactorsError) as err:
        parse_factors(text, Path("f.csv"))
    message = str(err.value)
    assert message.startswith("3 bad lines in f.csv:")
    assert "f.csv:2: fiscal_year" in message
    assert "f.csv:4: x/y fiscal year 2026 published 2025-01-01 is also on line 3" in message
    assert "f.csv:5: published" in message
    with pytest.raises(FactorsError, match="f.csv:1: header must be supplier,menu"):
        parse_factors("supplier,menu\n", Path("f.csv"))


def test_a_correction_published_after_today_is_refused_and_the_factor_in_force_kept() -> None:
    text = (
        HEADER + "national,average,2026,0.000423,0.000423,2025-12-20\n"
        "national,average,2026,0.000504,0.000504,2099-01-01\n"  # a typo that replaced the factor in force
    )
    with pytest.raises(FactorsError) as err:
        parse_factors(text, Path("f.csv"), today=date(2026, 12, 6))
    assert "f.csv:3: published 2099-01-01 is after today (2026-12-06)" in str(err.value)
    on_the_day = parse_factors(text, Path("f.csv"), today=date(2099, 1, 1))  # published by then: the correction
    assert on_the_day.location(2026) == Factor(Decimal("0.000504"), date(2099, 1, 1))


def test_customers_choose_supplier_and_menu_and_the_old_setting_says_what_replaced_it(tmp_path: Path) -> None:
    (tmp_path / "units.csv").write_text("unit_id,customer_id\nU1,C1\n")
    factors = tmp_path / "factors.csv"
    factors.write_text(HEADER + "national,average,2026,0.000423,0.000423,2025-12-20\n")
    cases = {
        "emission_factor = 0.45\n": "emission_factor is replaced by supplier, menu and co2_columns",
        'supplier = "A"\n': "supplier and menu go together",
    }
    for body, says in cases.items():
        (tmp_path / "customers.toml").write_text("[customers.C1]\n" + body)
        with pytest.raises(RegistryError, match=says):
            load_registry(tmp_path / "units.csv", tmp_path / "customers.toml", factors_path=factors)
    (tmp_path / "customers.toml").write_text('[customers.C1]\nsupplier = "A"\nmenu = "B"\nco2_columns = true\n')
    registry = load_registry(tmp_path / "units.csv", tmp_path / "customers.toml", factors_path=factors)
    assert registry.day_factors("C1", date(2027, 3, 31)) == DayFactors(
        2026, Factor(Decimal("0.000423"), date(2025, 12, 20)), None
    )
    assert registry.day_factors("C1", date(2027, 4, 1)) == DayFactors(2027, None, None)
    assert registry.unknown_menus() == ["customer C1: supplier 'A' menu 'B' is not in the emission factors"]
    factors.write_text(HEADER + "national,average,2026,0.434,0.434,2025-12-20\n")
    with pytest.raises(RegistryError, match=r"factors.csv:2: basic_t_per_kwh '0.434'"):
        load_registry(tmp_path / "units.csv", tmp_path / "customers.toml", factors_path=factors)


def test_fiscal_year_runs_april_to_march_and_grams_round_half_up() -> None:
    assert fiscal_year(date(2027, 3, 31)) == 2026 and fiscal_year(date(2027, 4, 1)) == 2027
    assert kwh_e4(17, 0x01, 1) == 17_000 and kwh_e4(3, 0x0A, 2) == 600_000
    # 0.5 kWh x 0.000421 t/kWh = 210.5 g -> 211; 0.4 kWh -> 168.4 g -> 168
    assert grams(5_000, Decimal("0.000421")) == 211 and grams(4_000, Decimal("0.000421")) == 168


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("long_co2_utf-8", Layout(co2=FACTORS)),
        ("long_co2_cp932", Layout(encoding="cp932", newline="\r\n", co2=FACTORS)),
        ("wide_co2_utf-8", Layout(wide=True, co2=FACTORS)),
    ],
)
def test_golden_files_with_co2_columns(name: str, layout: Layout) -> None:
    assert render(DAY, LABELS, UNITS, slots_frame(slots()), layout) == (GOLDEN / f"{name}.csv").read_bytes()


def test_co2_columns_follow_the_import_and_its_quality_never_the_export() -> None:
    text = render(DAY, LABELS, UNITS, slots_frame(slots()), Layout(co2=FACTORS)).decode()
    rows = {(r["unit_id"], int(r["slot"])): r for r in csv.DictReader(io.StringIO(text))}
    solar = rows[("U000002", 25)]  # 2.5 kWh in, 4.0 kWh out: the export is never subtracted
    assert (solar["co2_location_kg"], solar["co2_market_kg"]) == ("1.058", "0.953")  # 1057.5 g, 952.5 g
    estimated = rows[("U000001", 10)]
    assert estimated["quality"] == "E" and estimated["co2_location_kg"] == "0.254"  # 0.6 kWh x 0.423 kg
    assert rows[("U000001", 5)]["co2_location_kg"] == rows[("U000003", 1)]["co2_market_kg"] == ""  # missing
    no_market = render(DAY, LABELS, UNITS, slots_frame(slots()), Layout(co2=DayFactors(2026, FACTORS.location, None)))
    assert {r["co2_market_kg"] for r in csv.DictReader(io.StringIO(no_market.decode()))} == {""}


GRID = Grid("Asia/Tokyo")
decimals = st.integers(0, 9_999_999).map(lambda n: Decimal(n).scaleb(-9))  # 0 to 0.009999999 t/kWh, 9 places
scales = st.sampled_from([(0x00, 1), (0x01, 1), (0x02, 10), (0x03, 3), (0x04, 1), (0x0A, 1)])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    month=st.sampled_from([date(2026, 2, 1), date(2026, 11, 1), date(2027, 3, 1)]),
    location=st.none() | decimals,
    market=st.none() | decimals,
    seed=st.integers(0, 2**32),  # the month's slots: drawn from it, as hypothesis would draw 3,000 rows slowly
    scale=scales,
)
def test_a_months_summary_is_the_exact_sum_of_its_daily_files(
    tmp_path_factory: pytest.TempPathFactory,
    month: date,
    location: Decimal | None,
    market: Decimal | None,
    seed: int,
    scale: tuple[int, int],
) -> None:
    rng = random.Random(seed)
    root = tmp_path_factory.mktemp("co2")
    published = date(2025, 12, 1)
    factors = DayFactors(
        fiscal_year(month),
        None if location is None else Factor(location, published),
        None if market is None else Factor(market, published),
    )
    units = [("U1", "SM-1"), ("U2", "SM-2")]
    files: list[str] = []
    day = month
    while day.month == month.month:
        ends = GRID.day_slots(day)
        rows = [
            SlotRow(end, unit, rng.randrange(0, 10**6), rng.choice("AAE"), 0, 0, "A", 0, meter, *scale)
            for end in ends
            for unit, meter in units
            if rng.random() > 0.1  # a tenth missing
        ]
        data, totals = render_with_totals(
            day, [(e, GRID.label(e)) for e in ends], units, slots_frame(rows), Layout(co2=factors)
        )
        assert totals is not None
        files.append(data.decode())
        path = totals_path(root, "C1", day)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(totals_bytes(totals, factors))
        day += timedelta(days=1)
    summary = month_summary(root, Customer(id="C1"), month)
    assert summary is not None
    table = {r["unit_id"]: r for r in csv.DictReader(io.StringIO(summary_bytes(summary, Layout()).decode()))}

    def column(unit: str | None, name: str) -> Decimal:
        return sum(
            (
                Decimal(r[name])
                for text in files
                for r in csv.DictReader(io.StringIO(text))
                if r[name] and unit in (None, r["unit_id"])
            ),
            Decimal(0),
        )

    for unit in ("U1", "U2", None):
        row = table[unit or TOTAL_ROW]
        assert Decimal(row["import_kwh"]) == column(unit, "import_kwh")
        for kind, factor in (("location", location), ("market", market)):
            got = row[f"co2_{kind}_kg"]
            assert got == "" if factor is None else Decimal(got) == column(unit, f"co2_{kind}_kg")
    total = table[TOTAL_ROW]
    assert int(total["slots"]) == 48 * 2 * len(files)
    if location is None:
        assert "no location-based factor for fiscal year" in total["note"]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.lists(st.text(max_size=30), min_size=0, max_size=8))
def test_any_factors_file_loads_or_is_refused_with_a_reason(noise: str, cells: list[str]) -> None:
    for text in (noise, HEADER + noise, HEADER + ",".join(cells) + "\n", HEADER + '"' + noise):
        try:
            parse_factors(text, Path("f.csv"))
        except FactorsError as exc:
            assert re.match(r"f\.csv:1: header must be |\d+ bad lines? in f\.csv:\nf\.csv:\d+: ", str(exc)), str(exc)

"""CO2 emission factors and the arithmetic of emissions (pure but for reading the factors file).

`emission_factors.csv` gives, per supplier, tariff menu and fiscal year (April to March), a basic and an
adjusted factor in t-CO2/kWh and the date they were published; a later date for the same key is a correction
and replaces the earlier row. The supplier `national` with menu `average` is the grid's factor: the
location-based figure uses its basic factor, the market-based figure the customer's supplier and menu's
adjusted factor (GHG Protocol Scope 2). Emissions are counted in whole grams from the register's integers,
each slot rounded half up once: kg with three decimals, and any sum of slots is exact.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

from kernel.errors import bad_lines
from kernel.meter import E1_UNITS

FACTOR_COLUMNS = ("supplier", "menu", "fiscal_year", "basic_t_per_kwh", "adjusted_t_per_kwh", "published")
LOCATION = ("national", "average")  # the (supplier, menu) row of the grid's average factor
PLACES = 9  # decimals a factor may have: t-CO2/kWh to the milligram
CEILING = Decimal("0.01")  # no grid is near 10 kg-CO2/kWh: a larger value was written in kg, not t
_E4 = 10_000  # kWh x 10^4 is a whole number for every register unit (the finest is 0.0001 kWh)


class FactorsError(ValueError):
    """The factors file is wrong; the message names the file, line and field."""


@dataclass(frozen=True, slots=True)
class Factor:
    """One factor as it applies: its value in t-CO2/kWh and the date it was published."""

    t_per_kwh: Decimal
    published: date

    def text(self) -> str:
        """The value as the file wrote it (no exponent)."""
        return f"{self.t_per_kwh:f}"


@dataclass(frozen=True, slots=True)
class Published:
    """One row of the file: both factors of a supplier's menu in a fiscal year."""

    basic: Decimal
    adjusted: Decimal
    published: date


@dataclass(frozen=True)
class Factors:
    """The factors in force, by (supplier, menu, fiscal year); only the latest published row of each."""

    table: dict[tuple[str, str, int], Published]

    def location(self, fiscal: int) -> Factor | None:
        """The grid's average factor of a fiscal year (location-based), if published."""
        row = self.table.get((*LOCATION, fiscal))
        return None if row is None else Factor(row.basic, row.published)

    def market(self, supplier: str, menu: str, fiscal: int) -> Factor | None:
        """A supplier's menu's adjusted factor of a fiscal year (market-based), if published."""
        row = self.table.get((supplier, menu, fiscal)) if supplier and menu else None
        return None if row is None else Factor(row.adjusted, row.published)

    def knows(self, supplier: str, menu: str) -> bool:
        """Whether any fiscal year has a row for this supplier and menu."""
        return any(s == supplier and m == menu for s, m, _ in self.table)


NO_FACTORS = Factors({})


@dataclass(frozen=True, slots=True)
class DayFactors:
    """The factors a customer's slots of one day are multiplied by; None where none is published."""

    fiscal_year: int
    location: Factor | None
    market: Factor | None


def fiscal_year(day: date) -> int:
    """The Japanese fiscal year a day belongs to: April 1 to March 31, named by the year it begins in."""
    return day.year if day.month >= 4 else day.year - 1


def kwh_e4(raw: int, e1: int, coef: int) -> int:
    """A register value in units of 0.0001 kWh, exactly."""
    value = raw * coef * E1_UNITS[e1] * _E4
    assert value.denominator == 1, "every register unit is a whole number of 0.0001 kWh"
    return int(value)


def grams(e4: int, factor: Decimal) -> int:
    """CO2 of `e4` x 0.0001 kWh at `factor` t-CO2/kWh, in grams rounded half up: kWh x t/kWh x 10^6."""
    exact = Fraction(e4) * Fraction(factor) * 100
    return int((exact * 2 + 1) // 2)


def format_grams(g: int | None) -> str:
    """Grams as kg with three decimals ("" for None)."""
    return "" if g is None else f"{g // 1000}.{g % 1000:03d}"


def format_e4(e4: int) -> str:
    """0.0001 kWh units as kWh, exactly, without trailing zeros."""
    text = f"{e4 // _E4}.{e4 % _E4:04d}".rstrip("0")
    return text.rstrip(".")


def load_factors(path: Path, today: date | None = None) -> Factors:
    """Read and check `emission_factors.csv`; raise FactorsError naming every bad line (file, line, field). With
    `today`, a row published after it is a bad line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FactorsError(f"{path}: factors file not found (setting emissions.factors)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FactorsError(f"{path}: cannot be read: {exc}") from None
    return parse_factors(text, path, today)


def parse_factors(text: str, path: Path, today: date | None = None) -> Factors:
    """The factors of a file's text (as found at `path`); raise FactorsError naming every bad line. With `today`,
    a row published after it is one: as the latest row of its key it would replace the factor in force now,
    and rewrite files of days before it was published (a date in 2099 is a typo, not a plan)."""
    reader = csv.reader(text.splitlines())
    header = next(reader, [])
    if tuple(h.strip() for h in header) != FACTOR_COLUMNS:
        raise FactorsError(f"{path}:1: header must be {','.join(FACTOR_COLUMNS)}, got {','.join(header)[:200]}")
    table: dict[tuple[str, str, int], Published] = {}
    seen: dict[tuple[str, str, int, date], int] = {}
    errors: list[str] = []
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue  # a blank line, as editors leave at the end
        try:
            key, value = _row(row)
        except ValueError as exc:
            errors.append(f"{path}:{line}: {exc}")
            continue
        if today is not None and value.published > today:
            errors.append(
                f"{path}:{line}: published {value.published} is after today ({today}): "
                "add a correction on the day it is published"
            )
            continue
        again = seen.setdefault((*key, value.published), line)
        if again != line:
            errors.append(
                f"{path}:{line}: {key[0]}/{key[1]} fiscal year {key[2]} published {value.published} is also on "
                f"line {again}: a correction needs a later published date"
            )
            continue
        if key not in table or value.published > table[key].published:
            table[key] = value
    if errors:
        raise FactorsError(bad_lines(path, errors))
    return Factors(table)


def _row(row: list[str]) -> tuple[tuple[str, str, int], Published]:
    if len(row) != len(FACTOR_COLUMNS):
        raise ValueError(f"{len(row)} fields, expected {len(FACTOR_COLUMNS)}")
    supplier, menu, year, basic, adjusted, published = (cell.strip() for cell in row)
    for name, text in (("supplier", supplier), ("menu", menu)):
        if not text or len(text) > 200:
            raise ValueError(f"{name} must be 1 to 200 characters")
    if not (year.isascii() and year.isdigit() and 2000 <= int(year) <= 2100):
        raise ValueError(f"fiscal_year {year[:20]!r} must be a year from 2000 to 2100")
    try:
        day = date.fromisoformat(published) if len(published) == 10 else None
    except ValueError:
        day = None
    if day is None:
        raise ValueError(f"published {published[:20]!r} must be a date YYYY-MM-DD")
    return (supplier, menu, int(year)), Published(
        _factor("basic_t_per_kwh", basic), _factor("adjusted_t_per_kwh", adjusted), day
    )


def _factor(name: str, text: str) -> Decimal:
    try:
        value = Decimal(text) if text.isascii() and len(text) <= 30 else None
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite() or value < 0:
        raise ValueError(f"{name} {text[:30]!r} must be a decimal number of t-CO2/kWh, 0 or more")
    if value >= CEILING:
        raise ValueError(f"{name} {text[:30]!r} is 10 kg-CO2/kWh or more: give the factor in t-CO2/kWh, not kg")
    if -int(value.as_tuple().exponent) > PLACES:  # finite: the exponent is a number
        raise ValueError(f"{name} {text[:30]!r} has more than {PLACES} decimals")
    return value

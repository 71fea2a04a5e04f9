"""What an export is made of, as plain data: a customer's file options, the jobs the exporter hands its
worker processes, and where their files go.

Nothing here needs polars, which the modules that render files load (`render`, `days`, `co2`): what plans an
export, or only names its files, need not load it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from kernel.emissions import DayFactors
from kernel.timegrid import SlotLabel

# Units a job holds at most (several customers' files, or one customer's): its rows of a day, 48 a unit, are
# about 50 MB in a worker at 10,000 units, and SQLite reads them with a unit filter at about 0.6 s.
SHARE_UNITS = 10_000
TOTALS_DIR = ".smame-co2"  # each customer's days of CO2 totals, out of the customers' sight
SUMMARY_NAME = re.compile(r"^(?P<customer>[A-Za-z0-9_-]{1,64})_(?P<month>\d{6})_co2\.csv(?:\.sha256)?$")


@dataclass(frozen=True, slots=True)
class Layout:
    """A customer's file options."""

    wide: bool = False
    encoding: str = "utf-8"  # or "cp932"
    newline: str = "\n"
    include_export: bool = True
    co2: DayFactors | None = None  # the day's emission factors; None: no CO2 columns


@dataclass(frozen=True, slots=True)
class CustomerFiles:
    """One customer's file of a day: its options and units in file order (unit, registry meter)."""

    customer: str
    layout: Layout
    units: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class DayJob:
    """A day to write for some customers, up to its last closed slot."""

    store: str  # the storage URL
    day: date
    labels: tuple[tuple[int, SlotLabel], ...]
    customers: tuple[CustomerFiles, ...]
    root: str
    files: bool = True  # False: a day past the files' retention whose month's CO2 summary is still kept


def month_of(day: date) -> date:
    """The first day of a day's month."""
    return day.replace(day=1)


def totals_path(root: Path, customer: str, day: date) -> Path:
    """Where a customer's day of totals is kept."""
    return root / TOTALS_DIR / customer / f"{day:%Y%m%d}.csv"


def summary_path(root: Path, customer: str, month: date) -> Path:
    """`{root}/{customer}/{customer}_{YYYYMM}_co2.csv`."""
    return root / customer / f"{customer}_{month:%Y%m}_co2.csv"


def days_of(month: date) -> list[date]:
    """Every day of the month that `month` (its first day) begins."""
    days = [month]
    while (after := days[-1] + timedelta(days=1)).month == month.month:
        days.append(after)
    return days

"""A customer's monthly CO2 summary, `{customer}_{YYYYMM}_co2.csv`, added up from its days.

Each time a customer's day is rendered with emissions, the worker keeps the day's totals per unit (energy in
0.0001 kWh, CO2 in whole grams, slots, estimated and missing) in `.smame-co2/` under the export directory, out
of the customers' sight. A month's summary is the exact sum of its days' totals, so it equals the sum of the
daily files' columns to the last digit; the factors it names are those the days were rendered with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import polars as pl

from csv_export.jobs import Layout, days_of, totals_path
from csv_export.render import TOTALS_SCHEMA, sum_or_null
from kernel.emissions import DayFactors, Factor, format_e4, format_grams
from kernel.registry import Customer

SUMMARY_HEADER = (
    "unit_id",
    "month",
    "import_kwh",
    "co2_location_kg",
    "co2_market_kg",
    "slots",
    "estimated_slots",
    "missing_slots",
    "estimated_share",
    "missing_share",
    "location_t_per_kwh",
    "location_published",
    "market_t_per_kwh",
    "market_published",
    "note",
)
TOTAL_ROW = "(total)"  # not a unit id: the registry allows letters, digits, _ and - only
# What a day's totals file holds beyond the totals: the factors they were worked out with.
_FACTOR_SCHEMA = {
    "fiscal_year": pl.Int64,
    "location_t_per_kwh": pl.String,
    "location_published": pl.String,
    "market_t_per_kwh": pl.String,
    "market_published": pl.String,
}


def totals_bytes(totals: pl.DataFrame, factors: DayFactors) -> bytes:
    """A day's totals with the factors they were worked out with, as the file keeps them."""

    def text(f: Factor | None) -> tuple[str, str]:
        return ("", "") if f is None else (f.text(), f.published.isoformat())

    (loc, loc_at), (mkt, mkt_at) = text(factors.location), text(factors.market)
    frame = totals.with_columns(
        fiscal_year=pl.lit(factors.fiscal_year, pl.Int64),
        location_t_per_kwh=pl.lit(loc),
        location_published=pl.lit(loc_at),
        market_t_per_kwh=pl.lit(mkt),
        market_published=pl.lit(mkt_at),
    )
    return frame.write_csv().encode()


def read_totals(path: Path) -> pl.DataFrame | None:
    """A day's totals file as written by `totals_bytes`; None when it is not there."""
    if not path.is_file():  # most days of a month have none yet: polars takes a millisecond to say so
        return None
    try:
        return pl.read_csv(path, schema=TOTALS_SCHEMA | _FACTOR_SCHEMA)
    except FileNotFoundError:  # deleted since (retention)
        return None


@dataclass
class MonthSummary:
    """A customer's month of emissions: per unit and in total, with the factors and what is missing."""

    customer: str
    month: date
    days: int  # days with totals (the month so far, from the customer's first day)
    units: pl.DataFrame  # TOTALS_SCHEMA, one row per unit in id order
    location: tuple[str, str] | None  # (t-CO2/kWh, published) when every day had the same; else None
    market: tuple[str, str] | None
    notes: list[str] = field(default_factory=list)

    def total(self) -> dict[str, int | None]:
        """The month's sums over every unit (CO2 None when no factor was in force)."""
        out: dict[str, int | None] = {}
        for column in TOTALS_SCHEMA:
            if column == "unit":
                continue
            series = self.units[column]
            out[column] = None if series.null_count() == len(series) else int(series.sum())
        return out


def month_summary(root: Path, customer: Customer, month: date) -> MonthSummary | None:
    """The summary of a customer's month from its days' totals under `root`; None when no day has any."""
    frames = [f for day in days_of(month) if (f := read_totals(totals_path(root, customer.id, day))) is not None]
    if not frames:
        return None
    days = pl.concat(frames)
    units = (
        days.group_by("unit")
        .agg(
            pl.col("kwh_e4").sum(),
            sum_or_null("location_g"),
            sum_or_null("market_g"),
            *[pl.col(c).sum() for c in ("slots", "estimated", "missing")],
        )
        .sort("unit")
        .select(TOTALS_SCHEMA.keys())
        .cast(TOTALS_SCHEMA)  # type: ignore[arg-type]
    )
    notes = []
    fiscal = int(days["fiscal_year"][0])  # a month lies in one fiscal year (April to March)
    factors: list[tuple[str, str] | None] = []
    supplier_menu = f"{customer.supplier}/{customer.menu}" if customer.supplier else "no supplier and menu set"
    for kind, what in (("location", "national/average"), ("market", supplier_menu)):
        used = days.select(f"{kind}_t_per_kwh", f"{kind}_published").unique().fill_null("")
        rows = sorted(tuple(r) for r in used.iter_rows())
        if len(rows) > 1:
            notes.append(f"{kind}-based factor changed within the month: " + "; ".join(f"{v} ({p})" for v, p in rows))
            factors.append(None)
        elif rows[0] == ("", ""):
            notes.append(f"no {kind}-based factor for fiscal year {fiscal} ({what}): {kind}-based CO2 left empty")
            factors.append(None)
        else:
            factors.append((rows[0][0], rows[0][1]))
    return MonthSummary(customer.id, month, len(frames), units, factors[0], factors[1], notes)


def summary_rows(summary: MonthSummary) -> list[dict[str, str | int | None]]:
    """A row per unit, then the total (`unit_id` TOTAL_ROW): energy and CO2 as exact decimal strings (CO2 None
    where no factor was in force), slot counts and the estimated and missing shares."""
    rows: list[dict[str, str | int | None]] = []
    for unit, t in [*((r["unit"], r) for r in summary.units.iter_rows(named=True)), (TOTAL_ROW, summary.total())]:
        slots, est, miss = (int(t[k] or 0) for k in ("slots", "estimated", "missing"))
        rows.append(
            {
                "unit_id": unit,
                "import_kwh": format_e4(int(t["kwh_e4"] or 0)),
                "co2_location_kg": None if t["location_g"] is None else format_grams(t["location_g"]),
                "co2_market_kg": None if t["market_g"] is None else format_grams(t["market_g"]),
                "slots": slots,
                "estimated_slots": est,
                "missing_slots": miss,
                "estimated_share": _share(est, slots),
                "missing_share": _share(miss, slots),
            }
        )
    return rows


def summary_bytes(summary: MonthSummary, layout: Layout) -> bytes:
    """The summary as a CSV file in the customer's encoding and line ends: a row per unit, then the total."""
    month = f"{summary.month:%Y-%m}"
    loc, mkt = summary.location or ("", ""), summary.market or ("", "")
    note = _quoted("; ".join(summary.notes))
    lines = [",".join(SUMMARY_HEADER)]
    for row in summary_rows(summary):
        values = ["" if v is None else str(v) for v in row.values()]
        lines.append(",".join([values[0], month, *values[1:], *loc, *mkt, note]))
    return (layout.newline.join(lines) + layout.newline).encode(layout.encoding, errors="replace")


def _share(part: int, whole: int) -> str:
    """part / whole with four decimals, rounded half up."""
    if not whole:
        return ""
    tenths = (part * 20000 + whole) // (2 * whole)
    return f"{tenths // 10000}.{tenths % 10000:04d}"


def _quoted(text: str) -> str:
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\r\n') else text

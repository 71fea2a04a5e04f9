"""Slots of one customer and local day -> the bytes of its CSV file (pure: no clock, no I/O).

Long layout: one row per unit and slot. Wide layout: one row per unit and direction, a column per
slot labelled by its end, and a quality string with one letter per slot. A customer with emissions gets
the imported energy's CO2, location- and market-based, as two more columns (long) or directions (wide),
and the day's totals per unit for its monthly summary. Re-rendering the same
slots gives the same bytes. The work is done in polars over a day's slots as columns: turning
480,000 rows into Python objects, not writing them, was most of an export's time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date

import polars as pl

from aggregator.store import SlotRow
from csv_export.jobs import Layout
from kernel.emissions import DayFactors, format_grams, grams, kwh_e4
from kernel.meter import format_kwh
from kernel.timegrid import SlotLabel

LONG_HEADER = ("unit_id", "meter_id", "date", "slot", "start", "end", "import_kwh", "export_kwh", "quality")
CO2_COLUMNS = ("co2_location_kg", "co2_market_kg")
# A customer's day of emissions per unit: what its monthly summary adds up (energy in 0.0001 kWh, CO2 in g).
TOTALS_SCHEMA = {
    "unit": pl.String,
    "kwh_e4": pl.Int64,
    "location_g": pl.Int64,
    "market_g": pl.Int64,
    "slots": pl.Int64,
    "estimated": pl.Int64,
    "missing": pl.Int64,
}
# The columns of the store's slot rows (`SlotRow`) that a file shows: a day's slots as the renderer reads them.
SLOT_SCHEMA = {
    "slot": pl.Int64,
    "unit": pl.String,
    "imp": pl.Int64,
    "imp_q": pl.String,
    "exp": pl.Int64,
    "exp_q": pl.String,
    "meter": pl.String,
    "e1": pl.Int64,
    "coef": pl.Int64,
}
_RANK = {"M": 0, "E": 1, "A": 2}


def slots_frame(rows: Iterable[SlotRow]) -> pl.DataFrame:
    """A day's slots in `SLOT_SCHEMA`, from the store's rows."""
    return pl.DataFrame([[getattr(r, c) for c in SLOT_SCHEMA] for r in rows], schema=SLOT_SCHEMA, orient="row")


def render(
    day: date,
    labels: Sequence[tuple[int, SlotLabel]],
    units: Sequence[tuple[str, str]],
    slots: pl.DataFrame,
    layout: Layout,
) -> bytes:
    """The file of one customer and day.

    `labels`: the (end, label) of each slot to include, in order (a day, or today so far);
    `units`: the customer's (unit_id, registry meter_id), in file order; `slots`: stored slots in
    `SLOT_SCHEMA` (other units and slots are ignored; absent slots are missing).
    """
    return render_with_totals(day, labels, units, slots, layout)[0]


def render_with_totals(
    day: date,
    labels: Sequence[tuple[int, SlotLabel]],
    units: Sequence[tuple[str, str]],
    slots: pl.DataFrame,
    layout: Layout,
) -> tuple[bytes, pl.DataFrame | None]:
    """The file as `render` makes it, and with emissions the day's totals per unit in `TOTALS_SCHEMA`."""
    grid = _grid(labels, units, slots, layout.co2)
    header, lines = _wide(day, labels, grid, layout) if layout.wide else _long(day, grid, layout)
    # joined inside polars: half a million Python strings would cost more than the rendering
    body = lines.str.join(layout.newline).item() if len(lines) else ""
    text = header + layout.newline + (body + layout.newline if body else "")
    return text.encode(layout.encoding, errors="replace"), None if layout.co2 is None else _totals(grid)


def _grid(
    labels: Sequence[tuple[int, SlotLabel]],
    units: Sequence[tuple[str, str]],
    slots: pl.DataFrame,
    co2: DayFactors | None = None,
) -> pl.DataFrame:
    """Every (unit, slot) of the file in order, with its stored values where there are some (and its import's
    energy in 0.0001 kWh and CO2 in grams, with emissions)."""
    slot_order = pl.DataFrame(
        {
            "slot": [e for e, _ in labels],
            "index": [lab.index for _, lab in labels],
            "start": [lab.start for _, lab in labels],
            "end": [lab.end for _, lab in labels],
        },
        schema={"slot": pl.Int64, "index": pl.Int64, "start": pl.String, "end": pl.String},
    )
    unit_order = pl.DataFrame(
        {"unit": [u for u, _ in units], "registry_meter": [m for _, m in units], "order": range(len(units))},
        schema={"unit": pl.String, "registry_meter": pl.String, "order": pl.Int64},
    )
    cells = unit_order.join(slot_order, how="cross")
    grid = cells.join(slots.select(SLOT_SCHEMA.keys()), on=["unit", "slot"], how="left", maintain_order="left")
    grid = grid.with_columns(imp_kwh=_kwh(grid, "imp"), exp_kwh=_kwh(grid, "exp"))
    if co2 is None:
        return grid
    return grid.join(_co2(grid, co2), on=["e1", "coef", "imp"], how="left", maintain_order="left").with_columns(
        pl.col("co2_location_kg", "co2_market_kg").fill_null("")
    )


def _co2(grid: pl.DataFrame, co2: DayFactors) -> pl.DataFrame:
    """For each distinct imported (e1, coef, raw) of the day, worked out once: the energy in 0.0001 kWh
    (`imp_e4`), the CO2 in grams at each factor (null without one) and as kg with three decimals."""
    present = grid.select("e1", "coef", "imp").drop_nulls().unique()
    e4 = [kwh_e4(r, e, c) for e, c, r in present.iter_rows()]
    columns: dict[str, pl.Series] = {"imp_e4": pl.Series(e4, dtype=pl.Int64)}
    for (name, g), factor in zip(_CO2, (co2.location, co2.market), strict=True):
        values = [None if factor is None else grams(e, factor.t_per_kwh) for e in e4]
        columns[g] = pl.Series(values, dtype=pl.Int64)
        columns[name] = pl.Series([format_grams(v) for v in values], dtype=pl.String)
    return present.with_columns(**columns)


_CO2 = (("co2_location_kg", "location_g"), ("co2_market_kg", "market_g"))


def sum_or_null(column: str) -> pl.Expr:
    """A group's sum of a column, null when no row has a value: CO2 without a factor stays missing, not 0."""
    return pl.when(pl.col(column).is_not_null().any()).then(pl.col(column).sum()).otherwise(None).alias(column)


def _totals(grid: pl.DataFrame) -> pl.DataFrame:
    """A day's emissions per unit, in file order: energy and CO2 summed over the slots that have them, and how
    many slots there were, estimated and missing (by the import register's quality)."""
    present = pl.col("imp_e4").is_not_null()
    return (
        grid.group_by("order", maintain_order=True)
        .agg(
            pl.col("unit").first(),
            pl.col("imp_e4").sum().alias("kwh_e4"),
            sum_or_null("location_g"),
            sum_or_null("market_g"),
            pl.len().cast(pl.Int64).alias("slots"),
            (present & (pl.col("imp_q") == "E")).sum().cast(pl.Int64).alias("estimated"),
            (~present).sum().cast(pl.Int64).alias("missing"),
        )
        .select(TOTALS_SCHEMA.keys())
        .cast(TOTALS_SCHEMA)  # type: ignore[arg-type]
    )


def _kwh(grid: pl.DataFrame, register: str) -> pl.Series:
    # Few distinct (scale, value) pairs in a day: each is formatted once, by the one format_kwh.
    present = grid.select("e1", "coef", pl.col(register).alias("raw")).drop_nulls().unique()
    texts = present.with_columns(
        text=pl.Series([format_kwh(r, e, c) for e, c, r in present.iter_rows()], dtype=pl.String)
    )
    return (
        grid.select("e1", "coef", pl.col(register).alias("raw"))
        .join(texts, on=["e1", "coef", "raw"], how="left", maintain_order="left")["text"]
        .fill_null("")
    )


def _cell(column: str) -> pl.Expr:
    """A free-text CSV field, quoted only when it must be (RFC 4180); one that a spreadsheet would take for a
    formula (starting = + - @, a tab or CR: the registry's meter ids and unit ids are an operator's text, never
    checked for it) is shown as text, with a leading apostrophe."""
    c = pl.col(column)
    c = pl.when(c.str.contains(r"^[=+\-@\t\r]")).then(pl.lit("'") + c).otherwise(c)
    return (
        pl.when(c.str.contains(r'[,"\r\n]'))
        .then(pl.lit('"') + c.str.replace_all('"', '""', literal=True) + pl.lit('"'))
        .otherwise(c)
    )


def _unit() -> pl.Expr:
    """The unit id as a cell: the registry's ids need no quoting (UNIT_ID) but may begin with "-", a formula."""
    c = pl.col("unit")
    return pl.when(c.str.starts_with("-")).then(pl.lit("'") + c).otherwise(c)


def _long(day: date, grid: pl.DataFrame, layout: Layout) -> tuple[str, pl.Series]:
    export = layout.include_export
    columns = LONG_HEADER if export else tuple(c for c in LONG_HEADER if c != "export_kwh")
    co2 = CO2_COLUMNS if layout.co2 is not None else ()
    header = ",".join(columns[:-1] + co2 + columns[-1:])
    # The serial in force at each slot: the newest one named so far, before the first the day's first, else
    # the registry's (a replaced meter changes it mid-day).
    serial = (
        pl.col("meter").forward_fill().backward_fill().over("order").fill_null(pl.col("registry_meter")).alias("serial")
    )
    imp_q = pl.col("imp_q").fill_null("M")
    worse = pl.col("exp_q").is_not_null() & (
        pl.col("exp_q").replace_strict(_RANK, default=2) < imp_q.replace_strict(_RANK, default=2)
    )
    q = pl.when(worse).then(pl.col("exp_q")).otherwise(imp_q) if export else imp_q
    parts = (
        [
            _unit(),
            _cell("serial"),
            pl.lit(day.isoformat()),
            pl.col("index").cast(pl.String),
            pl.col("start"),
            pl.col("end"),
            pl.col("imp_kwh"),
        ]
        + ([pl.col("exp_kwh")] if export else [])
        + [pl.col(c) for c in co2]
        + [q]
    )
    return header, grid.with_columns(serial).select(pl.concat_str(parts, separator=",").alias("line"))["line"]


def _wide(
    day: date, labels: Sequence[tuple[int, SlotLabel]], grid: pl.DataFrame, layout: Layout
) -> tuple[str, pl.Series]:
    header = ",".join(["unit_id", "meter_id", "date", "direction", *(lab.end for _, lab in labels), "quality"])
    directions = [("import", "imp_kwh", "imp_q")] + ([("export", "exp_kwh", "exp_q")] if layout.include_export else [])
    if layout.co2 is not None:  # the import's CO2, with the import's quality
        directions += [(name, name, "imp_q") for name in CO2_COLUMNS]
    per_unit = grid.group_by("order", maintain_order=True).agg(
        pl.col("unit").first(),
        # the serial at the end of the day
        pl.col("meter").drop_nulls().last().fill_null(pl.col("registry_meter").first()).alias("serial"),
        *[pl.col(v).str.join(",").alias(v) for _, v, _ in directions],
        *[pl.col(q).fill_null("M").str.join("").alias(q) for q in dict.fromkeys(q for _, _, q in directions)],
    )
    rows = [
        per_unit.select(
            pl.concat_str(
                [_unit(), _cell("serial"), pl.lit(day.isoformat()), pl.lit(name), pl.col(v), pl.col(q)],
                separator=",",
            ).alias("line"),
            "order",
        ).with_columns(direction=pl.lit(k))
        for k, (name, v, q) in enumerate(directions)
    ]
    return header, pl.concat(rows).sort(["order", "direction"])["line"]

"""A unit's day of health (health.md), from what its telegrams said that day (pure: rows in, records out).

Everything here is derived from the readings smame keeps (each with its telegram's `seq`, `sent`, receipt and,
on the telegram's newest reading, the unit's `diag`) and from the unit's connection events. One record a unit
a day: a few numbers that the risk pass compares with the unit's own past and with the fleet.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

import polars as pl

from kernel.reading import read_diag

SEQ_WRAP = 2**32  # `seq` counts modulo this
WRAP_NEAR = 2**20  # a fall from this close to the top to this close to 0 is a wrap; any other fall a restart
LATE_S = 3600  # a reading received this long after its time came in a backlog, not live

# The day's rows of the readings (`Store.health_rows`): one a reading.
ROW_SCHEMA = {
    "unit": pl.String,
    "at": pl.Int64,
    "seq": pl.Int64,
    "sent": pl.Int64,
    "received": pl.Int64,
    "no_data": pl.Boolean,
    "diag": pl.Binary,
}
# What the record holds, in the order the store keeps it (after `day` and `unit`).
RECORD = {
    "readings": pl.Int64,  # readings of the day's half hours received (48 expected on most days)
    "late": pl.Int64,  # of them, received more than LATE_S after their time (sent in a backlog)
    "delay_p50": pl.Int64,  # median seconds from a telegram's newest reading to its receipt
    "delay_max": pl.Int64,
    "seq_gaps": pl.Int64,  # telegrams the unit numbered and smame never received
    "restarts": pl.Int64,  # times `seq` started again lower
    "clock_offset": pl.Int64,  # median seconds of the unit's clock ahead of receipt (`sent` - receipt)
    "no_data": pl.Int64,  # readings whose import register had no value
    "rsrp": pl.Float64,  # median dBm
    "rsrp_min": pl.Int64,
    "rsrq": pl.Float64,  # median dB
    "sinr": pl.Float64,  # median dB
    "ce": pl.Int64,  # highest coverage enhancement level
    "reboots": pl.Int64,  # rise of the unit's boot counter over the day
    "vsup_min": pl.Int64,  # lowest supply voltage, mV
    "attaches": pl.Int64,  # network attach attempts
    "fw": pl.String,  # the firmware it last said
    "cell": pl.String,  # the cell it last said
    "diag_dropped": pl.Int64,  # diag fields left out as wrong
    "disconnects": pl.Int64,  # times its status topic went offline
}
_DIAG = ["fw", "rsrp", "rsrq", "sinr", "ce", "cell", "boot", "vsup", "att", "dropped"]


def rows_frame(rows: Iterable[tuple[Any, ...]]) -> pl.DataFrame:
    """The store's rows (unit, at, seq, sent, received, no_data, diag) as a frame, with each `diag` checked and
    spread into its fields (null where a telegram had none, or the field was wrong: `dropped` counts those)."""
    frame = pl.DataFrame(list(rows), schema=ROW_SCHEMA, orient="row")
    diags = [None if blob is None else read_diag(blob) for blob in frame["diag"].to_list()]
    fields = {name: [None if d is None else getattr(d, name) for d in diags] for name in _DIAG}
    types = {"fw": pl.String, "cell": pl.String, "rsrq": pl.Float64, "sinr": pl.Float64}
    return frame.drop("diag").with_columns(
        *(pl.Series(name, values, dtype=types.get(name, pl.Int64)) for name, values in fields.items())
    )


def records_frame(
    rows: Iterable[tuple[Any, ...]], columns: Sequence[str] = tuple(RECORD), batch: int = 100_000
) -> pl.DataFrame:
    """The store's health records (day, unit, and those of the RECORD columns named) as a frame, `batch` rows at
    a time (never all of them as Python objects)."""
    schema = {"day": pl.Int64, "unit": pl.String, **{c: RECORD[c] for c in columns}}
    taken = iter(rows)
    parts = [pl.DataFrame(part, schema=schema, orient="row") for part in iter(lambda: list(islice(taken, batch)), [])]
    return pl.concat(parts, rechunk=True) if parts else pl.DataFrame(schema=schema)


def day_records(rows: pl.DataFrame, disconnects: Mapping[str, int]) -> pl.DataFrame:
    """One record a unit (sorted by unit) from its day's rows (`rows_frame`) and its count of disconnects; a
    unit with disconnects and no reading has a record too."""
    telegrams = (
        rows.group_by("unit", "seq", "received")
        .agg(pl.col("at").max().alias("newest"), pl.col("sent").first())
        .sort("unit", "received", "sent", "seq")  # in a second, as the unit sent them
        .with_columns(step=pl.col("seq").diff().over("unit"), before=pl.col("seq").shift(1).over("unit"))
        .with_columns(
            # a wrap (from near the top to near 0): the gap is what lies across it; a unit that restarts from
            # anywhere else (its counter kept or drawn anew) has restarted, and lost nothing by it
            step=pl.when((pl.col("before") >= SEQ_WRAP - WRAP_NEAR) & (pl.col("seq") < WRAP_NEAR))
            .then(pl.col("step") + SEQ_WRAP)
            .otherwise(pl.col("step"))
        )
        .group_by("unit")
        .agg(
            (pl.col("received") - pl.col("newest")).median().round().cast(pl.Int64).alias("delay_p50"),
            (pl.col("received") - pl.col("newest")).max().alias("delay_max"),
            pl.when(pl.col("step") > 1).then(pl.col("step") - 1).otherwise(0).sum().alias("seq_gaps"),
            (pl.col("step") < 0).sum().cast(pl.Int64).alias("restarts"),
            (pl.col("sent") - pl.col("received")).median().round().cast(pl.Int64).alias("clock_offset"),
        )
    )
    readings = (
        rows.sort("unit", "at")
        .group_by("unit")
        .agg(
            pl.len().cast(pl.Int64).alias("readings"),
            (pl.col("received") - pl.col("at") > LATE_S).sum().cast(pl.Int64).alias("late"),
            pl.col("no_data").sum().cast(pl.Int64).alias("no_data"),
            pl.col("rsrp").median().alias("rsrp"),
            pl.col("rsrp").min().alias("rsrp_min"),
            pl.col("rsrq").median().alias("rsrq"),
            pl.col("sinr").median().alias("sinr"),
            pl.col("ce").max().alias("ce"),
            (pl.col("boot").max() - pl.col("boot").min()).alias("reboots"),
            pl.col("vsup").min().alias("vsup_min"),
            pl.col("att").sum().alias("attaches"),
            pl.col("fw").drop_nulls().last().alias("fw"),
            pl.col("cell").drop_nulls().last().alias("cell"),
            pl.col("dropped").sum().alias("diag_dropped"),
        )
    )
    events = pl.DataFrame(
        {"unit": list(disconnects), "disconnects": list(disconnects.values())},
        schema={"unit": pl.String, "disconnects": pl.Int64},
    )
    out = (
        readings.join(telegrams, on="unit", how="full", coalesce=True)
        .join(events, on="unit", how="full", coalesce=True)
        .with_columns(
            *(pl.col(c).fill_null(0) for c in ("readings", "late", "no_data", "disconnects", "diag_dropped")),
            pl.col("seq_gaps").fill_null(0),
            pl.col("restarts").fill_null(0),
        )
    )
    return out.select("unit", *(pl.col(name).cast(kind) for name, kind in RECORD.items())).sort("unit")

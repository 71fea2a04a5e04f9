"""Which units are at risk of falling silent, and why (pure: health records in, an assessment out).

Each unit's day (its health record, `monitoring.health`) is compared with its own baseline, the days before it:
- counts (reboots, disconnects, readings without meter data, attach attempts, lost telegrams) with a Poisson
  tail: how unlikely the day's count is at the unit's usual rate, that rate drawn towards its peers' when the
  unit has few days behind it (a new unit is compared with its peers: the units of its signal band, whose radio
  makes them attach and drop alike; the fleet, where a band has too few units);
- levels (RSRP, SINR, lowest supply voltage, clock offset, delivery delay) by how far the day moved from the
  baseline's median, in the worse direction, in dB, mV or s and in robust deviations (median absolute
  deviation); a weak but steady level moves nowhere and is no risk.
What many units show together is not theirs: the median excess over the fleet, and over the units of the same
cell, is taken off each unit's figure first, and said once as an event of the fleet or of the cell.

A signal's severity is 1 where it is as strong as the thresholds below; a unit's risk is its highest severity
and it is at risk from 1 on, with every signal of severity 1 or more as a reason in words and figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import stats

from monitoring.at_risk import SIGNALS
from monitoring.inventory import BANDS

BASELINE_DAYS = 28
PSEUDO_DAYS = 7.0  # a unit's usual rate is drawn towards its peers' as if it had this many days at their rate
MIN_PEERS = 30  # units of a signal band with a baseline for the band's rate to be its units' prior (else the fleet's)
# Readings (of a day's 48 half hours) a baseline day needs to count for a unit's usual counts: a day it reported
# only a part of (its first, on a new installation; one it was mostly away) would count as a whole day of few events
MIN_COVER = 24
COUNT_P = 1e-5  # a count this unlikely at the unit's usual rate has severity 1
LEVEL_Z = 4.0  # robust deviations from the baseline's median at severity 1 (with the change below)
MIN_BASELINE = 5  # days of baseline a level needs (counts lean on their peers' rate until they have days)
MIN_CELL = 8  # units of a cell evaluated the same day for the cell's common excess to count
AT_RISK = 1.0


@dataclass(frozen=True, slots=True)
class Count:
    """A count a day: at least `least` of them, `what` in the reason."""

    column: str
    least: int
    what: str


@dataclass(frozen=True, slots=True)
class Level:
    """A level: `worse` -1 when falling is worse, +1 rising, 0 either way; severity 1 from `change` (unit) and
    LEVEL_Z robust deviations, the deviation never taken smaller than `floor`."""

    column: str
    worse: int
    change: float
    floor: float
    unit: str
    what: str


COUNTS = (
    Count("reboots", 3, "reboots"),
    Count("disconnects", 3, "disconnects"),
    Count("no_data", 3, "readings without meter data"),
    Count("attaches", 8, "network attach attempts"),
    Count("seq_gaps", 6, "telegrams lost"),
)
LEVELS = (
    Level("rsrp", -1, 8.0, 1.5, "dB", "RSRP"),
    Level("sinr", -1, 6.0, 1.5, "dB", "SINR"),
    Level("vsup_min", -1, 200.0, 25.0, "mV", "lowest supply voltage"),
    Level("clock_offset", 0, 60.0, 2.0, "s", "clock offset"),
    Level("delay_p50", 1, 120.0, 5.0, "s", "median delivery delay"),
)
assert tuple(s.column for s in (*COUNTS, *LEVELS)) == tuple(SIGNALS), "at_risk.SIGNALS names them in this order"
# the health record's columns the assessment reads (besides `day` and `unit`)
COLUMNS = ("readings", "restarts", "cell", *(s.column for s in (*COUNTS, *LEVELS)))
UNITS_OF = {"rsrp": "dBm", "sinr": "dB", "vsup_min": "mV", "clock_offset": "s", "delay_p50": "s"}


@dataclass(frozen=True, slots=True)
class Reason:
    """One signal that puts a unit at risk: its severity and what it says."""

    signal: str
    severity: float
    words: str


@dataclass(frozen=True, slots=True)
class UnitRisk:
    """An at-risk unit and its reasons, the strongest first."""

    unit: str
    risk: float
    reasons: tuple[Reason, ...]


@dataclass(frozen=True, slots=True)
class Event:
    """Something many units showed together (`scope`: "fleet" or a cell), taken off each of them."""

    scope: str
    signal: str
    units: int
    of: int
    words: str


@dataclass(frozen=True, slots=True)
class Assessment:
    """A day's risk: the units evaluated, every unit's risk, the at-risk ones (highest first), the events."""

    day: int
    evaluated: int
    risk: dict[str, float]
    at_risk: tuple[UnitRisk, ...]
    events: tuple[Event, ...]


def assess(records: pl.DataFrame, day: int, elapsed: float = 1.0) -> Assessment:
    """The risk of every unit with a record on `day` (epoch of its start), from `records` (columns `day`,
    `unit` and the record's COLUMNS; the BASELINE_DAYS before it are the baseline). `elapsed`: the share of the day
    its record covers (a day in progress expects fewer counts)."""
    today = records.filter(pl.col("day") == day).sort("unit")
    units = today["unit"].to_list()
    n = len(units)
    if n == 0:
        return Assessment(day, 0, {}, (), ())
    base = records.filter((pl.col("day") < day) & (pl.col("day") >= day - BASELINE_DAYS * 86400))
    # each baseline record's unit as its row of today's (-1: none), joined in polars: weeks of a large fleet's
    # unit ids as Python strings would be gigabytes
    index = pl.DataFrame(
        {"unit": units, "row": np.arange(n, dtype=np.int64)}, schema={"unit": pl.String, "row": pl.Int64}
    )
    rows = base.select("unit").join(index, on="unit", how="left", maintain_order="left")["row"].fill_null(-1).to_numpy()
    # days back (a local day of 23 or 25 hours is still one)
    cols = (np.rint((day - base["day"].to_numpy()) / 86400) - 1).astype(np.int64)
    known = (rows >= 0) & (cols >= 0) & (cols < BASELINE_DAYS)
    groups = _cells(today["cell"].to_list())
    peers = _bands(*_days(today, base, pl.col("rsrp").cast(pl.Float64), rows, cols, known, n))
    partial = _days(today, base, pl.col("readings").cast(pl.Float64), rows, cols, known, n)[1] < MIN_COVER
    signals: tuple[Count | Level, ...] = (*COUNTS, *LEVELS)
    severity = np.zeros((n, len(signals)))
    figures: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    events: list[Event] = []
    for k, sig in enumerate(signals):
        # a unit without `diag` says its reboots only by its `seq` starting again
        expr = (pl.coalesce("reboots", "restarts") if sig.column == "reboots" else pl.col(sig.column)).cast(pl.Float64)
        now, past = _days(today, base, expr, rows, cols, known, n)
        if isinstance(sig, Count):
            past[partial] = np.nan
            shape, rate = _usual_count(now, past, elapsed, peers)
            usual = shape / rate
            excess = now - usual
        else:
            usual, spread = _baseline(past, sig.floor)
            excess = (now - usual) * sig.worse if sig.worse else np.abs(now - usual)
        common, said = _common(sig, excess, groups, n)
        events += said
        if isinstance(sig, Count):
            severity[:, k] = _count_severity(sig, now - np.round(common), shape, rate)
        else:
            severity[:, k] = _level_severity(sig, excess - common, spread)
        figures.append((now, usual, np.sum(np.isfinite(past), axis=1).astype(float)))
    risk = severity.max(axis=1)
    flagged = np.flatnonzero(risk >= AT_RISK)
    at_risk = []
    for i in flagged[np.argsort(-risk[flagged], kind="stable")]:
        reasons = sorted(
            (
                Reason(sig.column, round(float(severity[i, k]), 2), _words(sig, figures[k], i, elapsed))
                for k, sig in enumerate(signals)
                if severity[i, k] >= AT_RISK
            ),
            key=lambda r: -r.severity,
        )
        at_risk.append(UnitRisk(units[i], round(float(risk[i]), 2), tuple(reasons)))
    scores = dict(zip(units, np.round(risk, 2).tolist(), strict=True))
    return Assessment(day, n, scores, tuple(at_risk), tuple(events))


def _days(
    today: pl.DataFrame,
    base: pl.DataFrame,
    expr: pl.Expr,
    rows: np.ndarray,
    cols: np.ndarray,
    known: np.ndarray,
    n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """A signal's figure of each unit on the day, and on each day of its baseline (NaN where it has none)."""
    now = today.select(expr).to_series().to_numpy().astype(float)
    past = np.full((n, BASELINE_DAYS), np.nan)
    past[rows[known], cols[known]] = base.select(expr).to_series().to_numpy()[known]
    return now, past


def _bands(now: np.ndarray, past: np.ndarray) -> np.ndarray:
    """Each unit's signal band (0 poor .. 3 excellent, `inventory.BANDS`) by the median RSRP of its baseline,
    or of the day when it has none: a unit whose signal decays is still held to the band it was in; -1 without
    any RSRP."""
    level = now.copy()
    seen = np.any(np.isfinite(past), axis=1)
    level[seen] = np.nanmedian(past[seen], axis=1)
    floors = sorted(floor for _, floor in BANDS if np.isfinite(floor))  # -100, -90, -80
    return np.where(np.isfinite(level), np.searchsorted(floors, level, side="right"), -1)


def _usual_count(now: np.ndarray, past: np.ndarray, elapsed: float, peers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's usual rate as a gamma distribution (shape, rate): its own count over its baseline days,
    drawn towards its peers' mean rate (its signal band's, with MIN_PEERS units or more; else the fleet's) as if
    it had PSEUDO_DAYS more days at that rate (a unit with few days, or with rare events, is held to its peers).
    When no unit has a day behind it (a new installation's first day), the peers' rate is that of the day."""
    days = np.sum(np.isfinite(past), axis=1)
    total = np.nansum(past, axis=1)
    has = days > 0
    rates = np.zeros(len(past))
    rates[has] = total[has] / days[has]
    if not has.any():
        has = np.isfinite(now)
        rates[has] = now[has] / max(elapsed, 1e-3)
    # the mean, not the median: most units see rare events on no day; the worst 1% (failing ones) capped
    capped = np.minimum(rates, np.quantile(rates[has], 0.99)) if has.any() else rates
    prior = np.full(len(past), float(np.mean(capped[has])) if has.any() else 0.0)
    for band in np.unique(peers[peers >= 0]):
        members = has & (peers == band)
        if members.sum() >= MIN_PEERS:
            prior[peers == band] = np.mean(capped[members])
    return total + PSEUDO_DAYS * np.maximum(prior, 1e-3), (days + PSEUDO_DAYS) / elapsed


def _baseline(past: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's baseline median and robust spread (median absolute deviation, as a normal's deviation, never
    under `floor`); NaN with fewer than MIN_BASELINE days."""
    enough = np.sum(np.isfinite(past), axis=1) >= MIN_BASELINE
    usual = np.full(len(past), np.nan)
    spread = np.full(len(past), np.nan)
    if enough.any():
        usual[enough] = np.nanmedian(past[enough], axis=1)
        mad = stats.median_abs_deviation(past[enough], axis=1, scale="normal", nan_policy="omit")
        spread[enough] = np.maximum(np.nan_to_num(mad, nan=floor), floor)
    return usual, spread


def _count_severity(sig: Count, count: np.ndarray, shape: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """How unlikely at least `count` is for the unit (the gamma-Poisson, i.e. negative binomial, predictive
    of its usual rate: an uncertain rate makes a count less surprising), scaled so that COUNT_P is 1."""
    tail = stats.nbinom.sf(count - 1, shape, rate / (rate + 1.0))
    sev = np.log10(np.maximum(tail, 1e-300)) / np.log10(COUNT_P)
    return np.where(np.isfinite(count) & (count >= sig.least), sev, 0.0)


def _level_severity(sig: Level, excess: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """The smaller of the move against `sig.change` and against LEVEL_Z spreads (0 without a baseline)."""
    with np.errstate(invalid="ignore"):
        sev = np.minimum(excess / sig.change, excess / spread / LEVEL_Z)
    return np.where(np.isfinite(sev), np.maximum(sev, 0.0), 0.0)


def _cells(cells: list[str | None]) -> dict[str, np.ndarray]:
    """The evaluated units of each cell (by their index)."""
    groups: dict[str, list[int]] = {}
    for i, cell in enumerate(cells):
        if cell is not None:
            groups.setdefault(cell, []).append(i)
    return {c: np.array(m, dtype=np.int64) for c, m in groups.items()}


def _common(
    sig: Count | Level, excess: np.ndarray, groups: dict[str, np.ndarray], n: int
) -> tuple[np.ndarray, list[Event]]:
    """What each unit shares with the fleet and with its cell (the larger median excess, never below 0), and
    the events: the fleet's, or a cell's beyond the fleet's, where the median excess reaches a reason's size."""
    least = 0.5 if isinstance(sig, Count) else sig.change  # half the fleet with one more than usual is an event
    finite = np.isfinite(excess)
    fleet = float(np.median(excess[finite])) if finite.any() else 0.0
    common = np.full(n, max(fleet, 0.0))
    events = []
    if fleet >= least:
        events.append(Event("fleet", sig.column, int(np.sum(excess >= least)), n, _event_words(sig, fleet)))
    for cell, members in sorted(groups.items()):
        values = excess[members]
        values = values[np.isfinite(values)]
        if len(values) < MIN_CELL:
            continue
        median = float(np.median(values))
        common[members] = np.maximum(common[members], median)
        # a cell's few units make a noisier median than the fleet's: its event needs a whole count (or a third
        # of a reason's) more than usual, beyond what the fleet shows
        said = max(1.0, sig.least / 3) if isinstance(sig, Count) else least
        if median >= said and median >= fleet + said:
            hit = int(np.sum(values >= least))
            events.append(Event(f"cell {cell}", sig.column, hit, len(values), _event_words(sig, median)))
    return common, events


def _words(sig: Count | Level, figures: tuple[np.ndarray, np.ndarray, np.ndarray], i: int, elapsed: float) -> str:
    """A reason in words and figures."""
    now, usual, days = (float(a[i]) for a in figures)
    if isinstance(sig, Count):
        rate = usual / elapsed if elapsed > 0 else usual
        return f"{now:.0f} {sig.what} {'today' if elapsed < 1 else 'that day'} against {rate:.2g} a day"
    unit = UNITS_OF[sig.column]
    if sig.worse == 0:
        return f"{sig.what} {now:+.0f} {unit}, {abs(now - usual):.0f} {sig.unit} from its usual {usual:+.0f} {unit}"
    side = "under" if sig.worse < 0 else "over"
    move = f"{abs(now - usual):.0f} {sig.unit} {side} its {days:.0f}-day median"
    return f"{sig.what} {now:.0f} {unit}, {move} {usual:.0f} {unit}"


def _event_words(sig: Count | Level, median: float) -> str:
    if isinstance(sig, Count):
        return f"{median:.0f} more {sig.what} than usual, as a median"
    return f"{sig.what} {median:.0f} {sig.unit} worse than usual, as a median"

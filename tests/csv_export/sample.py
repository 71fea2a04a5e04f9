"""A fixed day of slots for two units: actual, missing, estimated, rollover, export, a replaced meter."""

from __future__ import annotations

from datetime import date

from aggregator.store import SlotRow
from kernel.timegrid import Grid

GRID = Grid("Asia/Tokyo")
DAY = date(2026, 11, 23)
ENDS = GRID.day_slots(DAY)
LABELS = [(e, GRID.label(e)) for e in ENDS]
UNITS = [("U000001", "SM-0001"), ("U000002", "SM-0002"), ("U000003", "SM-0003")]  # U000003 sent nothing


def slot(
    end: int, unit: str, imp: int | None, imp_q: str, exp: int | None, exp_q: str, meter: str, e1: int, coef: int
) -> SlotRow:
    return SlotRow(end, unit, imp, imp_q, 0, exp, exp_q, 0, meter, e1, coef)


def slots() -> list[SlotRow]:
    out: list[SlotRow] = []
    for i, end in enumerate(ENDS, start=1):
        # U000001: 0.1 kWh register; slot 5 missing; slots 10-12 estimated; slot 20 rolled over (still actual).
        if i != 5:
            q = "E" if 10 <= i <= 12 else "A"
            out.append(slot(end, "U000001", 3 + i % 7, q, 0, q, "SM-0001", 0x01, 1))
        # U000002: 0.01 kWh x coef 10 with solar export around noon; a new meter from slot 30 (slot 30 reset).
        meter = "SM-0002" if i < 30 else "メーター-0002"
        if i == 30:
            out.append(slot(end, "U000002", None, "M", None, "M", meter, 0x02, 10))
            continue
        export = max(0, 40 - abs(i - 25) * 6) if 14 <= i <= 36 else 0
        out.append(slot(end, "U000002", 25 + i % 5, "A", export, "A" if i != 26 else "E", meter, 0x02, 10))
    return out

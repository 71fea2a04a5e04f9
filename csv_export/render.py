"""Slots of one customer and local day -> the bytes of its CSV file (pure: no clock, no I/O).

Long layout: one row per unit and slot. Wide layout: one row per unit and direction, a column per
slot labelled by its end, and a quality string with one letter per slot. Re-rendering the same
slots gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from aggregator.slots import format_kwh
from aggregator.timegrid import SlotLabel

LONG_HEADER = ("unit_id", "meter_id", "date", "slot", "start", "end", "import_kwh", "export_kwh", "quality")
_RANK = {"M": 0, "E": 1, "A": 2}
_NONE: Mapping[int, "SlotTuple"] = {}


@dataclass(frozen=True, slots=True)
class Layout:
    """A customer's file options."""

    wide: bool = False
    encoding: str = "utf-8"  # or "cp932"
    newline: str = "\n"
    include_export: bool = True


# (slot end, unit, imp, imp_q, exp, exp_q, meter, e1, coef, flags), as the store returns them
SlotTuple = tuple[Any, ...]


class _Kwh:
    """Formats raw deltas per scale, remembering each value: a day holds few distinct values per scale."""

    def __init__(self) -> None:
        self._tables: dict[tuple[int, int], dict[int, str]] = {}

    def table(self, e1: int | None, coef: int | None) -> dict[int, str]:
        """raw -> text for one (e1, coef); fill it with `text`."""
        key = (e1 or 0, coef or 0)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = {}
        return table

    @staticmethod
    def text(table: dict[int, str], raw: int | None, e1: int | None, coef: int | None) -> str:
        """The kWh text of a raw delta ("" when missing)."""
        if raw is None or e1 is None or coef is None:
            return ""
        got = table.get(raw)
        if got is None:
            got = table[raw] = format_kwh(raw, e1, coef)
        return got


def cell(text: str) -> str:
    """A CSV field, quoted only when it must be (RFC 4180)."""
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def quality(imp_q: str | None, exp_q: str | None, include_export: bool) -> str:
    """One letter for a long row: the import register's, or the lower of both when export is reported."""
    q = imp_q or "M"
    if include_export and exp_q is not None and _RANK[exp_q] < _RANK[q]:
        q = exp_q
    return q


def by_unit(slots: Iterable[SlotTuple]) -> dict[str, dict[int, SlotTuple]]:
    """Slots grouped by unit and slot end: done once per day, shared by every customer's file."""
    out: dict[str, dict[int, SlotTuple]] = {}
    for s in slots:
        unit = out.get(s[1])
        if unit is None:
            unit = out[s[1]] = {}
        unit[s[0]] = s
    return out


def render(
    day: date,
    labels: Sequence[tuple[int, SlotLabel]],
    units: Iterable[tuple[str, str]],
    slots: Mapping[str, Mapping[int, SlotTuple]],
    layout: Layout,
) -> bytes:
    """The file of one customer and day.

    `labels`: the (end, label) of each slot to include, in order (a day, or today so far);
    `units`: the customer's (unit_id, registry meter_id), in file order; `slots`: the day's stored slots
    grouped by `by_unit` (other units are ignored; absent slots are missing).
    """
    kwh = _Kwh()
    text_day = day.isoformat()
    lines = _wide(text_day, labels, units, slots, layout, kwh) if layout.wide else \
        _long(text_day, labels, units, slots, layout, kwh)
    return (layout.newline.join(lines) + layout.newline).encode(layout.encoding, errors="replace")


def _first_meter(unit_rows: Mapping[int, SlotTuple], fallback: str) -> str:
    # Before the first slot that names a serial, the day's first serial (else the registry's) is shown.
    for end in sorted(unit_rows):
        if unit_rows[end][6]:
            return unit_rows[end][6]  # type: ignore[return-value]
    return fallback


def _long(day: str, labels: Sequence[tuple[int, SlotLabel]], units: Iterable[tuple[str, str]],
          by_unit: Mapping[str, Mapping[int, SlotTuple]], layout: Layout, kwh: _Kwh) -> list[str]:
    export = layout.include_export
    header = LONG_HEADER if export else tuple(c for c in LONG_HEADER if c != "export_kwh")
    lines = [",".join(header)]
    append = lines.append
    slots = [(end, f"{day},{lab.index},{lab.start},{lab.end},") for end, lab in labels]
    text = kwh.text
    for unit, meter_id in units:
        rows = by_unit.get(unit, _NONE)
        serial = _first_meter(rows, meter_id)
        head = f"{unit},{cell(serial)},"
        for end, prefix in slots:
            r = rows.get(end)
            if r is None:
                append(f"{head}{prefix},,M" if export else f"{head}{prefix},M")
                continue
            imp, imp_q, exp, exp_q, meter, e1, coef = r[2:9]
            if meter and meter != serial:  # the meter was replaced during the day
                serial = meter
                head = f"{unit},{cell(serial)},"
            table = kwh.table(e1, coef)
            q = quality(imp_q, exp_q, export)
            if export:
                append(f"{head}{prefix}{text(table, imp, e1, coef)},{text(table, exp, e1, coef)},{q}")
            else:
                append(f"{head}{prefix}{text(table, imp, e1, coef)},{q}")
    return lines


def _wide(day: str, labels: Sequence[tuple[int, SlotLabel]], units: Iterable[tuple[str, str]],
          by_unit: Mapping[str, Mapping[int, SlotTuple]], layout: Layout, kwh: _Kwh) -> list[str]:
    lines = [",".join(["unit_id", "meter_id", "date", "direction", *(lab.end for _, lab in labels), "quality"])]
    directions = (("import", 2, 3), ("export", 4, 5)) if layout.include_export else (("import", 2, 3),)
    ends = [end for end, _ in labels]
    for unit, meter_id in units:
        rows = by_unit.get(unit, _NONE)
        present = [rows.get(end) for end in ends]
        serials = [r[6] for r in present if r is not None and r[6]]
        meter = cell(serials[-1] if serials else meter_id)  # the serial at the end of the day
        for name, value, qual in directions:
            values, letters = [], []
            for r in present:
                if r is None:
                    values.append("")
                    letters.append("M")
                else:
                    values.append(kwh.text(kwh.table(r[7], r[8]), r[value], r[7], r[8]))  # type: ignore[arg-type]
                    letters.append(r[qual] or "M")  # type: ignore[arg-type]
            lines.append(f"{unit},{meter},{day},{name},{','.join(values)},{''.join(letters)}")
    return lines

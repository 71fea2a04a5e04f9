"""Slots of one customer and local day -> the bytes of its CSV file (pure: no clock, no I/O).

Long layout: one row per unit and slot. Wide layout: one row per unit and direction, a column per
slot labelled by its end, and a quality string with one letter per slot. Re-rendering the same
slots gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date

from aggregator.slots import format_kwh
from aggregator.timegrid import SlotLabel

LONG_HEADER = ("unit_id", "meter_id", "date", "slot", "start", "end", "import_kwh", "export_kwh", "quality")
_RANK = {"M": 0, "E": 1, "A": 2}


@dataclass(frozen=True, slots=True)
class Layout:
    """A customer's file options."""

    wide: bool = False
    encoding: str = "utf-8"  # or "cp932"
    newline: str = "\n"
    include_export: bool = True


# (slot end, unit, imp, imp_q, exp, exp_q, meter, e1, coef), as the store returns them
SlotTuple = tuple[int, str, int | None, str | None, int | None, str | None, str | None, int | None, int | None]


class _Kwh:
    """Formats raw deltas, remembering each (raw, scale): a day holds few distinct values per scale."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int, int], str] = {}

    def __call__(self, raw: int | None, e1: int | None, coef: int | None) -> str:
        if raw is None or e1 is None or coef is None:
            return ""
        key = (raw, e1, coef)
        text = self._cache.get(key)
        if text is None:
            text = self._cache[key] = format_kwh(raw, e1, coef)
        return text


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


def render(
    day: date,
    labels: Sequence[tuple[int, SlotLabel]],
    units: Iterable[tuple[str, str]],
    slots: Iterable[SlotTuple],
    layout: Layout,
) -> bytes:
    """The file of one customer and day.

    `labels`: the (end, label) of each slot to include, in order (a day, or today so far);
    `units`: the customer's (unit_id, registry meter_id), in file order; `slots`: stored slots of the
    day for any units (others are ignored; absent ones are missing).
    """
    by_unit: dict[str, dict[int, SlotTuple]] = {}
    for s in slots:
        by_unit.setdefault(s[1], {})[s[0]] = s
    kwh = _Kwh()
    text_day = day.isoformat()
    lines = _wide(text_day, labels, units, by_unit, layout, kwh) if layout.wide else \
        _long(text_day, labels, units, by_unit, layout, kwh)
    return (layout.newline.join(lines) + layout.newline).encode(layout.encoding, errors="replace")


def _meters(unit_rows: dict[int, SlotTuple], labels: Sequence[tuple[int, SlotLabel]], fallback: str) -> list[str]:
    # The serial in force at each slot: the slot's own, else the last one seen that day, else the registry's.
    out, current = [], next((r[6] for _, r in sorted(unit_rows.items()) if r[6]), fallback)
    for end, _ in labels:
        r = unit_rows.get(end)
        if r is not None and r[6]:
            current = r[6]
        out.append(cell(current))
    return out


def _long(day: str, labels: Sequence[tuple[int, SlotLabel]], units: Iterable[tuple[str, str]],
          by_unit: dict[str, dict[int, SlotTuple]], layout: Layout, kwh: _Kwh) -> list[str]:
    export = layout.include_export
    header = LONG_HEADER if export else tuple(c for c in LONG_HEADER if c != "export_kwh")
    lines = [",".join(header)]
    prefixes = [f"{day},{lab.index},{lab.start},{lab.end}," for _, lab in labels]
    for unit, meter_id in units:
        rows = by_unit.get(unit, {})
        meters = _meters(rows, labels, meter_id)
        for (end, _), prefix, meter in zip(labels, prefixes, meters):
            r = rows.get(end)
            if r is None:
                lines.append(f"{unit},{meter},{prefix},,M" if export else f"{unit},{meter},{prefix},M")
                continue
            imp = kwh(r[2], r[7], r[8])
            q = quality(r[3], r[5], export)
            if export:
                lines.append(f"{unit},{meter},{prefix}{imp},{kwh(r[4], r[7], r[8])},{q}")
            else:
                lines.append(f"{unit},{meter},{prefix}{imp},{q}")
    return lines


def _wide(day: str, labels: Sequence[tuple[int, SlotLabel]], units: Iterable[tuple[str, str]],
          by_unit: dict[str, dict[int, SlotTuple]], layout: Layout, kwh: _Kwh) -> list[str]:
    lines = [",".join(["unit_id", "meter_id", "date", "direction", *(lab.end for _, lab in labels), "quality"])]
    directions = (("import", 2, 3), ("export", 4, 5)) if layout.include_export else (("import", 2, 3),)
    for unit, meter_id in units:
        rows = by_unit.get(unit, {})
        meters = _meters(rows, labels, meter_id)
        meter = meters[-1] if meters else cell(meter_id)
        for name, value, qual in directions:
            values, letters = [], []
            for end, _ in labels:
                r = rows.get(end)
                if r is None:
                    values.append("")
                    letters.append("M")
                else:
                    values.append(kwh(r[value], r[7], r[8]))  # type: ignore[arg-type]
                    letters.append(r[qual] or "M")  # type: ignore[arg-type]
            lines.append(f"{unit},{meter},{day},{name},{','.join(values)},{''.join(letters)}")
    return lines

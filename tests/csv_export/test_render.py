"""Rendering a customer's day: golden files for both layouts and encodings, and the rules behind them."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from aggregator.store import SlotRow
from csv_export.jobs import Layout
from csv_export.render import render, slots_frame
from tests.csv_export.sample import DAY, LABELS, UNITS, slots

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("long_utf-8", Layout()),
        ("long_cp932", Layout(encoding="cp932", newline="\r\n")),
        ("wide_utf-8", Layout(wide=True)),
        ("wide_cp932", Layout(wide=True, encoding="cp932", newline="\r\n")),
        ("long_import_only", Layout(include_export=False)),
    ],
)
def test_golden_files(name: str, layout: Layout) -> None:
    assert render(DAY, LABELS, UNITS, slots_frame(slots()), layout) == (GOLDEN / f"{name}.csv").read_bytes()


def test_long_file_reads_back_as_the_slots() -> None:
    text = render(DAY, LABELS, UNITS, slots_frame(slots()), Layout()).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 3 * 48
    by_key = {(r["unit_id"], int(r["slot"])): r for r in rows}
    assert by_key[("U000001", 5)] == {**by_key[("U000001", 5)], "import_kwh": "", "export_kwh": "", "quality": "M"}
    assert by_key[("U000002", 25)]["export_kwh"] == "4.0" and by_key[("U000002", 25)]["import_kwh"] == "2.5"
    assert by_key[("U000002", 30)]["meter_id"] == "メーター-0002"
    assert by_key[("U000001", 48)]["end"] == "24:00"


def test_cp932_is_what_japanese_systems_read() -> None:
    data = render(DAY, LABELS, UNITS, slots_frame(slots()), Layout(encoding="cp932", newline="\r\n"))
    assert "メーター-0002".encode("cp932") in data and b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")


def test_wide_has_a_column_per_slot_and_a_quality_letter_per_slot() -> None:
    rows = list(csv.reader(io.StringIO(render(DAY, LABELS, UNITS, slots_frame(slots()), Layout(wide=True)).decode())))
    header = rows[0]
    assert header[4] == "00:30" and header[51] == "24:00" and header[-1] == "quality" and len(header) == 53
    u1_import = rows[1]
    assert u1_import[3] == "import" and u1_import[8] == "" and len(u1_import[-1]) == 48
    assert u1_import[-1][4] == "M" and u1_import[-1][9:12] == "EEE"


def test_today_so_far_and_a_customer_without_units() -> None:
    partial = render(DAY, LABELS[:21], UNITS[:1], slots_frame(slots()), Layout()).decode().splitlines()
    assert len(partial) == 22 and partial[-1].startswith("U000001,SM-0001,2026-11-23,21,10:00,10:30,")
    assert (
        render(DAY, LABELS, [], slots_frame(slots()), Layout())
        == b"unit_id,meter_id,date,slot,start,end,import_kwh,export_kwh,quality\n"
    )


def test_same_slots_same_bytes_in_any_order() -> None:
    rows = slots()
    assert render(DAY, LABELS, UNITS, slots_frame(rows), Layout()) == render(
        DAY, LABELS, UNITS, slots_frame(rows[::-1]), Layout()
    )


@pytest.mark.parametrize(
    ("unit", "serial", "shown"),
    [
        ("U9", "SM-1", "U9,SM-1"),
        ("U9", "a,b", 'U9,"a,b"'),
        ("U9", 'say "hi"', 'U9,"say ""hi"""'),
        ("U9", "x\ny", 'U9,"x\ny"'),
        # the registry's text that a spreadsheet would run as a formula is shown as text
        (
            "U9",
            '=HYPERLINK("http://evil.example","x")',
            '\'=HYPERLINK(""http://evil.example"",""x"")'.join(['U9,"', '"']),
        ),
        ("U9", "+81 3", "U9,'+81 3"),
        ("U9", "@SUM(A1)", "U9,'@SUM(A1)"),
        ("U9", "\tx", "U9,'\tx"),
        ("-U9", "SM-1", "'-U9,SM-1"),
    ],
)
def test_text_cells_are_quoted_only_when_needed_and_never_a_formula(unit: str, serial: str, shown: str) -> None:
    for layout, line in (
        (Layout(), f"{shown},2026-11-23,1,00:00,00:30,,,M"),
        (Layout(wide=True), f"{shown},2026-11-23,import,,M"),
    ):
        text = render(DAY, LABELS[:1], [(unit, serial)], slots_frame([]), layout).decode()
        assert text.split("\n", 1)[1].startswith(line)


def test_row_quality_is_the_lower_of_the_registers_reported() -> None:
    end = LABELS[0][0]
    for imp_q, exp_q, with_export, want in [
        ("A", "E", True, "E"),
        ("E", "A", True, "E"),
        ("A", None, True, "A"),
        ("A", "M", False, "A"),
        (None, None, True, "M"),
    ]:
        rows = [SlotRow(end, "U1", 1, imp_q, 0, 1 if exp_q else None, exp_q, 0, "SM", 1, 1)]
        text = render(DAY, LABELS[:1], [("U1", "SM")], slots_frame(rows), Layout(include_export=with_export)).decode()
        assert text.splitlines()[1].endswith("," + want), (imp_q, exp_q, with_export)

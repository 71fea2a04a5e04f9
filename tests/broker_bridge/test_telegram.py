"""Every kind of wrong input in telegram-v1.md is refused with its reason; good readings are kept."""

from __future__ import annotations

import json
from datetime import datetime

import msgspec
import pytest

from broker_bridge import telegram
from broker_bridge.telegram import NO_DATA, Decoded, Rules, decode, unit_of_topic
from kernel.meter import Flag
from kernel.reading import DIAG_MAX, DIAG_TOO_LARGE, Diag, Reading, Reason, read_diag
from kernel.timegrid import Grid

GRID = Grid("Asia/Tokyo")
NOW = int(datetime.fromisoformat("2026-11-23T10:30:09+09:00").timestamp())
TOPIC = "smame/v1/U000123/reading"
RULES = Rules(GRID.on_boundary, tolerance=300)


def body(**changes: object) -> dict[str, object]:
    t: dict[str, object] = {
        "v": 1,
        "unit": "U000123",
        "meter": "SM-4711-0001",
        "seq": 18231,
        "sent": "2026-11-23T10:30:07+09:00",
        "e1": 1,
        "coef": 1,
        "digits": 6,
        "readings": [
            {"at": "2026-11-23T10:00:00+09:00", "fwd": 523101, "rev": 0},
            {"at": "2026-11-23T10:30:00+09:00", "fwd": 523118, "rev": 0},
        ],
    }
    t.update(changes)
    return t


def run(payload: object, topic: str = TOPIC) -> Decoded:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return decode(topic, raw, NOW, {"U000123", "U2"}, RULES)


def test_the_contract_example_decodes() -> None:
    d = run(body())
    assert d.rejects == []
    assert [(r.at, r.fwd, r.rev, r.meter) for r in d.readings] == [
        (NOW - 9 - 1800, 523101, 0, "SM-4711-0001"),
        (NOW - 9, 523118, 0, "SM-4711-0001"),
    ]
    assert d.readings[0].coef == 1 and d.readings[0].digits == 6 and d.readings[0].flags == 0


def test_coef_defaults_to_one_and_rev_is_optional() -> None:
    t = body(readings=[{"at": "2026-11-23T10:30:00+09:00", "fwd": 5}])
    del t["coef"]
    [r] = run(t).readings
    assert (r.coef, r.rev) == (1, None)


def test_no_data_value_is_kept_as_no_value_and_not_range_checked() -> None:
    [r] = run(body(readings=[{"at": "2026-11-23T10:30:00+09:00", "fwd": NO_DATA, "rev": NO_DATA}])).readings
    assert (r.fwd, r.rev) == (None, None)


@pytest.mark.parametrize(
    ("payload", "topic", "reason"),
    [
        (b"\x00not json", TOPIC, Reason.NOT_JSON),
        (b"[1, 2]", TOPIC, Reason.NOT_OBJECT),
        (b'{"v": 1, "pad": "' + b"x" * 17000 + b'"}', TOPIC, Reason.TOO_LARGE),
        (body(v=2), TOPIC, Reason.UNKNOWN_VERSION),
        (body(v="1", seq="x"), TOPIC, Reason.UNKNOWN_VERSION),
        ({k: v for k, v in body().items() if k != "meter"}, TOPIC, Reason.BAD_FIELD),
        (body(seq="18231"), TOPIC, Reason.BAD_FIELD),
        (body(e1=7), TOPIC, Reason.BAD_FIELD),
        (body(digits=9), TOPIC, Reason.BAD_FIELD),
        (body(coef=0), TOPIC, Reason.BAD_FIELD),
        (body(readings=[]), TOPIC, Reason.BAD_FIELD),
        (body(sent="2026-11-23T10:30:07"), TOPIC, Reason.BAD_TIME),
        (body(), "smame/v1/U2/reading", Reason.UNIT_MISMATCH),
        (body(unit="U9"), "smame/v1/U9/reading", Reason.UNKNOWN_UNIT),
        (body(), "smame/v1/bad+id/reading", Reason.BAD_TOPIC),
        # hostile: nesting deeper than any stack, oversized lists, text that would be a spreadsheet formula
        (b'{"x":' + b"[" * 2000 + b"]" * 2000 + b"}", TOPIC, Reason.NOT_JSON),
        (b'{"v":1,"unit":"U000123","x":' + b"[" * 5000 + b"]" * 5000 + b"}", TOPIC, Reason.NOT_JSON),
        (b'{"v":1,"unit":5,"x":' + b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"}", TOPIC, Reason.NOT_JSON),
        (body(readings=[{"at": "2026-11-23T10:30:00+09:00", "fwd": 1}] * 97), TOPIC, Reason.BAD_FIELD),
        (body(meter='=HYPERLINK("http://x","y")'), TOPIC, Reason.BAD_FIELD),
        (body(meter="@SUM(1+1)"), TOPIC, Reason.BAD_FIELD),
        (body(meter="-2+3"), TOPIC, Reason.BAD_FIELD),
        (body(meter="SM\u00001"), TOPIC, Reason.BAD_FIELD),
        (body(meter="SM\r\n1"), TOPIC, Reason.BAD_FIELD),
        (body(meter="\tSM1"), TOPIC, Reason.BAD_FIELD),
        (body(meter="M" * 65), TOPIC, Reason.BAD_FIELD),
    ],
)
def test_whole_telegram_refused(payload: object, topic: str, reason: str) -> None:
    d = run(payload, topic)
    assert d.readings == []
    assert [r.reason for r in d.rejects] == [reason]
    assert d.rejects[0].detail


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"at": "2026-11-23T10:15:00+09:00", "fwd": 1}, Reason.BAD_TIME),
        ({"at": "2026-11-23T10:00:00", "fwd": 1}, Reason.BAD_TIME),
        ({"at": "2026-11-23T10:00:00+09:00", "fwd": 1_000_000}, Reason.OUT_OF_RANGE),
        ({"at": "2026-11-23T10:00:00+09:00", "fwd": -1}, Reason.OUT_OF_RANGE),
        ({"at": "2026-11-23T10:00:00+09:00", "fwd": 1, "rev": 10**6}, Reason.OUT_OF_RANGE),
        ({"at": "2026-11-23T11:00:00+09:00", "fwd": 1}, Reason.FUTURE),
        ({"at": "2026-11-23T10:00:00+09:00", "fwd": "12"}, Reason.BAD_FIELD),
        ({"fwd": 12}, Reason.BAD_FIELD),
        # times the slot grid cannot place, or that would pair across ages: refused before any work on them
        ({"at": "0001-01-01T00:00:00+09:00", "fwd": 1}, Reason.TOO_OLD),
        ({"at": "0001-01-02T00:11:01+00:00", "fwd": 1}, Reason.TOO_OLD),  # a :30 under Tokyo's 1887 offset
        ({"at": "9999-12-31T23:30:00+00:00", "fwd": 1}, Reason.FUTURE),
        ({"at": "9999-12-31T23:30:00-09:00", "fwd": 1}, Reason.FUTURE),
        ({"at": "2022-11-01T10:00:00+09:00", "fwd": 1}, Reason.TOO_OLD),
    ],
)
def test_a_bad_reading_is_refused_and_the_good_ones_kept(bad: dict[str, object], reason: str) -> None:
    good = {"at": "2026-11-23T10:30:00+09:00", "fwd": 523118, "rev": 0}
    d = run(body(readings=[bad, good]))
    assert [(r.reason, r.index) for r in d.rejects] == [(reason, 0)]
    assert [r.fwd for r in d.readings] == [523118]


def test_future_within_tolerance_is_accepted() -> None:
    d = run(body(readings=[{"at": "2026-11-23T10:30:00+09:00", "fwd": 1}], sent="2026-11-23T10:33:00+09:00"))
    assert d.rejects == [] and d.readings[0].flags == 0


def test_unit_clock_running_fast_flags_clock_skew() -> None:
    d = run(body(sent="2026-11-23T10:50:00+09:00"))
    assert {r.flags for r in d.readings} == {Flag.CLOCK_SKEW}


def test_the_plausible_window_is_a_setting() -> None:
    old = body(readings=[{"at": "2025-11-23T10:30:00+09:00", "fwd": 1}])
    assert [r.reason for r in run(old).rejects] == []
    raw = json.dumps(old).encode()
    strict = Rules(GRID.on_boundary, tolerance=300, max_age=30 * 86400, max_readings=1)
    assert [r.reason for r in decode(TOPIC, raw, NOW, {"U000123"}, strict).rejects] == [Reason.TOO_OLD]
    two = json.dumps(body()).encode()
    [reject] = decode(TOPIC, two, NOW, {"U000123"}, strict).rejects
    assert reject.reason == Reason.BAD_FIELD and "expected 1..1" in reject.detail


def test_what_the_decoder_remembers_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each unit's topic and meter and each time are checked once and remembered; a flood of distinct texts (a
    # hostile client, a fleet larger than the memo) must neither grow them past their bound nor change a verdict.
    monkeypatch.setattr(telegram, "_MEMO_MAX", 500)
    units = {f"U{k}" for k in range(1200)}
    for k in range(1200):
        meter = f"M-{k}" if k % 3 else f"-bad{k}"
        sent = f"2026-11-23T10:30:{k % 60:02d}.{k:06d}+09:00"
        d = decode(
            f"smame/v1/U{k}/reading", json.dumps(body(unit=f"U{k}", meter=meter, sent=sent)).encode(), NOW, units, RULES
        )
        assert (len(d.readings), [r.reason for r in d.rejects]) == ((2, []) if k % 3 else (0, [Reason.BAD_FIELD]))
        assert len(unit_of_topic(f"x/{k}/y/{k}/reading") or "") == len(str(k))
    assert max(len(m) for m in (telegram._TOPIC_UNITS, telegram._METERS_OK, telegram._INSTANTS)) <= 500
    assert unit_of_topic("smame/v1/U7/reading") == "U7" and unit_of_topic("smame/v1/U 7/reading") is None


def diag_of(r: Reading) -> Diag | None:
    """A reading's diag as smame keeps it, read as the health records read it."""
    return None if r.diag is None else read_diag(r.diag)


GOOD_DIAG = {
    "fw": "2.1.0+b7",
    "rsrp": -97,
    "rsrq": -11.5,
    "sinr": 4.5,
    "ce": 1,
    "cell": "44010-1f2a",
    "boot": 12,
    "up": 86400,
    "vsup": 3300,
    "att": 2,
}


def test_a_units_diag_travels_with_its_newest_reading() -> None:
    readings = [
        {"at": "2026-11-23T10:30:00+09:00", "fwd": 523118, "rev": 0},  # the newest first: order does not matter
        {"at": "2026-11-23T10:00:00+09:00", "fwd": 523101, "rev": 0},
    ]
    sent = {**GOOD_DIAG, "extra": [1, 2]}  # a field of a later version: kept, and ignored when read
    d = run(body(readings=readings, diag=sent))
    assert d.rejects == []
    newest, older = d.readings
    assert newest.at == NOW - 9 and older.diag is None
    assert newest.diag is not None and json.loads(newest.diag) == sent  # kept as the unit sent it
    assert diag_of(newest) == Diag(**GOOD_DIAG)  # type: ignore[arg-type]
    assert run(body()).readings[-1].diag is None  # old units send none
    assert run(body(diag=None)).readings[-1].diag is None  # nor does null


@pytest.mark.parametrize(
    ("wrong", "kept"),
    [
        ({"rsrp": -20}, "rsrp"),  # out of range
        ({"fw": "2.1 beta!"}, "fw"),  # not the pattern
        ({"ce": "1"}, "ce"),  # another type
        ({"boot": -1, "vsup": 30001}, "boot"),
        ({"att": 2**70}, "att"),
        ({"cell": None, "sinr": "high"}, "sinr"),  # null is absent, not wrong
    ],
)
def test_a_wrong_diag_field_is_dropped_and_counted_and_the_readings_taken(wrong: dict[str, object], kept: str) -> None:
    d = run(body(diag={**GOOD_DIAG, **wrong, "dropped": 0}))
    assert d.rejects == [] and len(d.readings) == 2  # never quarantined for it
    diag = diag_of(d.readings[-1])
    assert diag is not None
    dropped = [k for k, v in wrong.items() if v is not None]
    assert diag.dropped == len(dropped)
    assert all(getattr(diag, k) is None for k in wrong)
    others = {k: v for k, v in GOOD_DIAG.items() if k not in wrong}
    assert {k: getattr(diag, k) for k in others} == others and kept in GOOD_DIAG


@pytest.mark.parametrize("diag", [[1, 2], "ok", 7, True])
def test_a_diag_that_is_no_object_is_one_field_dropped(diag: object) -> None:
    d = run(body(diag=diag))
    assert d.rejects == [] and len(d.readings) == 2
    assert diag_of(d.readings[-1]) == Diag(dropped=1)


def test_a_dropped_count_sent_by_a_unit_is_not_believed() -> None:
    d = run(body(diag={**GOOD_DIAG, "dropped": 7}))
    assert diag_of(d.readings[-1]) == Diag(**GOOD_DIAG)  # type: ignore[arg-type]


def test_a_diag_too_large_to_keep_is_one_field_dropped_and_the_readings_taken() -> None:
    d = run(body(diag={**GOOD_DIAG, "note": "x" * DIAG_MAX}))
    assert d.rejects == [] and len(d.readings) == 2
    assert d.readings[-1].diag == DIAG_TOO_LARGE and diag_of(d.readings[-1]) == Diag(dropped=1)


def test_a_diag_kept_by_an_earlier_version_is_read_and_one_no_decoder_takes_is_dropped() -> None:
    earlier = Diag(fw="2.1.0", rsrp=-97, dropped=1)  # msgpack, checked when it was kept
    assert read_diag(msgspec.msgpack.encode(earlier)) == earlier
    assert read_diag(b"\xc1") == read_diag(b"{") == Diag(dropped=1)
    assert read_diag(memoryview(b'{"rsrp":-97}')) == Diag(rsrp=-97)  # as a store may hand it


def test_a_refused_telegram_is_about_its_sent_time_unless_its_version_is_unknown() -> None:
    [bad_coef] = run(body(coef=0)).rejects
    [unknown] = run(body(v=0)).rejects  # not read further: its time neither (the typed path never decodes it)
    assert (bad_coef.reason, bad_coef.at) == (Reason.BAD_FIELD, NOW - 2)
    assert (unknown.reason, unknown.at) == (Reason.UNKNOWN_VERSION, None)

"""Fuzzing what parses outside input: the broker's frames, the telegram decoder (structured and byte-level) and the
slot arithmetic.

Every example must come back with readings or reasons, never an exception; the cost of one telegram is bounded.
`SMAME_FUZZ_EXAMPLES=20000 scripts/test tests/broker_bridge/test_fuzz.py` runs longer than CI does.
"""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.slots import Point, pair_slots
from broker_bridge import mqtt
from broker_bridge.telegram import MAX_PAYLOAD, Decoded, Reject, Rules, _slow_path, decode, decode_status
from kernel.meter import MISSING, Limits
from kernel.reading import DIAG_CELL, DIAG_MAX, DIAG_NAME, KEEP, REASONS, Reason, Refused, Status, read_diag
from kernel.timegrid import SLOT, Grid

GRID = Grid("Asia/Tokyo")
NOW = int(datetime(2026, 11, 23, 1, 30, 9, tzinfo=UTC).timestamp())
RULES = Rules(GRID.on_boundary)
TOPIC = "smame/v1/F1/reading"
EXAMPLES = int(os.environ.get("SMAME_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Edge-biased values: the boundaries of every field, of datetime itself, and of the register widths.
ints = st.one_of(
    st.sampled_from(
        [
            0,
            1,
            -1,
            2**31,
            2**32 - 1,
            2**32,
            2**63,
            -(2**63),
            10**8,
            10**8 - 1,
            0xFFFFFFFE,
            0x0A,
            0x0D,
            999_999,
            1_000_000,
        ]
    ),
    st.integers(),
)
offsets = st.sampled_from(["+09:00", "Z", "-09:00", "+14:00", "-12:00", "+09:18", "", "+23:59"])
instants = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59)).map(
        lambda d: d.isoformat(timespec="seconds")
    ),
    st.sampled_from(
        [
            "0001-01-01T00:00:00",
            "9999-12-31T23:30:00",
            "0001-01-02T00:11:01",
            "2026-11-23T10:30:00",
            "2026-11-23T10:30:00.000001",
            "1970-01-01T00:00:00",
        ]
    ),
).flatmap(lambda d: offsets.map(lambda o: d + o))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=True), st.text(max_size=40), instants)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=20,
)
readings = st.fixed_dictionaries(
    {"at": st.one_of(instants, junk), "fwd": st.one_of(ints, junk)},
    optional={"rev": st.one_of(ints, junk), "extra": junk},
)
# a unit's diagnostics: each field good, at its edges, just outside them, of another type, or anything
diag_values = {
    "fw": st.sampled_from(["1.2.3", "v2.0.1+b7", "x" * 32, "x" * 33, "", "1 2", "ü"]),
    "rsrp": st.sampled_from([-140, -44, -141, -43, -97, 0, -97.5, "-97"]),
    "rsrq": st.sampled_from([-20, -3, -20.5, -2.9, -10.5, float("nan"), "x"]),
    "sinr": st.sampled_from([-20, 40, 40.1, -21, 3.5, float("inf"), None]),
    "ce": st.sampled_from([0, 1, 2, 3, -1, True, 1.0]),
    "cell": st.sampled_from(["44010-1f2a", "x" * 33, "a/b", ""]),
    "boot": st.sampled_from([0, 7, -1, 2**53, 2**53 + 1, 2**64]),
    "up": st.sampled_from([0, 86400, -5, 1.5]),
    "vsup": st.sampled_from([0, 3300, 30000, 30001, -1]),
    "att": st.sampled_from([0, 3, -1, 2**31]),
    "dropped": st.sampled_from([0, 5]),
}
diags = st.one_of(
    st.fixed_dictionaries({}, optional={k: st.one_of(v, v, junk) for k, v in diag_values.items()}),
    junk,
)

telegrams = st.fixed_dictionaries(
    {
        "v": st.one_of(st.just(1), junk),
        "unit": st.one_of(st.just("F1"), st.text(max_size=70)),
        "meter": st.one_of(st.just("SM-1"), st.text(max_size=70)),
        "seq": st.one_of(ints, junk),
        "sent": st.one_of(instants, junk),
        "e1": st.one_of(st.sampled_from([0, 1, 2, 3, 4, 10, 11, 12, 13]), ints, junk),
        "digits": st.one_of(st.integers(1, 8), ints, junk),
        "readings": st.one_of(st.lists(readings, max_size=100), junk),
    },
    optional={"coef": st.one_of(ints, junk), "x": junk, "diag": diags},
)


def check(payload: bytes, topic: str = TOPIC) -> Decoded:
    d = decode(topic, payload, NOW, {"F1"}, RULES)
    assert d.readings or d.rejects, "neither readings nor a reason"
    assert all(r.reason in REASONS and r.detail for r in d.rejects)
    for r in d.readings:  # what passes is inside the window and on the grid
        assert NOW - RULES.max_age <= r.at <= NOW + RULES.tolerance and GRID.on_boundary(r.at)
        if r.diag is not None:  # kept as sent, bounded, and read later without raising, each field in its range
            assert len(r.diag) <= DIAG_MAX
            diag = read_diag(r.diag)
            assert diag.rsrp is None or -140 <= diag.rsrp <= -44
            assert diag.fw is None or DIAG_NAME.fullmatch(diag.fw)
    return d


def cost(payload: bytes) -> tuple[float, int]:
    """CPU seconds of one decode (the least of three: noise only adds) and its peak of allocated bytes."""
    best = min(_timed(payload) for _ in range(3))
    tracemalloc.start()
    try:
        decode(TOPIC, payload, NOW, {"F1"}, RULES)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return best, peak


def _timed(payload: bytes) -> float:
    started = time.process_time()
    decode(TOPIC, payload, NOW, {"F1"}, RULES)
    return time.process_time() - started


class _Frames:
    """What the MQTT reader hands on: messages, control packets, failures."""

    def __init__(self, version: int = mqtt.MQTT5) -> None:
        self.version = version
        self.messages: list[tuple[str, bytes, int | None]] = []
        self.controls: list[tuple[int, bytes]] = []
        self.failures: list[Exception] = []

    def on_messages(self, ms: list[mqtt.Message]) -> None:
        self.messages.extend((m.topic, m.payload, m.packet_id) for m in ms)

    def _on_control(self, kind: int, body: bytes) -> None:
        self.controls.append((kind, body))

    def _fail(self, exc: Exception) -> None:
        self.failures.append(exc)


def _publish(topic: str, payload: bytes, packet_id: int, version: int = mqtt.MQTT5) -> bytes:
    props = b"\x00" if version == mqtt.MQTT5 else b""  # MQTT 3.1.1 has no properties block
    return mqtt._packet(mqtt.PUBLISH | 0x02, mqtt._str(topic) + packet_id.to_bytes(2, "big") + props + payload)


# around each width of the remaining length: 1 byte up to 127, 2 up to 16383, then 3
sizes = st.one_of(st.integers(0, 300), st.integers(16_340, 16_400), st.sampled_from([100, 150, 20_000]))


@FUZZ
@given(
    st.lists(sizes, min_size=1, max_size=8),
    st.lists(st.integers(1, 40_000), max_size=12),
    st.sampled_from([mqtt.MQTT5, mqtt.MQTT311]),
)
def test_the_brokers_frames_read_in_any_pieces_give_each_message_once_in_order(
    lengths: list[int], cuts: list[int], version: int
) -> None:
    sent = [(f"smame/v1/U{i}/reading", bytes([i % 251]) * n, i + 1) for i, n in enumerate(lengths)]
    ping = bytes([0xD0, 0])  # a control packet between the messages
    stream = ping.join(_publish(*m, version) for m in sent)
    frames = _Frames(version)
    reader = mqtt._Protocol(frames)  # type: ignore[arg-type]
    last = 0
    for cut in sorted({c % (len(stream) + 1) for c in cuts}) + [len(stream)]:
        reader.data_received(stream[last:cut])
        last = cut
    assert frames.failures == []
    assert frames.messages == sent
    assert len(frames.controls) == len(sent) - 1


@FUZZ
@given(telegrams)
def test_structured_telegrams_never_raise(t: dict[str, object]) -> None:
    check(json.dumps(t, default=str).encode())


# Telegrams that are nearly right: times around NOW in every spelling RFC 3339 allows and some it does not,
# registers around their limits; most pass the head checks, so their readings are weighed one by one.
near_times = st.builds(
    lambda slots, seconds, fraction, sep, offset: (
        (datetime.fromtimestamp(NOW - NOW % SLOT + slots * SLOT + seconds, UTC).astimezone(offset[0])).strftime(
            f"%Y-%m-%d{sep}%H:%M:%S"
        )
        + fraction
        + offset[1]
    ),
    st.integers(-60, 12),
    st.sampled_from([0, 0, 0, 1, 59, 300, 301]),
    st.sampled_from(["", "", ".0", ".000001", ".5"]),
    st.sampled_from(["T", "T", "t", " "]),
    st.sampled_from(
        [
            (timezone(timedelta(hours=9)), "+09:00"),
            (UTC, "Z"),
            (UTC, "z"),
            (UTC, "+00:00"),
            (UTC, ""),
            (timezone(timedelta(hours=-5)), "-05:00"),
            (timezone(timedelta(hours=9)), "+0900"),
        ]
    ),
)
near_readings = st.lists(
    st.fixed_dictionaries(
        {"at": near_times, "fwd": st.sampled_from([0, 5, 999_999, 10**6, 0xFFFFFFFE, -1])},
        optional={"rev": st.sampled_from([None, 0, 7, 10**6, 0xFFFFFFFE])},
    ),
    min_size=1,
    max_size=6,
)
near_telegrams = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "unit": st.just("F1"),
        "meter": st.sampled_from(["SM-1", "SM-1", "-x"]),
        "seq": st.sampled_from([0, 7, 2**32]),
        "sent": near_times,
        "e1": st.sampled_from([1, 2, 5]),
        "digits": st.just(6),
        "readings": near_readings,
    },
    optional={"diag": diags},
)


@settings(FUZZ, max_examples=max(EXAMPLES, 1500))  # a difference hides in few of the near telegrams
@given(st.one_of(near_telegrams, near_telegrams, telegrams), st.booleans())
def test_the_fast_path_says_exactly_what_the_typed_decoders_say(t: dict[str, object], escaped: bool) -> None:
    # The fast path reads times as text and parses each distinct one once; the typed decoders (the slow path)
    # are the reference for every reading, reason and message. Escaped JSON strings must not tell them apart.
    raw = json.dumps(t, default=str).encode()
    if escaped:
        raw = raw.replace(b"-", b"\\u002d").replace(b"T", b"\\u0054")
    assert decode(TOPIC, raw, NOW, {"F1"}, RULES) == _slow_path("F1", raw, NOW, {"F1"}, RULES)


@FUZZ
@given(st.binary(max_size=2048), st.text(max_size=80))
def test_any_bytes_on_any_topic_never_raise(payload: bytes, topic: str) -> None:
    check(payload, topic)


@FUZZ
@given(telegrams, st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_mangled_telegrams_never_raise(t: dict[str, object], cut: int, noise: bytes) -> None:
    raw = json.dumps(t, default=str).encode()
    check(raw[:cut] + noise + raw[cut:])


def worst_telegrams() -> list[bytes]:
    """The most expensive inputs we know of, each at the size limit."""
    at = datetime(2026, 11, 23, 10, 0, tzinfo=timezone(timedelta(hours=9)))
    full = {
        "v": 1,
        "unit": "F1",
        "meter": "SM-1",
        "seq": 1,
        "sent": at.isoformat(),
        "e1": 1,
        "coef": 1,
        "digits": 8,
        "readings": [{"at": (at - timedelta(minutes=30 * k)).isoformat(), "fwd": k, "rev": k} for k in range(96)],
    }
    deep = b'{"x":' + b"[" * 8000 + b"]" * 8000 + b"}"
    many = b'{"v":1,"unit":"F1","readings":[' + b",".join([b"{}"] * 5000) + b"]}"
    numbers = b'{"v":1,"seq":' + b"9" * (MAX_PAYLOAD - 20) + b"}"
    return [json.dumps(full).encode(), deep, many, numbers, b" " * MAX_PAYLOAD, b"x" * (MAX_PAYLOAD + 1)]


def test_no_telegram_costs_more_than_a_millisecond_or_a_small_bound_of_memory() -> None:
    for payload in worst_telegrams():
        assert len(payload) <= MAX_PAYLOAD + 1
        seconds, peak = cost(payload)
        assert seconds < 0.001, f"{seconds * 1000:.2f} ms for {payload[:40]!r}"
        assert peak < 2 * 2**20, f"{peak} bytes for {payload[:40]!r}"


def test_a_refused_payload_is_kept_as_an_excerpt_with_its_size_and_hash() -> None:
    huge = b"x" * 10_000_000
    r = Refused.of(NOW, "t" * 10_000, "F1", Reason.TOO_LARGE, "10000000 bytes", huge)
    assert len(r.payload) == KEEP and len(r.topic) <= 256 and len(r.detail) <= 1024
    assert "10000000 bytes, sha256 " in r.detail and f"first {KEEP} kept" in r.detail
    small = Refused.of(NOW, TOPIC, "F1", Reason.NOT_JSON, "bad", b"abc")
    assert small.payload == b"abc" and small.detail == "bad"


points = st.builds(
    Point,
    at=st.integers(-(2**40), 2**40).map(lambda t: t - t % SLOT),
    value=st.integers(0, 10**8 - 1),
    meter=st.sampled_from(["A", "B"]),
    digits=st.integers(1, 8),
    e1=st.sampled_from([0, 1, 2, 3, 0x0A]),
    coef=st.sampled_from([1, 10, 999_999]),
    flags=st.integers(0, 63),
).map(lambda p: msgspec.structs.replace(p, value=p.value % 10**p.digits))  # as the decoder lets through


@FUZZ
@given(points, points, st.integers(1, 48 * 31), st.fractions(min_value=Fraction(1, 100), max_value=Fraction(10**6)))
def test_slot_arithmetic_is_bounded_by_the_gap_cap_whatever_the_points(
    a: Point, b: Point, cap: int, kwh: Fraction
) -> None:
    if a.at == b.at:
        return
    prev, nxt = (a, b) if a.at < b.at else (b, a)
    started = time.process_time()
    slots = pair_slots(prev, nxt, Limits(kwh, cap))
    assert time.process_time() - started < 0.5  # proportional to the cap, never to the gap
    n = (nxt.at - prev.at) // SLOT
    assert len(slots) == (1 if n > cap else n) and slots[-1].end == nxt.at
    if n > cap:
        assert slots[0].quality == MISSING
    assert all(s.value is None or s.value >= 0 for s in slots)
    if all(s.value is not None for s in slots) and len(slots) > 1:
        delta = (nxt.value - prev.value) % 10**nxt.digits
        assert sum(s.value or 0 for s in slots) == delta  # estimates sum exactly to the register difference


@FUZZ
@given(
    st.one_of(st.sampled_from(["smame/v1/F1/status", "smame/v1/F2/status", "smame/v1//status", "status"]), st.text()),
    st.one_of(st.sampled_from([b"online", b"offline", b" online\r\n", b"", b"onl", b"x" * 17]), st.binary()),
)
def test_any_status_message_is_a_state_a_reason_or_nothing(topic: str, payload: bytes) -> None:
    got = decode_status(topic, payload, NOW, {"F1"})
    if isinstance(got, Status):
        assert got.unit == "F1" and payload.strip() in (b"online", b"offline") and len(payload) <= 16
    elif isinstance(got, Reject):
        assert got.reason == Reason.BAD_STATUS and got.detail
    else:
        assert got is None and (topic != "smame/v1/F1/status" or not payload)


@FUZZ
@given(st.one_of(st.binary(max_size=300), diags.map(lambda d: json.dumps(d, default=str).encode())))
def test_any_kept_diag_is_read_without_raising_each_field_in_its_range(kept: bytes) -> None:
    diag = read_diag(kept)
    assert diag.dropped >= 0 and (diag.ce is None or 0 <= diag.ce <= 2)
    assert diag.cell is None or DIAG_CELL.fullmatch(diag.cell)

"""Telegram v1: the wire contract between a unit and the backend (pure: no clock, no I/O).

`decode` turns one MQTT message into the readings it carries and the reasons it was (partly)
refused; `encode` is the one way to write a telegram, used by the simulator and the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Generic, TypeVar

import msgspec

from kernel.meter import E1_UNITS, METER_ID, UNIT_ID, Flag
from kernel.reading import DIAG_MAX, DIAG_TOO_LARGE, Reading, Reason, Status

VERSION = 1
MAX_PAYLOAD = 16 * 1024
NO_DATA = 0xFFFFFFFE  # ECHONET Lite: the register has no value at that time
SEQ_LIMIT = 2**32
_SKEW = int(Flag.CLOCK_SKEW)


class WireReading(msgspec.Struct, forbid_unknown_fields=False):
    at: datetime
    fwd: int
    rev: int | None = None


R = TypeVar("R")


class WireTelegram(msgspec.Struct, Generic[R], forbid_unknown_fields=False, omit_defaults=True):
    """The telegram; `WireTelegram[msgspec.Raw]` leaves the readings undecoded (the slow path). Encoded without
    the fields at their defaults (`coef` 1, no `diag`), as units send them."""

    v: int
    unit: str
    meter: str
    seq: int
    sent: datetime
    e1: int
    digits: int
    readings: list[R]
    coef: int = 1
    diag: Any = None  # the unit's diagnostics (`kernel.reading.Diag`); what is kept is the envelope's bytes


@dataclass(frozen=True, slots=True)
class Rules:
    """What makes a reading acceptable beyond its shape (from the ingest settings and the local slot grid)."""

    on_boundary: Callable[[int], bool]
    tolerance: int = 300  # seconds a reading may lie ahead of its receipt (the unit's clock may run fast)
    max_age: int = 3 * 366 * 86400  # seconds a reading may lie behind its receipt
    max_readings: int = 96


class _TextReading(msgspec.Struct, forbid_unknown_fields=False, gc=False):
    at: str
    fwd: int
    rev: int | None = None


class _TextTimes(msgspec.Struct, forbid_unknown_fields=False, gc=False):
    """The telegram with its times left as text, the fast path's shape: units share a few hundred distinct
    times (the half hours, the seconds they send at), so each text is parsed once (`_instant`), not per reading.
    Anything it cannot take goes to the typed decoders, which decide and say why."""

    v: int
    unit: str
    meter: str
    seq: int
    sent: str
    e1: int
    digits: int
    readings: list[_TextReading]
    coef: int = 1
    diag: msgspec.Raw = msgspec.Raw()  # kept as the unit sent it, checked only when read (`kernel.reading.read_diag`)


class _Envelope(msgspec.Struct, forbid_unknown_fields=False):
    v: Any = None  # any JSON: a version of the wrong type is an unknown version, not a payload that is no object
    diag: msgspec.Raw = msgspec.Raw()


_RawTelegram = WireTelegram[msgspec.Raw]
_decode_fast = msgspec.json.Decoder(_TextTimes).decode
_decode_raw = msgspec.json.Decoder(_RawTelegram).decode
_decode_reading = msgspec.json.Decoder(WireReading).decode
_decode_envelope = msgspec.json.Decoder(_Envelope).decode
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Reject:
    """Something refused: the whole telegram (index None) or one of its readings; `at`, the time it is about
    (the reading's, or the whole telegram's `sent`), when it has one."""

    reason: str
    detail: str
    index: int | None = None
    at: int | None = None


class Decoded(msgspec.Struct, gc=False):
    """What one MQTT message yields."""

    unit: str | None
    readings: list[Reading] = []
    rejects: list[Reject] = []


# Texts a fleet repeats in every telegram (each unit's topic and meter serial, the times), checked once and
# remembered: a regular expression or a time's parser costs a third of a microsecond, a look-up a twentieth.
# Bounded: a memo is cleared whole when full, and a text longer than any valid one is never kept.
_MEMO_MAX = 150_000  # a fleet's topics and then some
_MEMO_TEXT = 96  # "smame/v1/" + a unit id of 64 + "/reading" is 81
_TOPIC_UNITS: dict[str, str | None] = {}
_METERS_OK: dict[str, bool] = {}


def _remember(memo: dict[str, Any], text: str, value: R) -> R:
    """Keep `value` for `text` in `memo` (within the bounds above); return it."""
    if len(text) <= _MEMO_TEXT:
        if len(memo) >= _MEMO_MAX:
            memo.clear()
        memo[text] = value
    return value


def unit_of_topic(topic: str) -> str | None:
    """The unit id of `.../{unit_id}/reading`, or None when the topic has no valid one."""
    if topic in _TOPIC_UNITS:
        return _TOPIC_UNITS[topic]
    parts = topic.split("/")
    if len(parts) < 2 or parts[-1] != "reading" or not UNIT_ID.fullmatch(parts[-2]):
        return _remember(_TOPIC_UNITS, topic, None)
    return _remember(_TOPIC_UNITS, topic, parts[-2])


def unit_of_status(topic: str) -> str | None:
    """The unit id of `.../{unit_id}/status`, or None when the topic has no valid one."""
    parts = topic.split("/")
    return parts[-2] if len(parts) >= 2 and parts[-1] == "status" and UNIT_ID.fullmatch(parts[-2]) else None


STATUS_MAX = 16  # bytes of a status message: `online` or `offline`, with room for white space


def decode_status(topic: str, payload: bytes, received: int, known_units: Container[str]) -> Status | Reject | None:
    """A message of a unit's status topic (`.../{unit_id}/status`): its connection state, a reason to refuse it,
    or None when there is nothing to keep (a unit the registry does not know, whose retained status comes at
    every subscription; an empty message, which clears a retained one)."""
    unit = unit_of_status(topic)
    if unit is None or unit not in known_units or not payload:
        return None
    if len(payload) > STATUS_MAX:
        return Reject(Reason.BAD_STATUS, f"{len(payload)} bytes, at most {STATUS_MAX}: online or offline")
    state = payload.strip()
    if state not in (b"online", b"offline"):
        return Reject(Reason.BAD_STATUS, f"{state.decode('utf-8', 'replace')!r} is neither online nor offline")
    return Status(unit, received, state == b"online")


def _meter_ok(meter: str) -> bool:
    if meter in _METERS_OK:
        return _METERS_OK[meter]
    return _remember(_METERS_OK, meter, METER_ID.fullmatch(meter) is not None)


def decode(topic: str, payload: bytes, received: int, known_units: Container[str], rules: Rules) -> Decoded:
    """Validate one telegram against the contract; never raises on bad input."""
    topic_unit = unit_of_topic(topic)
    if topic_unit is None:
        return _refused(None, Reason.BAD_TOPIC, f"topic {topic[:100]!r} is not smame/v1/<unit_id>/reading")
    if len(payload) > MAX_PAYLOAD:
        return _refused(topic_unit, Reason.TOO_LARGE, f"{len(payload)} bytes, limit {MAX_PAYLOAD}")
    try:
        try:
            t = _decode_fast(payload)
        except msgspec.DecodeError:
            return _slow_path(topic_unit, payload, received, known_units, rules)
    except RecursionError:  # msgspec skips unknown fields recursively: `{"x":[[[...]]]}` goes deeper than the stack
        return _refused(topic_unit, Reason.NOT_JSON, "JSON nested too deeply")
    sent = _instant(t.sent)
    items: list[_Item] = []
    for i, r in enumerate(t.readings):
        at = _instant(r.at)
        if at is None:
            break
        items.append((i, at[0], at[1], r.at, r.fwd, r.rev))
    if sent is None or len(items) < len(t.readings):  # a time that is no RFC 3339 instant with an offset
        return _slow_path(topic_unit, payload, received, known_units, rules)
    head = _check_head(t, True, topic_unit, known_units, rules)
    if head is not None:
        # (a telegram of an unknown version is not read further: nothing of it, its time neither)
        about = None if head.reason == Reason.UNKNOWN_VERSION else sent[0]
        return Decoded(topic_unit, [], [replace(head, at=about)])
    return _readings(t, sent[0], items, [], received, rules, _kept_diag(t.diag))


# A reading on its way through `_readings`: index, epoch seconds (None: the time has no UTC offset),
# microseconds, the time as given (for messages), fwd, rev.
_Item = tuple[int, int | None, int, "datetime | str", int, int | None]
_INSTANTS: dict[str, tuple[int, int] | None] = {}


def _instant(text: str) -> tuple[int, int] | None:
    """Epoch seconds and microseconds of an RFC 3339 time with a UTC offset (msgspec's parser, the one the
    typed decoders use), or None; remembered, as a fleet sends the same few hundred texts."""
    if text in _INSTANTS:
        return _INSTANTS[text]
    try:
        when = msgspec.convert(text, datetime)
        found = None if when.tzinfo is None else (int(when.timestamp()), when.microsecond)
    except (msgspec.ValidationError, ValueError, OverflowError):
        found = None
    return _remember(_INSTANTS, text, found)


def _shown(when: datetime | str) -> str:
    """A reading's time as messages show it (ISO 8601 of the parsed instant)."""
    return (when if isinstance(when, datetime) else msgspec.convert(when, datetime)).isoformat()


def _slow_path(topic_unit: str, payload: bytes, received: int, known_units: Container[str], rules: Rules) -> Decoded:
    # The fast decoder failed: find out why, and keep the readings that are good.
    try:
        envelope = _decode_envelope(payload)
    except msgspec.ValidationError:
        return _refused(topic_unit, Reason.NOT_OBJECT, "payload is JSON but not an object")
    except msgspec.DecodeError as exc:
        return _refused(topic_unit, Reason.NOT_JSON, str(exc))
    if envelope.v != VERSION:
        return _refused(topic_unit, Reason.UNKNOWN_VERSION, f"v={envelope.v!r}, expected {VERSION}")
    diag = _kept_diag(envelope.diag)
    try:
        raw = _decode_raw(payload)
    except msgspec.DecodeError as exc:
        return _refused(topic_unit, Reason.BAD_FIELD, str(exc))
    head = _check_head(raw, raw.sent.tzinfo is not None, topic_unit, known_units, rules)
    if head is not None:
        return Decoded(topic_unit, [], [replace(head, at=int(raw.sent.timestamp()) if raw.sent.tzinfo else None)])
    items: list[_Item] = []
    rejects: list[Reject] = []
    for i, item in enumerate(raw.readings):
        try:
            r = _decode_reading(item)
        except msgspec.DecodeError as exc:
            rejects.append(Reject(Reason.BAD_FIELD, f"readings[{i}]: {exc}", i))
            continue
        at = None if r.at.tzinfo is None else int(r.at.timestamp())
        items.append((i, at, r.at.microsecond, r.at, r.fwd, r.rev))
    return _readings(raw, int(raw.sent.timestamp()), items, rejects, received, rules, diag)


def _check_head(
    t: WireTelegram[Any] | _TextTimes, sent_has_offset: bool, topic_unit: str, known_units: Container[str], rules: Rules
) -> Reject | None:
    if t.v != VERSION:
        return Reject(Reason.UNKNOWN_VERSION, f"v={t.v!r}, expected {VERSION}")
    if t.unit != topic_unit:
        return Reject(Reason.UNIT_MISMATCH, f"unit {t.unit[:100]!r} published on the topic of {topic_unit!r}")
    if t.unit not in known_units:
        return Reject(Reason.UNKNOWN_UNIT, f"unit {t.unit!r} is not in the registry")
    if t.e1 not in E1_UNITS:
        return Reject(Reason.BAD_FIELD, f"e1={t.e1:#04x} is not an ECHONET unit code")
    if not 1 <= t.coef <= 999_999:
        return Reject(Reason.BAD_FIELD, f"coef={t.coef} outside 1..999999")
    if not 1 <= t.digits <= 8:
        return Reject(Reason.BAD_FIELD, f"digits={t.digits} outside 1..8")
    if not 0 <= t.seq < SEQ_LIMIT:
        return Reject(Reason.BAD_FIELD, f"seq={t.seq} outside 0..2^32-1")
    if not sent_has_offset:
        return Reject(Reason.BAD_TIME, "sent has no UTC offset")
    if not _meter_ok(t.meter):
        return Reject(
            Reason.BAD_FIELD, f"meter {t.meter[:80]!r} is not 1..64 of A-Z a-z 0-9 . _ - (a letter or digit first)"
        )
    if not 1 <= len(t.readings) <= rules.max_readings:
        return Reject(Reason.BAD_FIELD, f"{len(t.readings)} readings, expected 1..{rules.max_readings}")
    return None


def _kept_diag(raw: msgspec.Raw) -> bytes | None:
    """A telegram's `diag` as it is kept: the bytes the unit sent (None when it sent none or null), or
    DIAG_TOO_LARGE beyond DIAG_MAX bytes."""
    if len(raw) > DIAG_MAX:
        return DIAG_TOO_LARGE
    kept = bytes(raw)
    return kept if kept and kept != b"null" else None


def _readings(
    t: WireTelegram[Any] | _TextTimes,
    sent: int,
    items: list[_Item],
    rejects: list[Reject],
    received: int,
    rules: Rules,
    blob: bytes | None,
) -> Decoded:
    limit = 10**t.digits
    tolerance, on_boundary = rules.tolerance, rules.on_boundary
    horizon = received + tolerance
    oldest = received - rules.max_age
    # A unit clock running fast shows; a slow one cannot be told from time spent queued in the broker.
    skew_after = -1 if sent > horizon else sent + tolerance
    unit, meter, e1, coef, digits, seq = t.unit, t.meter, t.e1, t.coef, t.digits, t.seq
    out: list[Reading] = []
    # the telegram's diag goes with its newest reading (none if that one is refused)
    newest = -1
    if blob is not None:
        for item in items:  # (a loop: a generator over the items costs a microsecond a telegram)
            if item[1] is not None and item[1] > newest:
                newest = item[1]
    for i, at, micro, when, fwd, rev in items:
        if at is None:
            rejects.append(Reject(Reason.BAD_TIME, f"readings[{i}].at has no UTC offset", i))
            continue
        # The window first: the grid cannot place years 1 or 9999, and a reading from long ago would pair with
        # the unit's last one across a gap the size of the ages.
        if at > horizon:
            rejects.append(Reject(Reason.FUTURE, f"readings[{i}].at {_shown(when)} is in the future", i, at))
            continue
        if at < oldest:
            rejects.append(
                Reject(
                    Reason.TOO_OLD,
                    f"readings[{i}].at {_shown(when)} is older than {rules.max_age // 86400} days",
                    i,
                    at,
                )
            )
            continue
        if micro or not on_boundary(at):
            rejects.append(Reject(Reason.BAD_TIME, f"readings[{i}].at {_shown(when)} is not on a half hour", i, at))
            continue
        if fwd != NO_DATA and not 0 <= fwd < limit:
            rejects.append(Reject(Reason.OUT_OF_RANGE, f"readings[{i}].fwd outside 0..10^{digits}-1", i, at))
            continue
        if rev is not None and rev != NO_DATA and not 0 <= rev < limit:
            rejects.append(Reject(Reason.OUT_OF_RANGE, f"readings[{i}].rev outside 0..10^{digits}-1", i, at))
            continue
        out.append(
            Reading(
                unit,
                at,
                meter,
                None if fwd == NO_DATA else fwd,  # the meter had no value
                None if rev == NO_DATA else rev,
                e1,
                coef,
                digits,
                seq,
                sent,
                _SKEW if at > skew_after else 0,
                blob if at == newest else None,
            )
        )
    return Decoded(unit, out, rejects)


def _refused(unit: str | None, reason: str, detail: str) -> Decoded:
    return Decoded(unit, [], [Reject(reason, detail)])


def encode(telegram: WireTelegram[Any]) -> bytes:
    """Serialise a telegram as compact JSON (the simulator's and tests' only writer)."""
    return _encode(telegram)

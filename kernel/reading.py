"""A reading as everything after the decoder handles it, and input refused with its reason (pure data).

The broker bridge makes them from telegrams, the writer process receives them (array-like msgpack), the
aggregator stores them and the monitor counts the reasons."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Annotated

import msgspec

KEEP = 4096  # bytes of a refused payload kept in the quarantine; the rest is named by its size and hash


class Reason:
    """Why a telegram or one of its readings was quarantined (stable strings: metrics and reports use them)."""

    TOO_LARGE = "too_large"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    UNKNOWN_VERSION = "unknown_version"
    BAD_FIELD = "bad_field"
    BAD_TOPIC = "bad_topic"
    UNIT_MISMATCH = "unit_mismatch"
    UNKNOWN_UNIT = "unknown_unit"
    BAD_TIME = "bad_time"
    OUT_OF_RANGE = "out_of_range"
    FUTURE = "future"
    TOO_OLD = "too_old"
    CONFLICT = "conflict"  # decided by the store: same (unit, at), other values
    BAD_STATUS = "bad_status"  # a status message that is neither `online` nor `offline`
    INTERNAL = "internal"  # decoding failed in a way it never should: a bug, kept with the telegram that found it


REASONS = sorted(v for k, v in vars(Reason).items() if k.isupper())


# `fw` and `cell` are further held to DIAG_NAME and DIAG_CELL by `read_diag`, which remembers the few texts a
# fleet sends (a regular expression at every decode would cost more than the rest of the diag)
_Text = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
DIAG_NAME = re.compile(r"[A-Za-z0-9._+-]{1,32}")
DIAG_CELL = re.compile(r"[A-Za-z0-9-]{1,32}")
_Count = Annotated[int, msgspec.Meta(ge=0, le=2**53)]  # (a counter beyond 2^53 is no real one)
# Bytes of a unit's `diag` kept as it sent it: every field at its longest is under 300, so a unit may add fields of
# a later version. A larger one is kept as DIAG_TOO_LARGE, which `read_diag` counts as one field dropped.
DIAG_MAX = 1024
DIAG_TOO_LARGE = b'"too large"'


class Diag(msgspec.Struct, frozen=True, gc=False, omit_defaults=True, forbid_unknown_fields=False):
    """A unit's diagnostics from one telegram (telegram v1's optional `diag`, health.md), as `read_diag` makes
    them: each field checked (type, range, pattern), None where absent or dropped. `dropped` counts the fields
    that were present but wrong: they are left out, the telegram's readings were taken all the same."""

    fw: _Text | None = None  # firmware version (DIAG_NAME)
    rsrp: Annotated[int, msgspec.Meta(ge=-140, le=-44)] | None = None  # dBm
    rsrq: Annotated[float, msgspec.Meta(ge=-20, le=-3)] | None = None  # dB
    sinr: Annotated[float, msgspec.Meta(ge=-20, le=40)] | None = None  # dB
    ce: Annotated[int, msgspec.Meta(ge=0, le=2)] | None = None  # LTE-M coverage enhancement level
    cell: _Text | None = None  # serving cell id (DIAG_CELL)
    boot: _Count | None = None  # reboots since manufacture
    up: _Count | None = None  # seconds since the last boot
    vsup: Annotated[int, msgspec.Meta(ge=0, le=30000)] | None = None  # supply voltage, mV
    att: _Count | None = None  # network attach attempts since the previous telegram
    dropped: int = 0  # set by `read_diag`: a unit that sends it is read field by field, which ignores it


DIAG_FIELDS = tuple(f for f in Diag.__struct_fields__ if f != "dropped")
_diag_json = msgspec.json.Decoder(Diag).decode
_diag_msgpack = msgspec.msgpack.Decoder(Diag).decode


def read_diag(kept: bytes) -> Diag:
    """A unit's `diag` as kept with its reading (`Reading.diag`), each field checked: the good fields, and in
    `dropped` how many were present but wrong (one for a `diag` that is no JSON object, or was too large to keep).

    Ingest keeps the `diag` as the unit sent it and checks nothing of it (the cost of a telegram is what limits
    a restart's drain); it is checked here, where the health records are made of it. A `diag` kept by an earlier
    version as msgpack (its first byte is no JSON's), checked when it was kept, is read as it is."""
    if len(kept) and kept[0] >= 0x80:  # (by index: a store may hand a memoryview)
        try:
            return _diag_msgpack(kept)
        except msgspec.DecodeError:
            return Diag(dropped=1)
    try:
        diag = _diag_json(kept)
    except (msgspec.DecodeError, RecursionError):  # a field out of its range, no object: read field by field
        return _field_by_field(kept)
    if diag.dropped or not (_fits(DIAG_NAME, diag.fw) and _fits(DIAG_CELL, diag.cell)):  # (`dropped` is not its say)
        return _field_by_field(kept)
    return diag


def _field_by_field(kept: bytes) -> Diag:
    """The good fields of a `diag` the typed decoder refused, and how many were wrong."""
    try:
        value = msgspec.json.decode(kept)
    except (msgspec.DecodeError, RecursionError):  # (ingest keeps JSON values only: a store altered by hand)
        return Diag(dropped=1)
    if not isinstance(value, dict):
        return Diag(dropped=1)
    good: dict[str, object] = {}
    for name in DIAG_FIELDS:
        if name in value:
            try:
                one = msgspec.convert({name: value[name]}, Diag)
            except msgspec.ValidationError:
                continue
            if _fits(DIAG_NAME, one.fw) and _fits(DIAG_CELL, one.cell):
                good[name] = value[name]
    wrong = sum(1 for name in DIAG_FIELDS if name in value) - len(good)
    return msgspec.structs.replace(msgspec.convert(good, Diag), dropped=wrong)


@functools.lru_cache(maxsize=4096)
def _fits(pattern: re.Pattern[str], text: str | None) -> bool:
    """Whether `text` (None: absent) is all of `pattern`; remembered, as a fleet sends few firmware names and cells."""
    return text is None or pattern.fullmatch(text) is not None


class Reading(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """One validated fixed-time reading; None in a register means the meter had no value.

    Array-like: it crosses to the writer process as a msgpack array, not a map of field names."""

    unit: str
    at: int
    meter: str
    fwd: int | None
    rev: int | None
    e1: int
    coef: int
    digits: int
    seq: int
    sent: int
    flags: int = 0
    diag: bytes | None = None  # the telegram's `diag` as the unit sent it (`read_diag`), on its newest reading only


class Status(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """A unit's connection as its retained status topic says it (`online`, or `offline`: its last will), with
    the time it was received."""

    unit: str
    at: int
    online: bool


class Incoming(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """A valid reading with the message it came in."""

    reading: Reading
    received: int
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    """Input to keep in quarantine, with its reason."""

    received: int
    topic: str
    unit: str | None
    reason: str
    detail: str
    payload: bytes
    concerns: int | None = None  # the time of the reading (or telegram) it is about, when it has one

    @classmethod
    def of(
        cls,
        received: int,
        topic: str,
        unit: str | None,
        reason: str,
        detail: str,
        payload: bytes,
        concerns: int | None = None,
    ) -> Refused:
        """Refused input with a bounded excerpt: at most KEEP bytes of the payload (and of the topic), the rest
        named by its size and SHA-256, so that no refusal costs the store more than a few kilobytes."""
        if len(payload) > KEEP:
            digest = hashlib.sha256(payload).hexdigest()
            detail = f"{detail} [payload {len(payload)} bytes, sha256 {digest}, first {KEEP} kept]"
            payload = payload[:KEEP]
        return cls(received, topic[:256], unit, reason, detail[:1024], payload, concerns)

"""A reading as everything after the decoder handles it, and input refused with its reason (pure data).

The broker bridge makes them from telegrams, the writer process receives them (array-like msgpack), the
aggregator stores them and the monitor counts the reasons."""

from __future__ import annotations

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


# `fw` and `cell` are further held to DIAG_NAME and DIAG_CELL by the decoder, which remembers the few texts a
# fleet sends (a regular expression at every decode would cost more than the rest of the diag)
_Text = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
DIAG_NAME = re.compile(r"[A-Za-z0-9._+-]{1,32}")
DIAG_CELL = re.compile(r"[A-Za-z0-9-]{1,32}")
_Count = Annotated[int, msgspec.Meta(ge=0, le=2**53)]  # (a counter beyond 2^53 is no real one)


class Diag(msgspec.Struct, frozen=True, gc=False, omit_defaults=True, forbid_unknown_fields=False):
    """A unit's diagnostics from one telegram (telegram v1's optional `diag`, health.md): each field checked as
    it is decoded (type, range, pattern); None where absent or dropped. `dropped` counts the fields that were
    present but wrong: they are left out, the telegram's readings are taken all the same."""

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
    dropped: int = 0  # set by the decoder: a unit that sends it is decoded field by field, which ignores it


DIAG_FIELDS = tuple(f for f in Diag.__struct_fields__ if f != "dropped")


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
    diag: bytes | None = None  # the telegram's `Diag` as kept (msgpack), on its newest reading only


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

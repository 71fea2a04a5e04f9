"""Commands to units and their answers (devices.md): the wire, the arguments of each operation and the states a
command goes through (pure: no clock, no I/O).

smame publishes `{"v":1,"id":...,"op":...,"args":{...},"expires":"<ISO>"}` on `smame/v1/{unit}/cmd`; the unit
answers on `smame/v1/{unit}/res` with `{"v":1,"id":...,"status":...,"detail":...,"state":{...}}`. A unit carries
out a command id at most once, so a command sent again keeps its id.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec

from kernel.meter import UNIT_ID
from kernel.reading import DIAG_NAME
from kernel.registry import Registry

VERSION = 1
OPS = ("ping", "reboot", "set", "resend", "fw")
COMMAND_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
ANSWER_MAX = 4096  # bytes of a unit's answer; a larger one is refused, not read
DETAIL_MAX = 500  # characters of an answer's detail that are kept
STATE_MAX = 2048  # bytes of an answer's `state` that are kept (its JSON as the unit sent it)
INTERVALS = (1, 5, 10, 15, 30, 60)  # reporting intervals a unit may be set to, minutes
RESEND_MAX_S = 31 * 86400  # the longest range one `resend` may ask for
FW_MAX_BYTES = 64 * 1024 * 1024
_BROKER = re.compile(r"mqtts?://[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?")
_URL = re.compile(r"https?://[!-~]{1,500}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class State:
    """Where a command stands (stable strings: the store, the API and the console use them)."""

    QUEUED = "queued"  # in the store, not yet taken by the broker for the unit
    SENT = "sent"  # the broker took it for the unit's session
    ACCEPTED = "accepted"  # the unit took it (a reboot ends here; a firmware update goes on)
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"  # the unit would not (bad arguments for it, busy)
    EXPIRED = "expired"  # no answer before its expiry
    CANCELLED = "cancelled"  # withdrawn by an operator before it was sent


STATES = (
    State.QUEUED, State.SENT, State.ACCEPTED, State.DONE, State.FAILED, State.REJECTED, State.EXPIRED, State.CANCELLED
)  # fmt: skip
FINAL = frozenset({State.DONE, State.FAILED, State.REJECTED, State.EXPIRED, State.CANCELLED})
ANSWERS = (State.ACCEPTED, State.DONE, State.FAILED, State.REJECTED)
# The states an answer may move a command from. An answer the unit sent after the command's expiry still says what
# it did, and wins; an `accepted` that arrives after the unit's final answer changes nothing.
ANSWERABLE = {
    State.ACCEPTED: (State.QUEUED, State.SENT, State.EXPIRED),
    **dict.fromkeys(
        (State.DONE, State.FAILED, State.REJECTED), (State.QUEUED, State.SENT, State.ACCEPTED, State.EXPIRED)
    ),
}


class CommandError(ValueError):
    """An operator's command that cannot be sent; the message says what to fix."""


class SetArgs(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    interval_min: int | None = None
    brokers: list[str] | None = None
    diag_every: Annotated[int, msgspec.Meta(ge=0, le=48)] | None = None


CONFIG_KEYS = SetArgs.__struct_fields__  # a unit's configuration: what `set` sets and answers report


def reported_config(state: str) -> dict[str, Any] | None:
    """The configuration a unit reported in an answer's `state` (its JSON text): those of CONFIG_KEYS it holds
    with values `set` would take, and its firmware version `fw`; None when it holds none (or is no JSON object)."""
    try:
        decoded = msgspec.json.decode(state) if state else None
    except msgspec.DecodeError:
        return None
    if not isinstance(decoded, dict):
        return None
    out = {}
    for key in CONFIG_KEYS:
        if key in decoded:
            try:
                out[key] = check_args("set", {key: decoded[key]})[key]
            except CommandError:
                continue  # a value smame would never ask for: not a configuration it can compare
    fw = decoded.get("fw")
    if isinstance(fw, str) and DIAG_NAME.fullmatch(fw):
        out["fw"] = fw  # not configuration (never wanted, never set), but what campaigns judge by
    return out or None


class ResendArgs(msgspec.Struct, forbid_unknown_fields=True, rename={"start": "from", "end": "to"}):
    start: datetime
    end: datetime


class FwArgs(msgspec.Struct, forbid_unknown_fields=True):
    version: str
    url: str
    sha256: str
    size: Annotated[int, msgspec.Meta(ge=1, le=FW_MAX_BYTES)]


def check_args(op: str, args: dict[str, Any]) -> dict[str, Any]:
    """The arguments of `op` as they are sent (brokers given as one comma-separated text made a list); raises
    CommandError naming what is wrong."""
    if op not in OPS:
        raise CommandError(f"unknown operation {op!r}: one of {', '.join(OPS)}")
    if op in ("ping", "reboot"):
        if args:
            raise CommandError(f"{op} takes no arguments (got {', '.join(sorted(args))})")
        return {}
    if op == "set":
        if isinstance(args.get("brokers"), str):
            args = {**args, "brokers": [b.strip() for b in args["brokers"].split(",") if b.strip()]}
        s = _convert(args, SetArgs, op)
        if s.interval_min is None and s.brokers is None and s.diag_every is None:
            raise CommandError("set needs at least one of interval_min, brokers, diag_every")
        if s.interval_min is not None and s.interval_min not in INTERVALS:
            raise CommandError(f"interval_min {s.interval_min}: one of {', '.join(map(str, INTERVALS))}")
        if s.brokers is not None:
            if not 1 <= len(s.brokers) <= 4:
                raise CommandError(f"brokers: 1 to 4 addresses, not {len(s.brokers)}")
            bad = [b for b in s.brokers if not _BROKER.fullmatch(b)]
            if bad:
                raise CommandError(f"brokers: {bad[0]!r} is no mqtt://host:port or mqtts://host:port")
        out: dict[str, Any] = msgspec.to_builtins(s)
        return out
    if op == "resend":
        r = _convert(args, ResendArgs, op)
        if r.start.tzinfo is None or r.end.tzinfo is None:
            raise CommandError("resend: from and to need their offset (2026-12-01T00:00:00+09:00)")
        if not 0 < (r.end - r.start).total_seconds() <= RESEND_MAX_S:
            raise CommandError(f"resend: from must lie before to, at most {RESEND_MAX_S // 86400} days before")
        return {"from": r.start.isoformat(), "to": r.end.isoformat()}
    f = _convert(args, FwArgs, op)
    if not DIAG_NAME.fullmatch(f.version):
        raise CommandError(f"fw: version {f.version!r} is not [A-Za-z0-9._+-]{{1,32}}")
    if not _URL.fullmatch(f.url):
        raise CommandError("fw: url must be an http(s) URL of printable characters")
    if not _SHA256.fullmatch(f.sha256):
        raise CommandError("fw: sha256 must be 64 lowercase hex digits")
    return {"version": f.version, "url": f.url, "sha256": f.sha256, "size": f.size}


def targets(registry: Registry, units: Sequence[str], customer: str | None) -> list[str]:
    """The units a command goes to: the listed ones (each once, in order) or every unit of `customer`; raises
    CommandError naming a unit or customer the registry does not have, or an empty target."""
    if customer is not None:
        if customer not in registry.customers:
            raise CommandError(f"customer {customer!r} is not in the registry")
        chosen = [u.id for u in registry.units_of(customer)]
    else:
        unknown = [u for u in units if u not in registry.units]
        if unknown:
            raise CommandError(f"unit {unknown[0][:64]!r} is not in the registry")
        chosen = list(dict.fromkeys(units))
    if not chosen:
        raise CommandError("no unit to send it to")
    return chosen


def _convert(args: dict[str, Any], kind: type[Any], op: str) -> Any:
    try:
        return msgspec.convert(args, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise CommandError(f"{op}: {exc}") from None


def parse_arg_pairs(pairs: list[str]) -> dict[str, Any]:
    """`key=value` texts (from a command line) as arguments: a value that reads as JSON is taken as such (numbers,
    lists), any other as text. Raises CommandError for a pair without `=`."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise CommandError(f"argument {pair!r}: write it as key=value")
        try:
            out[key] = msgspec.json.decode(value)
        except msgspec.DecodeError:
            out[key] = value
    return out


def command_payload(command_id: str, op: str, args: dict[str, Any], expires: int) -> bytes:
    """The `cmd` message of a command."""
    stamp = datetime.fromtimestamp(expires, UTC).isoformat().replace("+00:00", "Z")
    return msgspec.json.encode({"v": VERSION, "id": command_id, "op": op, "args": args, "expires": stamp})


def cmd_topic(unit: str) -> str:
    return f"smame/v1/{unit}/cmd"


def res_topic(unit: str) -> str:
    return f"smame/v1/{unit}/res"


def unit_of_answer(topic: str) -> str | None:
    """The unit of a `smame/v1/{unit}/res` topic; None for any other."""
    parts = topic.split("/")
    if len(parts) == 4 and parts[0] == "smame" and parts[1] == "v1" and parts[3] == "res":
        return parts[2] if UNIT_ID.fullmatch(parts[2]) else None
    return None


class _Answer(msgspec.Struct, forbid_unknown_fields=False):
    v: int
    id: str
    status: str
    detail: str = ""
    state: msgspec.Raw = msgspec.Raw(b"null")


class Answer(msgspec.Struct, frozen=True):
    """A unit's answer to a command, read and checked: `state` is the JSON object it sent, as its text ("" when
    none)."""

    unit: str
    id: str
    status: str
    detail: str
    state: str


_decode_answer = msgspec.json.Decoder(_Answer).decode


class AnswerRefused(msgspec.Struct, frozen=True):
    """A message on a unit's answer topic that is no answer: `reason` one of REFUSALS (a metric's label), `detail`
    the particulars."""

    reason: str
    detail: str


REFUSALS = ("bad_topic", "too_large", "not_answer", "unknown_version", "bad_id", "unknown_status")


def read_answer(topic: str, payload: bytes) -> Answer | AnswerRefused:
    """A `res` message as an Answer, or why it is refused (never raises)."""
    unit = unit_of_answer(topic)
    if unit is None:
        return AnswerRefused("bad_topic", f"not a unit's answer topic: {topic[:100]!r}")
    if len(payload) > ANSWER_MAX:
        return AnswerRefused("too_large", f"{len(payload)} bytes, over the {ANSWER_MAX} an answer may have")
    try:
        a = _decode_answer(payload)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return AnswerRefused("not_answer", f"not an answer: {str(exc)[:200]}")
    if a.v != VERSION:
        return AnswerRefused("unknown_version", f"unknown version {a.v}")
    if not COMMAND_ID.fullmatch(a.id):
        return AnswerRefused("bad_id", "the command id is not [A-Za-z0-9_-]{1,64}")
    if a.status not in ANSWERS:
        return AnswerRefused("unknown_status", f"unknown status {a.status[:32]!r}: one of {', '.join(ANSWERS)}")
    # a NUL is valid JSON text but no PostgreSQL text: it would fail the store, and the answer would come back
    detail = a.detail[:DETAIL_MAX].replace("\x00", "")
    return Answer(unit, a.id, a.status, detail, _kept_state(bytes(a.state)))


_NOT_KEPT = '"not kept: not a JSON object of UTF-8 text, or too large"'


def _kept_state(raw: bytes) -> str:
    """An answer's `state` as it is kept: the object's text as the unit sent it, "" for none. The decoder only
    skipped over it, so it is read here: text that is no UTF-8 (which the store could not take) or no object is
    replaced by a note saying so, and the answer itself still counts."""
    if raw == b"null":
        return ""
    if len(raw) > STATE_MAX or not raw.startswith(b"{"):
        return _NOT_KEPT
    try:
        msgspec.json.decode(raw)
        return raw.decode()
    except (msgspec.DecodeError, UnicodeDecodeError):
        return _NOT_KEPT

"""Firmware campaigns (devices.md): how a campaign runs its units, pure (no clock, no I/O).

A campaign updates its target units to one firmware image, a wave at a time (cumulative shares of the units, for
example 1%, 10%, 50%, 100%: a wave starts once every unit of the waves before it has ended) or at a rate (units
started a minute). Each unit started is sent one `fw` command; its outcome is its command's answer, or, when the
unit's answer is lost (it rebooted mid-install), the version it reports. A unit that has not ended within the
campaign's timeout is judged by the version it reports then. The campaign aborts by itself once at least
`abort_min` units have ended and more than `abort_share` of them failed (AWS IoT Jobs' rule); it is done when
every unit has ended.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kernel.commands import CommandError, State

CAMPAIGN_ID = re.compile(r"[a-z0-9]{1,32}")
STAGES = ("download", "verify", "install", "boot")  # where a unit's update failed, as the unit says
MAX_WAVES = 10


class Phase:
    """Where a campaign stands (stable strings: the store, the console and the API use them)."""

    RUNNING = "running"
    PAUSED = "paused"  # no unit is started; those started go on
    CANCELLED = "cancelled"  # by an operator: no unit is started any more
    ABORTED = "aborted"  # by itself: too many failures
    DONE = "done"  # every unit ended


PHASES = (Phase.RUNNING, Phase.PAUSED, Phase.CANCELLED, Phase.ABORTED, Phase.DONE)
ENDED_PHASES = frozenset({Phase.CANCELLED, Phase.ABORTED, Phase.DONE})


class Step:
    """Where one unit of a campaign stands."""

    PENDING = "pending"  # not started yet
    SENT = "sent"  # its `fw` command is queued or with the unit
    UPDATING = "updating"  # the unit accepted it and is downloading or installing
    DONE = "done"  # it reports the campaign's version
    FAILED = "failed"  # it said so (with the stage), refused, or still reports another version after the timeout
    SKIPPED = "skipped"  # never started: the campaign was cancelled or aborted first


STEPS = (Step.PENDING, Step.SENT, Step.UPDATING, Step.DONE, Step.FAILED, Step.SKIPPED)
ENDED_STEPS = frozenset({Step.DONE, Step.FAILED, Step.SKIPPED})
STARTED = (Step.SENT, Step.UPDATING)


@dataclass(frozen=True, slots=True)
class Plan:
    """How a campaign starts its units: cumulative wave shares in percent (ending at 100), or units a minute
    (`rate` > 0, no waves); how long a unit may take; when it aborts."""

    waves: tuple[float, ...] = (100.0,)
    rate: int = 0
    timeout_s: int = 3600
    abort_share: float = 0.1
    abort_min: int = 10


def check_plan(waves: Sequence[float], rate: int, timeout_s: int, abort_share: float, abort_min: int) -> Plan:
    """A campaign's plan, checked; raises CommandError naming what is wrong."""
    if rate < 0 or rate > 100_000:
        raise CommandError("rate: units a minute, 1 to 100000 (0: by waves)")
    if rate == 0:
        if not 1 <= len(waves) <= MAX_WAVES:
            raise CommandError(f"waves: 1 to {MAX_WAVES} shares in percent, such as 1,10,50,100")
        if any(not 0 < w <= 100 for w in waves) or list(waves) != sorted(set(waves)) or waves[-1] != 100:
            raise CommandError("waves: rising shares in percent, each over 0, the last 100 (1,10,50,100)")
    if not 5 <= timeout_s <= 30 * 86400:
        raise CommandError("timeout: 5 s to 30 days a unit")
    if not 0 < abort_share <= 1 or math.isnan(abort_share):
        raise CommandError("abort share: over 0 and at most 1 (0.1: abort when more than 10% failed)")
    if not 1 <= abort_min <= 1_000_000:
        raise CommandError("abort minimum: at least 1 unit ended before the share is judged")
    return Plan(tuple(waves) if rate == 0 else (), rate, timeout_s, abort_share, abort_min)


def wave_sizes(plan: Plan, units: int) -> list[int]:
    """How many units the waves hold together, wave by wave (cumulative; the last is every unit); at least one
    unit a wave, so a 1% wave of 50 units still tries one."""
    if plan.rate:
        return [units]
    out: list[int] = []
    for share in plan.waves:
        n = min(units, max(1, math.ceil(units * share / 100)))
        if not out or n > out[-1]:
            out.append(n)
    return out


def wave_of(index: int, sizes: Sequence[int]) -> int:
    """The wave (0-based) of the unit at `index` in the campaign's order."""
    return next(w for w, n in enumerate(sizes) if index < n)


def to_start(plan: Plan, sizes: Sequence[int], total: int, begun: int, open_: int, started_last_minute: int) -> int:
    """How many pending units to start now (the next ones in the campaign's order; `begun` of `total` were,
    `open_` of them have not ended): at a rate, what the minute has room for; by waves, the next wave once every
    unit of the waves before it has ended."""
    pending = total - begun
    if pending <= 0:
        return 0
    if plan.rate:
        return min(pending, max(0, plan.rate - started_last_minute))
    wave = wave_of(begun, sizes)
    before = sizes[wave - 1] if wave else 0
    if begun > before or open_:
        return 0  # the wave has begun, or one before it has not ended (units are started in order)
    return sizes[wave] - begun


def should_abort(plan: Plan, counts: Mapping[str, int]) -> str:
    """Why the campaign aborts ("" when it goes on): more than `abort_share` of the ended units failed, once at
    least `abort_min` have ended."""
    failed = counts.get(Step.FAILED, 0)
    ended = counts.get(Step.DONE, 0) + failed
    if ended < plan.abort_min or failed <= plan.abort_share * ended:
        return ""
    return f"{failed} of {ended} units ended failed, over {plan.abort_share:.0%} (judged once {plan.abort_min} ended)"


def outcome(state: str, answer_fw: str | None, detail: str, version: str) -> tuple[str, str] | None:
    """A started unit's step from its `fw` command's state and answer: (step, stage) when it ended, ("updating",
    "") when it took the command, None when it did not answer yet. A `done` that reports another version is a
    failure to boot (its new firmware did not come up); a `failed` names its stage in its detail."""
    if state == State.ACCEPTED:
        return Step.UPDATING, ""
    if state == State.DONE:
        return (Step.DONE, "") if answer_fw == version else (Step.FAILED, "boot")
    if state == State.FAILED:
        said = detail.split(":", 1)[0].strip().lower()
        return Step.FAILED, said if said in STAGES else "unknown"
    if state in (State.REJECTED, State.CANCELLED):
        return Step.FAILED, state
    return None


def unit_token(secret: str, campaign: str, unit: str) -> str:
    """The part of a unit's download URL that only the campaign's secret makes: no other unit, and nobody
    without the secret, can name it."""
    mac = hmac.new(secret.encode(), f"{campaign}/{unit}".encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


def download_path(campaign: str, unit: str, token: str) -> str:
    """Where a unit of a campaign fetches the image on smame's web server."""
    return f"/fw/{campaign}/{unit}/{token}.bin"

"""Firmware campaigns (devices.md, `kernel.firmware`): made from an image and a target, and moved on by the
leader's pass: the started units judged by their answers or the version they report, the campaign aborted or
done when its rule says so, the next units started with one `fw` command each.

A unit fetches the image from smame's web server at a URL of its own (`kernel.firmware.download_path`): only the
campaign's units can name theirs. A unit whose answer is lost (it rebooted mid-install) or that has not ended
within the campaign's timeout is asked its version once with a `ping`, and judged by it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from aggregator.store import CampaignRow, OpenUnit, Store, new_command
from kernel.commands import FINAL, CommandError, State
from kernel.firmware import (
    CAMPAIGN_ID,
    ENDED_STEPS,
    Phase,
    Plan,
    Step,
    download_path,
    outcome,
    should_abort,
    to_start,
    unit_token,
    wave_sizes,
)
from kernel.registry import Registry

PROBE_S = 600  # how long a unit is given to say its version once its update's outcome is unknown
BURST = 1000  # units started a pass at most (the commands' rate spreads them further)
HEALTH_DAYS = 7  # a unit's firmware, for a campaign's target by version: its newest of these days' health records


def who_of(campaign_id: str) -> str:
    """Who asks for a campaign's commands, in their rows and the audit log."""
    return f"smame:campaign {campaign_id}"


def plan_text(plan: Plan) -> str:
    return json.dumps(
        {
            "waves": list(plan.waves),
            "rate": plan.rate,
            "timeout_s": plan.timeout_s,
            "abort_share": plan.abort_share,
            "abort_min": plan.abort_min,
        },
        separators=(",", ":"),
    )


def read_plan(text: str) -> Plan:
    p = json.loads(text)
    return Plan(tuple(p["waves"]), p["rate"], p["timeout_s"], p["abort_share"], p["abort_min"])


def versions_of(store: Store, now: int) -> dict[str, str]:
    """Each unit's firmware as last known: its newest health record's over the last days, overridden by what it
    reported in an answer since."""
    out = {u: fw for u, _, fw, *_ in store.newest_health(now - HEALTH_DAYS * 86400) if fw}
    for unit, (config, _) in store.reported().items():
        fw = json.loads(config).get("fw")
        if fw:
            out[unit] = fw
    return out


def targets_of(store: Store, registry: Registry, target: Mapping[str, Any], now: int) -> list[str]:
    """The units a target names: {"customer": C}, {"from_version": V} (units last known on V) or {"units": [...]};
    raises CommandError naming what is unknown or empty."""
    if "customer" in target:
        if target["customer"] not in registry.customers:
            raise CommandError(f"customer {str(target['customer'])[:64]!r} is not in the registry")
        units = [u.id for u in registry.units_of(target["customer"])]
    elif "from_version" in target:
        versions = versions_of(store, now)
        units = sorted(u for u in registry.units if versions.get(u) == target["from_version"])
    else:
        unknown = [u for u in target.get("units", []) if u not in registry.units]
        if unknown:
            raise CommandError(f"unit {str(unknown[0])[:64]!r} is not in the registry")
        units = list(dict.fromkeys(target.get("units", [])))
    if not units:
        raise CommandError("the target holds no unit")
    return units


def create_campaign(
    store: Store,
    registry: Registry,
    version: str,
    target: Mapping[str, Any],
    plan: Plan,
    now: int,
    who: str,
    origin: str,
    name: str = "",
) -> CampaignRow:
    """Make a campaign of `version` for the target's units in a spread order (so that a wave is a sample of the
    fleet, not one customer); raises CommandError naming what is wrong (on the store's thread)."""
    image = next((f for f in store.firmwares() if f[0] == version), None)
    if image is None:
        raise CommandError(f"no firmware {version!r} is kept: add it first (smame firmware add)")
    units = targets_of(store, registry, target, now)
    campaign_id = secrets.token_hex(8)
    assert CAMPAIGN_ID.fullmatch(campaign_id)
    units.sort(key=lambda u: hashlib.sha256(f"{campaign_id}/{u}".encode()).digest())
    row = CampaignRow(
        campaign_id,
        name[:100] or f"{version} for {json.dumps(dict(target))[:60]}",
        version,
        image[1],
        image[2],
        json.dumps(dict(target), separators=(",", ":")),
        plan_text(plan),
        Phase.RUNNING,
        secrets.token_hex(16),
        now,
        who,
        origin,
        now,
        "",
        len(units),
    )
    store.add_campaign(row, units)
    return row


def campaign_pass(store: Store, now: int, base_url: str, expiry_probe_s: int = PROBE_S) -> list[str]:
    """Move every running or paused campaign on (on the store's thread); what happened, in words, for the log."""
    said = []
    for c in store.running_campaigns():
        plan = read_plan(c.plan)
        store.campaign_steps(c.id, _judged(store, c, store.campaign_open(c.id), plan, now, expiry_probe_s), now)
        counts = store.campaign_counts(c.id)
        why = should_abort(plan, counts)
        if why:
            store.set_campaign_phase(c.id, Phase.ABORTED, (Phase.RUNNING, Phase.PAUSED), now, why, "smame", "")
            said.append(f"campaign {c.id} aborted: {why}")
            continue
        pending, open_ = counts.get(Step.PENDING, 0), counts.get(Step.SENT, 0) + counts.get(Step.UPDATING, 0)
        if not pending and not open_:
            ended = f"{counts.get(Step.DONE, 0)} of {c.total} units on {c.version}"
            store.set_campaign_phase(c.id, Phase.DONE, (Phase.RUNNING, Phase.PAUSED), now, ended, "smame", "")
            said.append(f"campaign {c.id} done: {ended}")
            continue
        if c.phase != Phase.RUNNING:
            continue
        if not base_url:
            said.append(f"campaign {c.id}: no unit started: devices.firmware_url is not set")
            continue
        recent = store.campaign_started_since(c.id, now - 60) if plan.rate else 0
        n = to_start(plan, wave_sizes(plan, c.total), c.total, c.total - pending, open_, recent)
        if n <= 0:
            continue
        started = []
        for seq, unit in store.campaign_pending(c.id, min(n, BURST)):
            url = base_url.rstrip("/") + download_path(c.id, unit, unit_token(c.secret, c.id, unit))
            args = {"version": c.version, "url": url, "sha256": c.sha256, "size": c.size}
            text = json.dumps(args, separators=(",", ":"))
            started.append(
                (seq, new_command(unit, "fw", text, now, now + plan.timeout_s, f"smame:campaign {c.id}", ""))
            )
        store.start_campaign_units(c.id, started)
        said.append(f"campaign {c.id}: {len(started)} units started")
    return said


def _judged(
    store: Store, c: CampaignRow, units: Sequence[OpenUnit], plan: Plan, now: int, probe_s: int
) -> list[tuple[int, str, str, str]]:
    """The started units' new steps: (seq, step, stage, detail) of those that moved on."""
    out = []
    for u in units:
        got = outcome(u.state, _fw(u.answer), u.detail, c.version)
        if got is not None and got[0] in ENDED_STEPS:
            out.append((u.seq, got[0], got[1], u.detail))
            continue
        reported = store.reported_of(u.unit)
        fw = json.loads(reported[0]).get("fw") if reported and reported[1] >= u.started else None
        if fw == c.version:  # its answer lost (a reboot mid-install), its version says it
            out.append((u.seq, Step.DONE, "", f"reports {fw}"))
        elif u.state in (State.EXPIRED, "") or now - u.started >= plan.timeout_s:
            if not u.probe:  # asked its version once; judged when it answers or the question lapses
                probe = new_command(u.unit, "ping", "{}", now, now + probe_s, who_of(c.id), "")
                store.probe_campaign_unit(c.id, u.seq, probe)
            elif u.probe_state in FINAL or u.probe_state == "":
                detail = f"reports {fw}, not {c.version}" if fw else "no answer within the timeout"
                out.append((u.seq, Step.FAILED, "boot" if fw else "timeout", detail))
        elif got is not None and u.step != Step.UPDATING:
            out.append((u.seq, Step.UPDATING, "", u.detail))
    return out


def _fw(answer: str) -> str | None:
    try:
        fw = json.loads(answer).get("fw") if answer else None
    except (ValueError, AttributeError):
        return None
    return fw if isinstance(fw, str) else None


def change_phase(store: Store, campaign_id: str, action: str, now: int, who: str, origin: str) -> str:
    """An operator's pause, resume or cancel; the campaign's phase after it; raises CommandError when it
    cannot be (no such campaign, or one whose phase does not allow it)."""
    moves = {
        "pause": (Phase.PAUSED, (Phase.RUNNING,)),
        "resume": (Phase.RUNNING, (Phase.PAUSED,)),
        "cancel": (Phase.CANCELLED, (Phase.RUNNING, Phase.PAUSED)),
    }
    if action not in moves:
        raise CommandError(f"{action!r}: pause, resume or cancel")
    c = store.campaign(campaign_id)
    if c is None:
        raise CommandError(f"no campaign {campaign_id[:40]!r}")
    phase, allowed = moves[action]
    if not store.set_campaign_phase(campaign_id, phase, allowed, now, f"{action} by {who}", who, origin):
        raise CommandError(f"campaign {campaign_id} is {c.phase}: it cannot {action}")
    return phase

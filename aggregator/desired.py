"""Desired configuration (devices.md): what operators want of units' configuration (the fleet's, a customer's, a
group's, a unit's; the narrower wins key by key), against what each unit last reported in its answers, and the
`set` commands that bring the units out of step in line.

A unit is sent `set` with what differs when its wanted configuration changes, and again only when it comes back
online after a try that did not bring it in step (an expired or failed `set`): a unit that cannot take a value is
not asked for it over and over. Its answers to `set` (and to `ping`) report its configuration.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aggregator.store import CommandRow, Store, new_command
from kernel.commands import CommandError, State
from kernel.registry import Registry, Unit
from kernel.settings import DevicesSettings

SCOPES = ("fleet", "customer", "group", "unit")  # widest first: a narrower scope's keys win
WHO = "smame:config"
OPEN = (State.QUEUED, State.SENT, State.ACCEPTED)

Desired = Mapping[tuple[str, str], Mapping[str, Any]]  # (scope, target) -> configuration


def check_target(registry: Registry, scope: str, target: str) -> str:
    """The target of a scope as kept ("" for the fleet); raises CommandError naming what the registry lacks."""
    if scope not in SCOPES:
        raise CommandError(f"scope {scope!r}: one of {', '.join(SCOPES)}")
    if scope == "fleet":
        return ""
    if scope == "customer" and target not in registry.customers:
        raise CommandError(f"customer {target[:64]!r} is not in the registry")
    if scope == "unit" and target not in registry.units:
        raise CommandError(f"unit {target[:64]!r} is not in the registry")
    if scope == "group" and not any(u.group == target for u in registry.units.values()):
        raise CommandError(f"group {target[:64]!r} is no unit's group in the registry")
    return target


def read_desired(rows: Iterable[tuple[str, str, str, str, str, int]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The store's desired configurations, decoded."""
    return {(scope, target): json.loads(config) for scope, target, config, *_ in rows}


def wanted(unit: Unit, desired: Desired) -> dict[str, Any]:
    """A unit's wanted configuration: the fleet's, its customer's, its group's and its own, merged in that order."""
    out: dict[str, Any] = {}
    for scope, target in (("fleet", ""), ("customer", unit.customer), ("group", unit.group), ("unit", unit.id)):
        if scope != "group" or unit.group:
            out.update(desired.get((scope, target), {}))
    return out


@dataclass(frozen=True, slots=True)
class Step:
    """A unit out of step: what is wanted, what it reported (None: never), what differs, and smame's last try
    (the configuration wanted then, when, the command, its state) if any."""

    unit: str
    customer: str
    wanted: dict[str, Any]
    reported: dict[str, Any] | None
    reported_at: int | None
    differs: dict[str, Any]
    last_try: tuple[str, int, str, str] | None

    def due(self, online_since: int | None) -> bool:
        """Whether a `set` is to be sent now: the wanted configuration changed since the last try, or the try
        ended without bringing the unit in step and the unit came back online since."""
        if self.last_try is None or self.last_try[0] != text(self.wanted):
            return True
        _, at, _, state = self.last_try
        if state in OPEN:
            return False
        return online_since is not None and online_since > at


def out_of_step(
    units: Iterable[Unit],
    desired: Desired,
    reported: Mapping[str, tuple[str, int]],
    tries: Mapping[str, tuple[str, int, str, str]],
) -> list[Step]:
    """The units whose reported configuration differs from the wanted one (or that never reported one), by unit."""
    out = []
    for u in units:
        want = wanted(u, desired)
        if not want:
            continue
        kept = reported.get(u.id)
        have = json.loads(kept[0]) if kept else None
        differs = {k: v for k, v in want.items() if have is None or have.get(k) != v}
        if differs:
            at = kept[1] if kept else None
            out.append(Step(u.id, u.customer, want, have, at, differs, tries.get(u.id)))
    return sorted(out, key=lambda s: s.unit)


def text(config: Mapping[str, Any]) -> str:
    """A configuration as kept: JSON with its keys in order."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def steps_now(store: Store, registry: Registry) -> list[Step]:
    """The units out of step now (on the store's thread)."""
    desired = read_desired(store.desired())
    if not desired:
        return []
    return out_of_step(registry.units.values(), desired, store.reported(), store.config_tries())


def config_pass(store: Store, registry: Registry, now: int, settings: DevicesSettings) -> list[CommandRow]:
    """Queue a `set` of what differs for each unit out of step whose turn it is (on the store's thread); the
    commands queued."""
    steps = steps_now(store, registry)
    if not steps:
        return []
    online = store.came_online()
    due = [s for s in steps if s.due(online.get(s.unit))]
    commands = [new_command(s.unit, "set", text(s.differs), now, now + settings.expiry_s, WHO, "") for s in due]
    if commands:
        store.add_config_sets(commands, [text(s.wanted) for s in due])
    return commands

"""Gap repair (devices.md): the slots of a unit left estimated or missing between two of its readings, which its
later telegrams did not fill (the broker died holding them, say), are asked of the unit once with `resend`.

A gap is found through the partial index of unfilled slots (never the fleet's actual ones), runs of consecutive
slots of a unit at a time; its range is from the unit's reading before it to the one after it, which is also its
key: a gap asked for (or one inside a range asked for) is never asked again, on this leader or the next. The
resends are spread in the queue at `devices.repair_per_s`, so that a broker's death over the whole fleet does not
come back as one burst of backlog. The readings resent arrive as ordinary late telegrams: their slots become
actual and the day's files are rewritten, as for any late data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

from aggregator.store import CommandRow, Store, new_command
from kernel.commands import RESEND_MAX_S
from kernel.settings import DevicesSettings
from kernel.timegrid import SLOT

WHO = "smame:repair"


def runs(slots: Iterable[tuple[str, int]]) -> Iterator[tuple[str, int, int]]:
    """Runs of consecutive slots of a unit, (unit, first slot end, last slot end), from (unit, slot) sorted by
    unit and slot."""
    run: list[object] = []
    unit, first, last = "", 0, 0
    for u, slot in slots:
        if run and u == unit and slot == last + SLOT:
            last = slot
            continue
        if run:
            yield unit, first, last
        unit, first, last, run = u, slot, slot, [u]
    if run:
        yield unit, first, last


def repair_pass(store: Store, now: int, settings: DevicesSettings) -> list[CommandRow]:
    """Find the gaps old enough and not yet asked for, and queue a `resend` for each (on the store's thread);
    the commands queued."""
    until = now - settings.repair_after_s
    gaps: dict[tuple[str, int], tuple[str, int, int, int]] = {}
    for unit, first, last in runs(store.unfilled_slots(until - settings.repair_days * 86400, until)):
        before = store.neighbour(unit, first - SLOT + 1, "fwd", before=True)
        after = store.neighbour(unit, last - 1, "fwd", before=False)
        if before is None or after is None or after.at - before.at <= SLOT:
            continue  # no reading on one side (it may yet come), or none is missing (a reset, a meter replaced)
        if after.at > until:
            continue  # its end is too recent: late telegrams may still fill it (looked at again next pass)
        start = max(before.at, after.at - RESEND_MAX_S)
        if (unit, start) in gaps or store.repair_covers(unit, start, after.at):
            continue
        gaps[unit, start] = (unit, start, after.at, (after.at - start) // SLOT)
    commands = []
    for i, (unit, start, end, _) in enumerate(gaps.values()):
        due = now + int(i / settings.repair_per_s)
        args = json.dumps({"from": _iso(start), "to": _iso(end)}, separators=(",", ":"))
        commands.append(new_command(unit, "resend", args, now, due + settings.expiry_s, WHO, "", due))
    if not commands:
        return []
    store.add_repairs(list(gaps.values()), commands)
    return commands


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()

"""Live alerts as a pure state machine: what holds now, what was already said -> what to say.

Each alert is said once when it starts, again every `repeat_s` while it holds (0: never), and once
when it clears. One-shot events (the broker lost our session) are said once. The state is plain
data, so it survives restarts and an alert is not announced twice because smame restarted.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Literal

# name -> what an operator reads in the subject line
TITLES = {
    "ingest_stopped": "ingest stopped",
    "ingest_stalled": "ingest stalled: nothing committed",
    "clock_behind": "this node's clock is behind the units'",
    "broker_unreachable": "broker unreachable",
    "session_lost": "the broker lost smame's session",
    "export_failing": "CSV export failing",
    "disk_low": "disk nearly full",
    "login_ban": "login ban",
    "units_silent": "many units silent",
    "units_at_risk": "many units at risk of failing",
    "status_refused": "the units' status topic is refused",
    "broker_cluster": "the broker's cluster is degraded",
    "health_failing": "the units' health pass fails",
    "report_failing": "the daily report cannot be made",
    "commands_failing": "commands to units failing",
    "campaign_aborted": "a firmware campaign aborted itself",
    "campaign_done": "a firmware campaign ended",
    "delivery_failing": "report or alert delivery failing",
    "reload_refused": "registry reload refused",
    "node_faults": "a node cannot do its part",
    "nodes_gone": "a node is gone",
    "failover": "another node leads now",
    "store_unreachable": "the store cannot be reached",
    "security_ban": "security: addresses banned after failed logins",
    "security_failed_logins": "security: repeated failed logins",
    "security_unit_mismatch": "security: telegrams under another unit's topic",
    "security_token_expiry": "security: API tokens expiring",
    "security_audit": "security: changes to who may do what, or to customers' data",
    "certificate_expiry": "certificates expire within weeks",
    "certificate_expiry_urgent": "certificates expire within days, have expired, or cannot be read",
}


STATE_KEY = "alert_state"  # the store's meta key of the alerts that hold (the console reads it too)


@dataclass(frozen=True, slots=True)
class Active:
    """An alert that holds: since when, what it said, when it last said it."""

    since: float
    text: str
    said: float


@dataclass(frozen=True, slots=True)
class Notice:
    """Something to tell the operators."""

    name: str
    state: Literal["firing", "repeat", "resolved", "event"]
    text: str
    since: float
    at: float

    @property
    def subject(self) -> str:
        """One line for a mail subject or the head of a Slack message."""
        word = {"firing": "ALERT", "repeat": "STILL", "resolved": "RESOLVED", "event": "EVENT"}[self.state]
        return f"[smame] {word}: {TITLES.get(self.name, self.name)}"

    @property
    def key(self) -> str:
        """Identifies this notice for ever: the outbox queues it only once."""
        return f"alert:{self.name}:{self.state}:{self.since:.0f}:{self.at:.0f}"


def step(
    active: Mapping[str, Active], holding: Mapping[str, str], now: float, repeat_s: float, unknown: Collection[str] = ()
) -> tuple[dict[str, Active], list[Notice]]:
    """The next state and the notices to send, given the conditions that hold now (name -> description).

    A condition in `unknown` cannot be told yet (just after a start, a broker that has been down for
    less than the limit): it keeps its state, so a restart neither clears nor raises it.
    """
    out: dict[str, Active] = {name: was for name, was in active.items() if name in unknown and name not in holding}
    notices: list[Notice] = []
    for name, text in holding.items():
        was = active.get(name)
        if was is None:
            out[name] = Active(now, text, now)
            notices.append(Notice(name, "firing", text, now, now))
        elif repeat_s and now - was.said >= repeat_s:
            out[name] = Active(was.since, text, now)
            notices.append(Notice(name, "repeat", text, was.since, now))
        else:
            out[name] = Active(was.since, text, was.said)
    for name, was in active.items():
        if name not in holding and name not in unknown:
            notices.append(
                Notice(
                    name, "resolved", f"cleared after {duration(now - was.since)}; it was: {was.text}", was.since, now
                )
            )
    return out, notices


def dump_state(active: Mapping[str, Active]) -> str:
    """The alerts that hold, as the text kept under STATE_KEY."""
    return json.dumps({k: asdict(v) for k, v in active.items()})


def load_state(raw: str) -> dict[str, Active] | None:
    """The alerts kept by `dump_state`, or None when the text is not such a state."""
    try:
        return {str(k): Active(**v) for k, v in json.loads(raw).items()}
    except (ValueError, TypeError, AttributeError):
        return None


def event(name: str, text: str, now: float) -> Notice:
    """A one-shot notice (nothing to clear)."""
    return Notice(name, "event", text, now, now)


def duration(seconds: float) -> str:
    """A span of time as an operator reads it: minutes, hours and minutes, or days and hours."""
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours < 48 else f"{hours // 24} days {hours % 24} h"


def silent_units_text(silent: Mapping[str, str], total: int, after_s: int, limit: int = 10) -> str:
    """One grouped description for many silent units (unit -> customer): the count and the customers."""
    by_customer: dict[str, int] = {}
    for customer in silent.values():
        by_customer[customer] = by_customer.get(customer, 0) + 1
    ranked = sorted(by_customer.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{c} {n}" for c, n in ranked[:limit])
    more = f" and {len(ranked) - limit} more customers" if len(ranked) > limit else ""
    return (
        f"{len(silent)} of {total} units have sent no reading for over {duration(after_s)}; by customer: {shown}{more}"
    )

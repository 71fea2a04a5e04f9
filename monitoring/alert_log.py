"""The history of the live alerts and what operators did about them, and the operators' controls (which alert
is acknowledged, which kind is silenced until when). The history is the store's `alert_log` table, written
in the transaction that queues what it says; the controls are one meta row the console writes and the monitor
reads at each check."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from aggregator.store import Store
from monitoring.alerts import Notice

CONTROLS_KEY = "alert_controls"
HISTORY_LIMIT = 500  # entries one look at the history shows at most, newest first


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of the history: an alert's start, repeat or end, an event, or an operator's action."""

    at: float
    name: str
    state: str  # firing, repeat, resolved, event; acknowledged, silenced, unsilenced
    text: str
    node: str  # the node that said it, or on which the operator acted
    who: str = ""  # the operator, for their actions
    told: bool = True  # sent by mail and Slack (False: held back by a silence or an acknowledgement)


@dataclass(frozen=True, slots=True)
class Ack:
    """An alert acknowledged by an operator: its repeats are not sent until it clears."""

    since: float  # the alert's start, so that a later alert of the same kind is not covered
    who: str
    at: float


@dataclass(frozen=True, slots=True)
class Silence:
    """A kind of alert silenced until a time: nothing of it is sent meanwhile (it is still kept here)."""

    until: float
    who: str
    at: float


@dataclass
class Controls:
    """What operators have said about the alerts."""

    acks: dict[str, Ack] = field(default_factory=dict)
    silences: dict[str, Silence] = field(default_factory=dict)

    def held_back(self, notice: Notice, active_since: Mapping[str, float], now: float) -> bool:
        """Whether this notice is kept from mail and Slack: its kind silenced, or a repeat of an acknowledged
        alert (its start and end are still told)."""
        silence = self.silences.get(notice.name)
        if silence is not None and silence.until > now:
            return True
        ack = self.acks.get(notice.name)
        return notice.state == "repeat" and ack is not None and ack.since == active_since.get(notice.name)

    def dump(self) -> str:
        return json.dumps(
            {
                "acks": {k: asdict(v) for k, v in self.acks.items()},
                "silences": {k: asdict(v) for k, v in self.silences.items()},
            }
        )

    @classmethod
    def load(cls, raw: str) -> Controls:
        """The controls kept by `dump`; what cannot be read counts as none (an alert is then told, not hidden)."""
        try:
            found = json.loads(raw)
            return cls(
                {str(k): Ack(**v) for k, v in found.get("acks", {}).items()},
                {str(k): Silence(**v) for k, v in found.get("silences", {}).items()},
            )
        except (ValueError, TypeError, AttributeError):
            return cls()


class AlertLog:
    """The history and the controls in a store, on the thread that owns its connection."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def record(self, entries: Sequence[Entry]) -> None:
        """Keep these lines (inside the caller's transaction, when it has one)."""
        if entries:
            self.store.executemany(
                "INSERT INTO alert_log (at, name, state, text, node, who, told) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(e.at, e.name, e.state, e.text, e.node, e.who, e.told) for e in entries],
            )

    def history(
        self, since: float, name: str = "", state: str = "", node: str = "", limit: int = HISTORY_LIMIT
    ) -> list[Entry]:
        """Lines from `since` on, newest first, of one kind, state or node when given."""
        where, args = ["at >= ?"], [since]
        for column, value in (("name", name), ("state", state), ("node", node)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)  # type: ignore[arg-type]
        rows = self.store.execute(
            f"SELECT at, name, state, text, node, who, told FROM alert_log WHERE {' AND '.join(where)} "
            "ORDER BY at DESC, id DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [Entry(float(r[0]), r[1], r[2], r[3], r[4], r[5], bool(r[6])) for r in rows]

    def nodes(self, since: float) -> list[str]:
        """The nodes named in the history from `since` on (the console's filter)."""
        rows = self.store.execute("SELECT DISTINCT node FROM alert_log WHERE at >= ? ORDER BY node", (since,))
        return [str(r[0]) for r in rows.fetchall()]

    def prune(self, before: float) -> int:
        """Forget lines older than `before`; returns how many."""
        return int(self.store.execute("DELETE FROM alert_log WHERE at < ?", (before,)).rowcount or 0)

    def controls(self) -> Controls:
        return Controls.load(self.store.get_meta(CONTROLS_KEY, "{}"))

    def acknowledge(self, name: str, since: float, who: str, node: str, now: float) -> None:
        """An operator acknowledges the alert `name` that started at `since`: its repeats are not sent."""
        with self.store.transaction():
            controls = self.controls()
            controls.acks[name] = Ack(since, who, now)
            self.store.set_meta(CONTROLS_KEY, controls.dump())
            self.record([Entry(now, name, "acknowledged", "its repeats are not sent until it clears", node, who)])

    def silence(self, name: str, until: float, shown: str, who: str, node: str, now: float) -> None:
        """An operator silences a kind of alert until `until` (shown so in the history); at or before `now`, the
        silence is lifted."""
        with self.store.transaction():
            controls = self.controls()
            if until > now:
                controls.silences[name] = Silence(until, who, now)
                text, state = f"nothing of it is sent until {shown}", "silenced"
            else:
                controls.silences.pop(name, None)
                text, state = "it is sent again", "unsilenced"
            self.store.set_meta(CONTROLS_KEY, controls.dump())
            self.record([Entry(now, name, state, text, node, who)])

"""The outbox table's queries: queueing, leasing and settling messages. Its schema is the store's, with every
other table's; what is done with the rows is `monitoring.outbox`'s."""

from __future__ import annotations

from dataclasses import dataclass

from aggregator.store import Store


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A message waiting to be sent (a report or an alert, for one channel)."""

    id: int
    key: str
    channel: str
    payload: bytes
    created: float
    attempts: int


class OutboxTable:
    """The outbox rows of a store, queried on the thread that owns its connection."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def enqueue(self, key: str, channel: str, payload: bytes, now: float) -> bool:
        """Keep a message for sending; False when one with this key exists already (never queued twice)."""
        cur = self.store.execute(
            "INSERT INTO outbox (key, channel, payload, created, next_try) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(key) DO NOTHING",
            (key, channel, payload, now, now),
        )
        return cur.rowcount == 1

    def claim_due(self, now: float, lease_s: float, limit: int = 20) -> list[OutboxRow]:
        """Messages due now, each leased for `lease_s` so that no other sender takes it meanwhile."""
        with self.store.transaction():
            rows = self.store.execute(
                "SELECT id, key, channel, payload, created, attempts FROM outbox "
                "WHERE sent IS NULL AND given_up IS NULL AND next_try <= ? ORDER BY next_try, id LIMIT ?"
                + self.store.claim_rows,
                (now, limit),
            ).fetchall()
            self.store.executemany(
                "UPDATE outbox SET next_try = ?, attempts = attempts + 1 WHERE id = ?",
                [(now + lease_s, r[0]) for r in rows],
            )
        return [OutboxRow(*r) for r in rows]

    def release(self, ids: list[int], now: float) -> None:
        """Claimed messages that were neither sent nor tried (the sender stopped): due again at `now`, their
        claim not counted as an attempt."""
        self.store.executemany(
            "UPDATE outbox SET next_try = ?, attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END "
            "WHERE id = ? AND sent IS NULL AND given_up IS NULL",
            [(now, i) for i in ids],
        )

    def sent(self, id: int, now: float) -> None:
        """The message went out."""
        self.store.execute("UPDATE outbox SET sent = ?, last_error = '' WHERE id = ?", (now, id))

    def retry(self, id: int, next_try: float, error: str) -> None:
        """Sending failed; try again at `next_try`."""
        self.store.execute("UPDATE outbox SET next_try = ?, last_error = ? WHERE id = ?", (next_try, error, id))

    def give_up(self, id: int, now: float, error: str) -> None:
        """Stop trying (kept, with its error, for the operator to see)."""
        self.store.execute("UPDATE outbox SET given_up = ?, last_error = ? WHERE id = ?", (now, error, id))

    def next_due(self) -> float | None:
        """When the next unsent message is due."""
        row = self.store.execute("SELECT min(next_try) FROM outbox WHERE sent IS NULL AND given_up IS NULL").fetchone()
        return None if row[0] is None else float(row[0])

    def counts(self) -> dict[str, int]:
        """Messages by state: pending, sent, given_up."""
        row = self.store.execute(
            "SELECT count(*) FILTER (WHERE sent IS NULL AND given_up IS NULL), count(sent), count(given_up) FROM outbox"
        ).fetchone()
        return {"pending": int(row[0]), "sent": int(row[1]), "given_up": int(row[2])}

    def health(self, since: float) -> tuple[int, float | None, int, str]:
        """Messages not sent yet, when the oldest of them was queued, how many were given up since `since`, and
        the newest error of a message not sent."""
        row = self.store.execute(
            "SELECT count(*), min(created) FROM outbox WHERE sent IS NULL AND given_up IS NULL"
        ).fetchone()
        gave_up = self.store.execute("SELECT count(*) FROM outbox WHERE given_up >= ?", (since,)).fetchone()[0]
        error = self.store.execute(
            "SELECT last_error FROM outbox WHERE sent IS NULL AND last_error != '' ORDER BY id DESC LIMIT 1"
        ).fetchone()
        oldest = None if row[1] is None else float(row[1])
        return int(row[0]), oldest, int(gave_up), str(error[0]) if error else ""

    def prune(self, before: float) -> None:
        """Forget sent and abandoned messages older than `before`."""
        self.store.execute(
            "DELETE FROM outbox WHERE (sent IS NOT NULL OR given_up IS NOT NULL) AND created < ?", (before,)
        )

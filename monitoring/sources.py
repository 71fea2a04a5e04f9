"""What the monitoring part reads of the other services, as Protocols of its own: it imports none of them.

Each service keeps its counters in a stats object of its own (`broker_bridge.bridge.BridgeStats`,
`aggregator.ingest.Outcome`, `csv_export.exporter.ExportStats`, `ftp_gateway.accounts.Accounts` and `Bans`);
the app hands those objects over, and mypy checks that they fit. Members are read-only properties, so a
service may hold a `Counter` where the monitor reads a `Mapping`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol


class BridgeCounters(Protocol):
    """The broker bridge: connection, messages, commits and their histograms."""

    @property
    def received(self) -> int: ...
    @property
    def acked(self) -> int: ...
    @property
    def batches(self) -> int: ...
    @property
    def connects(self) -> int: ...
    @property
    def sessions_lost(self) -> int: ...
    @property
    def connected(self) -> bool: ...
    @property
    def down_since(self) -> float | None: ...
    @property
    def last_error(self) -> str: ...
    @property
    def last_received(self) -> float: ...
    @property
    def pending(self) -> int: ...
    @property
    def last_batch(self) -> int: ...
    @property
    def last_commit_s(self) -> float: ...
    @property
    def commit_bounds(self) -> Sequence[float]: ...
    @property
    def commit_counts(self) -> Sequence[int]: ...
    @property
    def commit_sum(self) -> float: ...
    @property
    def size_bounds(self) -> Sequence[float]: ...
    @property
    def size_counts(self) -> Sequence[int]: ...
    @property
    def size_sum(self) -> int: ...

    def caught_up(self, now: float) -> bool:
        """True once ingest has drained what the broker held for it."""
        ...

    def stalled_for(self, now: float) -> float:
        """Seconds that received telegrams have waited with no commit finishing (0 while none waits)."""
        ...


class IngestCounters(Protocol):
    """The aggregator's totals of what ingest committed."""

    @property
    def stored(self) -> int: ...
    @property
    def duplicates(self) -> int: ...
    @property
    def slots(self) -> int: ...
    @property
    def quarantined(self) -> Mapping[str, int]: ...


class ExportCounters(Protocol):
    """The export service's runs and files."""

    @property
    def runs(self) -> int: ...
    @property
    def failures(self) -> int: ...
    @property
    def files_written(self) -> int: ...
    @property
    def files_deleted(self) -> int: ...
    @property
    def last_success(self) -> float: ...
    @property
    def last_error(self) -> str: ...


class LoginEvents(Protocol):
    """The file gateway's logins, failed logins and downloads, by (protocol, event)."""

    @property
    def events(self) -> Mapping[tuple[str, str], int]: ...


class BanList(Protocol):
    """The file gateway's banned addresses."""

    @property
    def bans(self) -> int: ...

    def active(self) -> Mapping[str, float]:
        """Each banned address with the seconds its ban has left."""
        ...


class Role(Protocol):
    """Which node of those sharing a store leads (`aggregator.leadership.Leadership`)."""

    @property
    def leading(self) -> bool: ...
    @property
    def leader(self) -> Mapping[str, object]: ...

"""Prometheus metrics, read from the services' own counters at scrape time (nothing is counted twice)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from monitoring.at_risk import SIGNALS, by_reason
from monitoring.monitor import Monitor
from monitoring.sources import (
    BanList,
    BridgeCounters,
    BrokerCluster,
    CommandCounters,
    ExportCounters,
    IngestCounters,
    LoginEvents,
    Role,
)


@dataclass
class Sources:
    """Where the figures come from; any part may be absent (disabled)."""

    bridge: BridgeCounters
    ingest: IngestCounters
    units: Callable[[], int]
    export: ExportCounters | None = None
    accounts: LoginEvents | None = None
    bans: BanList | None = None
    monitor: Monitor | None = None
    role: Role | None = None  # None: the only node (SQLite), which always leads
    commands: CommandCounters | None = None  # the leader's commands to units
    cluster: BrokerCluster | None = None  # the broker's nodes (a cluster, or a management API)


class SmameCollector(Collector):
    """Every smame_ metric."""

    def __init__(self, sources: Sources) -> None:
        self.s = sources

    def collect(self) -> Iterator[Metric]:
        b, i = self.s.bridge, self.s.ingest
        yield _counter("smame_telegrams_received", "MQTT messages received", b.received)
        yield _counter("smame_telegrams_acknowledged", "PUBACKs sent after commit", b.acked)
        yield _counter("smame_readings_stored", "new readings committed", i.stored)
        yield _counter("smame_readings_duplicate", "readings received again with the same values", i.duplicates)
        yield _counter("smame_slots_written", "30-minute slots written or rewritten", i.slots)
        yield _counts("smame_quarantined", "telegrams or readings refused, by reason", "reason", i.quarantined)
        yield _counter("smame_commit_batches", "ingest transactions committed", b.batches)
        yield _histogram(
            "smame_commit_seconds",
            "duration of each batch's commit transaction",
            b.commit_bounds,
            b.commit_counts,
            b.commit_sum,
        )
        yield _histogram(
            "smame_commit_batch_size", "telegrams per committed batch", b.size_bounds, b.size_counts, b.size_sum
        )
        yield _gauge("smame_commit_last_batch_size", "telegrams in the last committed batch", b.last_batch)
        yield _gauge("smame_commit_last_seconds", "duration of the last commit", b.last_commit_s)
        yield _gauge("smame_broker_connected", "1 while connected to the broker", int(b.connected))
        role = self.s.role
        yield _gauge(
            "smame_leader",
            "1 while this node leads (ingest, alerts, report), 0 while it stands by",
            int(role is None or role.leading),
        )
        epoch = role.leader.get("epoch") if role is not None else None
        yield _gauge(
            "smame_leader_epoch",
            "the epoch of the leader as this node last saw it (0: single node)",
            float(epoch) if isinstance(epoch, int) else 0,
        )
        yield _counter("smame_broker_connects", "successful broker connections", b.connects)
        yield _counter("smame_broker_sessions_lost", "reconnects that found no session at the broker", b.sessions_lost)
        yield _gauge("smame_units_registered", "units in the registry", self.s.units())
        yield _gauge(
            "smame_telegram_last_received_timestamp_seconds", "when the newest telegram arrived", b.last_received
        )
        yield _gauge(
            "smame_ingest_stalled_seconds",
            "how long received telegrams have waited with no commit finishing (0 while none waits)",
            b.stalled_for(time.time()),
        )
        if self.s.monitor is not None:
            yield from _node_metrics(self.s.monitor)
            if role is None or role.leading:  # a standby's would be what it last saw as leader, long stale
                yield from _leader_metrics(self.s.monitor)
        c = self.s.commands
        if c is not None and (role is None or role.leading):  # a standby sends none
            yield from _command_metrics(c)
        if self.s.cluster is not None:
            yield from _cluster_metrics(self.s.cluster)
        if self.s.export is not None:
            e = self.s.export
            yield _counter("smame_export_runs", "export runs", e.runs)
            yield _counter("smame_export_failures", "export runs that failed", e.failures)
            yield _counter("smame_export_files_written", "CSV files written", e.files_written)
            yield _counter("smame_export_files_deleted", "CSV files deleted by retention", e.files_deleted)
            yield _gauge(
                "smame_export_last_success_timestamp_seconds", "time of the last successful run", e.last_success
            )
        if self.s.accounts is not None:
            events = CounterMetricFamily(
                "smame_files_events", "file gateway logins, failed logins and downloads", labels=["protocol", "event"]
            )
            for (protocol, event), n in sorted(self.s.accounts.events.items()):
                events.add_metric([protocol, event], n)
            yield events
        if self.s.bans is not None:
            yield _counter("smame_files_bans", "addresses banned after repeated failed logins", self.s.bans.bans)
            refused = CounterMetricFamily(
                "smame_refused_addresses",
                "logins and API calls with right credentials from an address their customer does not allow",
                labels=["door"],
            )
            for door, n in sorted(self.s.bans.refused.items()):
                refused.add_metric([door], n)
            yield refused


def _cluster_metrics(c: BrokerCluster) -> Iterator[Metric]:
    """The broker's nodes, and smame's queue on them."""
    up = GaugeMetricFamily("smame_broker_node_up", "1 while the broker node takes a connection", labels=["node"])
    for node, ok in sorted(c.node_states().items()):
        up.add_metric([node], int(ok))
    yield up
    queue = c.queue_state()
    if queue is not None:
        leader, members, online = queue
        replicas = GaugeMetricFamily(
            "smame_broker_queue_replicas", "replicas of smame's queue, and those online", labels=["state"]
        )
        replicas.add_metric(["member"], members)
        replicas.add_metric(["online"], online)
        yield replicas
        led = GaugeMetricFamily("smame_broker_queue_leader", "1 for the node leading smame's queue", labels=["node"])
        if leader:
            led.add_metric([leader], 1)
        yield led


def _command_metrics(c: CommandCounters) -> Iterator[Metric]:
    """The leader's commands to units."""
    yield _gauge("smame_commands_connected", "1 while the commands' broker connection is up", int(c.connected))
    yield _gauge("smame_commands_failing", "1 while the commands cannot use the store", int(bool(c.failing)))
    yield _counter("smame_commands_published", "commands published to units (again included)", c.published)
    yield _counter("smame_commands_expired", "commands that lapsed with no answer", c.expired)
    yield _counter("smame_command_answers", "units' answers applied to their commands", c.answers)
    yield _counter("smame_command_answers_unmatched", "answers to no open command of their unit", c.unmatched)
    yield _counts(
        "smame_command_answers_refused", "messages on units' answer topics that are no answer", "reason", c.refused
    )


def _node_metrics(m: Monitor) -> Iterator[Metric]:
    """What every node's monitor knows of its own: what it sent, its disks."""
    sent = CounterMetricFamily(
        "smame_notifications",
        "reports and alerts by channel: sent, failed attempts, given up",
        labels=["channel", "result"],
    )
    for (channel, result), n in sorted(m.outbox.stats.items()):
        sent.add_metric([channel, result], n)
    yield sent
    disk = GaugeMetricFamily(
        "smame_disk_free_ratio", "free share of the file system of the data and export directories", labels=["path"]
    )
    for path, (free, total) in sorted(m.disk().items()):
        disk.add_metric([path], free / total if total else 1.0)
    yield disk


def _leader_metrics(m: Monitor) -> Iterator[Metric]:
    """What only the leader's monitor knows: the fleet as its scans found it, the alerts, the outbox."""
    reporting = GaugeMetricFamily(
        "smame_units_reporting", "units whose newest reading is this recent", labels=["within"]
    )
    for within, n in sorted(m.scan.reporting.items()):
        reporting.add_metric([within], n)
    yield reporting
    today = GaugeMetricFamily(
        "smame_slots_today", "today's closed import slots of registered units, by quality", labels=["quality"]
    )
    for quality, n in sorted(m.scan.slots_today.items()):
        today.add_metric([quality], n)
    yield today
    yield _gauge(
        "smame_units_silent", "units heard of before, silent for longer than alerts.silent_after_s", len(m.scan.silent)
    )
    active = GaugeMetricFamily("smame_alert_active", "1 for each live alert that holds", labels=["alert"])
    for name in sorted(m.active):
        active.add_metric([name], 1)
    yield active
    yield _gauge("smame_outbox_pending", "reports and alerts waiting to be sent", m.scan.outbox_pending)
    risk = GaugeMetricFamily(
        "smame_units_at_risk",
        'units at risk of failing now, by the reason that puts them there (reason="all": the units)',
        labels=["reason"],
    )
    risk.add_metric(["all"], len(m.scan.at_risk))
    counts = by_reason(m.scan.at_risk)
    for reason in SIGNALS:
        risk.add_metric([reason], counts.get(reason, 0))
    yield risk
    dropped = GaugeMetricFamily(
        "smame_diag_fields_dropped",
        "fields of units' diag left out as wrong (bad_diag) on the day, as the last health pass found them",
        labels=["day"],
    )
    for day, n in sorted(m.diag_dropped.items()):
        dropped.add_metric([day], n)
    yield dropped


def _histogram(
    name: str, doc: str, bounds: Sequence[float], counts: Sequence[int], total: float
) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for bound, n in zip([*map(str, bounds), "+Inf"], counts, strict=True):
        cumulative += n
        buckets.append((bound, cumulative))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


def _counts(name: str, doc: str, label: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    """A counter with one sample for each key of `counts`, under `label`, in order."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, n in sorted(counts.items()):
        family.add_metric([key], n)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)

"""The monitor service: watches the other services and the store, raises live alerts, sends the daily report.

Every `alerts.check_s` it reads the services' counters and scans the store (each unit's newest
reading, today's slot quality), works out which alert conditions hold, and queues what the alert
state machine says to send, with the new state, in one transaction. Once a day, after `report.at`,
it queues the previous day's report. Everything sent goes through the outbox.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from aggregator.store import Store
from kernel.certificates import Held, held_in
from kernel.firmware import STEPS
from kernel.reading import Reason
from kernel.registry import Registry
from kernel.settings import Settings
from kernel.timegrid import Grid
from monitoring import alerts, at_risk
from monitoring.alert_log import AlertLog, Entry
from monitoring.alerts import Active, Notice
from monitoring.at_risk import Standing
from monitoring.channels import configured, fan_out
from monitoring.daily import Fleet, make_report
from monitoring.outbox import Message, Outbox
from monitoring.outbox_table import OutboxTable
from monitoring.security import SECURITY_ACTIONS, SecurityEvents
from monitoring.sources import BanList, BridgeCounters, CommandCounters, ExportCounters
from monitoring.worker import JobFailed, OnStoreThread, Runner

if TYPE_CHECKING:
    from monitoring.health_pass import Kept

log = logging.getLogger("smame.monitor")
ALERT_STATE = alerts.STATE_KEY
MISMATCH_CURSOR = "security_mismatch_cursor"
REPORT_DONE = "report_last_day"
CLOCK_SAID_S = 120.0  # a clock found behind the units' is told this long after the last batch that said so
NODE_GONE_S = 60.0  # a node whose row has not beaten for this long is gone (a node beats every second)
NODE_FORGET_S = 86400.0  # its row is dropped after this long: its alert then clears
# the health pass or a report still running after this long is stuck (a million units take a few minutes): ended
JOB_LIMIT_S = 1800.0
REPORT_RETRY_S = 600.0  # a report that could not be made is tried again after this long


@dataclass
class Watched:
    """The other services' counters the monitor reads; absent parts are None."""

    bridge: BridgeCounters
    export: ExportCounters | None = None
    bans: BanList | None = None
    paths: Sequence[Path] = ()  # directories whose file systems must not fill up
    reload_refused: Callable[[], str] = lambda: ""  # why the last registry reload was refused ("" if it was not)
    node: str = ""  # this node's name among those sharing a store (its own row in `nodes` is not news)
    commands: CommandCounters | None = None  # the leader's commands to units
    # what is wrong with the broker's cluster (nodes unreachable for over the given seconds, a queue's replicas), each
    # a sentence
    broker_cluster: Callable[[float], list[str]] = lambda down_after_s: []


@dataclass
class Scan:
    """What one look at the store found."""

    units: int = 0
    silent: dict[str, str] = field(default_factory=dict)  # unit -> customer, heard of before but silent now
    reporting: dict[str, int] = field(default_factory=dict)  # "1h", "1d" -> units with a reading that recent
    slots_today: dict[str, int] = field(default_factory=dict)  # quality -> closed import slots today
    outbox_pending: int = 0
    nodes: list[tuple[str, float, dict[str, object]]] = field(default_factory=list)  # Store.nodes()
    at_risk: list[Standing] = field(default_factory=list)  # units at risk now, riskiest first


def alert_messages(notice: Notice, settings: Settings) -> list[Message]:
    """A notice for every configured channel."""
    since = datetime.fromtimestamp(notice.since, ZoneInfo(settings.timezone)).isoformat(timespec="seconds")
    return fan_out(
        settings, notice.key, notice.subject, f"{notice.text}\n\nsince {since} ({settings.timezone})", notice.at
    )


CERTIFICATES_EVERY_S = 3600  # the watched certificates are read again this often (a rotation shows within the hour)
AUDIT_CURSOR = "audit_told"  # the store's meta key: the newest security-relevant audit entry told
AUDIT_TOLD_MAX = 1000  # audit entries told in one event at most (the rest in the next)
TOKENS_TOLD = "tokens_told"  # the store's meta key: each API token's expiry stage told (id:expires:soon|expired)
TOKEN_WARN_S = 14 * 86400  # an API token is told of this long before it expires (and again once it has)
CAMPAIGNS_TOLD = "campaigns_told"  # the store's meta key: the newest campaign end told, and the ids ended then


class Monitor:
    """Alerts and the daily report; `run` is the service loop."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        grid: Grid,
        registry: Callable[[], Registry],
        watched: Watched,
        outbox: Outbox,
        clock: Callable[[], float] = time.time,
        runner: Runner | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.grid = grid
        self.registry = registry
        self.watched = watched
        self.outbox = outbox
        self.clock = clock
        # where the health pass and the daily report run: a process of their own in smame (`smame.app`)
        self.runner = runner or OnStoreThread(store)
        self.started = clock()
        self.scan = Scan()
        self.active: dict[str, Active] = {}
        self._events: list[Notice] = []
        self._loaded = False
        self._saved = ""  # the alert state as last written
        self._due_since: float | None = None  # when a report fell due that waits for ingest to catch up
        self._behind_since: float | None = None  # since when ingest has not caught up with the broker
        self.draining = False  # ingest is draining a backlog: the store's newest readings are not the fleet's
        self.checked = False  # a check has run (and said whether ingest is draining)
        # the file gateway tells it of bans and failed logins; a user is named after as many as ban an address
        self.security = SecurityEvents(settings.ftp.ban_after)
        self.history = AlertLog(store)
        self._pruned = 0.0  # when the history and the nodes were last pruned
        self._health_at = 0.0  # when the units' health records were last kept
        self._health_failed = ""  # why the last health pass failed ("" when it did not)
        # fields of units' diag left out as wrong today and yesterday, as the last health pass found them
        self.diag_dropped: dict[str, int] = {}
        self.certificates: list[Held] = []  # the watched certificates, soonest to expire first, as last read
        self.certificate_problems: list[str] = []  # what could not be read of them
        self._certificates_at = -math.inf  # when they were last read
        self._report_failed = ""  # why the last try to make the daily report failed ("" when it did not)
        self._report_retry_at = 0.0  # when it is tried again

    def close(self) -> None:
        """Stop a health pass or a report under way (after the range of units it is making), then close the
        store."""
        self.runner.close()
        self.store.close()

    def failover(self, node: str, epoch: int, former: str, silent_s: float, row: Mapping[str, object]) -> None:
        """Called when this node has taken over from a leader that did not stop cleanly: said once, at the next
        check, with why the former leader went when its row says."""
        why = str(row.get("fault") or "") or (
            f"it went without handing over, its last beat {silent_s:.0f} s before (killed, stopped, or cut off "
            "from the store)"
        )
        self._events.append(
            alerts.event("failover", f"node {node} leads now, epoch {epoch}; {former}: {why}", self.clock())
        )

    def session_lost(self) -> None:
        """Called by ingest when the broker had no session for us: said once, at the next check."""
        self._events.append(
            alerts.event(
                "session_lost",
                f"the broker had no session for client id {self.settings.broker.client_id}: telegrams "
                "queued for smame while it was away may be lost; check the broker's persistence and session expiry",
                self.clock(),
            )
        )

    async def run(self) -> None:
        """Check, alert and report for ever. The alert state is read from the store again at each start: a node
        that leads again takes over what the leader before it alerted."""
        self._loaded = False
        if not configured(self.settings):
            log.warning("neither mail.smtp_url nor slack is set: alerts and the daily report are only logged")
        passing: tuple[type[Exception], ...] = (OSError, *self.store.errors)
        while True:
            try:
                await self.check()
            except passing as exc:  # a busy store or a full disk must not stop the watching
                log.error("monitor check failed, trying again in %.0f s: %s", self.settings.alerts.check_s, exc)
            await asyncio.sleep(self.settings.alerts.check_s)

    async def tell_security(self) -> int:
        """Queue what the file gateway saw (bans, failed logins) as alerts, and nothing else: on a node that stands
        by, whose monitor does not run, so that its events are told and do not pile up. Returns how many
        messages were queued."""
        notices = self._security_notices(self.clock())
        for n in notices:
            log.warning("%s: %s", n.subject, n.text)
        entries = [Entry(n.at, n.name, n.state, n.text, self.watched.node) for n in notices]
        return await self.outbox.put(
            [m for n in notices for m in alert_messages(n, self.settings)], lambda: self.history.record(entries)
        )

    def _campaigns_ended(self, now: float) -> tuple[list[Notice], str]:
        """Firmware campaigns that ended by themselves since the last told (on the store's thread): an event each,
        and the mark to keep once they are queued. At the first look, none before it."""
        raw = self.store.get_meta(CAMPAIGNS_TOLD, "")
        if not raw:
            self.store.set_meta(CAMPAIGNS_TOLD, json.dumps({"at": int(now), "ids": []}))
            return [], ""
        mark = json.loads(raw)
        ended = [c for c in self.store.campaigns_ended(mark["at"]) if c.id not in mark["ids"]]
        if not ended:
            return [], raw
        at = ended[-1].changed
        ids = [c.id for c in ended if c.changed == at] + (mark["ids"] if at == mark["at"] else [])
        notices = []
        for c in ended:
            counts = self.store.campaign_counts(c.id)
            said = ", ".join(f"{counts[s]} {s}" for s in STEPS if counts.get(s))
            text = f"campaign {c.id} ({c.name}), firmware {c.version}, {c.phase}: {c.detail}; units: {said}"
            notices.append(alerts.event(f"campaign_{c.phase}", text, now))
        return notices, json.dumps({"at": at, "ids": ids})

    def _certificate_alerts(self, now: float) -> dict[str, str]:
        """The certificate alerts that hold: those expiring within alerts.cert_warn_days, and within
        alerts.cert_urgent_days (or expired, or unreadable) apart, each naming the soonest."""
        a = self.settings.alerts
        out: dict[str, str] = {}
        urgent = [h for h in self.certificates if h.not_after - now <= a.cert_urgent_days * 86400]
        soon = [h for h in self.certificates if h not in urgent and h.not_after - now <= a.cert_warn_days * 86400]
        for name, held, within in (
            ("certificate_expiry", soon, a.cert_warn_days),
            ("certificate_expiry_urgent", urgent, a.cert_urgent_days),
        ):
            if held:
                out[name] = f"{len(held)} certificate(s) expire within {within} days: " + certificates_text(
                    held, now, self.grid.zone
                )
        if self.certificate_problems:  # a certificate that cannot be read may as well have expired
            problems = self.certificate_problems
            unread = "; ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
            said = [out.get("certificate_expiry_urgent", ""), f"certificates watched that cannot be read: {unread}"]
            out["certificate_expiry_urgent"] = "; ".join(t for t in said if t)
        return out

    def _tokens_expiring(self, now: float) -> tuple[list[Notice], str]:
        """API tokens that expire within TOKEN_WARN_S, or have expired, not told yet at that stage (on the store's
        thread): one security event for all, and the mark to keep once it is queued (the stages told of the
        tokens still listed)."""
        raw = self.store.get_meta(TOKENS_TOLD, "[]")
        told = set(json.loads(raw))
        soon: list[str] = []
        gone: list[str] = []
        stages: list[str] = []
        for token_id, customer, name, expires in self.store.tokens_expiring(now + TOKEN_WARN_S):
            stage = f"{token_id}:{expires}:{'expired' if expires <= now else 'soon'}"
            stages.append(stage)
            if stage not in told:
                shown = datetime.fromtimestamp(expires, self.grid.zone).isoformat(timespec="minutes")
                named = f" ({name})" if name else ""
                (gone if expires <= now else soon).append(f"{token_id} of {customer}{named} {shown}")
        if not (soon or gone):
            return [], ""
        parts = [f"{what}: {', '.join(which)}" for what, which in (("expire soon", soon), ("expired", gone)) if which]
        text = f"API tokens {'; '.join(parts)} (smame tokens add makes a new one; the customer's server needs it)"
        return [alerts.event("security_token_expiry", text, now)], json.dumps(sorted(stages))

    def _audited(self, now: float) -> tuple[list[Notice], str]:
        """The audit log's security-relevant entries since the last told (on the store's thread): one security
        event for them, and the cursor to keep once it is queued. At the first look, none before it."""
        raw = self.store.get_meta(AUDIT_CURSOR, "")
        if not raw:
            self.store.set_meta(AUDIT_CURSOR, str(self.store.audit_newest()))
            return [], ""
        rows = self.store.audit_after(int(raw), SECURITY_ACTIONS, AUDIT_TOLD_MAX)
        if not rows:
            return [], ""
        said = []
        for _, at, who, origin, action, target, detail in rows[:20]:
            when = datetime.fromtimestamp(at, self.grid.zone).isoformat(timespec="minutes")
            where = f" from {origin}" if origin else ""
            said.append(f"{when} {who}{where}: {action} {target}" + (f" ({detail[:120]})" if detail else ""))
        more = f"; and {len(rows) - 20} more (the console's Audit page)" if len(rows) > 20 else ""
        text = f"{len(rows)} change(s) to who may do what, or to customers' data: " + "; ".join(said) + more
        return [alerts.event("security_audit", text, now)], str(rows[-1][0])

    def _security_notices(self, now: float) -> list[Notice]:
        return [alerts.event(kind, text, now) for kind, text in self.security.due(now)]

    async def check(self) -> list[Notice]:
        """One round: scan, alerts and events; returns the notices queued."""
        now = self.clock()
        if not self._loaded:
            self.active = await self.store.call(self._load_state)
            self._saved = alerts.dump_state(self.active)
            self._loaded = True
        if now - self._certificates_at >= CERTIFICATES_EVERY_S or now < self._certificates_at:
            self._certificates_at = now
            paths = self.settings.watched_certificates
            self.certificates, self.certificate_problems = await asyncio.to_thread(held_in, paths)
        self.draining = self._draining(now)
        self.checked = True
        if self.draining:  # the last scan stands (each unit's newest reading may still be in the broker), and
            # the count of units, which ingest_stopped needs should commits fail from the start
            self.scan = replace(self.scan, units=len(self.registry().units))
        else:
            self.scan = await self.store.call(self._scan, now)
        self.scan.nodes = await self.store.call(self._nodes, now)
        notices: list[Notice] = []
        started = {name: a.since for name, a in self.active.items()}  # an alert that clears now is in here only
        if self.settings.alerts.enabled:
            holding, unknown = self.conditions(now)
            self.active, notices = alerts.step(self.active, holding, now, self.settings.alerts.repeat_s, unknown)
        started |= {name: a.since for name, a in self.active.items()}
        await self.store.call(self._read_mismatches)
        campaigns, campaigns_mark = await self.store.call(self._campaigns_ended, now)
        expiring, tokens_mark = await self.store.call(self._tokens_expiring, now)
        audited, audit_mark = await self.store.call(self._audited, now)
        security = self._security_notices(now)
        notices, self._events = notices + self._events + campaigns + expiring + audited + security, []
        controls = await self.store.call(self.history.controls)
        entries = [
            Entry(n.at, n.name, n.state, n.text, self.watched.node, told=not controls.held_back(n, started, now))
            for n in notices
        ]
        for n, e in zip(notices, entries, strict=True):
            (log.info if n.state == "resolved" else log.warning)(
                "%s: %s%s", n.subject, n.text, "" if e.told else " (not sent: silenced or acknowledged)"
            )
        told = [n for n, e in zip(notices, entries, strict=True) if e.told]
        messages = [m for n in told for m in alert_messages(n, self.settings)]
        state = alerts.dump_state(self.active)
        if entries or state != self._saved:
            # The new state, what it says and its history go in together: a crash between them can neither lose
            # nor repeat an alert.
            def also() -> None:
                self.store.set_meta(ALERT_STATE, state)
                self.history.record(entries)
                if campaigns:  # told with them, in the same transaction: each end is told once
                    self.store.set_meta(CAMPAIGNS_TOLD, campaigns_mark)
                if expiring:  # the same: each token's stage is told once
                    self.store.set_meta(TOKENS_TOLD, tokens_mark)
                if audited:  # and each audit entry
                    self.store.set_meta(AUDIT_CURSOR, audit_mark)

            await self.outbox.put(messages, also)
            self._saved = state
        return notices

    async def run_jobs(self) -> None:
        """Make the units' health and the daily report when they are due, for ever: apart from the checks, which
        go on every `alerts.check_s` while a job takes minutes."""
        passing: tuple[type[Exception], ...] = (OSError, *self.store.errors)
        while True:
            try:
                if self.checked:  # then whether ingest is draining a backlog is known
                    await self.jobs()
            except passing as exc:  # a busy store or a full disk: said, tried again
                log.error("monitor jobs failed, trying again in %.0f s: %s", self.settings.alerts.check_s, exc)
            await asyncio.sleep(self.settings.alerts.check_s)

    async def jobs(self) -> None:
        """The units' health pass when `health.pass_every_s` has passed since the last (not while ingest drains a
        backlog), then yesterday's report when it is due."""
        now = self.clock()
        await self.keep_health(now)
        await self.report_if_due(now)

    async def keep_health(self, now: float) -> None:
        """The units' health pass (`monitoring.health_pass`), when due."""
        every = self.settings.health.pass_every_s
        if self.draining or now - self._health_at < every:
            return
        self._health_at = now
        try:
            started = time.monotonic()
            units = list(self.registry().units)
            kept = await self.runner.run(_health_pass, self.grid, units, now, limit_s=JOB_LIMIT_S)
        except JobFailed as exc:  # a part that fails must not stop the alerts and the report: said, tried later
            log.error("units' health records not kept (%s); trying again in %.0f s%s", exc, every, _detail(exc))
            self._health_failed = str(exc)[:300]
            return
        self.diag_dropped.update(kept.dropped)
        took = time.monotonic() - started
        log.info("units' health: %d records kept and the risk assessed in %.1f s", kept.records, took)
        self._health_failed = ""

    def conditions(self, now: float) -> tuple[dict[str, str], set[str]]:
        """The alert conditions that hold now, each with what an operator needs to know; and those not known yet."""
        a, s, w = self.settings.alerts, self.scan, self.watched
        holding: dict[str, str] = {}
        unknown: set[str] = set()
        b = w.bridge
        quiet = now - max(b.last_received, self.started)
        if s.units and quiet > a.ingest_silence_s:
            holding["ingest_stopped"] = (
                f"no telegram received for {quiet / 60:.0f} min while {s.units} units are "
                "registered" + ("" if b.connected else " (not connected to the broker)")
            )
        elif s.units and not b.last_received:
            unknown.add("ingest_stopped")  # just started: nothing received yet, but not for long
        if b.clock_error and now - b.clock_error_at < CLOCK_SAID_S:
            holding["clock_behind"] = (
                f"{b.clock_error}: ingest acknowledges nothing until it is set right (the broker keeps the telegrams)"
            )
        if b.status_refused:
            holding["status_refused"] = (
                f"the broker refused smame's subscription to the units' status topic: {b.status_refused}; "
                "readings are taken, but units' disconnects are not counted in their health"
            )
        if b.stalled_for(now) > self.settings.node.stall_s:
            holding["ingest_stalled"] = (
                f"telegrams received wait to be committed and no commit has finished for over "
                f"{self.settings.node.stall_s:.0f} s: the writer process or the store is stuck, and nothing is "
                "acknowledged meanwhile (docs/monitoring.md, ingest_stalled)"
            )
        if not b.connected and b.down_since is not None:
            if now - b.down_since > a.broker_down_s:
                holding["broker_unreachable"] = (
                    f"not connected to {self.settings.broker.url} for "
                    f"{(now - b.down_since) / 60:.0f} min: {b.last_error or 'no answer'}"
                )
            else:
                unknown.add("broker_unreachable")
        broken = w.broker_cluster(a.broker_down_s)
        if broken:
            holding["broker_cluster"] = "; ".join(broken)
        if w.export is not None and w.export.last_error:
            holding["export_failing"] = (
                "the last export run failed (retried after a minute, then less often, and at once on SIGHUP): "
                + w.export.last_error
            )
        low = []
        for path, (free, total) in self.disk().items():
            percent = 100 * free / total if total else 100.0
            if percent < a.disk_free_percent:
                low.append(f"{path}: {percent:.1f}% free ({free / 2**30:.1f} GiB)")
        if low:
            holding["disk_low"] = "; ".join(low)
        if w.bans is not None:
            banned = w.bans.active()
            if banned:
                holding["login_ban"] = "banned after repeated failed FTP/SFTP logins: " + ", ".join(
                    f"{addr} ({left / 60:.0f} min left)" for addr, left in sorted(banned.items())
                )
        if self.draining:
            unknown.add("units_silent")
        elif len(s.silent) >= a.silent_units_min:
            holding["units_silent"] = alerts.silent_units_text(s.silent, s.units, a.silent_after_s)
        if self._health_failed:
            holding["health_failing"] = (
                f"the units' health pass failed ({self._health_failed}): their records and risk are not kept and "
                f"the units at risk are as last assessed; tried again every {self.settings.health.pass_every_s:.0f} s"
            )
        if self._report_failed:
            holding["report_failing"] = (
                f"the report {self._report_failed}: tried again every {REPORT_RETRY_S / 60:.0f} min, and sent once "
                "it is made"
            )
        c = w.commands
        if c is not None and c.failing:
            holding["commands_failing"] = (
                f"commands to units cannot use the store ({c.failing}): none is sent and units' answers wait at the "
                "broker; tried again every few seconds"
            )
        elif c is not None and not c.connected and b.connected and c.down_since is not None:
            # (a broker down for ingest too is broker_unreachable: said once)
            if now - c.down_since > a.broker_down_s:
                holding["commands_failing"] = (
                    f"the commands' connection to the broker has been down for {(now - c.down_since) / 60:.0f} min "
                    f"while ingest's is up: {c.last_error or 'no answer'} (its client id ends in -devices; the "
                    "broker's ACL must let the ingest user read smame/v1/+/res and write smame/v1/+/cmd)"
                )
            else:
                unknown.add("commands_failing")
        most = self.settings.health.alert_at_risk
        if most and len(s.at_risk) > most:
            holding["units_at_risk"] = (
                at_risk.text(s.at_risk) + f" (more than health.alert_at_risk, {most}; the console's At risk page)"
            )
        holding.update(self._certificate_alerts(now))
        refused = w.reload_refused()
        if refused:
            holding["reload_refused"] = (
                f"a SIGHUP reload of the registry was refused; the previous one is in force: {refused}"
            )
        faults, gone = [], []
        for node, beat, row in s.nodes:
            if node == w.node:
                continue
            if now - beat > NODE_GONE_S:
                seen = datetime.fromtimestamp(beat, self.grid.zone).isoformat(timespec="seconds")
                gone.append(f"{node} ({row.get('role', '?')}, last beat {seen})")
                continue
            said = [str(row[k]) for k in ("fault", "export_error", "reload_error") if row.get(k)]
            faults += [f"{node}: {text}" for text in said]
        if faults:
            holding["node_faults"] = "; ".join(faults)
        if gone:
            holding["nodes_gone"] = "no beat from " + ", ".join(gone) + " (its row is dropped after a day)"
        failing = [f"{ch}: {err}" for ch, (since, err) in self.outbox.failing.items() if now - since > 600]
        if failing:
            holding["delivery_failing"] = "sending keeps failing (kept in the outbox and retried): " + "; ".join(
                failing
            )
        elif self.outbox.failing:
            unknown.add("delivery_failing")
        return holding, unknown

    def _draining(self, now: float) -> bool:
        """True while ingest, connected, is behind the broker (`caught_up` says no), for `report.catch_up_wait_s` at
        most: after an outage the broker holds hours of telegrams, and units whose readings wait there are not
        silent. A fleet whose telegrams never pause long enough to look caught up is scanned again after that
        wait; while the broker cannot be reached, nothing drains and the scan goes on as ever."""
        bridge = self.watched.bridge
        if not bridge.connected or bridge.caught_up(now):
            self._behind_since = None
            return False
        if self._behind_since is None:
            self._behind_since = now
        return now - self._behind_since < self.settings.report.catch_up_wait_s

    def disk(self) -> dict[str, tuple[int, int]]:
        """Free and total bytes of the file system of each watched directory."""
        out = {}
        for path in self.watched.paths:
            try:
                usage = shutil.disk_usage(path)
            except OSError:  # not made yet (the export directory before the first run)
                continue
            out[str(path)] = (usage.free, usage.total)
        return out

    async def report_if_due(self, now: float) -> bool:
        """Queue yesterday's report once `report.at` has passed today; True when it was queued now."""
        r = self.settings.report
        if not r.enabled:
            return False
        local = datetime.fromtimestamp(now, self.grid.zone)
        if local.hour * 60 + local.minute < r.minutes:
            return False
        day = local.date() - timedelta(days=1)
        done = await self.store.call(self.store.get_meta, REPORT_DONE, "")
        if done and date.fromisoformat(done) >= day:
            return False
        # After a restart the broker may still hold hours of telegrams for us: a report built now would call
        # missing what arrives seconds later. It waits until ingest has caught up, for a while at most.
        b = self.watched.bridge
        if self._due_since is None:
            self._due_since = now
        waited = now - self._due_since
        caught_up = b.caught_up(now)  # once: the wait and the caveat must agree
        if not caught_up and waited < r.catch_up_wait_s:
            return False
        caveat = (
            ""
            if caught_up
            else (
                f"ingest had not caught up after {waited / 60:.0f} min ("
                + (
                    "not connected to the broker"
                    if not b.connected
                    else f"{b.pending} telegrams waiting to be committed"
                    if b.pending
                    else "telegrams still arriving"
                )
                + "): slots listed as missing may still arrive"
            )
        )
        if now < self._report_retry_at:
            return False
        key = f"report:{day.isoformat()}"
        try:
            made = await self.runner.run(
                make_report,
                self.grid,
                Fleet.of(self.registry()),
                day,
                int(now),
                r.silent_after_s,
                r.zero_run_slots,
                caveat,
                self.settings.health.report_units,
                limit_s=JOB_LIMIT_S,
            )
        except JobFailed as exc:  # alerts go on meanwhile, and an operator is told
            log.error(
                "daily report for %s not made (%s); trying again in %.0f s%s", day, exc, REPORT_RETRY_S, _detail(exc)
            )
            self._report_failed = f"for {day} failed ({exc})"[:300]
            self._report_retry_at = now + REPORT_RETRY_S
            return False
        self._due_since = None
        self._report_failed = ""
        messages = made.rendered.messages(self.settings, now, key)
        await self.outbox.put(messages, lambda: self.store.set_meta(REPORT_DONE, day.isoformat()))
        log.info(
            "daily report for %s made in %.1f s, queued for %s: %d of %d units with problems, %d problem slots",
            day,
            made.seconds,
            ", ".join(ch for _, ch, _ in messages) or "no channel (log only)",
            made.with_problems,
            made.units,
            made.problem_slots,
        )
        return True

    # --- on the store thread ----------------------------------------------------------------------

    def _read_mismatches(self) -> None:
        # Telegrams under another unit's topic, from the quarantine: what a restart finds there is told too,
        # once (the cursor is kept in the store).
        saved = int(self.store.get_meta(MISMATCH_CURSOR, "-1"))
        cursor = saved
        if cursor < 0:  # a new installation, or one from before this: the past is not news
            cursor = max((q.id for q in self.store.quarantine(Reason.UNIT_MISMATCH, 1)), default=0)
        rows = self.store.quarantine_after(Reason.UNIT_MISMATCH, cursor)
        if rows:
            self.security.mismatches(q.detail for q in rows)
            cursor = rows[-1].id
        if cursor != saved:  # a write only when there is news, not at every check
            self.store.set_meta(MISMATCH_CURSOR, str(cursor))

    def _nodes(self, now: float) -> list[tuple[str, float, dict[str, object]]]:
        if now - self._pruned >= 3600:  # housekeeping, hourly: rows of nodes long gone, an old history
            self.store.forget_nodes(now - NODE_FORGET_S)
            self.history.prune(now - self.settings.alerts.history_days * 86400)
            self._pruned = now
        return self.store.nodes()

    def _load_state(self) -> dict[str, Active]:
        raw = self.store.get_meta(ALERT_STATE, "{}")
        state = alerts.load_state(raw)
        if state is None:
            log.warning("alert state unreadable, starting afresh: %r", raw[:200])
        return state or {}

    def _scan(self, now: float) -> Scan:
        registry = self.registry()
        last = self.store.last_readings(registry.units)
        a = self.settings.alerts
        silent = {
            u: registry.units[u].customer for u, t in last.items() if t is not None and now - t > a.silent_after_s
        }
        reporting = {
            "1h": sum(1 for t in last.values() if t is not None and now - t <= 3600),
            "1d": sum(1 for t in last.values() if t is not None and now - t <= 86400),
        }
        upto = self.grid.floor(now)
        day = datetime.fromtimestamp(now, self.grid.zone).date()
        start = self.grid.day_start(day)
        closed = len(self.grid.closed(day, upto))
        counts = self.store.slot_quality_counts(start, upto) if closed else {}
        present = counts.get("A", 0) + counts.get("E", 0)
        slots_today = {
            "A": counts.get("A", 0),
            "E": counts.get("E", 0),
            "M": max(0, len(registry.units) * closed - present),
        }
        pending = OutboxTable(self.store).counts()["pending"]
        standing = at_risk.read(self.store, self.grid, now)
        return Scan(len(registry.units), silent, reporting, slots_today, pending, at_risk=standing)


def _health_pass(store: Store, grid: Grid, units: list[str], now: float, stopping: Callable[[], bool]) -> Kept:
    """The monitor's job (`monitoring.worker`): the units' health pass (`monitoring.health_pass`)."""
    from monitoring.health_pass import keep_health  # polars, numpy and scipy: not in smame's own process

    return keep_health(store, grid, units, now, stopping)


def _detail(exc: JobFailed) -> str:
    """A failed job's traceback on lines of its own after the log line, when it raised."""
    return f"\n{exc.detail.rstrip()}" if exc.detail else ""


def certificates_text(held: Sequence[Held], now: float, zone: tzinfo, limit: int = 10) -> str:
    """The soonest of these certificates, each with its file, subject and end (days left, or expired), and how
    many more."""
    shown = []
    for h in held[:limit]:
        left = h.not_after - now
        when = datetime.fromtimestamp(h.not_after, zone).isoformat(timespec="minutes")
        state = f"{left / 86400:.0f} days left" if left > 0 else "EXPIRED"
        shown.append(f"{h.path} ({h.subject}{', a CA' if h.ca else ''}) until {when}, {state}")
    more = f" and {len(held) - limit} more (smame certs list)" if len(held) > limit else ""
    return "; ".join(shown) + more

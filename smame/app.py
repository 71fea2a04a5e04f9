"""The composition root: builds the settings' parts and supervises the services in one TaskGroup."""

from __future__ import annotations

import asyncio
import faulthandler
import fcntl
import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from prometheus_client import CollectorRegistry

from aggregator.backends import is_postgres, open_url
from aggregator.ingest import UnitTable
from aggregator.sqlite import file_identity, sqlite_path
from aggregator.store import Deposed, Store, StoreError
from aggregator.writer import Writer, WriterError
from broker_bridge.bridge import Bridge, BrokerTarget, tls_context
from broker_bridge.cluster import ClusterWatch
from broker_bridge.devices import Devices
from broker_bridge.mqtt import version_for
from broker_bridge.telegram import Rules
from csv_export.exporter import Exporter
from ftp_gateway.accounts import Accounts, Bans, Doorway
from ftp_gateway.ftp import FtpOptions
from ftp_gateway.service import FileGateway
from kernel.reading import Incoming, Refused, Status
from kernel.registry import Registry, RegistryError, load_registry
from kernel.settings import Settings
from kernel.timegrid import Grid
from monitoring.direct import DirectAlert
from monitoring.http import MonitoringServer
from monitoring.mail import SmtpChannel
from monitoring.metrics import SmameCollector, Sources
from monitoring.monitor import CLOCK_SAID_S, Monitor, Watched
from monitoring.outbox import Channel, Outbox
from monitoring.sources import ExportCounters
from monitoring.worker import Worker
from smame import __version__
from smame.users import set_password
from web.context import WebContext
from web.proxies import Proxies
from web.server import WebServer

if TYPE_CHECKING:
    from aggregator.leadership import Leadership

log = logging.getLogger("smame")


def unit_table(registry: Registry) -> UnitTable:
    """The registry's units as the writer process needs them."""
    return UnitTable.of(registry, registry.units)


class RegistryHolder:
    """The registry in force; replaced whole on reload, so readers always see one consistent version."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock  # today's date, by the settings' time zone, bounds the factors' published dates
        self.current = self._load()
        self.refused = ""  # why the last reload was refused ("" when it was not)

    def _load(self) -> Registry:
        s = self.settings
        today = datetime.fromtimestamp(self.clock(), ZoneInfo(s.timezone)).date()
        registry = load_registry(
            s.registry.units, s.registry.customers, s.contract_kw, s.ingest.gap_cap_slots, s.emissions.factors, today
        )
        for warning in registry.unknown_menus():
            log.warning("%s: its market-based CO2 stays empty", warning)
        return registry

    def reload(self) -> bool:
        """Read the files again; keep the old registry if the new one is wrong (and say False)."""
        try:
            new = self._load()
        except RegistryError as exc:
            log.error("registry reload refused, keeping %d units: %s", len(self.current.units), exc)
            self.refused = str(exc)
            return False
        self.current, self.refused = new, ""
        log.info("registry reloaded: %d units, %d customers", len(new.units), len(new.customers))
        return True


def listeners(settings: Settings, files_only: bool = False) -> list[tuple[str, str, int]]:
    """(setting, address, port) of every listener the settings turn on."""
    f, s, m = settings.ftp, settings.sftp, settings.monitoring
    out = [("ftp.port", f.host, f.port)] if f.enabled else []
    out += [("sftp.port", s.host, s.port)] if s.enabled else []
    out += [("monitoring.metrics_port", m.host, m.metrics_port)] if m.enabled and not files_only else []
    out += [("web.port", settings.web.bind, settings.web.port)] if settings.web.enabled and not files_only else []
    return out


def check_ports(wanted: list[tuple[str, str, int]]) -> None:
    """Raise OSError naming the setting when one of the ports cannot be listened on (in use, not allowed),
    before anything starts: a service that fails to bind later would stop smame with a traceback."""
    for setting, host, port in wanted:
        if not port:
            continue
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers themselves do
                probe.bind((host, port))
                probe.listen()
        except OSError as exc:
            raise OSError(f"{setting}: cannot listen on {host} port {port}: {exc.strerror or exc}") from None


@contextmanager
def store_lock(settings: Settings, holder: str = "run") -> Iterator[None]:
    """Held alone, while it runs, by whatever may not share an SQLite store with another process: `smame run`
    (one process per store: a second one would ingest, alert and export beside the first), `restore` and
    `migrate`. The lock file names its holder and pid, so the one refused is told who holds it; raises OSError
    saying so. A PostgreSQL store needs none: its server keeps the nodes that share it apart."""
    if is_postgres(settings.storage_url):
        yield
        return
    path = sqlite_path(settings.storage_url)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            kind, _, pid = f.read(100).strip().partition(" ")
            doing = {"run": "in use by smame run", "restore": "being restored", "migrate": "being migrated"}
            what = f"{path} is {doing.get(kind, 'in use')} (pid {pid if pid.isdigit() else 'unknown'})"
            if holder != "run":
                raise OSError(f"{what}: stop it first") from None
            why = "one smame run per SQLite store" if kind == "run" else "try again when that is done"
            raise OSError(f"{what}: {why}") from None
        f.seek(0)
        f.truncate()
        f.write(f"{holder} {os.getpid()}\n")
        f.flush()
        yield


def open_store(settings: Settings, create: bool = True, application_name: str = "smame") -> Store:
    """The store named by the settings; without `create`, an SQLite file that does not exist yet is an error (a
    command that only reads must not leave an empty database behind, nor answer from one)."""
    url = settings.storage_url
    if not create and not is_postgres(url) and not sqlite_path(url).exists():
        raise StoreError(
            f"no database at {sqlite_path(url)}: run this where smame runs (settings data_dir, storage.url; -c), "
            "or start smame run once to create it"
        )
    return open_url(url, settings.storage.synchronous, application_name=application_name)


BANS_EVERY_S = 3.0  # how often a node shares its bans and learns of lifted ones


def node_name() -> str:
    """What this process is called among the nodes sharing a store: host and process id."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}"


def build_exporter(
    settings: Settings,
    registry: RegistryHolder,
    grid: Grid,
    clock: Callable[[], float] = time.time,
    create: bool = True,
) -> Exporter:
    """The exporter on a store connection of its own, so rendering never waits on ingest or holds it up; without
    `create`, a store that does not exist yet is an error (`open_store`)."""
    e = settings.export
    assert e.dir is not None
    return Exporter(
        open_store(settings, create),
        lambda: registry.current,
        grid,
        e.dir,
        e.retention_days,
        e.grace_s,
        settings.storage.retention_days,
        workers=e.workers,
        clock=clock,
        quarantine_days=settings.ingest.quarantine_days,
    )


def build_gateway(
    settings: Settings,
    registry: RegistryHolder,
    clock: Callable[[], float] = time.time,
    store: Callable[[], Store] | None = None,
) -> FileGateway | None:
    """FTP/FTPS and SFTP over the export directory, as the settings enable them; with `store`, which files were
    downloaded is kept on a connection it opens (closed by the caller: `FileGateway.store`)."""
    f, s = settings.ftp, settings.sftp
    if not (f.enabled or s.enabled):
        return None
    assert settings.export.dir is not None
    accounts = Accounts(
        lambda: registry.current,
        settings.export.dir,
        lambda user, password: set_password(settings.registry.customers, user, password),
        clock,
    )
    bans = Bans(f.ban_after, f.ban_window_s, f.ban_s)
    doorway = Doorway(f.max_unauthenticated_per_ip, f.max_unauthenticated, f.login_timeout_s)
    ftp = None
    if f.enabled:
        cert = f.certfile or settings.data_dir / "ftps-cert.pem"
        key = f.keyfile or settings.data_dir / "ftps-key.pem"
        if f.certfile is None:
            from ftp_gateway.certs import ensure_certificate  # cryptography (0.06 s) only where it is needed

            ensure_certificate(cert, key, ["localhost", "127.0.0.1"])
        ftp = FtpOptions(
            f.host,
            f.port,
            (cert, key),
            f.tls_required,
            f.passive_range,
            f.masquerade_address,
            f.max_connections,
            f.max_connections_per_ip,
            f.fail_delay_s,
        )
    sftp = (s.host, s.port, s.host_key or settings.data_dir / "ssh_host_ed25519_key") if s.enabled else None
    return FileGateway(accounts, bans, doorway, ftp, sftp, store() if store else None)


def build_web(
    settings: Settings,
    registry: RegistryHolder,
    grid: Grid,
    bans: Bans,
    clock: Callable[[], float],
    exporter: ExportCounters | None = None,
    node: Callable[[], Mapping[str, object]] = lambda: {"role": "leader"},
) -> tuple[WebServer, Store]:
    """The web server with the API and the console, on a store connection of its own (returned: closed when
    smame stops)."""
    assert settings.export.dir is not None
    store = open_store(settings, application_name="smame web")
    context = WebContext(
        store,
        lambda: registry.current,
        grid,
        settings.export.dir,
        bans,
        clock,
        settings.web.max_days,
        settings.ftp.fail_delay_s,
        settings.alerts.silent_after_s,
        settings.export.retention_days,
        exporter,
        node,
        settings.devices.expiry_s,
        settings.devices.keep_days,
        settings.data_dir / "firmware",
        firmware_url=settings.devices.firmware_url,
        require_2fa=settings.web.require_2fa,
    )

    def application() -> object:
        from web.app import build_app  # FastAPI loads on the web's own thread

        return build_app(context)

    return WebServer(application, settings.web.bind, settings.web.port, Proxies(settings.web.trusted_proxies)), store


def node_about(
    leadership: Leadership | None, cluster: ClusterWatch | None = None, bridge: Bridge | None = None
) -> dict[str, object]:
    """A node's role (leader or standby), its name, and the leader's node and epoch as it last saw them (the only
    node on SQLite always leads); with `cluster`, the broker's nodes as it sees them and the one it reads from."""
    if leadership is None:
        out: dict[str, object] = {"role": "leader", "node": node_name()}
    else:
        seen = leadership.leader
        out = {
            "role": "leader" if leadership.leading else "standby",
            "node": leadership.node,
            "leader": seen.get("node"),
            "epoch": seen.get("epoch"),
        }
    if cluster is not None:
        out["broker"] = {"node": bridge.stats.node if bridge is not None else "", **cluster.about()}
    return out


def build_channels(settings: Settings) -> dict[str, Channel]:
    """A channel for each one configured (mail, Slack)."""
    channels: dict[str, Channel] = {}
    if settings.mail.smtp_url:
        channels["mail"] = SmtpChannel(settings.mail)
    if settings.slack.enabled:
        from monitoring.slack_channel import SlackChannel  # slack-sdk only where Slack is configured

        channels["slack"] = SlackChannel(settings.slack)
    return channels


def build_outbox(settings: Settings, store: Store, clock: Callable[[], float] = time.time) -> Outbox:
    """The outbox with a channel for each one configured (mail, Slack)."""
    m = settings.monitoring
    return Outbox(
        store,
        build_channels(settings),
        backoff_min=m.outbox_retry_s,
        give_up_s=m.outbox_give_up_s,
        clock=clock,
        keep_s=m.outbox_keep_days * 86400,
        # standby nodes queue their file gateways' security events in the shared store: the leader's outbox
        # finds them as soon as its monitor would have
        poll_s=min(60.0, settings.alerts.check_s),
    )


def broker_target(settings: Settings) -> BrokerTarget:
    """Connection parameters from the broker settings."""
    b = settings.broker
    return BrokerTarget(
        nodes=b.nodes,
        tls=tls_context(
            str(b.ca_file) if b.ca_file else None,
            str(b.cert_file) if b.cert_file else None,
            str(b.key_file) if b.key_file else None,
        )
        if b.tls
        else None,
        version=version_for(b.kind),
        client_id=b.client_id,
        username=b.username,
        password=b.password.get_secret_value() if b.password else None,
        topic=b.topic,
        session_expiry=b.session_expiry,
        keepalive=b.keepalive,
        batch_size=b.batch_size,
        batch_delay=b.batch_delay_ms / 1000,
        reconnect_min=b.reconnect_min_s,
        reconnect_max=b.reconnect_max_s,
    )


STARTUP_WAIT_S = 300.0  # how long the first export waits for ingest to subscribe and drain before it starts anyway
MONITOR_WAIT_S = 5.0  # the same for the monitor


@dataclass
class App:
    """Everything `smame run` runs. On PostgreSQL, `leadership` says whether this node leads: the leader runs
    ingest, the monitor and the outbox; every node exports its own files, serves them and its metrics."""

    settings: Settings
    registry: RegistryHolder
    writer: Writer
    bridge: Bridge
    exporter: Exporter | None
    gateway: FileGateway | None
    monitor: Monitor | None
    leadership: Leadership | None = None
    web: tuple[WebServer, Store] | None = None
    clock: Callable[[], float] = time.time
    bans: Bans | None = None  # the node's one ban list (its gateway's and web server's)
    devices: Devices | None = None  # the leader's commands to units
    cluster: ClusterWatch | None = None  # the broker's nodes looked at (a cluster, or a management API)
    _reloading: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def build(cls, settings: Settings, clock: Callable[[], float] = time.time) -> App:
        """Wire the parts, all reading time from `clock`; raises RegistryError or OSError with a clear message on
        bad input."""
        registry = RegistryHolder(settings, clock)
        grid = Grid(settings.timezone)
        leadership = None
        leader_session = "smame"  # what the leader's own sessions are called (PostgreSQL)
        # reachable, its schema made or migrated (before the processes that open it too): or one line saying why not
        open_store(settings).close()
        if is_postgres(settings.storage_url):
            from aggregator.leadership import Leadership  # psycopg loads only where it is used

            leadership = Leadership(
                settings.storage_url, node_name(), clock=clock, max_offset_s=settings.node.max_clock_offset_s
            )
            leader_session = leadership.session
        # with a shared subscription other ingest processes write the same store
        writer = Writer(
            settings.storage_url,
            settings.storage.synchronous,
            grid,
            unit_table(registry.current),
            shared=settings.broker.topic.startswith("$share/"),
        )

        async def commit(incoming: list[Incoming], refused: list[Refused], statuses: list[Status]) -> None:
            await writer.commit(incoming, refused, int(clock()), statuses)

        i = settings.ingest
        rules = Rules(grid.on_boundary, i.clock_tolerance_s, i.max_age_days * 86400, i.max_readings)
        bridge = Bridge(broker_target(settings), commit, lambda: registry.current.units, rules)
        if leadership is not None:
            leadership.probe = bridge.probe
        b = settings.broker
        cluster = (
            ClusterWatch(bridge.target, b.management_url, b.watch_s, clock)
            if len(b.nodes) > 1 or b.management_url
            else None
        )
        exporter = build_exporter(settings, registry, grid, clock) if settings.export.enabled else None
        # `smame serve-files` (on a host that may not reach the store) has none: its downloads are only logged
        gateway = build_gateway(settings, registry, clock, lambda: open_store(settings, application_name="smame files"))
        devices = None
        if settings.devices.enabled:
            # a connection of its own: a command or an answer never waits on ingest's commits
            devices_store = open_store(settings, application_name=leader_session)
            devices = Devices(broker_target(settings), devices_store, settings.devices, clock, lambda: registry.current)
        monitor = None
        if settings.alerts.enabled or settings.report.enabled:
            # A connection of its own: scans and the outbox never wait on ingest or export.
            monitor_store = open_store(settings, application_name=leader_session)
            paths = [settings.data_dir] + (
                [settings.export.dir] if exporter is not None and settings.export.dir else []
            )
            watched = Watched(
                bridge.stats,
                exporter.stats if exporter else None,
                gateway.bans if gateway else None,
                paths,
                lambda: registry.refused,
                leadership.node if leadership is not None else node_name(),
                devices.stats if devices is not None else None,
                cluster.problems if cluster is not None else lambda down_after_s: [],
            )
            monitor = Monitor(
                settings,
                monitor_store,
                grid,
                lambda: registry.current,
                watched,
                build_outbox(settings, monitor_store, clock),
                clock,
                # the health pass and the daily report each in a process of their own, on a connection named as
                # the monitor's: a node taking over ends it too
                Worker(
                    functools.partial(
                        open_url, settings.storage_url, settings.storage.synchronous, application_name=leader_session
                    )
                ),
            )
            bridge.on_session_lost = monitor.session_lost
            if gateway is not None:  # security events
                gateway.bans.on_ban = monitor.security.ban
                gateway.accounts.on_failed_login = monitor.security.failed_login
        web = None
        f = settings.ftp  # one ban list a node: an address guessing at one door is kept from all of them
        bans = gateway.bans if gateway is not None else Bans(f.ban_after, f.ban_window_s, f.ban_s)
        if settings.web.enabled:
            if monitor is not None and gateway is None:
                bans.on_ban = monitor.security.ban
            about = functools.partial(node_about, leadership, cluster, bridge)
            web = build_web(settings, registry, grid, bans, clock, exporter.stats if exporter else None, about)
        app = cls(settings, registry, writer, bridge, exporter, gateway, monitor, leadership, web, clock)
        app.bans = bans if gateway is not None or web is not None else None
        app.devices = devices
        app.cluster = cluster
        if leadership is not None:
            leadership.ingest_fault = app.leader_fault
            leadership.report = app.node_report
        return app

    def services(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """The long-running services, by name: the leader's (on PostgreSQL, `lead` runs them while this node
        leads), and those of every node."""
        out: dict[str, Callable[[], Awaitable[None]]] = {"lead": self.lead}
        if self.leadership is None:  # SQLite: the only node leads from the start
            out = self.leader_services(None)
        if self.exporter is not None:
            out["export"] = functools.partial(self.after_ingest, self.exporter.run, drained=True)
        if self.gateway is not None:
            out["files"] = self.gateway.run
        if self.settings.monitoring.enabled:
            out["metrics"] = self.serve_metrics
        if self.cluster is not None:
            out["broker-watch"] = self.cluster.run
        if self.web is not None:
            # at once: FastAPI loads on its thread while the writer process starts, not during the backlog's drain
            out["web"] = self.web[0].run
        if self.monitor is not None and self.leadership is not None:
            out["security"] = self.standby_security
        if self.leadership is not None and self.settings.alerts.enabled:
            out["store-watch"] = self.store_watch
        if self.bans is not None:
            out["bans"] = self.share_bans
        return out

    async def share_bans(self) -> None:
        """Every BANS_EVERY_S, bring this node's ban list and the store's in step (`Bans.exchange`), on a
        connection of its own; while the store is away, the node keeps its own bans and tries again."""
        assert self.bans is not None
        bans, node = self.bans, self.leadership.node if self.leadership is not None else node_name()
        store: Store | None = None

        def exchange(store: Store) -> None:
            now = self.clock()
            new = bans.exchange(store.bans(now), now, node)
            if new:
                store.keep_bans(new)
                bans.kept(new)

        try:
            while True:
                try:
                    if store is None:
                        store = await asyncio.to_thread(open_store, self.settings, False, "smame bans")
                    await store.call(exchange, store)
                except Exception as exc:  # noqa: BLE001 (the store away or refusing: the node keeps its own bans)
                    log.warning("bans not shared with the other nodes for now: %s", exc)
                await asyncio.sleep(BANS_EVERY_S)
        finally:
            if store is not None:
                await asyncio.to_thread(store.close)

    async def store_watch(self) -> None:
        """On PostgreSQL, every node: while this node cannot use the store for `alerts.store_down_s`, say so
        straight to the channels (the outbox is in the store); when it can again, say that too."""
        assert self.leadership is not None
        leadership, a = self.leadership, self.settings.alerts
        direct = DirectAlert("store_unreachable", self.settings, build_channels(self.settings), self.clock)

        def holding() -> str:
            if not leadership.last_error:
                return ""
            return (
                f"node {leadership.node} cannot use the store: {leadership.last_error}. While no node can, nothing "
                "is ingested, acknowledged, reported or alerted through it (units keep their readings, the broker "
                "keeps the telegrams); is PostgreSQL up, reachable, and free of a lock on smame's tables "
                "(pg_locks)?"
            )

        await direct.watch(holding, a.store_down_s, min(5.0, a.check_s))

    async def standby_security(self) -> None:
        """While this node stands by, tell its file gateway's security events through the shared outbox (the
        leader sends them); while it leads, its monitor does."""
        assert self.monitor is not None and self.leadership is not None
        passing: tuple[type[Exception], ...] = (OSError, *self.monitor.store.errors)
        while True:
            await asyncio.sleep(self.settings.alerts.check_s)
            if not self.leadership.leading:
                try:
                    await self.monitor.tell_security()
                except passing as exc:  # the store away for a while: these events are in the log only
                    log.error("security events not queued for sending: %s", exc)

    def leader_services(self, fence: tuple[str, int] | None) -> dict[str, Callable[[], Awaitable[None]]]:
        """The services only the leader runs, by name; `fence` is its sessions' name and epoch (PostgreSQL)."""
        out: dict[str, Callable[[], Awaitable[None]]] = {"ingest": functools.partial(self.ingest, fence)}
        if self.monitor is not None:
            # soon, not at once: its first look at a fleet's store must not delay the subscription, and a broker
            # that is down is only alerted after alerts.broker_down_s anyway
            out["monitor"] = functools.partial(self.after_ingest, self.monitor.run, MONITOR_WAIT_S)
            # the health pass and the report (minutes at a million units): the checks go on meanwhile
            out["monitor jobs"] = functools.partial(self.after_ingest, self.monitor.run_jobs, MONITOR_WAIT_S)
            out["outbox"] = self.monitor.outbox.run
        if self.devices is not None:
            out["devices"] = functools.partial(self.after_ingest, self.devices.run, MONITOR_WAIT_S)
        return out

    async def lead(self) -> None:
        """Run the leader's services while this node is elected, standing by before and after. A node deposed
        (or whose writer lost the store) stands by again; only a fault of smame's own stops it."""
        assert self.leadership is not None
        try:
            while True:
                epoch = await self.leadership.acquire()
                if self.monitor is not None and self.leadership.took_over is not None:
                    self.monitor.failover(self.leadership.node, epoch, *self.leadership.took_over)
                services = self.leader_services((self.leadership.session, epoch))
                try:
                    async with asyncio.TaskGroup() as group:
                        group.create_task(self.leadership.hold(), name="leadership")
                        group.create_task(_run_all(services), name="leader")
                except BaseExceptionGroup as group_error:
                    # deposed, or the store failed under the writer: another node may lead meanwhile; any other
                    # error is a fault of smame's own and stops it
                    lost, other = group_error.split((Deposed, WriterError))
                    if lost is None or other is not None:
                        raise
                    log.error("this node no longer leads (epoch %d): %s; standing by", epoch, _first(lost))
                finally:
                    self.leadership.epoch = None
                await asyncio.sleep(self.leadership.period)
        finally:  # stopping: the lock goes at once, and a standby takes over without waiting for a stale beat
            await self.leadership.close()

    async def after_ingest(
        self, service: Callable[[], Awaitable[None]], wait_s: float = STARTUP_WAIT_S, drained: bool = False
    ) -> None:
        """Run a service once ingest has subscribed, and with `drained` once it has also caught up with the
        backlog the broker kept for it (or `wait_s` has passed): start-up work (the first export with its worker
        processes, the first scan) must neither delay the subscription nor take CPU from the drain."""

        async def ready() -> None:
            if self.leadership is not None:
                await self.leadership.decided.wait()
                if not self.leadership.leading:  # a standby has no backlog of its own to wait for
                    return
            await self.bridge.subscribed.wait()
            while drained and not self.bridge.stats.caught_up(time.time()):
                await asyncio.sleep(0.5)

        try:
            async with asyncio.timeout(wait_s):
                await ready()
        except TimeoutError:
            pass
        await service()

    async def ingest(self, fence: tuple[str, int] | None = None) -> None:
        """The writer process, and the bridge feeding it, until cancelled. The bridge subscribes while the writer
        starts: the writer takes requests in order, so the first commit waits for it, and nothing is
        acknowledged before it is committed. With `fence` every commit checks the leader's epoch."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._writer(fence), name="writer")
                group.create_task(self.bridge.run(), name="bridge")
        finally:  # cancelled while starting (SIGTERM at once): the writer is closed all the same
            # a writer that commits nothing, or one whose node no longer leads (its commits would be refused by
            # the epoch), is killed rather than waited for: it holds nothing acknowledged
            stuck = self.bridge.stats.stalled_for(self.clock()) > self.settings.node.stall_s
            deposed = self.leadership is not None and not self.leadership.leading
            close = self.writer.abort if stuck or deposed else self.writer.close
            await asyncio.get_running_loop().run_in_executor(None, close)

    async def _writer(self, fence: tuple[str, int] | None) -> None:
        await self.writer.start(fence)
        log.info("writer process %d has the store open", self.writer.pid)
        await self.writer.watch()

    def leader_fault(self) -> str:
        """What keeps this node, leading, from ingesting ("" when nothing): off the broker for longer than
        `node.handover_s` in this term, or telegrams waiting with no commit for longer than `node.stall_s`.
        Leadership hands over to a node without a fault when there is one."""
        now, b, n = self.clock(), self.bridge.stats, self.settings.node
        since = self.leadership.since if self.leadership is not None else 0.0
        if not b.connected and now - max(b.down_since or now, since) > n.handover_s:
            return f"cannot reach the broker for {now - max(b.down_since or now, since):.0f} s: {b.last_error}"
        stalled = b.stalled_for(now)
        if stalled > n.stall_s:
            return f"ingest stalled: {b.pending} telegrams wait, no commit has finished for {stalled:.0f} s"
        return ""

    def node_report(self) -> dict[str, object]:
        """What this node adds to its row among the nodes: its export (failed runs, last error and success),
        its registry reload, what it failed to send (as leader), and its version."""
        out: dict[str, object] = {"version": __version__, "reload_error": self.registry.refused}
        if self.cluster is not None:
            out["broker"] = self.cluster.about()
        if self.exporter is not None:
            s = self.exporter.stats
            out |= {"export_error": s.last_error, "export_ok": s.last_success, "export_failures": s.failures}
        if self.monitor is not None and self.monitor.outbox.failing:
            out["delivery_error"] = "; ".join(f"{ch}: {e}" for ch, (_, e) in self.monitor.outbox.failing.items())
        return out

    async def reload(self) -> None:
        """SIGHUP: read the registry again on a thread of its own (a fleet's files take a while to read, and the
        event loop acknowledges meanwhile); the writer gets the new one too. Reloads run one at a time."""
        async with self._reloading:
            log.info(
                "registry: reading %s and %s again", self.settings.registry.units, self.settings.registry.customers
            )
            loop = asyncio.get_running_loop()
            if await loop.run_in_executor(None, self.registry.reload):
                table = await loop.run_in_executor(None, unit_table, self.registry.current)
                self.writer.reload(table)
        if self.exporter is not None:
            self.exporter.retry_now()

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload(), name="reload")
        self._tasks.add(task)  # kept until done: the loop holds only a weak reference
        task.add_done_callback(self._tasks.discard)

    def health(self) -> dict[str, str]:
        """Each part's state for /healthz: "ok" or what is wrong. A standby's ingest is fine unconnected."""
        standby = self.leadership is not None and not self.leadership.leading
        b, now = self.bridge.stats, self.clock()
        if standby:  # not connected, by design; what keeps it from taking over is its fault
            fault = self.leadership.fault if self.leadership is not None else ""
            checks = {"ingest": f"could not take over: {fault}" if fault else "ok"}
        elif b.clock_error and now - b.clock_error_at < CLOCK_SAID_S:
            checks = {"ingest": f"refusing to acknowledge: {b.clock_error}"}
        elif not b.connected:
            checks = {"ingest": "not connected to the broker" + (f": {b.last_error}" if b.last_error else "")}
        elif b.stalled_for(now) > self.settings.node.stall_s:
            checks = {
                "ingest": f"stalled: {b.pending} telegrams wait, no commit has finished for {b.stalled_for(now):.0f} s"
            }
        else:
            checks = {"ingest": "ok"}
        if b.status_refused and not standby:
            checks["status"] = f"units' connection events are not taken: {b.status_refused}"
        checks["registry"] = (
            f"reload refused, the previous one kept: {self.registry.refused}" if self.registry.refused else "ok"
        )
        path = self.writer.path
        if path is not None and self.writer.identity is not None and file_identity(path) != self.writer.identity:
            checks["store"] = f"the database file {path} was deleted or replaced: restart smame"
        elif self.leadership is not None and self.leadership.last_error:
            checks["store"] = f"unreachable: {self.leadership.last_error}"
        else:
            checks["store"] = "ok"
        if self.exporter is not None:
            error = self.exporter.stats.last_error
            checks["export"] = "ok" if not error else f"failing: {error}"
        if self.gateway is not None:
            up = self.gateway.ftp_port is not None or self.gateway.sftp_port is not None
            checks["delivery"] = "ok" if up else "not listening"
        return checks

    def about(self) -> dict[str, object]:
        """This node's role for /healthz: leader or standby, the leader's node and epoch as last seen, and the
        broker's cluster as this node sees it."""
        return node_about(self.leadership, self.cluster, self.bridge)

    async def serve_metrics(self) -> None:
        """Serve /metrics and /healthz until cancelled."""
        registry = CollectorRegistry()
        registry.register(
            SmameCollector(
                Sources(
                    self.bridge.stats,
                    self.writer.totals,
                    lambda: len(self.registry.current.units),
                    self.exporter.stats if self.exporter else None,
                    self.gateway.accounts if self.gateway else None,
                    self.bans,  # (the file gateway's and the web's one list)
                    self.monitor,
                    self.leadership,
                    self.devices.stats if self.devices else None,
                    self.cluster,
                )
            )
        )
        m = self.settings.monitoring
        server = MonitoringServer(m.host, m.metrics_port, registry, self.health, about=self.about)
        server.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.stop)

    async def run(self) -> None:
        """Run every service until SIGTERM/SIGINT; a crashed service stops them all and raises."""
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None
        stopping = False

        def stop(signame: str) -> None:
            nonlocal stopping
            if stopping:  # the operator insists: what is not acknowledged is redelivered by the broker
                log.warning("%s received again: exiting now", signame)
                os._exit(130)
            stopping = True
            log.info("%s received: stopping", signame)
            _deadline(STOP_DEADLINE_S)
            main.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        log.info(
            "smame started: %d units, %d customers, store %s, time zone %s",
            len(self.registry.current.units),
            len(self.registry.current.customers),
            self.writer.path,
            self.settings.timezone,
        )
        try:
            await _run_all(self.services())
        except asyncio.CancelledError:
            if not stopping:
                raise
        except BaseException:
            _deadline(STOP_DEADLINE_S)  # a crashed service: the others get as long to stop as on SIGTERM
            raise
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            # the loop runs no handler from here on, and the closes below wait for the stores' threads (a health
            # pass may be under way): a further SIGTERM or SIGINT meanwhile exits at once, as it would before
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, _exit_now)
            if self.exporter is not None:
                self.exporter.close()
            if self.monitor is not None:
                self.monitor.close()
            if self.devices is not None:
                self.devices.store.close()
            if self.web is not None:
                self.web[1].close()
            if self.gateway is not None and self.gateway.store is not None:
                self.gateway.store.close()
        log.info("smame stopped")


def _exit_now(signum: int, frame: object) -> None:
    """A signal to stop while smame is already stopping: what is not acknowledged is redelivered by the broker."""
    log.warning("%s received again: exiting now", signal.Signals(signum).name)
    os._exit(130)


# Docker gives 10 s between SIGTERM and SIGKILL; a stop that takes longer than this ends the process, so that
# nothing (a stuck thread, a child that does not exit) can leave it running for ever.
STOP_DEADLINE_S = 9.0


def _deadline(seconds: float) -> None:
    def expire() -> None:
        log.error(
            "still stopping after %.0f s: exiting now (unacknowledged telegrams are redelivered); where each "
            "thread was stuck follows",
            seconds,
        )
        logging.shutdown()
        faulthandler.dump_traceback(all_threads=True)  # on stderr, for whoever finds out why
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True  # it must not itself keep the process alive
    timer.start()


async def _run_all(services: dict[str, Callable[[], Awaitable[None]]]) -> None:
    """Run the services side by side until one fails (the others are then cancelled) or all are cancelled."""
    async with asyncio.TaskGroup() as group:
        for name, service in services.items():
            group.create_task(_supervised(name, service), name=name)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error of a (nested) exception group."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


async def _supervised(name: str, service: Callable[[], Awaitable[None]]) -> None:
    try:
        await service()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if isinstance(exc, Deposed) or (isinstance(exc, ExceptionGroup) and exc.split(Deposed)[1] is None):
            raise  # not a crash: `App.lead` says so
        log.exception("service %s crashed", name)
        raise

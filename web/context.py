"""What the web server reads, handed to the API and the console alike."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aggregator.store import Store
from ftp_gateway.accounts import Bans, normalize
from kernel.registry import Registry
from kernel.timegrid import Grid
from monitoring.sources import ExportCounters

if TYPE_CHECKING:  # (the web framework loads on the web's own thread, not with this module)
    from starlette.requests import HTTPConnection

# Why a node without an exporter neither serves nor lists the customers' files (the API and the console).
NO_FILES = "this node writes no customer files (export.enabled is false)"


@dataclass
class WebContext:
    """The store (a connection of the web server's own), the registry in force, the slot grid, the export
    directory, the ban list shared with the file gateway, the clock, the settings the pages need, and this
    node's exporter's counters (None: it exports nothing, so no customer's file there is kept up to date)."""

    store: Store
    registry: Callable[[], Registry]
    grid: Grid
    export_dir: Path
    bans: Bans
    clock: Callable[[], float]
    max_days: int = 45
    fail_delay_s: float = 3.0
    silent_after_s: int = 7200
    file_days: int = 45  # export.retention_days: the customer page's map spans the days files are kept
    export: ExportCounters | None = None
    # this node among those sharing a store: role (leader or standby), node, leader, epoch (`/healthz` says the same)
    node: Callable[[], Mapping[str, object]] = lambda: {"role": "leader"}
    command_expiry_s: int = 86400  # devices.expiry_s: the life of a command queued without one
    audit_keep_days: int = 400  # devices.keep_days: how long the audit log's entries are kept
    firmware_dir: Path = Path("firmware")  # where this node keeps the images it serves (<data_dir>/firmware)
    require_2fa: bool = False  # web.require_2fa: every operator must have a second factor before anything else
    firmware_url: str = ""  # devices.firmware_url: where units fetch images ("": no campaign can start)


def client_of(request: HTTPConnection) -> str:
    """The address a request comes from, one spelling per address: its peer's, or the client a trusted proxy
    names (`web.proxies` put it in the request's scope)."""
    return normalize(request.client.host if request.client else "")

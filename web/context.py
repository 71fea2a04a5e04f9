"""What the web server reads, handed to the API and the console alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aggregator.store import Store
from ftp_gateway.accounts import Bans
from kernel.registry import Registry
from kernel.timegrid import Grid
from monitoring.sources import ExportCounters


@dataclass
class WebContext:
    """The store (a connection of the web server's own), the registry in force, the slot grid, the export
    directory (`files`: whether this node writes the customers' files there), the ban list shared with the file
    gateway, the clock, the settings the pages need, and this node's exporter's counters (None: none here)."""

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
    files: bool = True  # export.enabled: False when this node writes no customer files

"""What the command line does to the store's users and data, kept in the audit log: by `cli:<the system user>`,
from this host."""

from __future__ import annotations

import getpass
import os
import socket
import sys
import time

from aggregator.store import Store, StoreError
from kernel.settings import Settings
from smame.app import open_store


def audit_entry(store: Store, action: str, target: str, detail: str = "") -> None:
    """An entry of the audit log for what this command did, by the system user running it, on this host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # (a container's uid with no name)
        user = str(os.getuid())
    store.record_audit(int(time.time()), f"cli:{user}", socket.gethostname(), action, target, detail)


def audit_if_stored(settings: Settings, action: str, target: str, detail: str = "") -> None:
    """The same, for a command that works on files (the customers' logins): kept when the store exists (a
    command never makes one), and left out with a line saying so when it cannot be reached."""
    try:
        with open_store(settings, create=False) as store:
            audit_entry(store, action, target, detail)
    except StoreError as exc:
        print(f"(not in the audit log: {exc})", file=sys.stderr)

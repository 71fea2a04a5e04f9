"""The `smame` commands, one module per group; each module's `add` adds its subcommands and their handlers.

`GROUPS` is the order `smame --help` lists them in. A handler takes the settings and the parsed arguments
and returns the exit code."""

from __future__ import annotations

from smame.commands import (
    access,
    certs,
    customers,
    data,
    demo,
    export,
    firmware,
    provision,
    report,
    service,
    simulate,
    store,
    users,
)

GROUPS = (service, demo, data, simulate, export, report, users, access, customers, provision, certs, store, firmware)

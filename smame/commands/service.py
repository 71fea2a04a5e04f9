"""`smame run` (every service) and `smame serve-files` (the file gateway alone)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from kernel.settings import Settings
from smame.app import App, RegistryHolder, build_gateway, check_ports, listeners, store_lock
from smame.commands.args import Subcommands


def add(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    """Add `run` and `serve-files` to the command line."""
    run = sub.add_parser("run", parents=[common], help="run the services (ingest) until SIGTERM/SIGINT")
    run.set_defaults(func=_run)

    serve = sub.add_parser("serve-files", parents=[common], help="run only the FTP/FTPS/SFTP gateway")
    serve.set_defaults(func=_serve_files)


def _run(settings: Settings, args: argparse.Namespace) -> int:
    check_ports(listeners(settings))
    with store_lock(settings):
        return _run_app(App.build(settings))


def _run_app(app: App) -> int:
    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # optional: plain asyncio works, a little slower
        runner = asyncio.run
    try:
        runner(app.run())
    except Exception:  # the crashed service was logged by the supervisor
        return 1
    return 0


def _serve_files(settings: Settings, args: argparse.Namespace) -> int:
    check_ports(listeners(settings, files_only=True))
    holder = RegistryHolder(settings)
    gateway = build_gateway(settings, holder)
    if gateway is None:
        print("smame serve-files: both ftp.enabled and sftp.enabled are false", file=sys.stderr)
        return 2

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        loop.add_signal_handler(signal.SIGHUP, holder.reload)
        try:
            await gateway.run()
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    return 0

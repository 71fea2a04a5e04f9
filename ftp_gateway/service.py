"""The file gateway service: FTP/FTPS and SFTP side by side, sharing accounts and bans."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aggregator.store import Store
from ftp_gateway.accounts import Accounts, Bans, Doorway
from ftp_gateway.ftp import FtpOptions, FtpServer

log = logging.getLogger("smame.files")
KEEP_S = 10.0  # how often the downloads noted are written to the store


class FileGateway:
    """Runs until cancelled; stops both servers on the way out. With a store, it keeps there which files were
    downloaded (every `KEEP_S` and on the way out)."""

    def __init__(
        self,
        accounts: Accounts,
        bans: Bans,
        doorway: Doorway,
        ftp: FtpOptions | None,
        sftp: tuple[str, int, Path] | None,
        store: Store | None = None,
    ) -> None:
        self.accounts = accounts
        self.bans = bans
        self.doorway = doorway
        self.ftp_options = ftp
        self.sftp_options = sftp
        self.store = store
        self.ftp_port: int | None = None
        self.sftp_port: int | None = None

    async def run(self) -> None:
        """Serve until cancelled."""
        ftp = FtpServer(self.ftp_options, self.accounts, self.bans, self.doorway) if self.ftp_options else None
        acceptor = None
        try:
            if ftp is not None:
                ftp.start()
                self.ftp_port = ftp.port
            if self.sftp_options is not None:
                # asyncssh (0.1 s to load) is loaded by the gateway that serves SFTP, not by every smame start
                from ftp_gateway.sftp import host_key, start_sftp

                host, port, key_path = self.sftp_options
                acceptor = await start_sftp(host, port, host_key(key_path), self.accounts, self.bans, self.doorway)
                self.sftp_port = acceptor.get_port()
            while True:
                await asyncio.sleep(KEEP_S)
                await self.keep_downloads()
        finally:
            if ftp is not None:
                await asyncio.get_running_loop().run_in_executor(None, ftp.stop)
            if acceptor is not None:
                acceptor.close()
                await acceptor.wait_closed()
            await self.keep_downloads()
            log.info("file gateway stopped")

    async def keep_downloads(self) -> None:
        """Write the downloads noted to the store; while it is unavailable, keep them for the next time."""
        rows = self.accounts.downloads.take()
        if self.store is None or not rows:
            return
        passing: tuple[type[Exception], ...] = (OSError, *self.store.errors)
        try:
            await self.store.call(self.store.record_downloads, rows)
        except passing as e:
            self.accounts.downloads.restore(rows)
            log.warning("downloads not recorded for now (%d files): %s", len(rows), e)

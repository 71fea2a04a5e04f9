"""The file gateway service: FTP/FTPS and SFTP side by side, sharing accounts and bans."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ftp_gateway.accounts import Accounts, Bans, Doorway
from ftp_gateway.ftp import FtpOptions, FtpServer
from ftp_gateway.sftp import host_key, start_sftp

log = logging.getLogger("smame.files")


class FileGateway:
    """Runs until cancelled; stops both servers on the way out."""

    def __init__(
        self,
        accounts: Accounts,
        bans: Bans,
        doorway: Doorway,
        ftp: FtpOptions | None,
        sftp: tuple[str, int, Path] | None,
    ) -> None:
        self.accounts = accounts
        self.bans = bans
        self.doorway = doorway
        self.ftp_options = ftp
        self.sftp_options = sftp
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
                host, port, key_path = self.sftp_options
                acceptor = await start_sftp(host, port, host_key(key_path), self.accounts, self.bans, self.doorway)
                self.sftp_port = acceptor.get_port()
            await asyncio.Event().wait()
        finally:
            if ftp is not None:
                await asyncio.get_running_loop().run_in_executor(None, ftp.stop)
            if acceptor is not None:
                acceptor.close()
                await acceptor.wait_closed()
            log.info("file gateway stopped")

"""SFTP (asyncssh): password or public-key login, each customer chrooted to its directory, read-only."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import asyncssh

from ftp_gateway.accounts import Accounts, Bans, Doorway, Ticket
from kernel.certificates import write_file

log = logging.getLogger("smame.sftp")
MAX_AUTH_ATTEMPTS = 6  # on one connection; then it is closed (OpenSSH's MaxAuthTries)
_WRITE_FLAGS = asyncssh.FXF_WRITE | asyncssh.FXF_APPEND | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC


def _denied(what: str) -> asyncssh.SFTPError:
    return asyncssh.SFTPError(asyncssh.FX_PERMISSION_DENIED, f"read-only: {what} refused")


def host_key(path: Path) -> asyncssh.SSHKey:
    """The server's key: made on first start and kept, so clients can pin it."""
    if path.exists():
        key = asyncssh.read_private_key(str(path))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519")
        write_file(path, key.export_private_key(), private=True)
        log.info("sftp: new host key written to %s", path)
    log.info("sftp: host key fingerprint %s", key.get_fingerprint("sha256"))
    return key


class _Server(asyncssh.SSHServer):
    def __init__(self, accounts: Accounts, bans: Bans, doorway: Doorway) -> None:
        self.accounts = accounts
        self.bans = bans
        self.doorway = doorway
        self.ticket: Ticket | None = None  # its place at the door until it logs in or goes
        self.address = "?"
        self.attempts = 0
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.address = (conn.get_extra_info("peername") or ("?",))[0]
        loop = asyncio.get_running_loop()
        self.ticket = self.doorway.enter(self.address, lambda: loop.call_soon_threadsafe(conn.abort))
        if self.ticket is None:
            log.warning("sftp: refused %s: too many connections waiting to log in", self.address)
            conn.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()

    def auth_completed(self) -> None:
        self._leave(logged_in=True)

    def _leave(self, logged_in: bool = False) -> None:
        if self.ticket is not None:
            if logged_in:
                self.doorway.logged_in(self.ticket)
            else:
                self.doorway.leave(self.ticket)
            self.ticket = None

    def _refuse_if_banned(self) -> None:
        if self.bans.banned(self.address):
            log.warning("sftp: refused %s: banned", self.address)
            raise asyncssh.DisconnectError(
                asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                "too many failed logins from your address; try again later",
            )

    def begin_auth(self, username: str) -> bool:
        self._refuse_if_banned()
        account = self.accounts.get(username)
        if account is not None and account.ssh_keys and self.conn is not None:
            if self.accounts.allows(account, self.address):
                self.conn.set_authorized_keys(asyncssh.import_authorized_keys("\n".join(account.ssh_keys)))
            else:  # its keys are not offered: a key login fails as if the key were wrong
                self.bans.refuse(self.address, f"login {username} (key)", "SFTP")
        return True

    def password_auth_supported(self) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        # Every attempt, not only the first: one connection must not go on guessing once its address is banned.
        self._refuse_if_banned()
        self.attempts += 1
        if self.attempts > MAX_AUTH_ATTEMPTS:
            log.warning("sftp: closed user=%s address=%s after %d attempts", username, self.address, MAX_AUTH_ATTEMPTS)
            raise asyncssh.DisconnectError(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "too many attempts")
        # scrypt takes ~0.2 s: off the event loop, which ingest shares
        account = await asyncio.to_thread(self.accounts.check_password, username, password)
        if account is not None and not self.accounts.allows(account, self.address):
            self.bans.refuse(self.address, f"login {username}", "SFTP")
            return False
        if account is not None:
            self.accounts.events[("sftp", "login")] += 1
            log.info("sftp: login user=%s address=%s (password)", username, self.address)
            return True
        log.warning("sftp: failed login user=%s address=%s", username, self.address)
        self.accounts.failed("sftp", username, self.address)
        if self.bans.failed(self.address, f"login {username}", "SFTP"):
            log.error("sftp: address %s banned after repeated failed logins", self.address)
        return False


class ReadOnlySFTP(asyncssh.SFTPServer):
    """Chrooted to the customer's directory; lists and reads, refuses everything else."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], accounts: Accounts) -> None:
        self.user = chan.get_extra_info("username")
        account = accounts.get(self.user)
        if account is None:  # removed from the registry since login
            raise asyncssh.SFTPError(asyncssh.FX_PERMISSION_DENIED, "no such account")
        self.home = os.path.realpath(account.home)
        self.address = (chan.get_extra_info("peername") or ("?",))[0]
        self.account, self.accounts = account, accounts
        super().__init__(chan, chroot=self.home.encode())

    def map_path(self, path: bytes) -> bytes:
        local = super().map_path(path)
        real = os.path.realpath(local)  # a symlink must not lead out of the customer's directory
        if real != self.home.encode() and not real.startswith(self.home.encode() + b"/"):
            raise asyncssh.SFTPError(asyncssh.FX_NO_SUCH_FILE, "no such file")
        return local

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        """Listings leave symbolic links out, as FTP's do: their targets would name places outside the
        customer's directory (and reading one is refused anyway)."""
        async for name in super().scandir(path):
            if name.attrs.type != asyncssh.FILEXFER_TYPE_SYMLINK:
                yield name

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> Any:
        if pflags & _WRITE_FLAGS:
            log.warning(
                "sftp: refused write user=%s address=%s path=%s", self.user, self.address, path.decode(errors="replace")
            )
            raise _denied("writing")
        opened = super().open(path, pflags, attrs)
        log.info("sftp: download user=%s address=%s file=%s", self.user, self.address, path.decode(errors="replace"))
        self.accounts.downloaded("sftp", self.account, path.decode(errors="replace"))
        return opened

    def _refuse(self, what: str) -> NoReturn:
        log.warning("sftp: refused %s user=%s address=%s", what, self.user, self.address)
        raise _denied(what)

    def remove(self, path: bytes) -> None:
        self._refuse("remove")

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        self._refuse("rename")

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        self._refuse("rename")

    def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        self._refuse("mkdir")

    def rmdir(self, path: bytes) -> None:
        self._refuse("rmdir")

    def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        self._refuse("setstat")

    def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        self._refuse("setstat")

    def lsetstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        self._refuse("setstat")

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        self._refuse("symlink")

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        self._refuse("link")

    def readlink(self, path: bytes) -> bytes:
        return self._refuse("readlink")  # a link's target would name places outside the directory


async def start_sftp(
    host: str, port: int, key: asyncssh.SSHKey, accounts: Accounts, bans: Bans, doorway: Doorway
) -> asyncssh.SSHAcceptor:
    """Listen for SFTP; the acceptor's `close()` stops it."""
    acceptor = await asyncssh.listen(
        # "::" alone would be IPv6 only (asyncio sets IPV6_V6ONLY): every address of both families, as FTP does
        "" if host == "::" else host,
        port,
        server_host_keys=[key],
        server_factory=lambda: _Server(accounts, bans, doorway),
        sftp_factory=lambda chan: ReadOnlySFTP(chan, accounts),
        allow_scp=False,
        process_factory=None,
        login_timeout=doorway.login_timeout,
    )
    log.info("sftp: listening on port %d", acceptor.get_port())
    return acceptor

"""FTP with explicit TLS (pyftpdlib): each customer's login sees its own directory, read-only.

pyftpdlib is configured through class attributes, so each server gets its own handler subclass.
It runs its own I/O loop, in a thread of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from pyftpdlib.authorizers import AuthenticationFailed
from pyftpdlib.filesystems import AbstractedFS
from pyftpdlib.handlers import FTPHandler, TLS_FTPHandler
from pyftpdlib.servers import FTPServer

from ftp_gateway.accounts import Accounts, Bans, Doorway, Ticket

log = logging.getLogger("smame.ftp")
READ_ONLY = "elr"  # change directory, list, retrieve


@dataclass(frozen=True)
class FtpOptions:
    """What the FTP server needs from the settings."""

    host: str
    port: int
    tls: tuple[Path, Path] | None  # certificate and key; None: plain FTP only
    tls_required: bool
    passive_ports: range | None
    masquerade_address: str | None
    max_connections: int
    max_connections_per_ip: int
    fail_delay_s: float


class _Authorizer:
    """pyftpdlib's authorizer interface over smame's accounts: hashed passwords, one home each."""

    def __init__(self, accounts: Accounts, bans: Bans) -> None:
        self.accounts = accounts
        self.bans = bans

    def validate_authentication(self, username: str, password: str, handler: Any) -> None:
        if self.bans.banned(handler.remote_ip):
            raise AuthenticationFailed("Too many failed logins from your address; try again later.")
        account = self.accounts.check_password(username, password)
        if account is None:
            raise AuthenticationFailed("Authentication failed.")
        if not self.accounts.allows(account, handler.remote_ip):
            handler.address_refused = True  # (the same answer: the address learns nothing of the password)
            self.bans.refuse(handler.remote_ip, f"login {username}", "FTP")
            raise AuthenticationFailed("Authentication failed.")

    def get_home_dir(self, username: str) -> str:
        account = self.accounts.get(username)
        assert account is not None
        return str(account.home)

    def has_user(self, username: str) -> bool:
        return self.accounts.get(username) is not None

    def has_perm(self, username: str, perm: str, path: str | None = None) -> bool:
        if perm not in READ_ONLY:
            return False
        if path is None:
            return True
        home = os.path.realpath(self.get_home_dir(username))
        real = os.path.realpath(path)
        return real == home or real.startswith(home + os.sep)

    def get_perms(self, username: str) -> str:
        return READ_ONLY

    def get_msg_login(self, username: str) -> str:
        return "Logged in: your files, read-only."

    def get_msg_quit(self, username: str) -> str:
        return "Goodbye."

    def impersonate_user(self, username: str, password: str) -> None:
        pass

    def terminate_impersonation(self, username: str) -> None:
        pass


class _NoLinks(AbstractedFS):  # type: ignore[misc]
    """Listings leave symbolic links out: their targets would name places outside the customer's directory."""

    def listdir(self, path: str) -> list[str]:
        return [n for n in super().listdir(path) if not os.path.islink(os.path.join(path, n))]


def _handler(options: FtpOptions, accounts: Accounts, bans: Bans, doorway: Doorway) -> type[FTPHandler]:
    base: type[FTPHandler] = TLS_FTPHandler if options.tls else FTPHandler

    class Handler(base):  # type: ignore[misc]
        authorizer = _Authorizer(accounts, bans)
        abstracted_fs = _NoLinks
        banner = "smame file gateway"
        passive_ports = options.passive_ports
        masquerade_address = options.masquerade_address
        auth_failed_timeout = options.fail_delay_s
        permit_foreign_addresses = False
        use_sendfile = False

        ticket: Ticket | None = None  # its place at the door until it logs in or goes
        address_refused = False  # the last login's credentials were right, from an address not allowed

        def on_connect(self) -> None:
            if bans.banned(self.remote_ip):
                log.warning("ftp: refused %s: banned", self.remote_ip)
                self.respond("421 Too many failed logins from your address; try again later.")
                self.close_when_done()
                return
            self.ticket = doorway.enter(self.remote_ip, self._evicted)
            if self.ticket is None:
                log.warning("ftp: refused %s: too many connections waiting to log in", self.remote_ip)
                self.respond("421 Too many connections waiting to log in; try again later.")
                self.close_when_done()
                return
            self._login_timer = self.ioloop.call_later(
                doorway.login_timeout, self._login_expired, _errback=self.handle_error
            )

        def _evicted(self) -> None:
            # Any thread (an SFTP newcomer may need the place): the connection is shut down under its TLS layer,
            # if any, through a duplicate of its descriptor; this handler's loop then sees it end and closes it.
            with contextlib.suppress(OSError, ValueError):
                with socket.socket(fileno=os.dup(self.socket.fileno())) as raw:
                    raw.shutdown(socket.SHUT_RDWR)

        def _login_expired(self) -> None:
            if not self.authenticated:
                self.respond("421 Login timed out.")
                self.close_when_done()

        def _leave(self, logged_in: bool = False) -> None:
            if self.ticket is not None:
                if logged_in:
                    doorway.logged_in(self.ticket)
                else:
                    doorway.leave(self.ticket)
                self.ticket = None
                self._login_timer.cancel()

        def close(self) -> None:  # not on_disconnect: pyftpdlib calls that a loop turn later
            self._leave()
            super().close()

        def ftp_PORT(self, line: str) -> None:  # noqa: N802 (pyftpdlib's name)
            self.respond("502 Active mode is off: use PASV or EPSV.")

        def ftp_EPRT(self, line: str) -> None:  # noqa: N802 (pyftpdlib's name)
            self.respond("502 Active mode is off: use PASV or EPSV.")

        def on_login(self, username: str) -> None:
            self._leave(logged_in=True)
            accounts.events[("ftp", "login")] += 1
            account = accounts.get(username)
            log.info(
                "ftp: login user=%s customer=%s address=%s tls=%s",
                username,
                account.customer if account else "?",
                self.remote_ip,
                bool(getattr(self, "_ssl_established", False)),
            )

        def on_login_failed(self, username: str, password: str) -> None:
            if self.address_refused:  # noted as such, not a failure toward a ban
                self.address_refused = False
                return
            log.warning("ftp: failed login user=%s address=%s", username, self.remote_ip)
            accounts.failed("ftp", username, self.remote_ip)
            if bans.failed(self.remote_ip, f"login {username}", "FTP"):
                log.error("ftp: address %s banned after repeated failed logins", self.remote_ip)

        def on_file_sent(self, file: str) -> None:
            log.info("ftp: download user=%s address=%s file=%s", self.username, self.remote_ip, file)
            account = accounts.get(self.username)
            if account is not None:
                accounts.downloaded("ftp", account, file)

        def log_cmd(self, cmd: str, arg: str, respcode: int, respstr: str) -> None:
            if respcode >= 500 and cmd not in ("PASS",):  # refusals, with who and what
                log.warning(
                    "ftp: refused %s %s user=%s address=%s: %s %s",
                    cmd,
                    arg,
                    self.username,
                    self.remote_ip,
                    respcode,
                    respstr,
                )

    if options.tls:
        cert, key = options.tls
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION)
        ctx.use_certificate_chain_file(str(cert))
        ctx.use_privatekey_file(str(key))
        Handler.ssl_context = ctx
        Handler.certfile = str(cert)
        Handler.tls_control_required = options.tls_required
        Handler.tls_data_required = options.tls_required
    return Handler


class FtpServer:
    """The FTP/FTPS server in a thread of its own."""

    def __init__(self, options: FtpOptions, accounts: Accounts, bans: Bans, doorway: Doorway) -> None:
        handler = _handler(options, accounts, bans, doorway)
        self.server = FTPServer((options.host, options.port), handler)
        self.server.max_cons = options.max_connections
        self.server.max_cons_per_ip = options.max_connections_per_ip
        self.port = self.server.address[1]
        self._thread = threading.Thread(target=self._serve, name="ftp", daemon=True)

    def _serve(self) -> None:
        self.server.serve_forever(timeout=0.2, blocking=True, handle_exit=False)

    def start(self) -> None:
        self._thread.start()
        log.info("ftp: listening on port %d", self.port)

    def stop(self) -> None:
        self.server.close_all()
        self._thread.join(5)

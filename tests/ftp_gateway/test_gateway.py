"""Customers fetch their files over FTPS and SFTP, and nothing else: real servers, real clients."""

from __future__ import annotations

import asyncio
import base64
import ftplib
import hashlib
import io
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import paramiko
import pytest

from csv_export.files import write_if_changed
from ftp_gateway.accounts import Accounts, Bans, Doorway
from ftp_gateway.sftp import host_key, start_sftp
from kernel.registry import load_registry
from tests.helpers import (
    STARTED,
    connect_from,
    free_port,
    gateway_env,
    real_processes,
    smame,
    smame_env,
    wait_log,
    wait_until,
    write_registry,
)

PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-22"}


@dataclass
class Gateway:
    env: dict[str, str]
    ftp: int
    sftp: int
    export: Path
    log: Path
    proc: subprocess.Popen[bytes]


def write_files(workdir: Path) -> Path:
    """A file of C1's and one of C2's in the export directory under `workdir`, which is returned."""
    export = workdir / "data" / "export"
    for customer in ("C1", "C2"):
        write_if_changed(export / customer / f"{customer}_20261123.csv", f"unit_id\n{customer}-data\n".encode())
    return export


@pytest.fixture(params=[True], ids=["tls-required"])
def gateway(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Gateway]:
    real_processes()
    write_registry(workdir, {"U1": "C1", "U2": "C2"})
    export = write_files(workdir)
    ftp, sftp = free_port(), free_port()
    env = smame_env(
        workdir,
        1883,
        **gateway_env(ftp, sftp),
        SMAME_FTP__FAIL_DELAY_S="0.05",
        SMAME_FTP__BAN_AFTER="3",
        SMAME_FTP__BAN_S="3",
        SMAME_FTP__TLS_REQUIRED=str(request.param).lower(),
        SMAME_FTP__LOGIN_TIMEOUT_S="5",  # three scrypt checks (0.2-0.7 s each here) fit well within it
        SMAME_FTP__MAX_UNAUTHENTICATED="6",
        SMAME_FTP__MAX_UNAUTHENTICATED_PER_IP="4",
    )
    for user, customer in (("alice", "C1"), ("bob", "C2")):
        proc = subprocess.run(
            [sys.executable, "-m", "smame.cli", "users", "add", customer, user, "--password-stdin"],
            env=env,
            input=PASSWORDS[user] + "\n",
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
    log = workdir / "files.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "smame.cli", "serve-files"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    STARTED.append(proc)  # type: ignore[arg-type]
    wait_log(log, "sftp: listening")
    wait_log(log, "ftp: listening")
    yield Gateway(env, ftp, sftp, export, log, proc)
    proc.terminate()
    proc.wait(10)


def ftps(g: Gateway, user: str = "alice", password: str | None = None, source: str = "") -> ftplib.FTP_TLS:
    """A logged-in FTPS client (from `source`, another loopback address); a refused login closes its connection
    before the error is raised."""
    ctx = ssl.create_default_context(cafile=str(g.export.parent / "ftps-cert.pem"))
    client = ftplib.FTP_TLS(context=ctx, timeout=10)
    try:
        client.connect("127.0.0.1", g.ftp, source_address=(source, 0) if source else None)
        client.auth()
        client.login(user, password or PASSWORDS[user])
        client.prot_p()
    except BaseException:
        client.close()
        raise
    return client


def sftp(g: Gateway, user: str = "alice", password: str | None = None, source: str = "") -> paramiko.SFTPClient:
    """A logged-in SFTP client (from `source`, another loopback address); a refused login closes its transport
    before the error is raised."""
    transport = paramiko.Transport(connect_from(source, g.sftp) if source else ("127.0.0.1", g.sftp))
    try:
        transport.connect(username=user, password=password or PASSWORDS[user])
        return paramiko.SFTPClient.from_transport(transport)  # type: ignore[return-value]
    except BaseException:
        transport.close()
        raise


def retr(client: ftplib.FTP, name: str) -> bytes:
    buf = io.BytesIO()
    client.retrbinary(f"RETR {name}", buf.write)
    return buf.getvalue()


def test_passwords_are_stored_only_as_salted_hashes(gateway: Gateway) -> None:
    text = (Path(gateway.env["SMAME_REGISTRY__CUSTOMERS"])).read_text()
    assert "alice-password-1" not in text and text.count('password_hash = "scrypt$') == 2
    listing = smame(["users", "list"], gateway.env).stdout
    assert "C1" in listing and "alice" in listing and "password" in listing


def test_customer_lists_and_downloads_its_own_files_over_ftps(gateway: Gateway) -> None:
    client = ftps(gateway)
    assert client.nlst() == ["C1_20261123.csv", "C1_20261123.csv.sha256"]
    assert retr(client, "C1_20261123.csv") == (gateway.export / "C1" / "C1_20261123.csv").read_bytes()
    client.quit()
    wait_log(gateway.log, "ftp: download user=alice")


@pytest.mark.parametrize("gateway", [False], ids=["tls-optional"], indirect=True)
def test_plain_ftp_when_the_operator_allows_it(gateway: Gateway) -> None:
    client = ftplib.FTP(timeout=10)
    client.connect("127.0.0.1", gateway.ftp)
    client.login("alice", PASSWORDS["alice"])
    assert client.nlst() == ["C1_20261123.csv", "C1_20261123.csv.sha256"]
    assert retr(client, "C1_20261123.csv") == (gateway.export / "C1" / "C1_20261123.csv").read_bytes()
    with pytest.raises(ftplib.error_perm):
        retr(client, "../C2/C2_20261123.csv")
    client.quit()
    wait_log(gateway.log, "ftp: login user=alice customer=C1 address=127.0.0.1 tls=False")


def test_customer_lists_and_downloads_its_own_files_over_sftp(gateway: Gateway) -> None:
    client = sftp(gateway)
    assert sorted(client.listdir(".")) == ["C1_20261123.csv", "C1_20261123.csv.sha256"]
    with client.open("C1_20261123.csv") as f:
        assert f.read() == (gateway.export / "C1" / "C1_20261123.csv").read_bytes()
    client.close()


def test_ssh_key_login(gateway: Gateway, workdir: Path) -> None:
    key = paramiko.ECDSAKey.generate()
    pub = workdir / "carol.pub"
    pub.write_text(f"{key.get_name()} {key.get_base64()} carol@test\n")
    smame(["users", "add", "C1", "carol", "--ssh-key", str(pub)], gateway.env)
    gateway.proc.send_signal(signal.SIGHUP)  # the running gateway takes the new login without a restart
    wait_log(gateway.log, "registry reloaded")
    transport = paramiko.Transport(("127.0.0.1", gateway.sftp))
    transport.connect(username="carol", pkey=key)
    client = paramiko.SFTPClient.from_transport(transport)
    assert client is not None and "C1_20261123.csv" in client.listdir(".")
    client.close()


def test_ftps_refuses_everything_but_reading_ones_own_files(gateway: Gateway) -> None:
    outside = gateway.export / "C1" / "escape.csv"
    os.symlink(gateway.export / "C2" / "C2_20261123.csv", outside)
    os.symlink("/etc/passwd", gateway.export / "C1" / "etc-passwd-link")
    client = ftps(gateway)
    client.cwd("/")
    assert "C2_20261123.csv" not in client.nlst()
    listing: list[str] = []
    client.retrlines("LIST", listing.append)
    client.retrlines("MLSD", listing.append)
    assert listing and not any("->" in line or "passwd" in line or "escape" in line for line in listing), listing
    for active in ("PORT 127,0,0,1,200,10", "EPRT |1|127.0.0.1|51210|"):  # passive only, as docs/delivery.md says
        with pytest.raises(ftplib.error_perm, match="502"):
            client.sendcmd(active)
    for cmd in ("RETR ../C2/C2_20261123.csv", "RETR /../C2/C2_20261123.csv", "RETR escape.csv"):
        with pytest.raises(ftplib.error_perm):
            retr(client, cmd.split(" ", 1)[1])
    with pytest.raises(ftplib.error_perm):
        client.cwd("../C2")
    for cmd in ("DELE C1_20261123.csv", "MKD new", "RMD x", "SITE CHMOD 777 C1_20261123.csv", "RNFR C1_20261123.csv"):
        with pytest.raises(ftplib.error_perm):
            client.sendcmd(cmd)
    for verb in ("STOR", "APPE"):
        with pytest.raises(ftplib.error_perm):
            client.storbinary(f"{verb} C1_20261123.csv", io.BytesIO(b"overwritten"))
    client.quit()
    assert (gateway.export / "C1" / "C1_20261123.csv").read_bytes() == b"unit_id\nC1-data\n"
    assert sorted(p.name for p in (gateway.export / "C1").iterdir()) == [
        "C1_20261123.csv",
        "C1_20261123.csv.sha256",
        "escape.csv",
        "etc-passwd-link",
    ]


def test_sftp_refuses_everything_but_reading_ones_own_files(gateway: Gateway, workdir: Path) -> None:
    os.symlink(gateway.export / "C2" / "C2_20261123.csv", gateway.export / "C1" / "escape.csv")
    os.symlink("/etc/passwd", gateway.export / "C1" / "etc-passwd-link")
    client = sftp(gateway)
    assert "C2_20261123.csv" not in client.listdir("/")
    listed = client.listdir_attr("/")  # links are left out of listings, as FTP leaves them out
    assert sorted(a.filename for a in listed) == ["C1_20261123.csv", "C1_20261123.csv.sha256"], listed
    for path in ("../C2/C2_20261123.csv", "/../C2/C2_20261123.csv", "escape.csv", "/etc/passwd"):
        with pytest.raises(OSError):
            client.open(path).read()
    local = workdir / "upload.csv"
    local.write_text("x\n")
    attempts = [
        lambda: client.put(str(local), "new.csv"),
        lambda: client.open("C1_20261123.csv", "w"),
        lambda: client.open("C1_20261123.csv", "a"),
        lambda: client.remove("C1_20261123.csv"),
        lambda: client.rename("C1_20261123.csv", "x.csv"),
        lambda: client.mkdir("d"),
        lambda: client.rmdir("d"),
        lambda: client.chmod("C1_20261123.csv", 0o777),
        lambda: client.symlink("/", "root"),
        lambda: client.readlink("escape.csv"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError):
            attempt()
    client.close()
    assert (gateway.export / "C1" / "C1_20261123.csv").read_bytes() == b"unit_id\nC1-data\n"
    assert sorted(p.name for p in (gateway.export / "C1").iterdir()) == [
        "C1_20261123.csv",
        "C1_20261123.csv.sha256",
        "escape.csv",
        "etc-passwd-link",
    ]


def test_plain_ftp_user_is_refused_before_any_password(gateway: Gateway) -> None:
    client = ftplib.FTP(timeout=10)
    client.connect("127.0.0.1", gateway.ftp)
    with pytest.raises(ftplib.error_perm, match="550 SSL/TLS required"):
        client.sendcmd("USER alice")
    client.close()


def test_tls_older_than_1_2_is_refused(gateway: Gateway, workdir: Path) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer TLS 1.1 at all
    assert _handshake_with_a_permissive_server(old, workdir) == "TLSv1.1"  # so the refusal below is the gateway's
    client = ftplib.FTP_TLS(context=old, timeout=10)
    client.connect("127.0.0.1", gateway.ftp)
    with pytest.raises((ssl.SSLError, OSError)):
        client.auth()


def _handshake_with_a_permissive_server(client: ssl.SSLContext, workdir: Path) -> str | None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert = workdir / "data" / "ftps-cert.pem"
    server.load_cert_chain(cert, workdir / "data" / "ftps-key.pem")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = ssl.TLSVersion.TLSv1
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        accepted: list[str | None] = []

        def accept() -> None:
            conn, _ = listener.accept()
            try:
                with server.wrap_socket(conn, server_side=True) as s:
                    accepted.append(s.version())
            except ssl.SSLError:
                accepted.append(None)

        thread = threading.Thread(target=accept)
        thread.start()
        with socket.create_connection(listener.getsockname()) as raw, client.wrap_socket(raw) as tls:
            version = tls.version()
        thread.join(5)
    return version


def test_repeated_failures_ban_the_address_for_a_while(gateway: Gateway) -> None:
    for _ in range(3):
        with pytest.raises(ftplib.error_perm):
            ftps(gateway, password="wrong-password")
    wait_log(gateway.log, "banned after repeated failed logins")
    with pytest.raises((ftplib.error_temp, ftplib.error_perm, EOFError, OSError)):
        ftps(gateway)  # the right password, from a banned address
    with pytest.raises(paramiko.SSHException):
        sftp(gateway)
    time.sleep(3.2)
    ftps(gateway).quit()  # the ban has ended


async def test_a_banned_address_cannot_go_on_guessing_on_an_open_sftp_connection(gateway: Gateway) -> None:
    tries = ["wrong-password"] * 3 + [PASSWORDS["alice"]] * 3  # ban_after = 3: the third failure bans

    class Guesser(asyncssh.SSHClient):
        def password_auth_requested(self) -> str | None:
            return tries.pop(0) if tries else None

    with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError)):
        async with asyncssh.connect(
            "127.0.0.1",
            gateway.sftp,
            username="alice",
            client_factory=Guesser,
            known_hosts=None,
            preferred_auth=["password"],
            login_timeout=20,
        ):
            pass
    log = gateway.log.read_text()
    assert "banned after repeated failed logins" in log and "sftp: login user=alice" not in log


def test_secrets_are_private_and_stay_so(gateway: Gateway, workdir: Path) -> None:
    data = gateway.export.parent
    for secret in (data / "ftps-key.pem", data / "ssh_host_ed25519_key"):
        assert secret.stat().st_mode & 0o777 == 0o600, secret
    customers = workdir / "customers.toml"
    customers.chmod(0o600)  # it holds the password hashes
    smame(["users", "remove", "bob"], gateway.env)
    assert customers.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("protocol", ["ftp", "sftp"])
def test_idle_strangers_cannot_crowd_out_customers(gateway: Gateway, protocol: str) -> None:
    port = gateway.ftp if protocol == "ftp" else gateway.sftp

    def stranger(source: str, tls: bool = False) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        s.recv(100)  # the banner: the server has taken the connection
        if tls:  # as an FTPS client does first: its connection waits to log in inside TLS
            s.sendall(b"AUTH TLS\r\n")
            assert s.recv(100).startswith(b"234")
            context = ssl.create_default_context(cafile=str(gateway.export.parent / "ftps-cert.pem"))
            s = context.wrap_socket(s, server_hostname="localhost")
        return s

    def refused(source: str) -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
            data = b""
            while chunk := s.recv(4096):  # the server closes it: 421 for FTP, nothing more for SSH
                data += chunk
            return protocol == "sftp" or data.startswith(b"421") or b"\r\n421" in data

    def customer() -> None:  # logs in from an address of its own, and out
        if protocol == "ftp":
            ftps(gateway, source="127.0.0.9").quit()
        else:
            sftp(gateway, source="127.0.0.9").close()

    # strangers hold every place at the door (6): four from one address, two from another
    tls = protocol == "ftp"  # the oldest waits inside TLS: the door closes it under its TLS layer
    idle = [stranger("127.0.0.2", tls)] + [stranger("127.0.0.2") for _ in range(3)]
    idle += [stranger("127.0.0.3") for _ in range(2)]
    try:
        assert refused("127.0.0.2")  # four wait from that address already
        customer()  # at once: it takes the place of the busiest address's oldest connection
        wait_until(lambda: _closed(idle[0]), 5)
        idle.append(stranger("127.0.0.3"))  # the customer's place taken again: six in all, three each
        assert refused("127.0.0.3")  # an address holding as many as the busiest puts nobody out
        for s in idle:
            s.close()
        # six strangers from six addresses, one place each: a newcomer puts none of them out...
        idle = [stranger(f"127.0.0.{10 + k}") for k in range(6)]
        assert refused("127.0.0.4")
        customer()  # ...but an address that has logged in before takes a stranger's place at once
        # they are given 5 s to log in; then the door is open again for anyone
        wait_until(lambda: all(_closed(s) for s in idle), 10)
        stranger("127.0.0.4").close()
    finally:
        for s in idle:
            s.close()


def _closed(s: socket.socket) -> bool:
    s.settimeout(0.1)
    try:
        while chunk := s.recv(4096):
            pass
        return not chunk
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError):  # ended under its TLS layer
        return True
    except (TimeoutError, OSError):
        return False


def test_a_password_changed_by_hand_and_an_old_hash_renewed_at_login(gateway: Gateway, workdir: Path) -> None:
    customers = workdir / "customers.toml"
    # bob's hash as smame made it before N was raised to 2^17: still good, and renewed at his next login
    salt = b"0123456789abcdef"
    old = hashlib.scrypt(PASSWORDS["bob"].encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    old_hash = f"scrypt${2**14}$8$1${base64.b64encode(salt).decode()}${base64.b64encode(old).decode()}"
    text = customers.read_text()
    start = text.index('password_hash = "', text.index('name = "bob"')) + len('password_hash = "')
    customers.write_text(text[:start] + old_hash + text[text.index('"', start) :])
    proc = subprocess.run(
        [sys.executable, "-m", "smame.cli", "users", "passwd", "C1", "alice", "--password-stdin"],
        env=gateway.env,
        input="a-brand-new-password\n",
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    gateway.proc.send_signal(signal.SIGHUP)
    wait_log(gateway.log, "registry reloaded")
    with pytest.raises(ftplib.error_perm):
        ftps(gateway)  # the old password
    ftps(gateway, password="a-brand-new-password").quit()
    ftps(gateway, "bob").quit()
    wait_log(gateway.log, "login bob: password hash renewed")
    assert old_hash not in customers.read_text() and f"scrypt${2**17}$8$1$" in customers.read_text()
    gateway.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: gateway.log.read_text().count("registry reloaded") == 2, 10)
    ftps(gateway, "bob").quit()  # the renewed hash takes the same password


def test_a_download_during_a_rewrite_gets_one_whole_version(gateway: Gateway) -> None:
    path = gateway.export / "C1" / "C1_20261124.csv"
    versions = [b"a" * 300_000 + b"\n", b"b" * 200_000 + b"\n"]
    write_if_changed(path, versions[0])
    done = threading.Event()

    def rewrite() -> None:
        i = 0
        while not done.is_set():
            i += 1
            write_if_changed(path, versions[i % 2])

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        client = ftps(gateway)
        got = [retr(client, path.name) for _ in range(15)]
        client.quit()
        s = sftp(gateway)
        for _ in range(15):
            with s.open(path.name) as f:
                got.append(f.read())
        s.close()
    finally:
        done.set()
        writer.join()
    assert all(g in versions for g in got)


def test_users_cli_errors(gateway: Gateway) -> None:
    env = gateway.env
    for args, stdin, message in (
        (["users", "add", "C9", "x", "--password-stdin"], "long-enough-pass\n", "customer C9"),
        (["users", "add", "C1", "alice", "--password-stdin"], "long-enough-pass\n", "exists"),
        (["users", "add", "C1", "dan", "--password-stdin"], "short\n", "at least 12"),
        (["users", "add", "C1", "bob\n", "--password-stdin"], "long-enough-pass\n", "user name"),
        (["users", "add", "C1", "a b", "--password-stdin"], "long-enough-pass\n", "user name"),
        (["users", "add", "C1", "dan"], "", "give it on standard input with --password-stdin"),
        (["users", "passwd", "C2", "alice", "--password-stdin"], "long-enough-pass\n", "no user alice of customer C2"),
        (["users", "remove", "nobody"], "", "no user nobody"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "smame.cli", *args], env=env, input=stdin, capture_output=True, text=True
        )
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    smame(["users", "remove", "bob"], env)
    assert "bob" not in smame(["users", "list"], env).stdout


async def test_sftp_on_every_ipv6_address_answers_on_ipv4_too(workdir: Path) -> None:
    write_registry(workdir, {"U1": "C1"})
    registry = load_registry(workdir / "units.csv", workdir / "customers.toml")
    key = host_key(workdir / "ssh_host_ed25519_key")
    port = free_port()
    acceptor = await start_sftp("::", port, key, Accounts(lambda: registry, workdir / "export"), Bans(), Doorway())
    try:
        for family_host in ("127.0.0.1", "::1"):  # "::" as sftp.host: both families, as "0.0.0.0" for FTP
            reader, writer = await asyncio.open_connection(family_host, port)
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"SSH-2.0-"), family_host
            writer.close()
    finally:
        acceptor.close()


def test_a_customer_with_an_allow_list_logs_in_only_from_its_addresses_and_a_refusal_bans_nobody(
    gateway: Gateway, workdir: Path
) -> None:
    customers = Path(gateway.env["SMAME_REGISTRY__CUSTOMERS"])
    allow = 'allow = ["127.0.0.2/32", "2001:db8::/32"]\n'  # C1 (alice) from 127.0.0.2 only; C2 (bob) from anywhere
    customers.write_text(customers.read_text().replace('name = "Customer C1"\n', 'name = "Customer C1"\n' + allow))
    gateway.proc.send_signal(signal.SIGHUP)
    wait_log(gateway.log, "registry reloaded")
    ftps(gateway, source="127.0.0.2").quit()
    sftp(gateway, source="127.0.0.2").close()
    for _ in range(2):  # as many as ban_after (3) and more, both doors: right passwords from the wrong address
        with pytest.raises(ftplib.error_perm, match="530"):
            ftps(gateway, source="127.0.0.3")
        with pytest.raises(paramiko.AuthenticationException):
            sftp(gateway, source="127.0.0.3")
    ftps(gateway, "bob", source="127.0.0.3").quit()  # that address is not banned
    sftp(gateway, "bob", source="127.0.0.3").close()
    text = gateway.log.read_text()
    assert text.count(" FTP: refused login alice from 127.0.0.3: not an address its customer allows") == 2
    assert text.count(" SFTP: refused login alice from 127.0.0.3: not an address its customer allows") == 2
    assert "failed login user=alice" not in text
    # a key login is refused from there too, as if the key were wrong
    key = paramiko.ECDSAKey.generate()
    pub = workdir / "carol.pub"
    pub.write_text(f"{key.get_name()} {key.get_base64()} carol@test\n")
    smame(["users", "add", "C1", "carol", "--ssh-key", str(pub)], gateway.env)
    gateway.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: gateway.log.read_text().count("registry reloaded") == 2)
    for source, works in (("127.0.0.3", False), ("127.0.0.2", True)):
        transport = paramiko.Transport(connect_from(source, gateway.sftp))
        try:
            if works:
                transport.connect(username="carol", pkey=key)
            else:
                with pytest.raises(paramiko.AuthenticationException):
                    transport.connect(username="carol", pkey=key)
        finally:
            transport.close()
    assert "SFTP: refused login carol (key) from 127.0.0.3" in gateway.log.read_text()

"""Certificates and private keys as smame makes them: the broker's CA and leaves (`smame provision`) and the
file gateway's self-signed FTPS certificate. One way to name a host, date a certificate and write a key, and to
read when the certificates in use stop (`held_in`)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def common_name(name: str) -> x509.Name:
    """A subject or issuer made of a common name alone."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def alt_names(names: Sequence[str]) -> x509.SubjectAlternativeName:
    """The names a server answers to: IP addresses as such, anything else as a DNS name."""
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(alt)


def builder(
    subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    """A certificate valid from five minutes ago (clocks differ) for `days` days, with a random serial."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_file(path: Path, data: bytes, private: bool = False) -> None:
    """Write a file atomically; a private one is created readable by its owner only, never wider for an instant."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class Held:
    """A certificate smame uses or was asked to watch: where it is, whose it is, and when it stops."""

    path: Path
    subject: str
    not_after: float  # epoch seconds
    ca: bool


WATCH_FILES_MAX = 2_000_000  # certificate files read from one directory at most (a million units' and then some)


def held_in(paths: Iterable[Path]) -> tuple[list[Held], list[str]]:
    """Every certificate in `paths` (a file: each certificate in it; a directory: its `*.pem` and those of its
    `certs/`, as `smame provision` writes them), soonest to expire first; and what could not be read, in words.
    Files without a certificate (keys) are passed over."""
    found: list[Held] = []
    problems: list[str] = []
    for path in paths:
        if path.is_dir():
            files = sorted(path.glob("*.pem"))
            files += sorted((path / "certs").glob("*.pem")) if (path / "certs").is_dir() else []
        elif path.exists():
            files = [path]
        else:
            problems.append(f"{path}: not found")
            continue
        for file in files[:WATCH_FILES_MAX]:
            try:
                data = file.read_bytes()
                if b"-----BEGIN CERTIFICATE-----" not in data:
                    continue
                certs = x509.load_pem_x509_certificates(data)
            except (OSError, ValueError) as exc:
                problems.append(f"{file}: {exc}")
                continue
            for cert in certs:
                try:
                    ca = bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
                except x509.ExtensionNotFound:
                    ca = False
                subject = cert.subject.rfc4514_string() or "(no subject)"
                found.append(Held(file, subject, cert.not_valid_after_utc.timestamp(), ca))
    found.sort(key=lambda h: (h.not_after, str(h.path)))
    return found, problems

"""A self-signed certificate for FTPS when the operator gives none (made once, kept, fingerprint logged)."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger("smame.ftp")


def write_secret(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only: created with mode 600, never wider for an instant."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ensure_certificate(cert: Path, key: Path, names: list[str]) -> str:
    """Create a self-signed certificate for `names` unless one exists; return its SHA-256 fingerprint."""
    if not (cert.exists() and key.exists()):
        cert.parent.mkdir(parents=True, exist_ok=True)
        private = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        alt: list[x509.GeneralName] = []
        for n in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(private, hashes.SHA256())
        )
        write_secret(
            key,
            private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        log.info("ftp: self-signed certificate written to %s", cert)
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    fingerprint = loaded.fingerprint(hashes.SHA256()).hex(":")
    log.info("ftp: certificate %s, SHA-256 fingerprint %s", cert, fingerprint)
    return fingerprint

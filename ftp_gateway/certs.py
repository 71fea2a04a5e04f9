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
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(private.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(private, hashes.SHA256())
        )
        key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        os.chmod(key, 0o600)
        cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        log.info("ftp: self-signed certificate written to %s", cert)
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    fingerprint = loaded.fingerprint(hashes.SHA256()).hex(":")
    log.info("ftp: certificate %s, SHA-256 fingerprint %s", cert, fingerprint)
    return fingerprint

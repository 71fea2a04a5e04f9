"""A self-signed certificate for FTPS when the operator gives none (made once, kept, fingerprint logged)."""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kernel.certificates import alt_names, builder, common_name, key_pem, write_file

log = logging.getLogger("smame.ftp")


def ensure_certificate(cert: Path, key: Path, names: list[str]) -> str:
    """Create a self-signed certificate for `names` unless one exists; return its SHA-256 fingerprint."""
    if not (cert.exists() and key.exists()):
        cert.parent.mkdir(parents=True, exist_ok=True)
        private = ec.generate_private_key(ec.SECP256R1())
        subject = common_name(names[0])
        certificate = (
            builder(subject, subject, private.public_key(), 3650)
            .add_extension(alt_names(names), critical=False)
            .sign(private, hashes.SHA256())
        )
        write_file(key, key_pem(private), private=True)
        write_file(cert, certificate.public_bytes(serialization.Encoding.PEM))
        log.info("ftp: self-signed certificate written to %s", cert)
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    fingerprint = loaded.fingerprint(hashes.SHA256()).hex(":")
    log.info("ftp: certificate %s, SHA-256 fingerprint %s", cert, fingerprint)
    return fingerprint

"""Salted password hashes (scrypt), checked in constant time. Pure: no I/O."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading

# OWASP's scrypt parameters: 2^17 x 8 x 1, 128 MiB and ~0.2 s a check: dear for a guesser, cheap for a
# few logins a minute. Hashes made with fewer are still accepted, and replaced at the next good login.
N, R, P, LENGTH = 2**17, 8, 1, 32
MAX_N = 2**20  # a stored hash asking for more is refused: it would cost a gigabyte a check
# At most two checks at once (FTP's thread, SFTP's): 128 MiB each, however many strangers knock.
_CHECKS = threading.BoundedSemaphore(2)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    with _CHECKS:
        return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=length, maxmem=2 * 128 * n * r + 2**20)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$salt$hash`, salt and hash in base64."""
    salt = salt or os.urandom(16)
    digest = _scrypt(password, salt, N, R, P, LENGTH)
    return f"scrypt${N}${R}${P}${_b64(salt)}${_b64(digest)}"


def outdated(stored: str) -> bool:
    """True when a hash was made with weaker parameters than today's."""
    try:
        scheme, n, r, p, _, _ = stored.split("$")
        return scheme != "scrypt" or (int(n), int(r), int(p)) < (N, R, P)
    except ValueError:
        return True


def verify_password(password: str, stored: str | None) -> bool:
    """True when the password matches the stored hash; False for any malformed or absent hash."""
    if not stored:
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        if not 1 < int(n) <= MAX_N or not 0 < int(r) * int(p) <= 64 or not 16 <= len(expected) <= 64:
            return False
        got = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p), len(expected))
    except (ValueError, TypeError, MemoryError):
        return False
    return hmac.compare_digest(got, expected)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()

"""Salted password hashes (scrypt), checked in constant time. Pure: no I/O."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

# 2^14 x 8 x 1: ~20 ms and 16 MiB per check: dear for a guesser, cheap for a few logins a minute.
N, R, P, LENGTH = 2**14, 8, 1, 32


def hash_password(password: str, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$salt$hash`, salt and hash in base64."""
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=LENGTH)
    return f"scrypt${N}${R}${P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str | None) -> bool:
    """True when the password matches the stored hash; False for any malformed or absent hash."""
    if not stored:
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()

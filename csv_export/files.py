"""Customer files on disk: names, atomic writes with a checksum beside them, and retention.

A file is written to a temporary name in its directory, fsynced and renamed over the old one, so a
download sees the old file or the new one, whole. Identical content is not written again, so the
file's mtime says when its data last changed.
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import date, timedelta
from pathlib import Path

NAME = re.compile(r"^(?P<customer>[A-Za-z0-9_-]{1,64})_(?P<day>\d{8})\.csv(?:\.sha256)?$")


def path_of(root: Path, customer: str, day: date) -> Path:
    """`{root}/{customer}/{customer}_{YYYYMMDD}.csv`."""
    return root / customer / f"{customer}_{day:%Y%m%d}.csv"


def write_if_changed(path: Path, data: bytes, with_checksum: bool = True) -> bool:
    """Write the file and (for a customer's file) its `.sha256` atomically unless it already holds these bytes;
    True if written."""
    checksum = path.with_name(path.name + ".sha256")
    try:
        if path.read_bytes() == data and (checksum.exists() or not with_checksum):
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic(path, data)
    if with_checksum:
        digest = hashlib.sha256(data).hexdigest()
        _atomic(checksum, f"{digest}  {path.name}\n".encode())  # the format `sha256sum -c` reads
    return True


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # disk full or the like: the previous file stays as it was
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    finally:
        os.close(fd)


CURSOR_FILE = ".smame-export-cursor"


def read_cursor(root: Path) -> int:
    """The newest change (`changes` id) the files in `root` render; 0 for a new or unreadable directory, whose
    files are then all rendered again. It lives with the files, not in the shared store: each node of a
    cluster renders into a directory of its own, at its own pace."""
    try:
        return int((root / CURSOR_FILE).read_text())
    except (OSError, ValueError):
        return 0


def write_cursor(root: Path, cursor: int) -> None:
    """Record that the files in `root` render every change up to `cursor`."""
    _atomic(root / CURSOR_FILE, f"{cursor}\n".encode())


def expired(root: Path, today: date, keep_days: int) -> list[Path]:
    """Files of days more than `keep_days` before today: with 45, today and the 45 days before it stay."""
    first_kept = today - timedelta(days=keep_days)
    out = []
    for customer_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for f in customer_dir.iterdir():
            m = NAME.match(f.name)
            if not m:
                continue
            try:
                day = date(int(m["day"][:4]), int(m["day"][4:6]), int(m["day"][6:]))
            except ValueError:  # a stray file named like ours (C1_20261399.csv) is not ours: left alone
                continue
            if day < first_kept:
                out.append(f)
    return sorted(out)


def check_writable(root: Path) -> None:
    """Create the export directory if needed and prove it writable; raise OSError saying what is wrong."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".smame-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"export directory {root} is not usable (setting export.dir): {exc.strerror or exc}") from None

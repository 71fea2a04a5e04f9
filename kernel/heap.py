"""The C heap of this process: giving back what a large job freed."""

from __future__ import annotations

import ctypes

_LIBC = ctypes.CDLL(None)  # the C library this process runs on


def trim_heap() -> None:
    """Return the C heap's free pages to the system (glibc; elsewhere nothing). glibc keeps what a thread freed
    in that thread's arena: after a large job a process would hold the job's peak while idle."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)

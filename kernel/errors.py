"""How a file's bad lines are told: every one at once, so that one round of fixes is enough."""

from __future__ import annotations

from pathlib import Path

MAX_ERRORS = 20  # bad lines said at once


def bad_lines(path: Path, errors: list[str]) -> str:
    """One message for a file's bad lines, each already naming its line and field; the first MAX_ERRORS shown."""
    more = f"\n... and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
    plural = "s" if len(errors) > 1 else ""
    return f"{len(errors)} bad line{plural} in {path}:\n" + "\n".join(errors[:MAX_ERRORS]) + more

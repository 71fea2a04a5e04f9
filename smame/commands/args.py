"""Argument types of the command line: each refuses a bad value with one line naming it."""

from __future__ import annotations

import argparse
from datetime import date, datetime
from typing import TypeAlias

# what each command module's `add` is given to add its subcommands to
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def positive(text: str) -> int:
    return int(_number(text, int, 1))


def count(text: str) -> int:
    return int(_number(text, int, 0))


def non_negative(text: str) -> float:
    return float(_number(text, float, 0))


def _number(text: str, kind: type[int] | type[float], least: int) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < least:
        raise argparse.ArgumentTypeError(
            f"{text} must be at least {least}" if least else f"{text} must not be negative"
        )
    return value


def connections(text: str) -> int | None:
    return None if text == "per-unit" else positive(text)


def instant(text: str) -> float:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a UTC offset, e.g. 2026-11-23T12:00:00+09:00")
    return when.timestamp()


def local_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


def month(text: str) -> date:
    """A month YYYY-MM, as its first day."""
    try:
        if len(text) != 7:  # fromisoformat would take 2026-11-05 as well
            raise ValueError(text)
        return date.fromisoformat(f"{text}-01")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a month YYYY-MM") from None

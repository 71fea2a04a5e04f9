"""Waking a service's loop early: the one way every service waits for an event or a time, whichever comes first."""

from __future__ import annotations

import asyncio


async def wait_woken(wake: asyncio.Event, seconds: float) -> bool:
    """Wait until `wake` is set or `seconds` have passed; clear it. True when it was set (woken early)."""
    try:
        async with asyncio.timeout(seconds):
            await wake.wait()
    except TimeoutError:
        return False
    finally:
        wake.clear()
    return True

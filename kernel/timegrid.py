"""The 30-minute slot grid of a local time zone (pure: no clock, no I/O).

A slot is named by the UTC epoch second at which it ends: the fixed-time reading at `t`
closes the slot `(t - 1800, t]`. Days are local days, so a day in a zone with daylight
saving has 46 or 50 slots; zones whose offset is not a whole half hour (Asia/Kathmandu)
still work, because every test is made on local wall-clock time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

SLOT = 1800


@dataclass(frozen=True, slots=True)
class SlotLabel:
    """Where a slot sits in its local day, as a person or a file sees it."""

    day: date
    index: int  # 1-based
    start: str  # "HH:MM" local
    end: str  # "HH:MM" local, the last slot of a day ends "24:00"


class Grid:
    """Slot arithmetic in one IANA time zone."""

    def __init__(self, zone: str) -> None:
        self.zone = ZoneInfo(zone)
        self.name = zone
        self._offsets: dict[int, int] = {}

    def on_boundary(self, epoch: int) -> bool:
        """True when the instant is a local :00 or :30 with zero seconds."""
        return (epoch + self._offset(epoch)) % SLOT == 0

    def floor(self, epoch: float) -> int:
        """The latest slot end at or before `epoch`."""
        t = int(epoch)
        return t - (t + self._offset(t)) % SLOT

    def _offset(self, epoch: int) -> int:
        # Offsets change on whole half hours at most, so one look-up per half hour serves every reading in it.
        key = epoch // SLOT
        offset = self._offsets.get(key)
        if offset is None:
            if len(self._offsets) > 100_000:
                self._offsets.clear()
            delta = datetime.fromtimestamp(key * SLOT, self.zone).utcoffset()
            offset = self._offsets[key] = int(delta.total_seconds()) if delta is not None else 0
        return offset

    def day_start(self, day: date) -> int:
        """Epoch of the first instant of a local day (the gap's end if midnight does not exist)."""
        return _day_start(self.zone, day)

    def day_slots(self, day: date) -> list[int]:
        """Ends of the slots of a local day, in order: 46, 48 or 50 of them."""
        start = self.day_start(day)
        end = self.day_start(day + timedelta(days=1))
        return list(range(start + SLOT, end + 1, SLOT))

    def closed(self, day: date, upto: int) -> list[tuple[int, SlotLabel]]:
        """The slots of a local day that have ended by `upto`, with their labels (a day, or today so far)."""
        return [(e, self.label(e)) for e in self.day_slots(day) if e <= upto]

    def day_of(self, slot_end: int) -> date:
        """The local day a slot belongs to (the day of its start)."""
        return datetime.fromtimestamp(slot_end - SLOT, self.zone).date()

    def label(self, slot_end: int) -> SlotLabel:
        """Day, 1-based index and local start/end labels of a slot."""
        day = self.day_of(slot_end)
        start = self.day_start(day)
        index = (slot_end - SLOT - start) // SLOT + 1
        begin = datetime.fromtimestamp(slot_end - SLOT, self.zone)
        finish = datetime.fromtimestamp(slot_end, self.zone)
        end = "24:00" if finish.date() != day else f"{finish:%H:%M}"
        return SlotLabel(day, index, f"{begin:%H:%M}", end)


@lru_cache(maxsize=4096)
def _day_start(zone: ZoneInfo, day: date) -> int:
    # fold=0 on a nonexistent midnight maps to the instant the gap ends, the day's first real instant.
    return int(datetime.combine(day, time(0), zone).timestamp())

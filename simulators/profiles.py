"""Half-hourly load and solar models of a fleet (pure: time and randomness are arguments)."""

from __future__ import annotations

import math
import random
from datetime import datetime

# Mean kW by local hour (0..23) on a weekday and on a weekend day, for a unit of scale 1.
_SHAPES: dict[str, tuple[list[float], list[float]]] = {
    "residential": (
        [
            0.30,
            0.25,
            0.22,
            0.22,
            0.22,
            0.28,
            0.55,
            0.95,
            0.80,
            0.45,
            0.35,
            0.35,
            0.40,
            0.35,
            0.35,
            0.40,
            0.55,
            0.95,
            1.4,
            1.6,
            1.5,
            1.2,
            0.80,
            0.45,
        ],
        [
            0.32,
            0.28,
            0.25,
            0.24,
            0.24,
            0.26,
            0.35,
            0.60,
            0.85,
            0.90,
            0.85,
            0.80,
            0.85,
            0.80,
            0.75,
            0.75,
            0.85,
            1.1,
            1.5,
            1.6,
            1.5,
            1.2,
            0.85,
            0.50,
        ],
    ),
    "shop": (
        [
            0.8,
            0.8,
            0.8,
            0.8,
            0.8,
            0.8,
            0.9,
            1.2,
            2.5,
            5.5,
            7.0,
            7.5,
            7.8,
            7.8,
            7.6,
            7.5,
            7.4,
            7.2,
            6.5,
            5.0,
            2.5,
            1.2,
            0.9,
            0.8,
        ],
        [
            0.8,
            0.8,
            0.8,
            0.8,
            0.8,
            0.8,
            0.9,
            1.2,
            2.8,
            6.0,
            7.8,
            8.4,
            8.6,
            8.6,
            8.5,
            8.3,
            8.0,
            7.6,
            6.8,
            5.2,
            2.6,
            1.2,
            0.9,
            0.8,
        ],
    ),
    "office": (
        [
            1.0,
            1.0,
            1.0,
            1.0,
            1.0,
            1.0,
            1.4,
            3.5,
            8.0,
            10.0,
            10.5,
            10.5,
            8.5,
            10.0,
            10.5,
            10.2,
            9.5,
            7.5,
            4.5,
            2.5,
            1.6,
            1.2,
            1.0,
            1.0,
        ],
        [1.0] * 24,
    ),
    "factory": (
        [4, 4, 4, 4, 4, 4, 6, 18, 30, 34, 35, 34, 20, 33, 35, 34, 30, 20, 8, 5, 4, 4, 4, 4],
        [3, 3, 3, 3, 3, 3, 3, 4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 4, 3, 3, 3, 3, 3, 3],
    ),
}


def season(month: int) -> float:
    """Heating in winter and cooling in summer raise consumption (Japan: both seasons peak)."""
    return {
        1: 1.30,
        2: 1.28,
        3: 1.12,
        4: 1.0,
        5: 0.95,
        6: 1.02,
        7: 1.18,
        8: 1.22,
        9: 1.08,
        10: 0.97,
        11: 1.05,
        12: 1.25,
    }[month]


def load_kw(profile: str, local: datetime, scale: float, rng: random.Random) -> float:
    """Mean power over the half hour that starts at `local`, in kW."""
    weekday, weekend = _SHAPES[profile]
    shape = weekend if local.weekday() >= 5 else weekday
    hour = local.hour + local.minute / 60
    here, there = shape[int(hour) % 24], shape[(int(hour) + 1) % 24]
    base = here + (there - here) * (hour - int(hour))
    return max(0.0, base * scale * season(local.month) * rng.lognormvariate(0.0, 0.18))


def solar_kw(kwp: float, local: datetime, cloud: float) -> float:
    """Mean PV output over the half hour that starts at `local`: a clear-sky bell times the day's cloud."""
    summer = math.cos((local.timetuple().tm_yday - 172) / 365 * 2 * math.pi)  # 1 at the June solstice
    half_day = 6.0 + 1.3 * summer  # hours from noon to sunset
    t = local.hour + local.minute / 60 + 0.25 - 12.0
    if abs(t) >= half_day:
        return 0.0
    return kwp * (0.75 + 0.1 * summer) * math.cos(t / half_day * math.pi / 2) ** 2 * cloud

"""A simulated fleet: units, their customers, meters and load (pure; the seed decides everything)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from kernel.emissions import fiscal_year

# e1 code -> kWh per register step; only what real SmaMe II meters use.
RESOLUTIONS = {0x01: 0.1, 0x02: 0.01, 0x00: 1.0}


@dataclass(frozen=True, slots=True)
class SimUnit:
    """One simulated LTE-M unit and its meter."""

    id: str
    customer: str
    meter: str
    profile: str
    scale: float  # multiplies the profile's kW
    contract_kw: int
    solar_kwp: float
    e1: int
    coef: int
    digits: int
    start_fwd: int  # raw register at the start of the run
    start_rev: int


def make_fleet(units: int, customers: int, seed: int, near_wrap: float = 0.03) -> list[SimUnit]:
    """`units` units spread over `customers` customers; `near_wrap` of them will roll over soon."""
    rng = random.Random(f"fleet:{seed}")
    out = []
    for i in range(units):
        profile = rng.choices(("residential", "shop", "office", "factory"), weights=(80, 10, 6, 4))[0]
        scale = rng.uniform(0.6, 1.6)
        peak = {"residential": 1.6, "shop": 8.6, "office": 10.5, "factory": 35.0}[profile] * scale * 1.3
        contract = max(3, int(peak * 1.5 + 0.999))
        solar = rng.choice((3.0, 4.5, 6.0)) if profile == "residential" and rng.random() < 0.3 else 0.0
        e1, coef = (0x01, 1) if profile != "factory" else rng.choice(((0x01, 1), (0x01, 10), (0x00, 1)))
        if profile == "residential" and rng.random() < 0.2:
            e1 = 0x02
        digits = 6 if rng.random() < 0.85 else 8
        top = 10**digits
        if rng.random() < near_wrap:  # a few hours of consumption before the register wraps
            fwd = top - int(peak * rng.uniform(1.0, 4.0) / (RESOLUTIONS[e1] * coef)) - 1
        else:
            fwd = rng.randrange(top // 2)
        fwd = max(0, min(fwd, top - 1))
        out.append(
            SimUnit(
                id=f"U{i:06d}",
                customer=f"C{i % customers:03d}",
                meter=f"SM-{seed % 10000:04d}-{i:06d}",
                profile=profile,
                scale=scale,
                contract_kw=contract,
                solar_kwp=solar,
                e1=e1,
                coef=coef,
                digits=digits,
                start_fwd=fwd,
                start_rev=rng.randrange(top // 4) if solar else 0,
            )
        )
    return out


# The fleet's electricity suppliers and menus (invented names) with their adjusted factors in t-CO2/kWh: a
# standard menu, a business menu and a renewable one (zero), as Japanese retailers offer them.
MENUS = (
    ("さくら電力", "従量電灯B", "0.000436"),
    ("さくら電力", "再エネ100", "0.000000"),
    ("みなと電力", "ビジネス", "0.000402"),
)
NATIONAL = "0.000423"  # t-CO2/kWh, near the grid average Japan publishes


def write_registry(fleet: list[SimUnit], directory: Path) -> tuple[Path, Path]:
    """units.csv and customers.toml for the fleet, so a demo needs no hand-written files. Each customer buys from
    one of MENUS; every other one (C000 first) asks for CO2 columns."""
    directory.mkdir(parents=True, exist_ok=True)
    units = directory / "units.csv"
    lines = ["unit_id,customer_id,meter_id,contract_kw,label"]
    lines += [f"{u.id},{u.customer},{u.meter},{u.contract_kw},{u.profile}" for u in fleet]
    units.write_text("\n".join(lines) + "\n", encoding="utf-8")
    customers = directory / "customers.toml"
    ids = sorted({u.customer for u in fleet})
    customers.write_text(
        "".join(
            f'[customers.{c}]\nname = "Simulated customer {c}"\nsupplier = "{MENUS[k % len(MENUS)][0]}"\n'
            f'menu = "{MENUS[k % len(MENUS)][1]}"\nco2_columns = {"true" if k % 2 == 0 else "false"}\n\n'
            for k, c in enumerate(ids)
        ),
        encoding="utf-8",
    )
    return units, customers


def write_factors(directory: Path, today: date) -> Path:
    """`emission_factors.csv` for the fleet's menus: the fiscal year of `today` and the two before it, each
    published the December before it began, and one correction of this year's first menu."""
    path = directory / "emission_factors.csv"
    year = fiscal_year(today)
    lines = ["supplier,menu,fiscal_year,basic_t_per_kwh,adjusted_t_per_kwh,published"]
    for fiscal in range(year - 2, year + 1):
        lines.append(f"national,average,{fiscal},{NATIONAL},{NATIONAL},{fiscal - 1}-12-20")
        lines += [f"{s},{m},{fiscal},0.000450,{adjusted},{fiscal - 1}-12-20" for s, m, adjusted in MENUS]
    supplier, menu, _ = MENUS[0]
    lines.append(f"{supplier},{menu},{year},0.000450,0.000431,{year}-02-15")  # a correction, published later
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

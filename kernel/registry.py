"""Who owns which unit: `units.csv` and `customers.toml`, validated as a whole, with the emission factors
that customers' energy is multiplied by (`emission_factors.csv`): read and replaced together.

The tenant of a reading comes from here, never from the telegram or its topic.
"""

from __future__ import annotations

import csv
import ipaddress
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kernel.addresses import ip_of
from kernel.emissions import NO_FACTORS, DayFactors, Factors, FactorsError, fiscal_year, load_factors
from kernel.errors import bad_lines
from kernel.meter import UNIT_ID, Limits

UNIT_COLUMNS = ("unit_id", "customer_id", "meter_id", "contract_kw", "label", "group")


class RegistryError(ValueError):
    """The registry files are wrong; the message names the file, line and field."""


class FtpUser(BaseModel):
    """One login of a customer (FTP, FTPS, SFTP)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    password_hash: str | None = None
    ssh_keys: list[str] = []


class Customer(BaseModel):
    """A customer and how it wants its CSV files."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    name: str = ""
    layout: Literal["long", "wide"] = "long"
    encoding: Literal["utf-8", "cp932"] = "utf-8"
    newline: Literal["\n", "\r\n"] = "\n"
    include_export: bool = True
    supplier: str = Field(default="", max_length=200)  # electricity retailer and tariff menu, as in the
    menu: str = Field(default="", max_length=200)  # factors file: the market-based emissions' factor
    co2_columns: bool = False  # emissions in the CSV files and a monthly summary
    users: list[FtpUser] = []
    # the addresses or networks its machines come from ("203.0.113.0/24", "2001:db8::/32"): its logins (FTPS,
    # SFTP) and tokens (the API) are taken from these only; empty: from anywhere
    allow: list[str] = Field(default=[], max_length=1000)

    @field_validator("allow")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for network in v:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(
                    f"allow: {network!r} is no address or network (203.0.113.0/24, 2001:db8::/32)"
                ) from None
        return v

    def allows(self, address: str) -> bool:
        """Whether a machine at `address` may use this customer's logins and tokens (an IPv4 address mapped into
        IPv6, as a dual-stack socket gives it, counts as the IPv4 address; no address is no allowed one)."""
        if not self.allow:
            return True
        ip = ip_of(address)
        return ip is not None and any(ip in ipaddress.ip_network(n, strict=False) for n in self.allow)

    @model_validator(mode="before")
    @classmethod
    def _replaced(cls, data: Any) -> Any:
        if isinstance(data, dict) and "emission_factor" in data:
            raise ValueError(
                "emission_factor is replaced by supplier, menu and co2_columns, with the factors in the file "
                "named by the setting emissions.factors (docs/emissions.md)"
            )
        return data

    @model_validator(mode="after")
    def _menu_of_a_supplier(self) -> Customer:
        if bool(self.supplier) != bool(self.menu):
            raise ValueError("supplier and menu go together: set both, or neither")
        return self


@dataclass(frozen=True, slots=True)
class Unit:
    """One communication unit and its place in the fleet."""

    id: str
    customer: str
    meter: str = ""
    contract_kw: Fraction | None = None
    label: str = ""
    group: str = ""  # a name the operators give units configured alike (desired configuration, devices.md)


@dataclass(frozen=True)
class Registry:
    """The units and customers in force."""

    units: dict[str, Unit]
    customers: dict[str, Customer]
    default_contract_kw: Fraction = Fraction(50)
    gap_cap: int = 48
    factors: Factors = NO_FACTORS
    # by the contract kW object (`limits_of`), each with the object, which keeps its id from being reused
    _limits: dict[int, tuple[Fraction | None, Limits]] = field(default_factory=dict, repr=False, compare=False)
    _by_customer: dict[str, list[Unit]] = field(default_factory=dict, repr=False, compare=False)

    def __contains__(self, unit: object) -> bool:
        return unit in self.units

    def customer_of(self, unit: str) -> str:
        """The customer id owning a unit."""
        return self.units[unit].customer

    def limits_of(self, unit: str) -> Limits:
        """Plausibility limits of a unit: its contract kW for half an hour."""
        kw = self.units[unit].contract_kw
        # one Limits for all units of a contract (a fleet has few), found by the kW's object: a Fraction's hash is
        # computed in Python at each look-up, and the units of a contract share one object (`load_registry`)
        held = self._limits.get(id(kw))
        if held is None:
            held = self._limits[id(kw)] = (kw, Limits((kw or self.default_contract_kw) / 2, self.gap_cap))
        return held[1]

    def units_of(self, customer: str) -> list[Unit]:
        """A customer's units, sorted by id."""
        if not self._by_customer and self.units:
            # built aside and put in at once: another thread (the web server's) may ask at the same moment
            built: dict[str, list[Unit]] = {}
            for u in sorted(self.units.values(), key=lambda u: u.id):
                built.setdefault(u.customer, []).append(u)
            self._by_customer.update(built)
        return self._by_customer.get(customer, [])

    def day_factors(self, customer: str, day: date) -> DayFactors | None:
        """The emission factors of a customer's slots of a local day; None when it has no emissions."""
        c = self.customers[customer]
        if not c.co2_columns:
            return None
        fiscal = fiscal_year(day)
        return DayFactors(fiscal, self.factors.location(fiscal), self.factors.market(c.supplier, c.menu, fiscal))

    def unknown_menus(self) -> list[str]:
        """Customers with emissions whose supplier and menu the factors file never names (a typo, most likely)."""
        return [
            f"customer {c.id}: supplier {c.supplier!r} menu {c.menu!r} is not in the emission factors"
            for c in self.customers.values()
            if c.co2_columns and c.supplier and not self.factors.knows(c.supplier, c.menu)
        ]


def load_registry(
    units_path: Path,
    customers_path: Path,
    default_contract_kw: Fraction = Fraction(50),
    gap_cap: int = 48,
    factors_path: Path | None = None,
    today: date | None = None,
) -> Registry:
    """Read and check the files (the emission factors too, when named; with `today`, none published after it);
    raise RegistryError naming the problem."""
    customers = _load_customers(customers_path)
    units = _load_units(units_path, customers)
    try:
        factors = NO_FACTORS if factors_path is None else load_factors(factors_path, today)
    except FactorsError as exc:
        raise RegistryError(str(exc)) from None
    return Registry(units, customers, default_contract_kw, gap_cap, factors)


def _read(path: Path, encoding: str, setting: str) -> str:
    """A registry file's text; raise RegistryError naming the file and the setting that points at it."""
    try:
        return path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise RegistryError(f"{path}: {setting.split('.')[-1]} file not found (setting {setting})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: cannot be read: {exc}") from None


def _load_customers(path: Path) -> dict[str, Customer]:
    return parse_customers(_read(path, "utf-8", "registry.customers"), path)


def parse_customers(text: str, path: Path) -> dict[str, Customer]:
    """The customers of a customers.toml text (as found at `path`); raise RegistryError naming the problem.
    Everything that writes the file runs its new text through this first."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # arrays or tables nested hundreds deep: tomllib recurses once a level
        raise RegistryError(f"{path}: not valid TOML: nested too deep") from None
    table = data.get("customers", {})
    if not isinstance(table, dict):
        raise RegistryError(f"{path}: [customers] must be a table of customer ids")
    out: dict[str, Customer] = {}
    for cid, body in table.items():
        try:
            out[cid] = Customer.model_validate({"id": cid, **body})
        except (ValidationError, TypeError) as exc:
            raise RegistryError(f"{path}: customers.{cid}: {_first_error(exc)}") from None
    return out


def unit_rows(path: Path) -> Iterator[tuple[int, dict[str, str | None]]]:
    """The rows of a units.csv with their line numbers, its header checked (a UTF-8 byte-order mark, as
    spreadsheets write one, is allowed); raise RegistryError naming the problem. The one reader of the file."""
    reader = csv.DictReader(_read(path, "utf-8-sig", "registry.units").splitlines())
    header = reader.fieldnames or []
    if header[:2] != ["unit_id", "customer_id"] or not set(header) <= set(UNIT_COLUMNS):
        raise RegistryError(f"{path}: header must be {','.join(UNIT_COLUMNS)} (the last four optional), got {header}")
    return enumerate(reader, start=2)  # row by row: a large fleet's file is never all dicts at once


def _load_units(path: Path, customers: dict[str, Customer]) -> dict[str, Unit]:
    units: dict[str, Unit] = {}
    errors: list[str] = []
    # The values many units share are kept once: customer ids, labels and contracts (100,000 units: 62 -> 24 MB).
    shared: dict[Any, Any] = {c: c for c in customers}
    for line, row in unit_rows(path):
        try:
            unit = _unit(row, customers, shared)
        except ValueError as exc:  # every bad line is said at once, so that one round of fixes is enough
            errors.append(f"{path}:{line}: {exc}")
            continue
        if unit.id in units:
            errors.append(f"{path}:{line}: unit_id {unit.id} appears twice")
        units[unit.id] = unit
    if errors:
        raise RegistryError(bad_lines(path, errors))
    return units


CONTRACT_KW = re.compile(r"[0-9]{1,7}(\.[0-9]{1,6})?")


def _unit(row: dict[str, str | None], customers: dict[str, Customer], shared: dict[Any, Any]) -> Unit:
    uid, cid = (row.get("unit_id") or "").strip(), (row.get("customer_id") or "").strip()
    if not UNIT_ID.fullmatch(uid):
        raise ValueError(f"unit_id {uid!r} must match [A-Za-z0-9_-]{{1,64}}")
    if cid not in customers:
        raise ValueError(f"customer_id {cid!r} is not in the customers file")
    kw_text = (row.get("contract_kw") or "").strip()
    kw = shared.get(("kw", kw_text)) if kw_text else None
    if kw is None and kw_text:  # each contract's text parsed once: a Fraction made, hashed and compared costs 10 us
        # a plain decimal only: Fraction("1e999999") alone takes a quarter of a second, on the reload's way
        if not CONTRACT_KW.fullmatch(kw_text):
            raise ValueError(f"contract_kw {kw_text[:20]!r} is not a number of kW such as 50 or 6.5")
        kw = Fraction(kw_text)
        if kw <= 0:
            raise ValueError("contract_kw must be positive")
        kw = shared[("kw", kw_text)] = shared.setdefault(kw, kw)  # "50" and "50.0": one object
    label = (row.get("label") or "").strip()
    meter = (row.get("meter_id") or "").strip()
    group = (row.get("group") or "").strip()
    if group and not UNIT_ID.fullmatch(group):
        raise ValueError(f"group {group[:70]!r} must match [A-Za-z0-9_-]{{1,64}}")
    kept = shared.setdefault
    return Unit(uid, shared[cid], meter, kw, kept(label, label), kept(group, group))


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    return str(exc)

"""The registry files: checked as a whole, errors name file, line and field."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from kernel.registry import RegistryError, load_registry


def files(
    tmp_path: Path, units: str, customers: str = '[customers.C1]\nname = "One"\n[customers.C2]\n'
) -> tuple[Path, Path]:
    (tmp_path / "units.csv").write_text(units)
    (tmp_path / "customers.toml").write_text(customers)
    return tmp_path / "units.csv", tmp_path / "customers.toml"


def test_units_and_customers_load(tmp_path: Path) -> None:
    reg = load_registry(
        *files(tmp_path, "unit_id,customer_id,meter_id,contract_kw,label\nU1,C1,SM-1,6,House\nU2,C2,,,\n")
    )
    assert reg.customer_of("U1") == "C1" and "U2" in reg and "U3" not in reg
    assert reg.limits_of("U1").max_slot_kwh == Fraction(3)
    assert reg.limits_of("U2").max_slot_kwh == Fraction(25)  # the default 50 kW
    assert [u.id for u in reg.units_of("C1")] == ["U1"]
    assert reg.customers["C1"].name == "One" and reg.customers["C2"].layout == "long"


def test_header_only_file_is_an_empty_fleet(tmp_path: Path) -> None:
    assert load_registry(*files(tmp_path, "unit_id,customer_id\n")).units == {}


@pytest.mark.parametrize(
    ("units", "customers", "message"),
    [
        ("unit,customer\nU1,C1\n", None, "header must be"),
        ("unit_id,customer_id\nU 1,C1\n", None, "units.csv:2: unit_id 'U 1'"),
        ("unit_id,customer_id\nU1,C1\nU1,C1\n", None, "units.csv:3: unit_id U1 appears twice"),
        ("unit_id,customer_id\nU1,C9\n", None, "units.csv:2: customer_id 'C9'"),
        ("unit_id,customer_id,meter_id,contract_kw\nU1,C1,,lots\n", None, "contract_kw 'lots'"),
        ("unit_id,customer_id,meter_id,contract_kw\nU1,C1,,0\n", None, "contract_kw must be positive"),
        ("unit_id,customer_id,meter_id,contract_kw\nU1,C1,,-3\n", None, "contract_kw '-3' is not a number of kW"),
        ("unit_id,customer_id,meter_id,contract_kw\nU1,C1,,1e999999\n", None, "contract_kw '1e999999' is not a"),
        ("unit_id,customer_id,meter_id,contract_kw\nU1,C1,,1" + "0" * 5000 + "\n", None, "not a number of kW"),
        ("unit_id,customer_id\n", '[customers.C1]\nlayout = "tall"\n', "customers.C1: layout"),
        ("unit_id,customer_id\n", "[customers.C1]\ncolour = 1\n", "customers.C1: colour"),
        ("unit_id,customer_id\n", "[customers.C1\n", "not valid TOML"),
        ("unit_id,customer_id\n", '[customers.C1]\nallow = ["10.0.0.0/33"]\n', "allow: '10.0.0.0/33' is no address"),
        ("unit_id,customer_id\n", '[customers.C1]\nallow = "10.0.0.1"\n', "customers.C1: allow"),
        ("unit_id,customer_id\n", "a = " + "[" * 1000 + "]" * 1000, "customers.toml: not valid TOML: nested too deep"),
    ],
)
def test_errors_name_the_place(tmp_path: Path, units: str, customers: str | None, message: str) -> None:
    paths = files(tmp_path, units) if customers is None else files(tmp_path, units, customers)
    with pytest.raises(RegistryError, match=message.replace("(", r"\(")):
        load_registry(*paths)


def test_an_allow_list_takes_its_addresses_and_networks_and_ipv4_on_a_dual_stack_socket(tmp_path: Path) -> None:
    customers = '[customers.C1]\nallow = ["203.0.113.0/24", "2001:db8::/32", "192.0.2.7"]\n[customers.C2]\n'
    registry = load_registry(*files(tmp_path, "unit_id,customer_id\nU1,C1\n", customers))
    c1, c2 = registry.customers["C1"], registry.customers["C2"]
    for address, allowed in (
        ("203.0.113.200", True),
        ("::ffff:203.0.113.9", True),  # an IPv4 client of a dual-stack listener
        ("2001:db8:1::5", True),
        ("192.0.2.7", True),
        ("192.0.2.8", False),
        ("2001:db9::1", False),
        ("", False),
        ("not an address", False),
    ):
        assert c1.allows(address) is allowed, address
        assert c2.allows(address)  # no list: from anywhere

"""Accounts and bans without a server: what a failed login costs, and one spelling per address."""

from __future__ import annotations

import time
from pathlib import Path

from ftp_gateway.accounts import Accounts, Bans, normalize
from ftp_gateway.passwords import hash_password
from kernel.registry import load_registry
from tests.helpers import write_registry


def test_an_ipv4_mapped_address_is_the_same_address() -> None:
    bans = Bans(max_failures=2, window=60, ban_s=60)
    bans.failed("::ffff:127.0.0.1")
    assert bans.failed("127.0.0.1")  # the second failure, whichever socket family it came in on
    assert bans.banned("127.0.0.1") and bans.banned("::ffff:127.0.0.1")
    assert normalize("::FFFF:10.0.0.1") == "10.0.0.1" and normalize("2001:DB8::1") == "2001:db8::1"
    assert normalize("not an address") == "not an address"


def test_a_failed_login_costs_the_same_for_every_kind_of_user(workdir: Path) -> None:
    write_registry(workdir, {"U1": "C1"})
    (workdir / "customers.toml").write_text(
        "[customers.C1]\nusers = [\n"
        f'  {{ name = "pw", password_hash = "{hash_password("right-password-1")}" }},\n'
        '  { name = "keyonly", ssh_keys = ["ssh-ed25519 '
        'AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x"] },\n'
        "]\n"
    )
    registry = load_registry(workdir / "units.csv", workdir / "customers.toml")
    accounts = Accounts(lambda: registry, workdir / "export")

    def cost(user: str) -> float:  # the least of five: scheduling noise only adds
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            assert accounts.check_password(user, "wrong-password") is None
            best = min(best, time.perf_counter() - started)
        return best

    with_password, key_only, unknown = cost("pw"), cost("keyonly"), cost("nobody")
    assert key_only > with_password / 2 and unknown > with_password / 2, (with_password, key_only, unknown)
    assert accounts.check_password("keyonly", "") is None

"""Accounts and bans without a server: what a failed login costs, and one spelling per address."""

from __future__ import annotations

import time
from pathlib import Path

from aggregator.backends import open_url
from ftp_gateway.accounts import Accounts, Bans, Doorway, Ticket, normalize
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


def test_nodes_share_their_bans_through_the_store_and_an_operators_lift_reaches_each(store_url: str) -> None:
    wall = 1_800_000_000.0
    clock_a, clock_b = [100.0], [5_000.0]  # each node's own monotonic clock
    a = Bans(max_failures=2, window=60, ban_s=600, clock=lambda: clock_a[0])
    b = Bans(max_failures=2, window=60, ban_s=600, clock=lambda: clock_b[0])

    def exchange(bans: Bans, node: str) -> None:
        new = bans.exchange(store.bans(wall), wall, node)
        if new:
            store.keep_bans(new)
            bans.kept(new)

    with open_url(store_url) as store:
        a.failed("192.0.2.7", "login alice", "FTP")
        assert a.failed("192.0.2.7", "login alice", "FTP")
        exchange(a, "a")
        assert store.bans(wall) == [("192.0.2.7", "FTP", wall, wall + 600, "a")]
        exchange(b, "b")
        assert b.banned("192.0.2.7")  # earned at a, kept from b's doors too
        assert store.lift_ban("192.0.2.7") and not store.lift_ban("192.0.2.7")
        assert a.banned("192.0.2.7")  # until each node looks at the store again
        exchange(a, "a")
        exchange(b, "b")
        assert not a.banned("192.0.2.7") and not b.banned("192.0.2.7")
        b.failed("198.51.100.1")
        b.failed("198.51.100.1")
        exchange(b, "b")
        wall += 601  # the ban's hour (here ten minutes) is over on every clock
        clock_a[0] += 601
        clock_b[0] += 601
        assert store.bans(wall) == []
        exchange(a, "a")
        exchange(b, "b")
        assert not b.banned("198.51.100.1") and b.active() == {} and a.active() == {}


def test_a_full_door_puts_out_the_busiest_strangers_oldest_for_a_newcomer_and_never_a_known_address() -> None:
    door = Doorway(per_address=4, total=8)
    closed: list[str] = []

    def enter(address: str, name: str) -> Ticket | None:
        return door.enter(address, lambda: closed.append(name))

    tickets = [enter(f"192.0.2.{1 + k // 4}", f"s{k}") for k in range(8)]  # two strangers, four places each
    customer = enter("198.51.100.1", "customer")
    assert customer is not None and closed == ["s0"]  # the busiest address's oldest made room
    assert enter("192.0.2.1", "again") is None  # three against four: putting one out would only swap them
    door.logged_in(customer)  # its address is known from now on
    for t in tickets:
        if t is not None:
            door.leave(t)
    door.leave(customer)  # twice: nothing more
    spread = [enter(f"203.0.113.{k}", f"w{k}") for k in range(8 - 1)]
    assert enter("198.51.100.1", "back") is not None  # a known address fills the last place...
    assert enter("192.0.2.99", "new") is None  # one place each: a newcomer puts nobody out
    assert enter("198.51.100.1", "known") is not None and closed[-1] == "w0"  # a known one puts a stranger out
    assert all(t is not None for t in spread) and door.evicted == 2 and door.refused == 2

"""The JSON API v1 over real HTTP (uvicorn on its own thread, as in `smame run`) on a real store and real files."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.backends import open_url
from aggregator.ingest import Ingestor
from aggregator.store import HEALTH_COLUMNS
from csv_export.exporter import Exporter, ExportStats
from csv_export.files import path_of
from ftp_gateway.accounts import Bans
from kernel.reading import Incoming, Reading
from kernel.registry import Registry, load_registry
from kernel.timegrid import SLOT, Grid
from monitoring.at_risk import reasons_json
from monitoring.risk import Reason
from tests.databases import BACKENDS
from tests.helpers import connect_from, real_processes, serving
from web.access import SESSION_COOKIE, AccessError, Operators, Sessions, Tokens
from web.app import build_app
from web.context import WebContext
from web.proxies import Proxies
from web.server import WebServer

GRID = Grid("Asia/Tokyo")
NOW = datetime.fromisoformat("2026-11-23T12:05:00+09:00").timestamp()
TODAY = date(2026, 11, 23)


def reading(unit: str, at: int, fwd: int, rev: int) -> Incoming:
    r = Reading(unit, at, f"SM-{unit}", fwd, rev, 1, 1, 6, 1, at + 5)
    return Incoming(r, at + 7, f"smame/v1/{unit}/reading", b"{}")


def history() -> list[Incoming]:
    """Three days before NOW: U1 with a short gap (estimated) and solar export; U2 silent for two days (missing);
    U3, another customer's, steady."""
    end = GRID.floor(NOW)
    start = end - 3 * 86400
    gap = set(range(start + 40 * SLOT, start + 44 * SLOT + 1, SLOT))
    silence = set(range(start + 10 * SLOT, start + 110 * SLOT, SLOT))
    out = []
    for k, when in enumerate(range(start, end + 1, SLOT)):
        if when not in gap:
            out.append(reading("U1", when, 1000 + 7 * k, 3 * k if k % 48 > 20 else 3 * (k - k % 48 + 20)))
        if when not in silence:
            out.append(reading("U2", when, 500 + 4 * k, 0))
        out.append(reading("U3", when, 9000 + 5 * k, 0))
    return out


@dataclass
class Api:
    port: int
    tokens: dict[str, str]  # customer -> token
    root: Path
    store_url: str
    bans: Bans

    def get(self, path: str, token: str | None = None, cookie: str = "") -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        if cookie:
            request.add_header("Cookie", f"{SESSION_COOKIE}={cookie}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def json(self, path: str, token: str | None = None) -> tuple[int, Any]:
        status, headers, body = self.get(path, token)
        assert headers["content-type"] == "application/json", (status, headers, body)
        return status, json.loads(body)


@dataclass
class World:
    """Three units of two customers with three days of readings, their CSV files and a token each."""

    store_url: str
    root: Path
    registry: Registry
    tokens: dict[str, str]


@pytest.fixture(scope="module", params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    workdir = tmp_path_factory.mktemp("web")
    if request.param == "sqlite":
        store_url = f"sqlite:///{workdir / 'smame.db'}"
    else:
        store_url = request.getfixturevalue("postgres").fresh_url()
    (workdir / "units.csv").write_text(
        "unit_id,customer_id,meter_id,contract_kw,label\nU1,C1,SM-U1,,roof\nU2,C1,,,\nU3,C2,SM-U3,,\n"
    )
    (workdir / "customers.toml").write_text(
        '[customers.C1]\nsupplier = "S"\nmenu = "M"\nco2_columns = true\n[customers.C2]\nencoding = "cp932"\n'
    )
    (workdir / "factors.csv").write_text(
        "supplier,menu,fiscal_year,basic_t_per_kwh,adjusted_t_per_kwh,published\n"
        "national,average,2026,0.000423,0.000423,2025-12-20\nS,M,2026,0.0005,0.000388,2025-12-20\n"
    )
    registry = load_registry(workdir / "units.csv", workdir / "customers.toml", factors_path=workdir / "factors.csv")
    root = workdir / "export"
    with open_url(store_url) as store:
        Ingestor(store, registry, GRID).commit(history(), [], int(NOW))
        tokens = {c: Tokens(store).add(c, f"{c}'s server", int(NOW)) for c in ("C1", "C2")}
    exporter = Exporter(open_url(store_url), lambda: registry, GRID, root, 45, 120)
    exporter.scheduled(NOW)
    exporter.close()
    return World(store_url, root, registry, tokens)


@pytest.fixture
def api(world: World) -> Iterator[Api]:
    """The API served over HTTP on a free port, with a ban list of its own."""
    bans = Bans(max_failures=3)
    store = open_url(world.store_url)
    registry, root, tokens, store_url = world.registry, world.root, world.tokens, world.store_url
    ctx = WebContext(
        store, lambda: registry, GRID, root, bans, lambda: NOW, max_days=45, fail_delay_s=0.0, export=ExportStats()
    )
    try:
        with serving(WebServer(lambda: build_app(ctx), "127.0.0.1", 0)) as port:
            yield Api(port, tokens, root, store_url, bans)
    finally:
        store.close()


def test_a_token_lists_its_own_customers_units_with_their_last_reading(api: Api) -> None:
    status, body = api.json("/api/v1/units", api.tokens["C1"])
    assert status == 200
    assert body["units"] == [
        {
            "unit_id": "U1",
            "customer_id": "C1",
            "meter_id": "SM-U1",
            "label": "roof",
            "last_reading_at": "2026-11-23T12:00:00+09:00",
        },
        {
            "unit_id": "U2",
            "customer_id": "C1",
            "meter_id": None,
            "label": None,
            "last_reading_at": "2026-11-23T12:00:00+09:00",
        },
    ]
    status, body = api.json("/api/v1/units", api.tokens["C2"])
    assert [u["unit_id"] for u in body["units"]] == ["U3"]


def test_another_customers_unit_or_file_answers_exactly_as_one_that_does_not_exist(api: Api) -> None:
    c1 = api.tokens["C1"]
    theirs = api.get("/api/v1/units/U3/slots?from=2026-11-22", c1)
    nobody = api.get("/api/v1/units/U9/slots?from=2026-11-22", c1)
    assert theirs[0] == nobody[0] == 404
    assert json.loads(theirs[2]) == {"error": "no unit U3"} and json.loads(nobody[2]) == {"error": "no unit U9"}
    assert theirs[1]["content-length"] == nobody[1]["content-length"]
    assert api.get("/api/v1/units/U3/slots?from=2026-11-22", api.tokens["C2"])[0] == 200  # it is there
    theirs = api.get("/api/v1/customers/C2/days/2026-11-22.csv", c1)
    nobody = api.get("/api/v1/customers/C9/days/2026-11-22.csv", c1)
    assert theirs[0] == nobody[0] == 404
    assert api.get("/api/v1/customers/C2/days/2026-11-22.csv", api.tokens["C2"])[0] == 200


def test_a_token_reads_only_its_scope_until_its_expiry_and_an_expired_one_is_told_so_without_a_ban(api: Api) -> None:
    with open_url(api.store_url) as store:
        units_only = Tokens(store).add("C1", "dashboard", int(NOW), scope=["units"])
        old = Tokens(store).add("C1", "old server", int(NOW) - 86400, expires=int(NOW) - 60)
        with pytest.raises(AccessError, match="scope is some of units, files, emissions, not slots"):
            Tokens(store).add("C1", "x", int(NOW), scope=["units", "slots"])
        with pytest.raises(AccessError, match="in the future"):
            Tokens(store).add("C1", "x", int(NOW), expires=int(NOW))
    assert api.get("/api/v1/units", units_only)[0] == 200
    assert api.get("/api/v1/units/U1/slots?from=2026-11-22", units_only)[0] == 200
    outside = (("/customers/C1/days/2026-11-22.csv", "files"), ("/customers/C1/emissions?month=2026-11", "emissions"))
    for path, scope in outside:
        status, _, body = api.get("/api/v1" + path, units_only)
        assert (status, json.loads(body)) == (403, {"error": f"this token reads units, not {scope}"})
        assert api.get("/api/v1" + path, api.tokens["C1"])[0] == 200  # a token of every scope (the default)
    for _ in range(api.bans.max_failures + 1):  # an expired token is refused, saying when, and bans nobody
        status, headers, body = api.get("/api/v1/units", old)
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert json.loads(body) == {"error": "this API token expired at 2026-11-23T12:04:00+09:00: ask for a new one"}
    assert api.get("/api/v1/units", api.tokens["C1"])[0] == 200


def test_a_node_that_writes_no_files_says_so_and_serves_no_stale_ones(world: World) -> None:
    # no exporter on this node, and the export directory still holds files from before: neither served nor listed
    store = open_url(world.store_url)
    ctx = WebContext(store, lambda: world.registry, GRID, world.root, Bans(3), lambda: NOW, fail_delay_s=0.0)
    Operators(store).add("oleg", "oleg-password-1", int(NOW))
    cookie = Sessions(store).open("oleg", int(NOW))
    try:
        with serving(WebServer(lambda: build_app(ctx), "127.0.0.1", 0)) as port:
            api = Api(port, world.tokens, world.root, world.store_url, Bans(3))
            says = "this node writes no customer files (export.enabled is false)"
            for path in ("/api/v1/customers/C1/days/2026-11-22.csv", "/api/v1/customers/C1/emissions?month=2026-11"):
                status, body = api.json(path, api.tokens["C1"])
                assert (status, body["error"][: len(says)]) == (404, says), path
            assert api.json("/api/v1/customers/C2/days/2026-11-22.csv", api.tokens["C1"]) == (
                404,
                {"error": "no customer C2"},
            )  # another customer's files answer as before
            assert api.json("/api/v1/units/U1/slots?from=2026-11-22", api.tokens["C1"])[0] == 200
            status, _, page = api.get("/customers/C1", cookie=cookie)  # the console's customer page
            assert status == 200 and says.encode() in page.lower() and b"C1_2026" not in page
    finally:
        Operators(store).remove("oleg")
        store.close()


def test_no_token_a_wrong_one_or_a_removed_one_is_401_and_guessing_is_banned(api: Api) -> None:
    status, headers, body = api.get("/api/v1/units")
    assert status == 401 and headers["www-authenticate"] == "Bearer" and "error" in json.loads(body)
    with open_url(api.store_url) as store:
        good = Tokens(store).add("C1", "to be removed", int(NOW))
    assert api.get("/api/v1/units", good)[0] == 200
    with open_url(api.store_url) as store:
        Tokens(store).remove(good.split("_")[1])
    assert api.get("/api/v1/units", good)[0] == 401  # at once: no reload, no restart
    assert api.get("/api/v1/units", good[:-1] + ("A" if good[-1] != "A" else "B"))[0] == 401
    assert api.get("/api/v1/units", "smame_000000000000_" + "x" * 43)[0] == 401
    status, headers, _ = api.get("/api/v1/units", api.tokens["C2"])  # the third failure banned the address
    assert status == 429 and int(headers["retry-after"]) > 0
    assert api.bans.bans == 1


def test_a_customers_good_calls_between_its_guesses_do_not_keep_it_from_being_banned(api: Api) -> None:
    mine, theirs = api.tokens["C1"], api.tokens["C2"]
    for k in range(3):
        assert api.get("/api/v1/units", mine)[0] == 200  # its own calls succeed in between
        assert api.get("/api/v1/units", theirs[:-2] + f"x{k}")[0] == 401  # guessing C2's token's secret
    assert api.get("/api/v1/units", mine)[0] == 429 and api.bans.bans == 1


def test_failures_aimed_at_one_account_from_many_addresses_ban_each_further_one_at_once() -> None:
    bans = Bans(max_failures=3, window=600, ban_s=3600)
    for k in range(3):  # a guesser spreading its tries over addresses: none reaches three
        assert not bans.failed(f"192.0.2.{k}", "login alice")
    assert bans.failed("192.0.2.50", "login alice")  # alice has had her three: the next address goes at once
    assert bans.banned("192.0.2.50") and not bans.banned("192.0.2.0")
    assert not bans.failed("192.0.2.51", "login bob")  # another account is counted apart


def test_slots_equal_the_csv_file_for_every_quality(api: Api) -> None:
    days = [TODAY - timedelta(days=d) for d in (3, 2, 1, 0)]
    status, body = api.json(f"/api/v1/units/U1/slots?from={days[0]}&to={days[-1]}", api.tokens["C1"])
    assert status == 200
    status, other = api.json(f"/api/v1/units/U2/slots?from={days[0]}&to={days[-1]}", api.tokens["C1"])
    slots = body["slots"] + other["slots"]
    assert {s["quality"] for s in slots} == {"A", "E", "M"}
    assert any(s["export_kwh"] not in (None, "0.0") for s in slots)
    # today ends with the last half hour closed at NOW (12:00)
    assert slots[len(body["slots"]) - 1]["end"] == "2026-11-23T12:00:00+09:00"
    from_files = {}
    for day in days:
        text = path_of(api.root, "C1", day).read_text()
        for row in csv.DictReader(io.StringIO(text)):
            from_files[(row["unit_id"], row["date"], int(row["slot"]))] = row
    compared = 0
    for unit, part in (("U1", body["slots"]), ("U2", other["slots"])):
        for s in part:
            row = from_files[(unit, s["date"], s["slot"])]
            assert (s["import_kwh"] or "", s["export_kwh"] or "", s["quality"]) == (
                row["import_kwh"],
                row["export_kwh"],
                row["quality"],
            ), (unit, s)
            assert (s["start"][11:16], s["end"][11:16]) == (row["start"], row["end"].replace("24:00", "00:00"))
            compared += 1
    assert compared == len(slots) > 3 * 48 * 2


def test_a_days_csv_is_the_files_bytes_in_its_encoding(api: Api) -> None:
    day = TODAY - timedelta(days=1)
    status, headers, body = api.get(f"/api/v1/customers/C2/days/{day}.csv", api.tokens["C2"])
    assert status == 200
    assert body == path_of(api.root, "C2", day).read_bytes()
    assert headers["content-type"] == "text/csv; charset=windows-31j"
    status, _, _ = api.get(f"/api/v1/customers/C2/days/{TODAY - timedelta(days=30)}.csv", api.tokens["C2"])
    assert status == 404


def test_an_operators_console_session_reads_every_customer_and_only_customers_downloads_are_noted(
    api: Api,
) -> None:
    day = TODAY - timedelta(days=1)
    names = {c: path_of(api.root, c, day).name for c in ("C1", "C2")}
    with open_url(api.store_url) as store:
        Operators(store).add("olga", "olga-password-1", int(NOW))
        cookie = Sessions(store).open("olga", int(NOW))
        before = {c: store.downloads(c).get(names[c]) for c in names}
    units = json.loads(api.get("/api/v1/units", cookie=cookie)[2])["units"]
    assert [u["unit_id"] for u in units] == ["U1", "U2", "U3"]  # both customers' units
    assert api.get(f"/api/v1/units/U3/slots?from={TODAY}", cookie=cookie)[0] == 200
    for customer in names:
        assert api.get(f"/api/v1/customers/{customer}/days/{day}.csv", cookie=cookie)[0] == 200
    assert api.get("/api/v1/units", cookie="not-a-session")[0] == 401
    with open_url(api.store_url) as store:  # an operator's look is not the customer's download
        assert {c: store.downloads(c).get(names[c]) for c in names} == before
    assert api.get(f"/api/v1/customers/C1/days/{day}.csv", api.tokens["C1"])[0] == 200
    with open_url(api.store_url) as store:
        _, via, who, count = store.downloads("C1")[names["C1"]]
        assert (via, who, count) == (
            "api",
            f"token {api.tokens['C1'].split('_')[1]}",
            (before["C1"] or (0,) * 4)[3] + 1,
        )
        Operators(store).remove("olga")
    assert api.get("/api/v1/units", cookie=cookie)[0] == 401  # a removed operator's session ends at once


def test_the_fleets_and_a_units_health_are_for_operators_only(api: Api) -> None:
    yesterday, today = GRID.day_start(TODAY - timedelta(days=1)), GRID.day_start(TODAY)
    record = dict.fromkeys(HEALTH_COLUMNS, 0) | {
        "readings": 40,
        "delay_p50": 12,
        "fw": "2.4.1",
        "rsrp": -95.0,
        "sinr": 4.5,
        "ce": 1,
    }
    with open_url(api.store_url) as store:
        store.keep_health(yesterday, ["unit", *HEALTH_COLUMNS], [("U1", *record.values())])
        store.keep_health(
            yesterday - 86400, ["unit", *HEALTH_COLUMNS], [("U3", *(record | {"fw": "2.5.0", "rsrp": -105.0}).values())]
        )
        reasons = [Reason("reboots", 2.5, "7 reboots that day against 0.02 a day")]
        store.keep_risk(yesterday, 3, [("U1", 2.5, reasons_json(reasons))], [], int(NOW) - 3600)
        store.keep_risk(today, 3, [], [("fleet", "disconnects", 3, 3, "1 more disconnects than usual")], int(NOW))
        Operators(store).add("hana", "hana-password-1", int(NOW))
        cookie = Sessions(store).open("hana", int(NOW))
    status, _, body = api.get("/api/v1/fleet/health?days=3", cookie=cookie)
    fleet = json.loads(body)
    assert status == 200, body
    [u1] = fleet["at_risk"]
    assert (u1["unit_id"], u1["customer_id"], u1["risk"], u1["since"]) == (
        "U1",
        "C1",
        2.5,
        str(TODAY - timedelta(days=1)),
    )
    assert u1["reasons"] == [{"signal": "reboots", "severity": 2.5, "words": "7 reboots that day against 0.02 a day"}]
    assert fleet["by_reason"] == {"reboots": 1}
    assert [(e["date"], e["scope"], e["units"]) for e in fleet["events"]] == [(str(TODAY), "fleet", 3)]
    # U3's newest day is the day before yesterday: too old for the inventory of now
    assert fleet["inventory"]["firmware"] == {"2.4.1": 1} and fleet["inventory"]["signal"] == {"fair": 1}
    assert [(d["date"], d["at_risk"]) for d in fleet["days"]][-1] == (str(TODAY - timedelta(days=1)), 1)
    status, _, body = api.get("/api/v1/units/U1/health?days=3", cookie=cookie)
    unit = json.loads(body)
    assert (unit["at_risk"], unit["risk"], unit["customer_id"]) == (True, 2.5, "C1")
    assert [(d["date"], d["rsrp"], d["fw"]) for d in unit["days"]] == [(str(TODAY - timedelta(days=1)), -95.0, "2.4.1")]
    assert api.get("/api/v1/units/U9/health", cookie=cookie)[0] == 404
    assert [
        api.get(f"{path}?days=1", cookie=cookie)[0] for path in ("/api/v1/fleet/health", "/api/v1/units/U1/health")
    ] == [200, 200]
    for path in ("/api/v1/fleet/health", "/api/v1/units/U1/health", "/api/v1/units/U3/health"):
        status, said = api.json(path, api.tokens["C1"])  # a customer's token, even for its own unit
        assert (status, said) == (403, {"error": said["error"]}) and said["error"].startswith("operators only"), said


HOSTILE = [
    ("/api/v1/fleet/health?days=0", 400),
    ("/api/v1/units/U1/health?days=100000", 400),
    ("/api/v1/units/U1/slots", 400),  # no from
    ("/api/v1/units/U1/slots?from=2026-13-01", 400),
    ("/api/v1/units/U1/slots?from=2026-11-23&to=2026-11-22", 400),
    ("/api/v1/units/U1/slots?from=2026-10-01&to=2026-11-23", 400),  # 54 days
    ("/api/v1/units/U1/slots?from=2000-01-01&to=2000-01-02", 200),  # long before anything: all missing
    ("/api/v1/units/U1/slots?from=2999-12-31", 200),  # after now: nothing closed yet
    ("/api/v1/units/U1/slots?from=0001-01-01", 400),  # outside the days the API addresses
    ("/api/v1/units/U1/slots?from=9999-12-31", 400),
    ("/api/v1/units/" + "U" * 65 + "/slots?from=2026-11-23", 400),
    ("/api/v1/customers/C1/days/2026-02-30.csv", 400),
    ("/api/v1/customers/..%2FC2/days/2026-11-22.csv", 404),
    ("/api/v1/units/..%2F..%2Fetc/slots?from=2026-11-23", 404),
    ("/api/v2/units", 404),
]


def test_hostile_or_malformed_requests_get_a_reason_as_json(api: Api) -> None:
    for path, status in HOSTILE:
        got, body = api.json(path, api.tokens["C1"])
        assert got == status, (path, body)
        if status != 200:
            assert set(body) == {"error"} and body["error"], path


def test_a_months_emissions_are_the_sums_of_the_customers_files(api: Api) -> None:
    status, body = api.json("/api/v1/customers/C1/emissions?month=2026-11", api.tokens["C1"])
    assert status == 200, body
    files = [path_of(api.root, "C1", TODAY - timedelta(days=k)) for k in range(4)]
    rows = [r for f in files for r in csv.DictReader(io.StringIO(f.read_text()))]

    def total(column: str, unit: str | None = None) -> Decimal:
        return sum((Decimal(r[column]) for r in rows if r[column] and unit in (None, r["unit_id"])), Decimal(0))

    for column in ("import_kwh", "co2_location_kg", "co2_market_kg"):
        assert Decimal(body["total"][column]) == total(column), column
    assert [(u["unit_id"], Decimal(u["co2_market_kg"])) for u in body["units"]] == [
        ("U1", total("co2_market_kg", "U1")),
        ("U2", total("co2_market_kg", "U2")),
    ]
    assert body["market_factor"] == {"t_per_kwh": "0.000388", "published": "2025-12-20"} and body["fiscal_year"] == 2026
    assert body["total"]["missing_slots"] == sum(r["quality"] == "M" for r in rows) and body["notes"] == []


def test_emissions_are_refused_with_a_reason(api: Api) -> None:
    for path, token, status, says in (
        ("/api/v1/customers/C1/emissions?month=2026-11", "C2", 404, "no customer C1"),
        ("/api/v1/customers/C9/emissions?month=2026-11", "C2", 404, "no customer C9"),
        ("/api/v1/customers/C2/emissions?month=2026-11", "C2", 404, "customer C2 has no emissions"),
        ("/api/v1/customers/C1/emissions?month=2026-10", "C1", 404, "no emissions of C1 for 2026-10"),
        ("/api/v1/customers/C1/emissions?month=2026-13", "C1", 400, "month: String should match pattern"),
        ("/api/v1/customers/C1/emissions?month=../../x", "C1", 400, "month: String should match pattern"),
        ("/api/v1/customers/C1/emissions", "C1", 400, "month: Field required"),
        ("/api/v1/customers/C1/emissions?month=2026-11", None, 401, "an API token is needed"),
    ):
        got, body = api.json(path, api.tokens[token] if token else None)
        assert (got, body["error"][: len(says)]) == (status, says), path


def test_the_openapi_document_describes_every_endpoint(api: Api) -> None:
    status, doc = api.json("/api/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {
        "/api/v1/units",
        "/api/v1/units/{unit_id}/slots",
        "/api/v1/customers/{customer_id}/days/{day}.csv",
        "/api/v1/customers/{customer_id}/emissions",
        "/api/v1/fleet/health",
        "/api/v1/units/{unit_id}/health",
        "/api/v1/commands",
        "/api/v1/commands/{command_id}",
        "/api/v1/commands/{command_id}/cancel",
    }
    assert "403" in doc["paths"]["/api/v1/fleet/health"]["get"]["responses"]
    assert "requestBody" in doc["paths"]["/api/v1/commands"]["post"]


def test_every_endpoint_keeps_its_openapi_document_for_any_input(api: Api) -> None:
    # schemathesis draws requests from the document (hostile values within and outside it) and checks each
    # answer against it: no server error, documented status, content type and body schema
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{api.port}/api/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) == 10
    auth = {"Authorization": f"Bearer {api.tokens['C1']}"}
    with open_url(api.store_url) as store:  # the commands are an operator's: fuzzed with a session and its token
        Operators(store).add("fuzz", "fuzz-password-1", int(NOW))
        secret = Sessions(store).open("fuzz", int(NOW))
        session = Sessions(store).get(secret, int(NOW))
    assert session is not None
    operator = {"Cookie": f"{SESSION_COOKIE}={secret}", "X-CSRF-Token": session.csrf}
    # and half the time days near the data and the caller's own customer, where the answers have a body to check
    near = st.dates(TODAY - timedelta(days=50), TODAY + timedelta(days=2)).map(date.isoformat)
    for operation in operations:

        def pinned(drawn: tuple[Any, str, str, bool]) -> Any:
            case, first, last, pin = drawn
            if pin:
                for where, key, value in (
                    ("query", "from", first),
                    ("query", "to", last),
                    ("path_parameters", "day", first),
                    ("path_parameters", "customer_id", "C1"),
                    ("path_parameters", "unit_id", "U1"),
                    ("query", "month", first[:7]),
                ):
                    params = getattr(case, where)
                    if params and key in params:
                        params[key] = value
            return case

        @given(case=st.tuples(operation.as_strategy(), near, near, st.booleans()).map(pinned))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            # a schema cannot say "to not before from" or "at most 45 days": those refusals are HOSTILE's cases
            who = operator if case.path.startswith("/api/v1/commands") else auth
            case.call_and_validate(headers=who, excluded_checks=[schemathesis.checks.positive_data_acceptance])

        check()


def test_slots_looked_up_by_their_ends_are_the_slots_of_the_range(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the API reads a unit's slots by key, not by a range of time (which holds every unit's slots)
    monkeypatch.setattr("aggregator.store._LOOKUPS", 7)  # several statements: the chunks join in order
    ends = [e for day in range(4) for e in GRID.day_slots(TODAY - timedelta(days=day))][::-1]
    ends.sort()
    with open_url(world.store_url) as store:
        for unit in ("U1", "U2", "U3"):
            assert store.slots_at(unit, ends) == store.slots(unit, ends[0] - SLOT, ends[-1])
            assert len(store.slots_at(unit, ends[::3])) == len(
                [r for r in store.slots(unit, 0, 2**62) if r.slot in ends[::3]]
            )


def test_the_consoles_counts_of_qualities_agree_with_the_slots(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # what the customer page's map and the fleet's completeness count, on both backends, against the slots
    monkeypatch.setattr("aggregator.store._LOOKUPS", 50)  # several statements
    ends = sorted(e for day in range(4) for e in GRID.day_slots(TODAY - timedelta(days=day)))
    with open_url(world.store_url) as store:
        stored = {(u, r.slot): r.imp_q for u in ("U1", "U2", "U3") for r in store.slots(u, 0, 2**62)}
        assert sorted(store.qualities_at(["U1", "U2"], ends)) == sorted(
            (u, e, q) for (u, e), q in stored.items() if u != "U3" and e in ends
        )
        counts = Counter({(u, q): n for u, q, n in store.unit_quality_counts(ends[0] - SLOT, ends[-1])})
        assert counts == Counter((u, q) for (u, e), q in stored.items() if e in ends)
        assert {q for (_, q) in counts} == {"A", "E", "M"}  # every quality counted


def test_every_answer_carries_the_security_headers_and_an_oversized_request_head_is_refused(api: Api) -> None:
    for path, token in (("/api/v1/units", api.tokens["C1"]), ("/api/v1/units", None), ("/login", None)):
        status, headers, _ = api.get(path, token)
        assert status in (200, 401), path
        assert "frame-ancestors 'none'" in headers["content-security-policy"], path
        assert (headers["x-frame-options"], headers["x-content-type-options"]) == ("DENY", "nosniff"), path
        assert headers["referrer-policy"] == "no-referrer", path
    padded = urllib.request.Request(f"http://127.0.0.1:{api.port}/api/v1/units")
    padded.add_header("Authorization", f"Bearer {api.tokens['C1']}")
    padded.add_header("X-Padding", "p" * 15_000)  # under 16 KiB with the rest: served
    with urllib.request.urlopen(padded, timeout=10) as response:
        assert response.status == 200
    for size in (17_000, 100_000):
        head = f"GET /api/v1/units HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api.tokens['C1']}\r\n"
        answer = raw(api.port, f"{head}X-Padding: {'p' * size}\r\n\r\n".encode())
        status = int(answer.split(" ", 2)[1])
        assert status in (400, 431), (size, answer[:300])  # refused: by the guard (431), or by the parser (400)
        assert '"units"' not in answer
    answer = raw(api.port, f"GET /api/v1/units?{'q=1&' * 4500} HTTP/1.1\r\nHost: x\r\n\r\n".encode())  # one write
    assert answer.startswith("HTTP/1.1 431 ") and "a request head over 16 KiB is refused" in answer, answer[:300]


def raw(port: int, request: bytes) -> str:
    """Send bytes as they are and read the answer's head and its body (by its content-length)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        got = b""
        while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < _length(got):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return got.decode("latin-1")


def _length(answer: bytes) -> int:
    found = re.search(rb"content-length: (\d+)", answer.split(b"\r\n\r\n", 1)[0], re.I)
    return int(found.group(1)) if found else 0


def test_strangers_idling_or_dripping_cannot_keep_a_customer_out(api: Api) -> None:
    real_processes()  # waits on the wall clock (the shifted pass's faketime breaks sleeping)
    if api.store_url.startswith("postgresql"):
        pytest.skip("connections are limited before any store is asked: tested once, on SQLite")
    idle = [connect_from(f"127.0.0.{3 + k // 8}", api.port) for k in range(64)]  # 8 addresses, 8 each
    drip = [connect_from("127.0.0.20", api.port) for _ in range(4)]
    try:
        # beyond its 8, an address's next connection is closed at once
        extra = connect_from("127.0.0.3", api.port)
        assert extra.recv(100) == b""
        extra.close()
        # a customer is served meanwhile, from its own address
        customer = connect_from("127.0.0.2", api.port)
        token = api.tokens["C1"]
        customer.sendall(f"GET /api/v1/units HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        assert customer.recv(100).startswith(b"HTTP/1.1 200 ")
        customer.close()
        for s in drip:
            s.sendall(b"GET /api/v1/units HTTP/1.1\r\n")
        for _ in range(8):  # a header byte a second holds no connection past its head's deadline
            for s in drip:
                with contextlib.suppress(OSError):
                    s.sendall(b"X")
            time.sleep(1)
        for s in idle + drip:  # every one of them closed by the server: a read ends
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(100) == b""
    finally:
        for s in idle + drip:
            s.close()


def test_the_client_behind_trusted_proxies_is_the_rightmost_address_they_did_not_add() -> None:
    proxies = Proxies(["10.0.0.0/8", "::1"])
    assert proxies.client("203.0.113.9", "192.0.2.1") == "203.0.113.9"  # not a proxy: its header says nothing
    assert proxies.client("10.1.2.3", "192.0.2.1, 198.51.100.7") == "198.51.100.7"  # the left is the client's say
    assert proxies.client("::ffff:10.1.2.3", "198.51.100.7, 10.9.9.9") == "198.51.100.7"  # two proxies in a row
    assert proxies.client("::1", "[2001:db8::5]:4711") == "2001:db8::5"
    assert proxies.client("10.1.2.3", "198.51.100.7:5000") == "198.51.100.7"
    assert proxies.client("10.1.2.3", "") == "10.1.2.3"  # nothing forwarded: the proxy itself
    assert proxies.client("10.1.2.3", "198.51.100.7, <script>") == "10.1.2.3"  # not an address: no further
    assert not Proxies()


def test_forwarded_headers_are_believed_from_trusted_proxies_only(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_url(world.store_url)
    wrong = world.tokens["C2"][:-2] + "xx"

    def get(port: int, token: str | None, forwarded_for: str, path: str = "/api/v1/units") -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
        request.add_header("X-Forwarded-For", forwarded_for)
        request.add_header("X-Forwarded-Proto", "https")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers.get("set-cookie", "")
        except urllib.error.HTTPError as exc:
            return exc.code, ""

    try:
        for trusted in ([], ["127.0.0.0/8"]):
            bans = Bans(max_failures=3)
            ctx = WebContext(
                store, lambda: world.registry, GRID, world.root, bans, lambda: NOW, max_days=45, fail_delay_s=0.0
            )
            with serving(WebServer(lambda ctx=ctx: build_app(ctx), "127.0.0.1", 0, Proxies(trusted))) as port:
                for k in range(3):  # a guesser naming its victim, then other addresses, as the client
                    assert get(port, wrong, "192.0.2.66" if k == 0 else f"203.0.113.{k}")[0] == 401
                cookie = get(port, None, "198.51.100.7", "/login")[1]
                if not trusted:  # the guesser is banned, the addresses it named are not; no proxy said https
                    assert bans.banned("127.0.0.1") and not bans.banned("192.0.2.66")
                    assert "secure" not in cookie.lower()
                    # said once, in case it is the operator's own proxy, not yet named
                    said = [r for r in caplog.records if "is not in web.trusted_proxies" in r.getMessage()]
                    assert len(said) == 1 and said[0].getMessage().startswith("web: 127.0.0.1 sends"), said
                    continue
                # behind a trusted proxy each client is itself: three addresses with one failure each
                assert not bans.banned("127.0.0.1") and bans.active() == {}
                for _ in range(3):
                    get(port, wrong, "192.0.2.1, 203.0.113.50")  # the proxy's client is the rightmost address
                assert bans.banned("203.0.113.50") and not bans.banned("192.0.2.1") and not bans.banned("127.0.0.1")
                assert get(port, world.tokens["C1"], "198.51.100.7")[0] == 200  # another client of the proxy
                assert get(port, world.tokens["C1"], "203.0.113.50")[0] == 429
                assert "secure" in cookie.lower()  # the proxy said the client came over https
                # a customer's allow list is held against the proxy's client, not the proxy
                allowing = dict(world.registry.customers)
                allowing["C1"] = allowing["C1"].model_copy(update={"allow": ["198.51.100.0/24"]})
                changed = dataclasses.replace(world.registry, customers=allowing)
                ctx.registry = lambda changed=changed: changed
                assert get(port, world.tokens["C1"], "198.51.100.9")[0] == 200
                assert get(port, world.tokens["C1"], "192.0.2.1")[0] == 403
                assert bans.refused == {"the API": 1} and not bans.banned("192.0.2.1")
                ctx.registry = lambda: world.registry
                # the proxy carries all its clients' connections: no per-address cap for it
                held = [connect_from("127.0.0.1", port) for _ in range(12)]
                try:
                    assert get(port, world.tokens["C1"], "198.51.100.8")[0] == 200
                finally:
                    for s in held:
                        s.close()
    finally:
        store.close()

"""`smame tokens`, `smame operators` and `smame bans` on the command line, and the API inside a running `smame run`."""

from __future__ import annotations

import http.cookiejar
import json
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

from aggregator.backends import open_url
from smame.demo import free_port
from tests.helpers import (
    Mosquitto,
    at,
    connect_from,
    console_env,
    first_start,
    memory_mb,
    metrics_env,
    publish,
    scrape,
    smame,
    smame_env,
    start_smame,
    stop,
    telegram,
    wait_log,
    wait_readings,
    write_registry,
    yesterday,
)
from tests.smame.test_admin import PASSWORD, refused


def get(port: int, path: str, token: str) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_token_made_on_the_command_line_reads_the_running_smame_until_it_is_removed(
    broker: Mosquitto, workdir: Path
) -> None:
    write_registry(workdir, {"U1": "C1", "U2": "C2"})
    port = free_port()
    env = smame_env(workdir, broker.port, SMAME_WEB__ENABLED="true", SMAME_WEB__PORT=str(port))
    first_start(workdir)
    refused(["tokens", "add", "C9"], env)  # not a customer
    made = smame(["tokens", "add", "C1", "--name", "billing server"], env)
    token = made.stdout.strip()
    assert made.stdout.count("\n") == 1 and token.startswith("smame_")  # alone, for TOKEN=$(smame tokens add C1)
    token_id = token.split("_")[1]
    listed = smame(["tokens", "list"], env).stdout
    assert token_id in listed and "billing server" in listed and token.split("_", 2)[2] not in listed
    proc = start_smame(env, workdir / "smame.log")
    try:
        wait_log(workdir / "smame.log", "web server listening")
        when = at("2026-11-22", "10:00")
        publish(broker.port, [("smame/v1/U1/reading", telegram("U1", [(when, 1234)]))])
        wait_readings(workdir / "data" / "smame.db", 1)
        status, body = get(port, "/api/v1/units", token)
        assert status == 200
        assert body["units"] == [
            {
                "unit_id": "U1",
                "customer_id": "C1",
                "meter_id": None,
                "label": None,
                "last_reading_at": when.isoformat(),
            }
        ]
        assert get(port, "/api/v1/units/U2/slots?from=2026-11-22", token)[0] == 404  # C2's
        smame(["tokens", "remove", token_id], env)
        started = time.monotonic()
        assert get(port, "/api/v1/units", token) == (401, {"error": "this API token is not valid"})
        assert time.monotonic() - started >= 2.5  # slowed down (ftp.fail_delay_s, 3 s)
        assert stop(proc) == 0
    finally:
        stop(proc)
    assert "Traceback" not in (workdir / "smame.log").read_text()
    refused(["tokens", "remove", token_id], env)


def test_operators_are_added_listed_given_new_passwords_and_removed(workdir: Path) -> None:
    write_registry(workdir, {"U1": "C1"})
    env = smame_env(workdir, 1883)
    first_start(workdir)
    smame(["operators", "add", "alice", "--password-stdin"], env, stdin=PASSWORD)
    assert "alice" in refused(["operators", "add", "alice", "--password-stdin"], env, stdin=PASSWORD)
    assert "12 characters" in refused(["operators", "add", "bob", "--password-stdin"], env, stdin="short\n")
    assert "must be" in refused(["operators", "add", "bad name", "--password-stdin"], env, stdin=PASSWORD)
    listed = smame(["operators", "list"], dict(env, TZ="UTC")).stdout.split()  # the machine's zone is not smame's
    assert listed[:2] == ["alice", "operator"] and listed[-1].endswith("+09:00"), listed  # Asia/Tokyo, as always
    smame(["operators", "passwd", "alice", "--password-stdin"], env, stdin="another-long-one\n")
    smame(["operators", "remove", "alice"], env)
    assert smame(["operators", "list"], env).stdout == ""
    assert "no operator alice" in refused(["operators", "remove", "alice"], env)


def console_login(port: int, name: str, password: str) -> str:
    """Log in to the console as a browser would (the login form's CSRF token); return the session cookie."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(f"http://127.0.0.1:{port}/login", timeout=10).read().decode()
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf, page
    form = urllib.parse.urlencode({"csrf": csrf.group(1), "name": name, "password": password}).encode()
    opener.open(f"http://127.0.0.1:{port}/login", form, timeout=10).read()
    [session] = [c.value for c in jar if c.name == "smame_session"]
    return f"smame_session={session}"


def page_of(port: int, cookie: str) -> str:
    """The URL the fleet page ends at with this cookie: itself while the session lives, else the login page."""
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Cookie": cookie})) as r:
        return str(r.url)


def test_an_operators_sessions_end_when_the_password_changes_or_the_operator_goes(
    broker: Mosquitto, workdir: Path
) -> None:
    write_registry(workdir, {"U1": "C1"})
    env, port = console_env(workdir, broker.port, PASSWORD)
    proc = start_smame(env, workdir / "smame.log")
    try:
        wait_log(workdir / "smame.log", "web server listening")
        cookie = console_login(port, "alice", PASSWORD.strip())
        assert page_of(port, cookie).endswith("/")
        smame(["operators", "passwd", "alice", "--password-stdin"], env, stdin="another-long-one\n")
        assert page_of(port, cookie).endswith("/login")  # the old password's session is over
        cookie = console_login(port, "alice", "another-long-one")
        assert page_of(port, cookie).endswith("/")
        smame(["operators", "remove", "alice"], env)
        smame(["operators", "add", "alice", "--password-stdin"], env, stdin=PASSWORD)
        assert page_of(port, cookie).endswith("/login")  # a new alice does not inherit the old one's sessions
    finally:
        assert stop(proc) == 0


def test_unread_downloads_of_a_large_file_hold_no_copy_of_it(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"U1": "C1"})
    port = free_port()
    env = smame_env(workdir, broker.port, SMAME_WEB__ENABLED="true", SMAME_WEB__PORT=str(port))
    first_start(workdir)
    token = smame(["tokens", "add", "C1"], env).stdout.strip()
    day = yesterday()
    big = workdir / "data" / "export" / "C1" / f"C1_{day:%Y%m%d}.csv"
    big.parent.mkdir(parents=True, exist_ok=True)
    big.write_bytes(b"unit_id,meter_id,date\n" + b"U1,SM-1,2026-01-01,1,00:00,00:30,0.5,0.0,A\n" * 500_000)  # 22 MB
    proc = start_smame(env, workdir / "smame.log")
    sockets = []
    try:
        wait_log(workdir / "smame.log", "web server listening")
        before = memory_mb(proc.pid)[0]
        request = (
            f"GET /api/v1/customers/C1/days/{day}.csv HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
        for _ in range(30):  # clients that ask for the file and read none of it
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(request)
            sockets.append(s)
        time.sleep(3)
        grown = memory_mb(proc.pid)[0] - before
        assert grown < 100, f"{grown:.0f} MB for 30 unread downloads of a {big.stat().st_size / 2**20:.0f} MB file"
        for s in sockets:
            s.close()
        with urllib.request.urlopen(  # and a client that reads gets the file whole
            urllib.request.Request(
                f"http://127.0.0.1:{port}/api/v1/customers/C1/days/{day}.csv",
                headers={"Authorization": f"Bearer {token}"},
            ),
            timeout=30,
        ) as response:
            assert response.read() == big.read_bytes()
    finally:
        for s in sockets:
            s.close()
        assert stop(proc) == 0


def call_from(source: str, port: int, token: str) -> int:
    """The status of an API call from `source` (another loopback address: a customer or stranger of its own)."""
    s = connect_from(source, port)
    try:
        s.sendall(f"GET /api/v1/units HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        return int(s.recv(100).split(b" ")[1])
    finally:
        s.close()


def test_an_operator_lists_and_lifts_bans_on_the_command_line_and_in_the_console(
    broker: Mosquitto, workdir: Path
) -> None:
    write_registry(workdir, {"U1": "C1"})
    env, port = console_env(workdir, broker.port, PASSWORD, SMAME_FTP__BAN_AFTER="2", SMAME_FTP__FAIL_DELAY_S="0")
    token = smame(["tokens", "add", "C1"], env).stdout.strip()
    assert smame(["bans", "list"], env).stdout == ""
    proc = start_smame(env, workdir / "smame.log")
    try:
        wait_log(workdir / "smame.log", "web server listening")
        for _ in range(2):  # the customer's server with a mistyped token
            assert call_from("127.0.0.5", port, token[:-1] + "x") == 401
        assert call_from("127.0.0.5", port, token) == 429
        deadline = time.monotonic() + 10  # shared through the store within a few seconds
        while "127.0.0.5" not in (listed := smame(["bans", "list"], dict(env, TZ="UTC")).stdout):
            assert time.monotonic() < deadline, listed
            time.sleep(0.5)
        assert "the API" in listed and "+09:00" in listed, listed  # where it was earned, in smame's zone
        cookie = console_login(port, "alice", PASSWORD.strip())
        page = urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{port}/alerts", headers={"Cookie": cookie}), timeout=10
        ).read()
        assert b"127.0.0.5" in page and b'action="/bans/lift"' in page
        assert "lifted the ban of 127.0.0.5" in smame(["bans", "remove", "127.0.0.5"], env).stdout
        deadline = time.monotonic() + 10  # the running node learns of it at its next look at the store
        while call_from("127.0.0.5", port, token) != 200:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert "127.0.0.5 is not banned" in refused(["bans", "remove", "127.0.0.5"], env)
        for _ in range(2):  # banned again, and lifted in the console: at once on this node
            call_from("127.0.0.5", port, token[:-1] + "x")
        assert call_from("127.0.0.5", port, token) == 429
        while "127.0.0.5" not in smame(["bans", "list"], env).stdout:
            time.sleep(0.5)
        csrf = re.search(rb'name="csrf" value="([^"]+)"', page)
        assert csrf
        form = urllib.parse.urlencode({"csrf": csrf.group(1).decode(), "address": "127.0.0.5"}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/bans/lift", form, headers={"Cookie": cookie})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.url.endswith("/alerts")
        assert call_from("127.0.0.5", port, token) == 200
        assert smame(["bans", "list"], env).stdout == ""
    finally:
        assert stop(proc) == 0
    assert "Traceback" not in (workdir / "smame.log").read_text()


def test_a_customer_with_an_allow_list_is_served_only_at_its_addresses_and_a_refusal_bans_nobody(
    broker: Mosquitto, workdir: Path
) -> None:
    _, customers = write_registry(workdir, {"U1": "C1", "U2": "C2"})
    # C1's machines are at 127.0.0.3 and in 127.0.0.8/29; C2 has no list
    allow = 'allow = ["127.0.0.3", "127.0.0.8/29"]\n'
    customers.write_text(customers.read_text().replace('name = "Customer C1"\n', 'name = "Customer C1"\n' + allow))
    metrics = free_port()
    env, port = console_env(
        workdir,
        broker.port,
        PASSWORD,
        SMAME_FTP__BAN_AFTER="2",
        SMAME_FTP__FAIL_DELAY_S="0",
        **metrics_env(metrics),
    )
    c1, c2 = (smame(["tokens", "add", c], env).stdout.strip() for c in ("C1", "C2"))
    proc = start_smame(env, workdir / "smame.log")
    try:
        wait_log(workdir / "smame.log", "web server listening")
        assert call_from("127.0.0.3", port, c1) == 200
        assert call_from("127.0.0.13", port, c1) == 200  # in 127.0.0.8/29
        for _ in range(4):  # more than ban_after: refused each time, never banned
            assert call_from("127.0.0.6", port, c1) == 403
        assert call_from("127.0.0.6", port, c2) == 200  # the address is not banned: C2 allows anyone
        assert call_from("127.0.0.6", port, c1[:-1] + "x") == 401  # a wrong token there still counts as one
        log = (workdir / "smame.log").read_text()
        assert f"the API: refused token {c1.split('_')[1]} from 127.0.0.6: not an address its customer allows" in log
        assert scrape(metrics)['smame_refused_addresses_total{door="the API"}'] == 4
        assert smame(["bans", "list"], env).stdout == ""
    finally:
        assert stop(proc) == 0


def test_a_token_is_made_with_an_expiry_and_a_scope_listed_so_and_its_changes_audited(workdir: Path) -> None:
    write_registry(workdir, {"U1": "C1"})
    env = dict(smame_env(workdir, 1883), TZ="UTC")
    first_start(workdir)
    made = smame(["tokens", "add", "C1", "--expires", "90d", "--scope", "units,files", "--name", "billing"], env)
    token_id = made.stdout.strip().split("_")[1]
    assert "until" in made.stderr and "+09:00" in made.stderr
    [listed] = smame(["tokens", "list"], env).stdout.splitlines()
    assert listed.split()[:4] == [token_id, "C1", listed.split()[2], "units,files"] and "until" in listed, listed
    for args, words in (
        (["--expires", "0d"], "give days or hours"),
        (["--expires", "soon"], "give days or hours"),
        (["--scope", "units,slots"], "give some of units, files, emissions"),
    ):
        wrong = smame(["tokens", "add", "C1", *args], env, check=False)
        assert wrong.returncode == 2 and words in wrong.stderr and "Traceback" not in wrong.stderr, wrong.stderr
    smame(["tokens", "remove", token_id], env)
    with open_url(f"sqlite:///{workdir / 'data' / 'smame.db'}") as store:
        entries = [(a, t, d) for _, _, w, _, a, t, d in reversed(store.audit(10, None, "")) if w.startswith("cli:")]
    assert [(a, t) for a, t, _ in entries] == [("token added", token_id), ("token removed", token_id)]
    detail = entries[0][2].split("; until ")
    assert detail[0] == "customer C1; reads units files"
    assert abs(datetime.fromisoformat(detail[1]).timestamp() - (time.time() + 90 * 86400)) < 120

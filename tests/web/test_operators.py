"""Operators' roles and second factors: the command line enrols and resets, the console enrols and logs in with
a code (chromium), and each role is refused what it may not do, on the console and the API."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pyotp
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as expected

from aggregator.backends import open_url
from aggregator.sqlite import check_copy
from aggregator.store import OPERATOR_EXTRA, TOKEN_EXTRA
from tests.helpers import (
    Mosquitto,
    console_env,
    first_start,
    smame,
    smame_env,
    start_smame,
    stop,
    wait_log,
    write_registry,
)
from tests.web.test_console import wait
from tests.web.test_tokens import console_login
from web.access import SCOPES, Operators, Tokens

PASSWORD = "correct-horse-battery"


def audit_actions(workdir: Path) -> list[tuple[str, str, str]]:
    """(who, action, on) of every audit entry, oldest first."""
    with open_url(f"sqlite:///{workdir / 'data' / 'smame.db'}") as store:
        return [(w, a, t) for _, _, w, _, a, t, _ in reversed(store.audit(1000, None, ""))]


def test_the_command_line_gives_roles_enrols_an_authenticator_and_resets_it(workdir: Path) -> None:
    write_registry(workdir, {"U1": "C1"})
    env = smame_env(workdir, 1883)
    first_start(workdir)
    smame(["operators", "add", "vera", "--role", "viewer", "--password-stdin"], env, stdin=PASSWORD + "\n")
    listed = smame(["operators", "list"], env).stdout.split()
    assert listed[:4] == ["vera", "viewer", "password", "only"], listed
    # enrolment: the key is printed (no terminal here: no QR code), a code of it is read, recovery codes follow
    with smame_popen(["operators", "2fa", "vera"], env) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        key = re.search(r"authenticator key for vera: ([A-Z2-7]{32})", proc.stdout.readline())
        assert key, "no key printed"
        proc.stdin.write(pyotp.TOTP(key.group(1)).now() + "\n")
        proc.stdin.close()
        out = proc.stdout.read()
        assert proc.wait(timeout=30) == 0, out
    codes = re.findall(r"^  ([0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4})$", out, re.M)
    assert len(set(codes)) == 10, out
    assert "2fa (10 recovery codes left)" in smame(["operators", "list"], env).stdout
    refused = smame(["operators", "2fa", "vera"], env, check=False)
    assert refused.returncode != 0 and "--reset it first" in refused.stderr and "Traceback" not in refused.stderr
    smame(["operators", "role", "vera", "operator"], env)
    smame(["operators", "2fa", "vera", "--reset"], env)
    assert smame(["operators", "list"], env).stdout.split()[:4] == ["vera", "operator", "password", "only"]
    wrong = smame(["operators", "role", "vera", "root"], env, check=False)
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr
    actions = [(a, t) for w, a, t in audit_actions(workdir) if w.startswith("cli:")]
    assert actions == [
        ("operator added", "vera"),
        ("second factor enrolled", "vera"),
        ("operator's role changed", "vera"),
        ("second factor reset", "vera"),
    ]


def smame_popen(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """A smame command running, its standard input and output pipes to talk with it."""
    return subprocess.Popen(
        [sys.executable, "-m", "smame.cli", *args], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def test_an_operator_enrols_an_authenticator_in_the_console_and_logs_in_with_its_codes(
    broker: Mosquitto, workdir: Path, browser: webdriver.Chrome
) -> None:
    write_registry(workdir, {"U1": "C1"})
    # (five failures below count toward the address's ban, as many as ban it by default: none bans here)
    no_ban = {"SMAME_FTP__FAIL_DELAY_S": "0", "SMAME_FTP__BAN_AFTER": "7"}
    env, port = console_env(workdir, broker.port, PASSWORD, SMAME_WEB__REQUIRE_2FA="true", **no_ban)
    proc = start_smame(env, workdir / "smame.log")
    site = f"http://127.0.0.1:{port}"
    try:
        wait_log(workdir / "smame.log", "web server listening")

        def said(words: str) -> None:
            """Wait for the page the click led to, which says `words` in its alert (the page left may have one)."""
            wait(browser).until(lambda b: words in b.find_element(By.CSS_SELECTOR, "p[role=alert]").text)

        def log_in(code: str) -> None:
            browser.get(site + "/login")
            browser.find_element(By.NAME, "name").send_keys("alice")
            browser.find_element(By.NAME, "password").send_keys(PASSWORD)
            browser.find_element(By.NAME, "code").send_keys(code)
            browser.find_element(By.CSS_SELECTOR, "form.login button").click()

        # every operator needs a second factor here: alice, who has none, is sent to enrol one, and nothing else
        log_in("")
        wait(browser).until(expected.url_to_be(site + "/account"))
        assert "needs a second factor" in browser.find_element(By.ID, "required").text
        browser.get(site + "/commands")
        assert browser.current_url == site + "/account"
        secret = browser.find_element(By.ID, "secret").text
        assert browser.find_element(By.CSS_SELECTOR, "#qr svg")  # the QR code an authenticator app scans
        totp = pyotp.TOTP(secret)
        # the password again first (a session left open must not be able to lock its operator out)
        browser.find_element(By.NAME, "password").send_keys("not-the-password")
        browser.find_element(By.NAME, "code").send_keys(totp.now())
        browser.find_element(By.CSS_SELECTOR, "form.login button").click()
        said("Wrong password.")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.NAME, "code").send_keys("000000" if totp.now() != "000000" else "111111")
        browser.find_element(By.CSS_SELECTOR, "form.login button").click()
        said("the code is not the authenticator's")
        secret = browser.find_element(By.ID, "secret").text  # (a new key each time the page is shown)
        totp = pyotp.TOTP(secret)
        now = time.time()
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.NAME, "code").send_keys(totp.at(now))
        browser.find_element(By.CSS_SELECTOR, "form.login button").click()
        codes = [li.text for li in wait(browser).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#recovery li"))]
        assert len(codes) == 10
        browser.get(site + "/")
        assert browser.current_url == site + "/"  # enrolled: the console is open
        browser.find_element(By.CSS_SELECTOR, "form.logout button").click()
        wait(browser).until(expected.url_to_be(site + "/login"))

        # without a code, with a wrong one, or with the one used already: refused, the same words each time
        for code in ("", "123456" if totp.at(now) != "123456" else "654321", totp.at(now)):
            log_in(code)
            said("Wrong name, password or code.")
        log_in(codes[0])  # a recovery code, good once
        wait(browser).until(expected.url_to_be(site + "/"))
        browser.find_element(By.CSS_SELECTOR, "form.logout button").click()
        wait(browser).until(expected.url_to_be(site + "/login"))
        log_in(codes[0])
        said("Wrong name, password or code.")
        log_in(totp.at(now + 30))  # the next step's code (a step ahead of the server's clock is taken)
        wait(browser).until(expected.url_to_be(site + "/"))
        browser.get(site + "/account")
        assert "9 recovery codes left" in browser.find_element(By.ID, "enrolled").text
        browser.get(site + "/audit?about=alice")
        entries = browser.find_element(By.ID, "entries").text
        for words in ("login failed", "second factor enrolled", "password and recovery", "password and totp"):
            assert words in entries, words
    finally:
        assert stop(proc) == 0
    failed = [t for w, a, t in audit_actions(workdir) if a == "login failed"]
    assert failed == ["alice"] * 4  # (the wrong password at the enrolment is counted toward a ban, not here)


def test_each_role_is_refused_what_it_may_not_do_on_the_console_and_the_api(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"U1": "C1"})
    env, port = console_env(workdir, broker.port, PASSWORD)
    for name, role in (("vera", "viewer"), ("otto", "operator")):
        smame(["operators", "add", name, "--role", role, "--password-stdin"], env, stdin=PASSWORD + "\n")
    proc = start_smame(env, workdir / "smame.log")
    site = f"http://127.0.0.1:{port}"
    try:
        wait_log(workdir / "smame.log", "web server listening")

        def call(cookie: str, method: str, path: str, body: bytes | None, **headers: str) -> tuple[int, str]:
            request = urllib.request.Request(site + path, body, {"Cookie": cookie, **headers}, method=method)
            opener = urllib.request.build_opener(NoRedirect)
            try:
                with opener.open(request, timeout=10) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        def csrf_of(cookie: str) -> str:
            found = re.search(r'name="csrf" value="([^"]+)"', call(cookie, "GET", "/commands", None)[1])
            assert found
            return found.group(1)

        def console(cookie: str, path: str, **fields: str) -> tuple[int, str]:
            body = urllib.parse.urlencode({"csrf": csrf_of(cookie), **fields}).encode()
            return call(cookie, "POST", path, body, **{"Content-Type": "application/x-www-form-urlencoded"})

        def api_command(cookie: str) -> tuple[int, str]:
            body = json.dumps({"op": "ping", "units": ["U1"]}).encode()
            return call(cookie, "POST", "/api/v1/commands", body, **{"X-CSRF-Token": csrf_of(cookie)})

        campaign = {"version": "9.9", "target_kind": "units", "target": "U1", "waves": "1", "timeout": "3600"}
        vera, otto, alice = (console_login(port, n, PASSWORD) for n in ("vera", "otto", "alice"))
        # a viewer reads every page and the fleet's API, and changes nothing
        assert call(vera, "GET", "/", None)[0] == 200 and call(vera, "GET", "/audit", None)[0] == 200
        assert call(vera, "GET", "/api/v1/fleet/health", None)[0] == 200
        status, text = console(vera, "/commands", op="ping", units="U1")
        assert (status, text) == (403, "refused: this needs the role operator, and vera's role is viewer")
        assert console(vera, "/alerts/silence", name="silent_units", hours="1")[0] == 403
        assert console(vera, "/bans/lift", address="192.0.2.1")[0] == 403
        status, text = api_command(vera)
        assert status == 403 and "needs the role operator" in text
        # an operator commands units, and is refused campaigns and the units' configuration
        assert console(otto, "/commands", op="ping", units="U1")[0] == 303
        assert api_command(otto)[0] in (200, 201, 202)
        for path, fields in (
            ("/campaigns", campaign),
            ("/configuration", {"scope": "fleet", "args": "interval_min=5"}),
        ):
            status, text = console(otto, path, **fields)
            assert (status, text) == (403, "refused: this needs the role admin, and otto's role is operator"), path
        # an admin passes the role check (and is told what is wrong with the campaign itself)
        assert console(alice, "/campaigns", **campaign)[0] != 403
        # the audit log as CSV, for a viewer too, filtered as the page is; the export itself is audited
        status, text = call(vera, "GET", "/audit.csv?about=console%3Aotto", None)
        rows = list(csv.reader(io.StringIO(text)))
        assert status == 200 and rows[0] == ["id", "at", "who", "from", "action", "on", "detail"]
        assert {r[2] for r in rows[1:]} == {"console:otto"} and {"login", "command ping"} <= {r[4] for r in rows}
        assert ("console:vera", "audit exported", "console:otto") in audit_actions(workdir)
        smame(["operators", "role", "otto", "viewer"], env)  # a role changed holds at the session's next request
        assert console(otto, "/commands", op="ping", units="U1")[0] == 403
    finally:
        assert stop(proc) == 0
    who = {w for w, a, _ in audit_actions(workdir) if a.startswith("command")}
    assert "console:vera" not in who and "console:otto" in who


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


def test_operators_and_tokens_from_before_keep_every_power_they_had_once_the_store_is_migrated(store_url: str) -> None:
    with open_url(store_url) as store:
        with store.transaction():
            store.execute("INSERT INTO operators (name, hash, created) VALUES ('olde', 'x', 1)")
            store.execute("INSERT INTO api_tokens (id, customer, name, hash, created) VALUES ('t1', 'C1', '', 'h', 1)")
        for table, extra in (("operators", OPERATOR_EXTRA), ("api_tokens", TOKEN_EXTRA)):  # what schema 4 left
            for column, _ in extra:
                store.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        store.execute("UPDATE meta SET value = '4' WHERE key = 'schema'")
    with open_url(store_url) as store:
        assert store.get_meta("schema") == str(type(store).schema_version)
        [olde] = Operators(store).list()
        assert (olde.name, olde.role, olde.two_factor, olde.recovery_left) == ("olde", "admin", False, 0)
        [t1] = Tokens(store).list()
        assert (t1.id, t1.expires, t1.scope) == ("t1", None, SCOPES)
    if store_url.startswith("sqlite"):
        check_copy(Path(store_url.removeprefix("sqlite:///")))  # migrated, it is smame's schema to the letter

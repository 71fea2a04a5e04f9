"""Commands from the console and the operator API, and the audit log's page, in a real browser against a running
smame whose leader sends them over a real Mosquitto to the simulator's units."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as expected
from selenium.webdriver.support.ui import Select

from simulators.devices import DeviceFleet, UnitDevice
from simulators.publisher import Endpoint
from tests.helpers import Mosquitto, console_env, smame, start_smame, stop, wait_log, write_registry
from tests.web.test_console import PASSWORD, get, login, post, shot, wait


@contextmanager
def answering(port: int, devices: list[UnitDevice]) -> Iterator[None]:
    """The simulator's units connected to the broker and answering commands, on a thread of their own."""
    loop = asyncio.new_event_loop()
    fleet = DeviceFleet(Endpoint((("127.0.0.1", port),)), devices, time.time)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(fleet.start(), loop).result(15)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(fleet.close(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def api(
    url: str, cookie: str = "", body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """An API call: (status, its JSON)."""
    request = urllib.request.Request(url, body, headers={"Cookie": cookie, **(headers or {})})
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def rows(browser: webdriver.Chrome, css: str) -> list[str]:
    return [r.text for r in browser.find_elements(By.CSS_SELECTOR, css)]


def test_an_operator_commands_units_from_the_console_and_the_api_and_finds_it_in_the_audit_log(
    broker: Mosquitto, workdir: Path, browser: webdriver.Chrome
) -> None:
    write_registry(workdir, {"U1": "C1", "U2": "C1", "U3": "C2"})
    env, port = console_env(
        workdir, broker.port, PASSWORD, SMAME_DEVICES__RETRY_S="1", SMAME_DEVICES__CONFIG_EVERY_S="1"
    )
    token = smame(["tokens", "add", "C1"], env).stdout.strip().split()[-1]
    proc = start_smame(env, workdir / "smame.log")
    units = [UnitDevice("U1"), UnitDevice("U2")]  # U3 never connects: its commands wait in the queue
    try:
        wait_log(workdir / "smame.log", "web server listening")
        site = f"http://127.0.0.1:{port}"
        with answering(broker.port, units):
            login(browser, site)
            browser.get(site + "/units/U1")
            assert browser.find_element(By.ID, "unit-commands").text == "None sent to this unit."
            Select(browser.find_element(By.CSS_SELECTOR, "#send select[name=op]")).select_by_value("set")
            browser.find_element(By.CSS_SELECTOR, "#send input[name=args]").send_keys("interval_min=15 diag_every=2")
            browser.find_element(By.CSS_SELECTOR, "#send button").click()
            wait(browser).until(expected.url_to_be(site + "/commands?unit=U1"))

            def u1_done(b: webdriver.Chrome) -> list[str] | None:
                b.refresh()
                got = rows(b, "#commands tbody tr")
                return got if got and " done " in got[0] else None

            done = wait(browser).until(u1_done)
            assert len(done) == 1 and "set" in done[0] and "console:alice (127.0.0.1)" in done[0], done
            assert '"interval_min":15' in done[0]  # the unit's answer: its configuration now
            assert units[0].config["interval_min"] == 15 and units[0].config["diag_every"] == 2
            shot(browser, "commands")

            # a wrong argument is refused with its reason, the form kept as it was filled
            browser.get(site + "/commands")
            Select(browser.find_element(By.CSS_SELECTOR, "#send select[name=op]")).select_by_value("set")
            browser.find_element(By.CSS_SELECTOR, "#send input[name=args]").send_keys("interval_min=7")
            browser.find_element(By.CSS_SELECTOR, "#send input[name=units]").send_keys("U1 U2")
            browser.find_element(By.CSS_SELECTOR, "#send button").click()
            error = wait(browser).until(expected.presence_of_element_located((By.ID, "error")))
            assert error.text.startswith("interval_min 7: one of 1, 5, 10, 15, 30, 60"), error.text
            assert browser.find_element(By.CSS_SELECTOR, "#send input[name=units]").get_attribute("value") == "U1 U2"

            # a reboot for a customer whose unit never connected: queued, then withdrawn
            browser.find_element(By.CSS_SELECTOR, "#send input[name=args]").clear()
            browser.find_element(By.CSS_SELECTOR, "#send input[name=units]").clear()
            Select(browser.find_element(By.CSS_SELECTOR, "#send select[name=op]")).select_by_value("reboot")
            browser.find_element(By.CSS_SELECTOR, "#send input[name=customer]").send_keys("C2")
            browser.find_element(By.CSS_SELECTOR, "#send button").click()
            wait(browser).until(expected.url_to_be(site + "/commands?unit=U3"))
            assert "reboot" in rows(browser, "#commands tbody tr")[0]
            assert " queued " in rows(browser, "#commands tbody tr")[0]
            browser.find_element(By.CSS_SELECTOR, "#commands tbody tr form button").click()
            wait(browser).until(expected.url_to_be(site + "/commands"))
            reboot = [r for r in rows(browser, "#commands tbody tr") if "U3" in r]
            assert len(reboot) == 1 and " cancelled " in reboot[0] and "cancelled by console:alice" in reboot[0]

            # the operator API: an operator's session with its CSRF token queues; a customer's token cannot
            cookie = f"smame_session={browser.get_cookie('smame_session')['value']}"  # type: ignore[index]
            csrf = browser.find_element(By.CSS_SELECTOR, "#send input[name=csrf]").get_attribute("value") or ""
            ping = json.dumps({"op": "ping", "units": ["U2"]}).encode()
            assert api(site + "/api/v1/commands", cookie, ping)[0] == 403  # no CSRF header
            bearer = {"Authorization": f"Bearer {token}", "X-CSRF-Token": csrf}
            assert api(site + "/api/v1/commands", "", ping, bearer)[0] == 403
            assert api(site + "/api/v1/commands", headers={"Authorization": f"Bearer {token}"})[0] == 403
            status, queued = api(site + "/api/v1/commands", cookie, ping, {"X-CSRF-Token": csrf})
            assert status == 201 and [c["unit_id"] for c in queued["commands"]] == ["U2"], queued
            command_id = queued["commands"][0]["command_id"]
            deadline = time.monotonic() + 15
            while (got := api(f"{site}/api/v1/commands/{command_id}", cookie))[1]["state"] != "done":
                assert time.monotonic() < deadline, got
                time.sleep(0.1)
            assert got[1]["asked_by"] == "console:alice" and got[1]["answer"]["interval_min"] == 30
            assert api(f"{site}/api/v1/commands/{command_id}/cancel", cookie, b"", {"X-CSRF-Token": csrf})[0] == 409
            listed = api(site + "/api/v1/commands?unit=U2&state=done", cookie)[1]["commands"]
            assert [c["command_id"] for c in listed] == [command_id]
            for body, words in [
                (b"{not json", "JSON"),
                (json.dumps({"op": "format", "units": ["U1"]}).encode(), "op"),
                (json.dumps({"op": "ping", "units": ["U9"]}).encode(), "unit 'U9' is not in the registry"),
                (json.dumps({"op": "ping", "units": ["U1"], "customer": "C1"}).encode(), "not both"),
                (json.dumps({"op": "set", "args": {"colour": 1}, "units": ["U1"]}).encode(), "colour"),
                (json.dumps({"op": "ping", "units": ["U1"], "expires_s": 1}).encode(), "expires_s"),
            ]:
                status, said = api(site + "/api/v1/commands", cookie, body, {"X-CSRF-Token": csrf})
                assert status == 400 and words in said["error"], (body, said)
            huge = json.dumps({"op": "ping", "units": ["U1"] * 200_000}).encode()
            assert api(site + "/api/v1/commands", cookie, huge, {"X-CSRF-Token": csrf})[0] == 413
            assert api(site + "/api/v1/commands?state=%3Cb%3E", cookie)[0] == 400
            assert api(site + "/api/v1/commands/nope", cookie)[0] == 404
            assert "/api/v1/commands" in api(site + "/api/openapi.json")[1]["paths"]

            # the configuration wanted of a customer reaches its units; the page shows who is out of step
            browser.get(site + "/configuration")
            assert browser.find_element(By.ID, "out-of-step-count").text == "0 units out of step"
            Select(browser.find_element(By.CSS_SELECTOR, "#change select[name=scope]")).select_by_value("group")
            browser.find_element(By.CSS_SELECTOR, "#change input[name=target]").send_keys("attic")
            browser.find_element(By.CSS_SELECTOR, "#change input[name=args]").send_keys("interval_min=5")
            browser.find_element(By.CSS_SELECTOR, "#change button[value=set]").click()
            error = wait(browser).until(expected.presence_of_element_located((By.ID, "error")))
            assert error.text == "group 'attic' is no unit's group in the registry"
            Select(browser.find_element(By.CSS_SELECTOR, "#change select[name=scope]")).select_by_value("customer")
            target = browser.find_element(By.CSS_SELECTOR, "#change input[name=target]")
            target.clear()
            target.send_keys("C1")
            browser.find_element(By.CSS_SELECTOR, "#change button[value=set]").click()
            # the same address before and after the post: wait for the page that lists it
            desired = wait(browser).until(lambda b: [r for r in rows(b, "#desired tbody tr") if "console" in r])
            assert len(desired) == 1 and desired[0].startswith('customer C1 {"interval_min":5} console:alice'), desired

            def in_step(b: webdriver.Chrome) -> bool:
                b.refresh()
                return b.find_element(By.ID, "out-of-step-count").text == "0 units out of step"

            wait(browser).until(in_step)
            assert units[0].config["interval_min"] == 5 and units[1].config["interval_min"] == 5
            browser.get(site + "/units/U1")
            said = browser.find_element(By.ID, "configuration").text
            assert said.startswith('Wanted {"interval_min":5}; reported {"diag_every":2,"interval_min":5}'), said
            assert said.endswith("in step (configuration).")
            shot(browser, "unit-configuration")

        # the audit log: who asked for what, from where; searched
        browser.get(site + "/audit")
        entries = rows(browser, "#entries tbody tr")
        assert any("console:alice 127.0.0.1 command set U1" in e for e in entries), entries
        assert any("console:alice 127.0.0.1 command cancelled" in e for e in entries), entries
        assert any("unit U1  command done" in e or "unit U1 command done" in e for e in entries), entries
        browser.find_element(By.CSS_SELECTOR, "#filter input[name=about]").send_keys("command reboot")
        browser.find_element(By.CSS_SELECTOR, "#filter button").click()
        wait(browser).until(expected.url_contains("about=command+reboot"))
        reboots = rows(browser, "#entries tbody tr")
        assert len(reboots) == 1 and "console:alice 127.0.0.1 command reboot U3" in reboots[0], reboots
        browser.get(site + "/audit?about=configuration+wanted")
        wanted = rows(browser, "#entries tbody tr")
        assert len(wanted) == 1 and 'configuration wanted customer C1 {"interval_min":5}' in wanted[0], wanted
        shot(browser, "audit")

        many = {"csrf": csrf, **{f"f{i}": "x" for i in range(20)}}
        assert post(site + "/commands", many, cookie) == 413  # more fields than any form has: refused
        assert post(site + "/commands", {"op": "ping", "units": "U1"}, cookie) == 403  # no CSRF token
        assert post(site + "/commands/cancel", {"csrf": csrf, "id": "nope"}, cookie) == 409
        expires = {"csrf": csrf, "op": "ping", "units": "U1", "expires_h": "nan"}
        assert post(site + "/commands", expires, cookie) == 400
        for fields in (
            {"scope": "<b>", "target": "x", "action": "set", "args": "interval_min=5"},
            {"scope": "unit", "target": "U1", "action": "set", "args": "colour=red"},
            {"scope": "unit", "target": "U1" * 3000, "action": "clear"},
        ):
            assert post(site + "/configuration", {"csrf": csrf, **fields}, cookie) in (400, 413), fields
        for path, status in [
            ("/commands?state=%3Cb%3E&unit=" + "u" * 5000, 200),
            ("/audit?about=" + "a" * 5000, 200),
            ("/audit?before=abc", 400),
        ]:
            assert get(site + path, cookie) == status, path
        assert stop(proc) == 0
    finally:
        stop(proc)
    assert "Traceback" not in (workdir / "smame.log").read_text()


def test_an_operator_runs_a_firmware_campaign_from_the_console(
    broker: Mosquitto, workdir: Path, browser: webdriver.Chrome
) -> None:
    write_registry(workdir, {"U1": "C1", "U2": "C1", "U3": "C1", "U5": "C2"})
    env, port = console_env(workdir, broker.port, PASSWORD, SMAME_DEVICES__CAMPAIGN_EVERY_S="0.5")
    site = f"http://127.0.0.1:{port}"
    env["SMAME_DEVICES__FIRMWARE_URL"] = site
    image = workdir / "fw.bin"
    image.write_bytes(bytes(range(256)) * 64)
    smame(["firmware", "add", str(image), "--version", "2.4.0"], env)
    proc = start_smame(env, workdir / "smame.log")
    units = [UnitDevice("U1"), UnitDevice("U2", fw_fault="image"), UnitDevice("U3")]  # U5 never connects
    try:
        wait_log(workdir / "smame.log", "web server listening")
        with answering(broker.port, units):
            login(browser, site)
            browser.get(site + "/campaigns")
            assert rows(browser, "#images tbody tr")[0].startswith("2.4.0 16384 ")

            def start(kind: str, target: str, waves: str) -> None:
                Select(browser.find_element(By.CSS_SELECTOR, "#start select[name=target_kind]")).select_by_value(kind)
                for name, value in (("target", target), ("waves", waves), ("abort_min", "3"), ("abort_share", "0.5")):
                    field = browser.find_element(By.CSS_SELECTOR, f"#start input[name={name}]")
                    field.clear()
                    field.send_keys(value)
                browser.find_element(By.CSS_SELECTOR, "#start button").click()

            start("customer", "C1", "10,5")
            error = wait(browser).until(expected.presence_of_element_located((By.ID, "error")))
            assert error.text.startswith("waves: rising shares in percent"), error.text
            start("customer", "C1", "100")
            wait(browser).until(expected.url_contains("/campaigns/"))

            def ended(b: webdriver.Chrome) -> str | None:
                b.refresh()
                phase = b.find_element(By.ID, "phase").text
                return phase if phase.startswith("done") else None

            assert wait(browser).until(ended).startswith("done since ")
            counts = browser.find_element(By.CSS_SELECTOR, "#counts tbody tr").text.split()
            assert counts == ["0", "0", "0", "2", "1", "0"]  # pending sent updating done failed skipped
            failed = rows(browser, "#failed tbody tr")
            assert len(failed) == 1 and failed[0].startswith("U2 verify ") and "not the one named" in failed[0]
            assert browser.find_element(By.CSS_SELECTOR, "#waves tbody tr").text.split()[:2] == ["1", "3"]
            assert [u.fw for u in units] == ["2.4.0", "2.3.0", "2.4.0"]
            shot(browser, "campaign")

            # one whose unit is away: paused, resumed and cancelled from its page
            browser.get(site + "/campaigns")
            start("units", "U5", "100")
            wait(browser).until(expected.url_contains("/campaigns/"))
            for action, phase in (("pause", "paused"), ("resume", "running"), ("cancel", "cancelled")):
                browser.find_element(By.ID, action).click()
                wait(browser).until(lambda b, p=phase: b.find_element(By.ID, "phase").text.startswith(p))
            assert browser.find_elements(By.ID, "resume") == []  # a cancelled campaign has no buttons
            assert browser.find_element(By.CSS_SELECTOR, "#counts tbody tr").text.split()[-1] == "1"  # skipped
            cookie = f"smame_session={browser.get_cookie('smame_session')['value']}"  # type: ignore[index]
            csrf = browser.find_element(By.CSS_SELECTOR, "form.logout input[name=csrf]").get_attribute("value")
            here = browser.current_url
            assert post(here + "/resume", {"csrf": csrf or ""}, cookie) == 409  # it ended
            assert post(here + "/explode", {"csrf": csrf or ""}, cookie) == 409
            assert get(site + "/campaigns/nope", cookie) == 404
            assert post(site + "/campaigns", {"csrf": csrf or "", "target_kind": "x", "waves": "nan"}, cookie) == 400
        browser.get(site + "/audit?about=console%3Aalice")
        actions = {r.split()[5] + " " + r.split()[6] for r in rows(browser, "#entries tbody tr")}
        assert {"campaign started", "campaign paused", "campaign running", "campaign cancelled"} <= actions, actions
        assert stop(proc) == 0
    finally:
        stop(proc)
    assert "Traceback" not in (workdir / "smame.log").read_text()

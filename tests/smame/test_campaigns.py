"""Firmware campaigns end to end: `smame firmware` and `smame campaign` against `smame run`, its web server serving
the image, and the simulator's units downloading, installing, failing and being cut off over a real Mosquitto."""

from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from aggregator.backends import open_url
from kernel.firmware import unit_token
from simulators.devices import UnitDevice
from tests.helpers import Mosquitto, console_env, smame, write_registry
from tests.smame.test_devices import Units, subscribed

PASSWORD = "campaign-pass-123"


def image(workdir: Path, size: int = 64 * 1024) -> Path:
    path = workdir / "fw-2.4.0.bin"
    path.write_bytes(random.Random(7).randbytes(size))
    return path


def campaign_env(workdir: Path, port: int) -> tuple[dict[str, str], str]:
    env, web = console_env(
        workdir,
        port,
        PASSWORD,
        SMAME_EXPORT__ENABLED="false",
        SMAME_DEVICES__RETRY_S="1",
        SMAME_DEVICES__CAMPAIGN_EVERY_S="0.5",
        SMAME_FTP__FAIL_DELAY_S="0.2",
    )
    site = f"http://127.0.0.1:{web}"
    env["SMAME_DEVICES__FIRMWARE_URL"] = site
    return env, site


def shown(env: dict[str, str], campaign: str) -> str:
    return smame(["campaign", "show", campaign], env).stdout


def until(env: dict[str, str], campaign: str, phase: str, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while f", {phase}" not in (said := shown(env, campaign)).splitlines()[0]:
        assert time.monotonic() < deadline, said
        time.sleep(0.3)
    return said


def status(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_a_campaign_finishes_through_cuts_reboots_and_lost_answers(broker: Mosquitto, workdir: Path) -> None:
    faults = ["", "cut", "reboot", "lost"] * 3
    units = {f"FW{i:02}": fault for i, fault in enumerate(faults)}
    write_registry(workdir, dict.fromkeys(units, "C1") | {"OT1": "C2"})
    env, site = campaign_env(workdir, broker.port)
    fw = image(workdir)
    devices = [UnitDevice(u, fw_fault=f) for u, f in units.items()]
    fleet = Units(broker.port, devices)
    proc = subscribed(env, workdir)
    try:
        refused = smame(["campaign", "start", "--version", "2.4.0", "--customer", "C1"], env, check=False)
        assert refused.returncode == 2 and "no firmware '2.4.0'" in refused.stderr
        added = smame(["firmware", "add", str(fw), "--version", "2.4.0"], env).stdout
        assert re.fullmatch(r"firmware 2\.4\.0: 65536 bytes, sha256 [0-9a-f]{64}\n", added)
        again = smame(["firmware", "add", str(fw), "--version", "2.4.0"], env, check=False)
        assert again.returncode == 1 and "kept already" in again.stderr
        started = smame(
            [
                *("campaign", "start", "--version", "2.4.0", "--customer", "C1", "--waves", "100"),
                *("--timeout", "5", "--abort-share", "0.5", "--abort-min", "4"),
            ],
            env,
        ).stdout
        campaign = started.split()[1].rstrip(":")
        assert started.endswith("2.4.0 for 12 units, waves of 12 units\n"), started

        said = until(env, campaign, "done", 60)
        assert "12 done, 0 failed" in said.replace("0 pending, 0 sent, 0 updating, ", ""), said
        assert all(d.fw == "2.4.0" for d in devices)
        for d in devices:  # a cut or a reboot resumes from the byte it had: no byte fetched twice
            assert d.downloads == ([0, 32768] if d.fw_fault in ("cut", "reboot") else [0]), (d.unit, d.downloads)
        assert [d.boots for d in devices if d.fw_fault == "reboot"] == [2, 2, 2]
        with open_url(f"sqlite:///{workdir / 'data' / 'smame.db'}") as store:
            lost = {u: d for _, u, _, _, _, _, d in store.campaign_units(campaign) if units[u] == "lost"}
            assert set(lost.values()) == {"reports 2.4.0"}  # judged by the version it said when asked
            c = store.campaign(campaign)
        assert c is not None

        # only a started unit of a running campaign, with its own token, gets the image (this one has ended)
        token = unit_token(c.secret, campaign, "FW00")
        assert status(f"{site}/fw/{campaign}/FW00/{token}.bin")[0] == 404
    finally:
        fleet.close()
        proc.terminate()
        proc.wait(30)


def test_the_image_is_served_by_ranges_to_the_campaigns_units_only(broker: Mosquitto, workdir: Path) -> None:
    write_registry(workdir, {"FW01": "C1", "FW02": "C1", "OT1": "C2"})
    env, site = campaign_env(workdir, broker.port)
    fw = image(workdir, 10_000)
    proc = subscribed(env, workdir)  # no unit answers: their fw commands wait with the broker, the units started
    try:
        smame(["firmware", "add", str(fw), "--version", "2.4.0"], env)
        started = smame(["campaign", "start", "--version", "2.4.0", "--units", "FW01,FW02", "--waves", "100"], env)
        campaign = started.stdout.split()[1].rstrip(":")
        with open_url(f"sqlite:///{workdir / 'data' / 'smame.db'}") as store:
            deadline = time.monotonic() + 15
            while store.campaign_counts(campaign).get("sent") != 2:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            c = store.campaign(campaign)
        assert c is not None
        url = f"{site}/fw/{campaign}/FW01/{unit_token(c.secret, campaign, 'FW01')}.bin"
        got, body, _ = status(url)
        assert got == 200 and body == fw.read_bytes()
        got, body, headers = status(url, {"Range": "bytes=4000-"})
        assert got == 206 and body == fw.read_bytes()[4000:] and headers["content-range"] == "bytes 4000-9999/10000"
        assert status(url, {"Range": "bytes=20000-"})[0] == 416
        other = unit_token(c.secret, campaign, "OT1")  # a unit the campaign does not hold, even with a good token
        for path in (
            f"/fw/{campaign}/OT1/{other}.bin",
            f"/fw/{campaign}/FW02/{unit_token(c.secret, campaign, 'FW01')}.bin",  # another unit's token
            f"/fw/{campaign}/FW01/{'0' * 32}.bin",
            f"/fw/nope/FW01/{'0' * 32}.bin",
        ):
            got, body, _ = status(site + path)
            assert (got, json.loads(body)) == (404, {"error": "no such image"}), path
        assert status(f"{site}/fw/{campaign}/..%2F..%2Fetc/{'0' * 32}.bin")[0] == 404
        assert smame(["campaign", "cancel", campaign], env).stdout.strip() == f"campaign {campaign} cancelled"
        assert status(url)[0] == 404  # a cancelled campaign serves no more
    finally:
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in (workdir / "smame.log").read_text()
    assert os.path.exists(workdir / "data" / "firmware" / f"{c.sha256}.bin")


def test_a_campaign_over_ten_thousand_units_aborts_at_its_threshold_in_its_first_wave(
    broker: Mosquitto, workdir: Path
) -> None:
    write_registry(workdir, {f"U{i:05}": "C1" for i in range(10_000)})
    env, _ = campaign_env(workdir, broker.port)
    fw = image(workdir, 16 * 1024)
    proc = subscribed(env, workdir)
    fleet = None
    try:
        smame(["firmware", "add", str(fw), "--version", "2.4.0"], env)
        started = smame(
            [
                *("campaign", "start", "--version", "2.4.0", "--customer", "C1", "--waves", "1,10,50,100"),
                *("--timeout", "60", "--abort-share", "0.2", "--abort-min", "20"),
            ],
            env,
        ).stdout
        assert started.endswith("for 10000 units, waves of 100, 1000, 5000, 10000 units\n"), started
        campaign = started.split()[1].rstrip(":")
        with open_url(f"sqlite:///{workdir / 'data' / 'smame.db'}") as store:
            first = [u for _, u, *_ in store.campaign_units(campaign, limit=100)]
        # the first wave's units come online; every third cannot download, gets a bad image, or does not boot it
        bad = ["download", "image", "noboot"]
        devices = [UnitDevice(u, fw_fault=bad[i // 3 % 3] if i % 3 == 0 else "") for i, u in enumerate(first)]
        fleet = Units(broker.port, devices)
        said = until(env, campaign, "aborted", 60)
        head = said.splitlines()[0]
        assert re.search(r"aborted \((\d+) of (\d+) units ended failed, over 20% \(judged once 20 ended\)\)", head)
        counts = dict(reversed(p.split()) for p in said.splitlines()[3].strip().split(", "))
        assert int(counts["skipped"]) >= 9900 and int(counts["done"]) + int(counts["failed"]) <= 100, counts
        stages = {line.split()[2] for line in said.splitlines()[4:]}
        assert stages <= {"download", "verify", "boot"} and len(stages) >= 2, said
        with open_url(f"sqlite:///{workdir / 'data' / 'smame.db'}") as store:
            sent_to = {c.unit for c in store.commands(limit=20_000) if c.op == "fw"}
            done = {u for _, u, *_ in store.campaign_units(campaign, "done")}
        assert sent_to <= set(first)  # nothing beyond the first wave was sent
        on = {d.unit: d for d in devices}
        assert done and all(on[u].fw == "2.4.0" and not on[u].fw_fault for u in done)
    finally:
        if fleet is not None:
            fleet.close()
        proc.terminate()
        proc.wait(30)

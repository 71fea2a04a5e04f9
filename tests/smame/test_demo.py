"""`smame demo` end to end, small and fast: it must show a working product and leave nothing running."""

from __future__ import annotations

import subprocess
import sys
from email import message_from_bytes
from email.policy import default
from pathlib import Path

from tests.helpers import real_processes, smame_env


def test_the_demo_runs_the_whole_product_and_cleans_up(workdir: Path) -> None:
    real_processes()
    work = workdir / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "smame.cli",
            "demo",
            "--dir",
            str(work),
            "--units",
            "60",
            "--customers",
            "3",
            "--speed",
            "0",
        ],
        env=smame_env(workdir, 1883),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "OK: 0 mismatches" in out  # units failing with their precursors included: the truth knows them
    assert "units at risk of failing: " in out and " of 60 assessed" in out  # the report's health section
    # no terminal: it says that it stops, and why, instead of "smame keeps running"
    assert "Everything stops now: standard input is no terminal" in out and "keeps running" not in out
    assert "sha256 matches" in out and "C000_" in out.split("fetches its files over FTPS")[1]
    assert "smame_readings_stored_total" in out
    assert "the operators' console: http://127.0.0.1:" in out and "(operator demo, password demo-" in out
    api = out.split("reads the JSON API with a token")[1]
    assert "GET /api/v1/units: 20 units" in api and '"quality": "A"' in api and "Authorization: Bearer smame_" in api
    # (among the mails, the security event of the token and the login the demo makes once smame runs)
    mails = [message_from_bytes(m.read_bytes(), policy=default) for m in sorted((work / "mail").glob("*.eml"))]
    reports = [m for m in mails if str(m["Subject"]).startswith("[smame] daily report ")]
    assert reports, f"the daily report was not mailed: {[str(m['Subject']) for m in mails]}"
    report = reports[0]
    assert any(p.get_filename() for p in report.iter_attachments())
    assert len(list((work / "data" / "export").glob("C00*/*.csv"))) >= 3
    assert "smame stopped" in (work / "smame.log").read_text()  # stopped cleanly, not killed
    again = subprocess.run(
        [sys.executable, "-m", "smame.cli", "demo", "--dir", str(workdir), "--no-follow"],
        env=smame_env(workdir, 1883),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 2 and "was not made by smame demo" in again.stderr  # never wipes a foreign directory

"""Certificates watched for their expiry: read from files and provisioned directories, alerted 30 and 7 days
ahead (and when unreadable) until rotated, and listed by `smame certs list`."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aggregator.backends import open_url
from broker_bridge.bridge import BridgeStats
from kernel.certificates import builder, common_name, held_in, key_pem, write_file
from kernel.registry import load_registry
from kernel.settings import load_settings
from kernel.timegrid import Grid
from monitoring.monitor import Monitor, Watched
from smame.app import build_outbox
from tests.helpers import first_start, smame, smame_env, write_registry

GRID = Grid("Asia/Tokyo")
DAY = 86400


def certificate(path: Path, name: str, days: int, ca: bool = False) -> None:
    """A self-signed certificate of `name` valid for `days` days from now, and its key beside it."""
    key = ec.generate_private_key(ec.SECP256R1())
    made = builder(common_name(name), common_name(name), key.public_key(), days)
    if ca:
        made = made.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, made.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    write_file(path.with_suffix(".key"), key_pem(key), private=True)


def provisioned(out: Path) -> None:
    """A directory as `smame provision --tls` leaves it: the CA, the broker's certificate, units' in certs/."""
    certificate(out / "ca.pem", "smame device CA", 5, ca=True)
    certificate(out / "server.pem", "broker.example", 399)
    certificate(out / "certs" / "U1.pem", "U1", 20)
    certificate(out / "certs" / "U2.pem", "U2", 400)


def test_the_certificates_of_files_and_provisioned_directories_are_read_soonest_first(tmp_path: Path) -> None:
    provisioned(tmp_path / "broker")
    certificate(tmp_path / "ftps.pem", "files.example", 90)
    (tmp_path / "broker" / "junk.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
    )
    held, problems = held_in([tmp_path / "ftps.pem", tmp_path / "broker", tmp_path / "gone.pem"])
    assert [(h.subject, h.ca) for h in held] == [
        ("CN=smame device CA", True),
        ("CN=U1", False),
        ("CN=files.example", False),
        ("CN=broker.example", False),
        ("CN=U2", False),
    ]
    assert abs(held[0].not_after - (time.time() + 5 * DAY)) < 600
    assert [p.split(":")[0] for p in problems] == [str(tmp_path / "broker" / "junk.pem"), str(tmp_path / "gone.pem")]


def test_certificates_near_their_end_are_alerted_until_they_are_rotated(tmp_path: Path, store_url: str) -> None:
    write_registry(tmp_path, {"U1": "C1"})
    provisioned(tmp_path / "broker")
    settings = load_settings(
        data_dir=tmp_path, ftp={"enabled": False}, monitoring={"certificates": [str(tmp_path / "broker")]}
    )
    registry = load_registry(tmp_path / "units.csv", tmp_path / "customers.toml")
    now = time.time()  # (the certificates are made for the machine's clock)
    clock = [now]
    with open_url(store_url) as store:
        outbox = build_outbox(settings, store, lambda: clock[0])
        m = Monitor(
            settings, store, GRID, lambda: registry, Watched(BridgeStats(connected=True)), outbox, lambda: clock[0]
        )
        notices = {n.name: n.text for n in asyncio.run(m.check()) if n.state == "firing"}
        assert (
            "1 certificate(s) expire within 30 days: " + str(tmp_path / "broker" / "certs" / "U1.pem")
            in (notices["certificate_expiry"])
        )
        urgent = notices["certificate_expiry_urgent"]
        assert urgent.startswith(f"1 certificate(s) expire within 7 days: {tmp_path / 'broker' / 'ca.pem'}")
        assert "(CN=smame device CA, a CA) until " in urgent and "days left" in urgent
        # rotated: the next reading of them (within the hour) clears both
        certificate(tmp_path / "broker" / "ca.pem", "smame device CA", 3650, ca=True)
        certificate(tmp_path / "broker" / "certs" / "U1.pem", "U1", 400)
        clock[0] = now + 600
        asyncio.run(m.check())
        assert {"certificate_expiry", "certificate_expiry_urgent"} <= set(m.active)  # not read again yet
        clock[0] = now + 3600
        resolved = {n.name for n in asyncio.run(m.check()) if n.state == "resolved"}
        assert resolved == {"certificate_expiry", "certificate_expiry_urgent"}
        assert not {"certificate_expiry", "certificate_expiry_urgent"} & set(m.active)


def test_smame_certs_list_shows_each_certificate_with_its_days_left(tmp_path: Path) -> None:
    write_registry(tmp_path, {"U1": "C1"})
    provisioned(tmp_path / "broker")
    env = smame_env(tmp_path, 1883, SMAME_MONITORING__CERTIFICATES=str(tmp_path / "broker"), SMAME_FTP__ENABLED="false")
    first_start(tmp_path)
    lines = smame(["certs", "list", "--within", "30"], env).stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["5", "20"]
    assert "CA CN=smame device CA" in lines[0] and str(tmp_path / "broker" / "ca.pem") in lines[0]
    assert len(smame(["certs", "list"], env).stdout.splitlines()) == 4
    ends = datetime.fromisoformat(lines[0].split()[2])  # in smame's zone, to the minute
    assert ends.utcoffset() == timedelta(hours=9) and abs(ends.timestamp() - (time.time() + 5 * DAY)) < 120

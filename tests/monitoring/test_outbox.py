"""The outbox against real receivers: Slack's 429, an SMTP outage, STARTTLS with a login, two senders at once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import SecretStr

from aggregator.backends import open_url
from aggregator.sqlite import SqliteStore
from ftp_gateway.certs import ensure_certificate
from kernel.settings import MailSettings, SlackSettings
from monitoring import mail, slack
from monitoring.mail import SmtpChannel
from monitoring.outbox import Outbox
from monitoring.outbox_table import OutboxTable
from monitoring.slack_channel import SlackChannel
from tests.helpers import free_port
from tests.monitoring.sinks import SlackStandIn, SmtpSink


def webhook(stand_in: SlackStandIn) -> SlackChannel:
    return SlackChannel(SlackSettings(webhook_url=SecretStr(stand_in.url), timeout_s=5))


def mail_to(port: int, **kw: object) -> MailSettings:
    kw.setdefault("timeout_s", 5)
    return MailSettings(smtp_url=f"smtp://127.0.0.1:{port}", recipients=["ops@example.jp"], **kw)  # type: ignore[arg-type]


def pending(url: str) -> int:
    store = open_url(url)
    try:
        return OutboxTable(store).counts()["pending"]
    finally:
        store.close()


def server_tls(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A TLS context for a test server, and its self-signed certificate for clients to trust."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ensure_certificate(cert, key, ["localhost", "127.0.0.1"])
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    return tls, cert


async def test_slack_429_is_retried_after_retry_after_and_delivered_once(tmp_path: Path) -> None:
    stand_in = SlackStandIn(statuses=[429], retry_after=1)
    store = SqliteStore(tmp_path / "smame.db")
    now = [time.time()]
    outbox = Outbox(store, {"slack": webhook(stand_in)}, backoff_min=0.1, clock=lambda: now[0])
    await outbox.put([("alert:x", "slack", slack.compose("[smame] ALERT: test", "something broke"))])
    assert await outbox.deliver_due() == 0  # 429
    now[0] += 0.9
    assert await outbox.deliver_due() == 0  # not due yet: Retry-After says one second
    assert len(stand_in.posts) == 1
    now[0] += 0.2
    assert await outbox.deliver_due() == 1
    assert await outbox.deliver_due() == 0
    assert len(stand_in.delivered) == 1 and len(stand_in.posts) == 2
    assert stand_in.delivered[0].body["text"].startswith("[smame] ALERT: test")
    assert outbox.stats["slack", "sent"] == 1 and outbox.stats["slack", "failed"] == 1
    # queuing the same message again sends nothing: the key is taken
    assert await outbox.put([("alert:x", "slack", b"{}")]) == 0
    store.close()
    stand_in.stop()


async def test_bot_token_and_its_429_through_the_web_api(tmp_path: Path) -> None:
    stand_in = SlackStandIn(statuses=[429], retry_after=1)
    channel = SlackChannel(
        SlackSettings(token=SecretStr("xoxb-test"), channel="#ops", api_url=stand_in.api_url, timeout_s=5)
    )
    store = SqliteStore(tmp_path / "smame.db")
    now = [time.time()]
    outbox = Outbox(store, {"slack": channel}, backoff_min=0.1, clock=lambda: now[0])
    await outbox.put([("r", "slack", slack.compose("[smame] daily report", "all fine"))])
    assert await outbox.deliver_due() == 0
    now[0] += 0.9
    assert await outbox.deliver_due() == 0  # Retry-After: 1
    now[0] += 0.2
    assert await outbox.deliver_due() == 1
    assert [p.path for p in stand_in.delivered] == ["/api/chat.postMessage"]
    assert stand_in.delivered[0].body["channel"] == "#ops"
    store.close()
    stand_in.stop()


async def test_smtp_down_then_up_the_mail_arrives_once(store_url: str) -> None:
    sink = SmtpSink()  # not started: the port refuses connections
    store = open_url(store_url)
    outbox = Outbox(store, {"mail": SmtpChannel(mail_to(sink.port))}, backoff_min=0.2)
    body = mail.compose("k1", "smame@example.jp", ["ops@example.jp"], "[smame] ALERT: x", "text", time.time())
    await outbox.put([("k1", "mail", body)])
    assert await outbox.deliver_due() == 0
    assert "mail" in outbox.failing and pending(store_url) == 1
    sink.start()
    try:
        deadline = time.monotonic() + 10
        while not await outbox.deliver_due() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for _ in range(3):
            await outbox.deliver_due()
        assert len(sink.messages) == 1
        assert sink.messages[0].recipients == ["ops@example.jp"]
        assert pending(store_url) == 0 and "mail" not in outbox.failing
    finally:
        sink.stop()
        store.close()


async def test_starttls_and_login(tmp_path: Path) -> None:
    tls, cert = server_tls(tmp_path)
    sink = SmtpSink(tls=tls, login=("smame", "s3cret-passw0rd")).start()
    store = SqliteStore(tmp_path / "smame.db")
    try:
        good = SmtpChannel(
            mail_to(sink.port, starttls="always", ca_file=cert, username="smame", password=SecretStr("s3cret-passw0rd"))
        )
        bad = SmtpChannel(
            mail_to(sink.port, starttls="always", ca_file=cert, username="smame", password=SecretStr("wrong"))
        )
        plain = SmtpChannel(
            mail_to(sink.port, starttls="never", username="smame", password=SecretStr("s3cret-passw0rd"))
        )
        body = mail.compose("k", "smame@example.jp", ["ops@example.jp"], "s", "t", time.time())
        for name, channel in (("bad", bad), ("plain", plain)):
            outbox = Outbox(store, {"mail": channel})
            await outbox.put([(name, "mail", body)])
            assert await outbox.deliver_due() == 0, name  # wrong password; or AUTH refused without TLS
        outbox = Outbox(store, {"mail": good})
        await outbox.put([("good", "mail", body)])
        assert await outbox.deliver_due() == 1
        assert len(sink.messages) == 1
    finally:
        sink.stop()
        store.close()


@pytest.mark.filterwarnings("ignore:Requiring AUTH:UserWarning")  # aiosmtpd cannot see that the socket is TLS
async def test_smtps_with_tls_from_the_start(tmp_path: Path) -> None:
    tls, cert = server_tls(tmp_path)
    sink = SmtpSink(implicit_tls=tls, login=("smame", "s3cret-passw0rd")).start()
    store = SqliteStore(tmp_path / "smame.db")
    try:
        settings = MailSettings(
            smtp_url=f"smtps://127.0.0.1:{sink.port}",
            recipients=["ops@example.jp"],
            timeout_s=5,
            ca_file=cert,
            username="smame",
            password=SecretStr("s3cret-passw0rd"),
        )
        untrusted = MailSettings(smtp_url=f"smtps://127.0.0.1:{sink.port}", recipients=["ops@example.jp"], timeout_s=5)
        body = mail.compose("k", "smame@example.jp", ["ops@example.jp"], "s", "t", time.time())
        outbox = Outbox(store, {"mail": SmtpChannel(untrusted)})
        await outbox.put([("untrusted", "mail", body)])
        assert await outbox.deliver_due() == 0 and "CERTIFICATE_VERIFY_FAILED" in outbox.failing["mail"][1]
        outbox = Outbox(store, {"mail": SmtpChannel(settings)})
        await outbox.put([("trusted", "mail", body)])
        assert await outbox.deliver_due() == 1
        assert len(sink.messages) == 1
    finally:
        sink.stop()
        store.close()


async def test_two_senders_never_send_the_same_message(store_url: str) -> None:
    stand_in = SlackStandIn()
    stores = [open_url(store_url), open_url(store_url)]
    outboxes = [Outbox(s, {"slack": webhook(stand_in)}) for s in stores]
    await outboxes[0].put([(f"m{i}", "slack", slack.compose(f"message {i}", "x")) for i in range(20)])
    sent = await asyncio.gather(*(o.deliver_due() for o in outboxes))
    assert sum(sent) == 20
    assert sorted(p.body["text"].split("\n")[0] for p in stand_in.delivered) == sorted(
        f"message {i}" for i in range(20)
    )
    for s in stores:
        s.close()
    stand_in.stop()


async def test_a_channel_keeps_its_order_when_one_message_fails(tmp_path: Path) -> None:
    stand_in = SlackStandIn(statuses=[500])
    store = SqliteStore(tmp_path / "smame.db")
    outbox = Outbox(store, {"slack": webhook(stand_in)}, backoff_min=0.2)
    await outbox.put(
        [("a:start", "slack", slack.compose("started", "x")), ("a:end", "slack", slack.compose("cleared", "x"))]
    )
    assert await outbox.deliver_due() == 0  # the first failed; the second waits behind it
    assert len(stand_in.posts) == 1
    deadline = time.monotonic() + 5
    while len(stand_in.delivered) < 2 and time.monotonic() < deadline:
        await outbox.deliver_due()
        await asyncio.sleep(0.05)
    assert [p.body["text"].split("\n")[0] for p in stand_in.delivered] == ["started", "cleared"]
    store.close()
    stand_in.stop()


async def test_a_message_too_old_is_given_up_and_kept(store_url: str) -> None:
    store = open_url(store_url)
    clock = [1000.0]
    outbox = Outbox(
        store, {"mail": SmtpChannel(mail_to(free_port()))}, backoff_min=1, give_up_s=60, clock=lambda: clock[0]
    )
    await outbox.put([("old", "mail", mail.compose("old", "a@b.jp", ["ops@example.jp"], "s", "t", 0))])
    assert await outbox.deliver_due() == 0
    clock[0] += 120
    assert await outbox.deliver_due() == 0
    assert OutboxTable(store).counts() == {"pending": 0, "sent": 0, "given_up": 1}
    assert outbox.stats["mail", "given_up"] == 1
    store.close()


async def test_an_unexpected_error_from_a_channel_fails_the_message_not_the_service(tmp_path: Path) -> None:
    sink = SmtpSink().start()
    store = SqliteStore(tmp_path / "smame.db")
    try:
        outbox = Outbox(store, {"mail": SmtpChannel(mail_to(sink.port))}, backoff_min=60)
        good = mail.compose("good", "smame@example.jp", ["ops@example.jp"], "fine", "t", time.time())
        # no From header: smtplib itself raises AttributeError, which is no SMTP error
        await outbox.put([("broken", "mail", b"To: ops@example.jp\r\n\r\nno sender"), ("good", "mail", good)])
        # the broken one is given up at once (retrying cannot cure it); the good one is not held up behind it
        assert await outbox.deliver_due() == 1
        assert [m.message["Subject"] for m in sink.messages] == ["fine"]
        assert outbox.stats["mail", "given_up"] == 1 and "mail" not in outbox.failing  # the channel works
        assert OutboxTable(store).counts() == {"pending": 0, "sent": 1, "given_up": 1}
        error = store.db.execute("SELECT last_error FROM outbox WHERE key = 'broken'").fetchone()[0]
        assert error.startswith("AttributeError")  # kept, with why
    finally:
        sink.stop()
        store.close()


class DripSmtp:
    """An SMTP server that sends its greeting one byte at a time, slower than any deadline."""

    def __init__(self, every: float) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.every = every
        self.stop = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        with self.sock, self.sock.accept()[0] as conn:  # both closed once stopped
            for byte in b"220 slow.example.jp ESMTP\r\n":
                if self.stop.wait(self.every):
                    return
                conn.sendall(bytes([byte]))
            self.stop.wait()


async def test_a_stalling_mail_server_holds_up_neither_slack_nor_the_outbox(tmp_path: Path) -> None:
    drip, stand_in = DripSmtp(every=0.5), SlackStandIn()
    store = SqliteStore(tmp_path / "smame.db")
    try:
        outbox = Outbox(
            store, {"mail": SmtpChannel(mail_to(drip.port, timeout_s=1)), "slack": webhook(stand_in)}, backoff_min=60
        )
        await outbox.put(
            [
                ("m", "mail", mail.compose("m", "smame@example.jp", ["ops@example.jp"], "s", "t", 0.0)),
                ("s", "slack", slack.compose("[smame] ALERT: x", "y")),
            ]
        )
        started = time.monotonic()
        assert await outbox.deliver_due() == 1  # Slack's, while mail drips
        assert time.monotonic() - started < 2.5  # the mail deadline (1 s), not the server's pace
        assert len(stand_in.delivered) == 1
        assert outbox.failing["mail"][1] == "no answer within 1 s"
        assert OutboxTable(store).counts() == {"pending": 1, "sent": 1, "given_up": 0}
    finally:
        drip.stop.set()
        stand_in.stop()
        store.close()


async def test_stopping_mid_delivery_leaves_the_untried_messages_due_at_once(store_url: str) -> None:
    # smame stopped while the outbox works through what it claimed: the message being sent keeps its lease (it
    # may yet go out), but those behind it, never tried, must be due at the next start, not five minutes later.
    drip = DripSmtp(every=0.5)
    store = open_url(store_url)
    try:
        outbox = Outbox(store, {"mail": SmtpChannel(mail_to(drip.port, timeout_s=30))}, lease_s=300)
        await outbox.put(
            [(k, "mail", mail.compose(k, "smame@example.jp", ["ops@example.jp"], k, "t", 0.0)) for k in "abc"]
        )
        delivering = asyncio.create_task(outbox.deliver_due())
        while not outbox._lanes or not next(iter(outbox._lanes.values())).busy:  # "a" is being sent
            await asyncio.sleep(0.01)
        delivering.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await delivering
        due = dict(store.execute("SELECT key, next_try <= ? FROM outbox", (time.time(),)).fetchall())
        assert due == {"a": 0, "b": 1, "c": 1}
    finally:
        drip.stop.set()
        store.close()


async def stop_mid_send(outbox: Outbox, during: Callable[[], None] = lambda: None) -> None:
    """Cancel a delivery round (smame stopping) once its first send is under way; `during` runs right after."""
    delivering = asyncio.create_task(outbox.deliver_due())
    while not outbox._lanes or not next(iter(outbox._lanes.values())).busy:
        await asyncio.sleep(0.01)
    delivering.cancel()
    during()
    with contextlib.suppress(asyncio.CancelledError):
        await delivering


async def test_a_send_that_fails_as_smame_stops_is_due_again_at_once(store_url: str) -> None:
    # Stopped while a mail is being sent, and the server then drops the connection: the send's outcome comes
    # within the grace, so the mail is due at the next start, not when its five-minute lease runs out.
    drip = DripSmtp(every=0.5)
    store = open_url(store_url)
    try:
        outbox = Outbox(store, {"mail": SmtpChannel(mail_to(drip.port, timeout_s=30))}, lease_s=300)
        await outbox.put([("a", "mail", mail.compose("a", "smame@example.jp", ["ops@example.jp"], "a", "t", 0.0))])
        await stop_mid_send(outbox, during=drip.stop.set)  # the server hangs up as smame stops
        [(due, error)] = store.execute("SELECT next_try <= ?, last_error FROM outbox", (time.time(),)).fetchall()
        assert due == 1 and error
    finally:
        drip.stop.set()
        store.close()


async def test_a_send_that_succeeds_as_smame_stops_is_marked_sent(store_url: str) -> None:
    class SlowSink(SmtpSink):
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:  # noqa: N802
            await asyncio.sleep(0.5)
            return await super().handle_DATA(server, session, envelope)

    sink = SlowSink().start()
    store = open_url(store_url)
    try:
        outbox = Outbox(store, {"mail": SmtpChannel(mail_to(sink.port))}, lease_s=300)
        await outbox.put([("a", "mail", mail.compose("a", "smame@example.jp", ["ops@example.jp"], "a", "t", 0.0))])
        await stop_mid_send(outbox)
        assert OutboxTable(store).counts() == {"pending": 0, "sent": 1, "given_up": 0}
        assert len(sink.messages) == 1
    finally:
        sink.stop()
        store.close()


async def test_a_mail_answered_after_the_deadline_is_sent_once(store_url: str) -> None:
    class SlowSink(SmtpSink):
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:  # noqa: N802
            await asyncio.sleep(2)  # the server takes it, but answers after smame's deadline
            return await super().handle_DATA(server, session, envelope)

    sink = SlowSink().start()
    store = open_url(store_url)
    try:
        outbox = Outbox(store, {"mail": SmtpChannel(mail_to(sink.port, timeout_s=1))}, backoff_min=0.1)
        await outbox.put([("m", "mail", mail.compose("m", "smame@example.jp", ["ops@example.jp"], "s", "t", 0.0))])
        assert await outbox.deliver_due() == 0  # past the deadline: failed for now
        deadline = time.monotonic() + 10
        while OutboxTable(store).counts()["sent"] == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            await outbox.deliver_due()  # a retry while the first send is still out must not send it again
        assert OutboxTable(store).counts() == {"pending": 0, "sent": 1, "given_up": 0}
        await asyncio.sleep(0.5)
        assert len(sink.messages) == 1
    finally:
        sink.stop()
        store.close()


async def test_sent_messages_are_forgotten_after_the_keep_time(store_url: str) -> None:
    stand_in = SlackStandIn()
    store = open_url(store_url)
    now = [time.time() - 31 * 86400]
    try:
        outbox = Outbox(store, {"slack": webhook(stand_in)}, clock=lambda: now[0], keep_s=30 * 86400)
        await outbox.put([("old", "slack", slack.compose("old", "x"))])
        assert await outbox.deliver_due() == 1
        now[0] += 30 * 86400  # a day younger than the keep time
        await outbox.put([("new", "slack", slack.compose("new", "x")), ("waiting", "nowhere", b"{}")])
        assert await outbox.deliver_due() == 1  # "waiting" has no channel: given up, and kept a while too
        now[0] += 86400
        runner = asyncio.create_task(outbox.run())
        await asyncio.sleep(0.5)
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        keys = [k for (k,) in store.execute("SELECT key FROM outbox ORDER BY key")]
        assert keys == ["new", "waiting"]
    finally:
        stand_in.stop()
        store.close()


async def test_a_webhook_that_answers_a_byte_at_a_time_fails_in_time(tmp_path: Path) -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip() -> None:
        conn, _ = sock.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok":
                if stop.wait(0.7):  # each byte well within a per-read timeout, the whole far beyond it
                    return
                conn.sendall(bytes([byte]))

    threading.Thread(target=drip, daemon=True).start()
    store = SqliteStore(tmp_path / "smame.db")
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    try:
        outbox = Outbox(store, {"slack": SlackChannel(SlackSettings(webhook_url=SecretStr(url), timeout_s=1))})
        await outbox.put([("s", "slack", slack.compose("[smame] ALERT: x", "y"))])
        started = time.monotonic()
        assert await outbox.deliver_due() == 0
        assert time.monotonic() - started < 2.5
        assert outbox.failing["slack"][1] == "no answer within 1 s"
    finally:
        stop.set()
        sock.close()
        store.close()

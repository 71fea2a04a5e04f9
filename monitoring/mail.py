"""Mail: composing a message (pure) and handing it to an SMTP server (the edge)."""

from __future__ import annotations

import hashlib
import smtplib
import ssl
from collections.abc import Sequence
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, getaddresses
from urllib.parse import urlsplit

from kernel.settings import MailSettings
from monitoring.outbox import SendFailed


def compose(
    key: str,
    sender: str,
    recipients: Sequence[str],
    subject: str,
    text: str,
    at: float,
    html: str | None = None,
    attachments: Sequence[tuple[str, bytes]] = (),
) -> bytes:
    """A MIME message: text, an HTML alternative, CSV attachments; its Message-ID is derived from `key`."""
    # Folding at 78 characters moves a long subject whole onto a continuation line, which some clients
    # show with a leading space; RFC 5322 allows lines of 998.
    msg = EmailMessage(policy=SMTP.clone(max_line_length=998))
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    msg["Date"] = formatdate(at, localtime=False)
    # The same message sent again after a crash carries the same id, so mail systems can drop the copy.
    msg["Message-ID"] = f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}@smame>"
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for name, data in attachments:
        msg.add_attachment(data, maintype="text", subtype="csv", filename=name)
    return msg.as_bytes()


class SmtpChannel:
    """Sends composed messages through the configured SMTP server."""

    name = "mail"

    def __init__(self, settings: MailSettings) -> None:
        assert settings.smtp_url is not None
        parts = urlsplit(settings.smtp_url)
        self.implicit_tls = parts.scheme == "smtps"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (465 if self.implicit_tls else 25)
        self.settings = settings
        self.deadline = settings.timeout_s  # for the whole send: a server that drips its answer fails in time
        # The connection itself waits longer: a reply to DATA that comes after the deadline still marks the
        # message sent (see Outbox._send), where giving up on it would send it again.
        self.socket_timeout = 4 * settings.timeout_s
        self.context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2

    def send(self, payload: bytes) -> None:
        """Deliver one message to every address in its To header; raises SendFailed."""
        from email import message_from_bytes

        msg = message_from_bytes(payload, policy=SMTP)
        recipients = [a for _, a in getaddresses(msg.get_all("To", []))]
        s = self.settings
        try:
            if self.implicit_tls:
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    self.host, self.port, timeout=self.socket_timeout, context=self.context
                )
            else:
                smtp = smtplib.SMTP(self.host, self.port, timeout=self.socket_timeout)
            with smtp:
                smtp.ehlo()
                if not self.implicit_tls and s.starttls != "never":
                    if smtp.has_extn("starttls"):
                        smtp.starttls(context=self.context)
                        smtp.ehlo()
                    elif s.starttls == "always":
                        raise SendFailed(f"{self.host}:{self.port} does not offer STARTTLS (mail.starttls = always)")
                if s.username:
                    smtp.login(s.username, s.password.get_secret_value() if s.password else "")
                refused = smtp.sendmail(msg["From"], recipients, payload)
        except (OSError, smtplib.SMTPException) as exc:
            raise SendFailed(f"SMTP {self.host}:{self.port}: {exc}") from exc
        if refused:  # some recipients took it; sending again would duplicate it for them
            raise SendFailed(f"SMTP refused {', '.join(refused)}", permanent=True)

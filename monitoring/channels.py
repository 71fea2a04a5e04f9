"""The one fan-out of a notification to the channels the settings configure (mail, Slack)."""

from __future__ import annotations

from collections.abc import Sequence

from kernel.settings import Settings
from monitoring import mail, slack
from monitoring.outbox import Message


def configured(settings: Settings) -> bool:
    """Whether any channel is set up (else reports and alerts only reach the log)."""
    return bool(settings.mail.smtp_url or settings.slack.enabled)


def fan_out(
    settings: Settings,
    key: str,
    subject: str,
    text: str,
    at: float,
    slack_text: str | None = None,
    html: str | None = None,
    attachments: Sequence[tuple[str, bytes]] = (),
) -> list[Message]:
    """The notification for every configured channel, each queued under `key:<channel>` (so never twice):
    mail with `text` (and `html`, `attachments`), Slack with `slack_text` or else `text`."""
    out: list[Message] = []
    if settings.mail.smtp_url:
        k = f"{key}:mail"
        m = settings.mail
        out.append((k, "mail", mail.compose(k, m.sender, m.recipients, subject, text, at, html, attachments)))
    if settings.slack.enabled:
        out.append((f"{key}:slack", "slack", slack.compose(subject, slack_text or text)))
    return out

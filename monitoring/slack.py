"""Slack: a message as JSON (pure). Posting it is `monitoring.slack_channel`'s, which loads slack-sdk."""

from __future__ import annotations

import json


def escape(text: str) -> str:
    """Text for Slack's mrkdwn with its control characters escaped, as Slack asks: what came from outside (a
    stranger's FTP user name, a unit's topic) can then neither mention `<!channel>` nor hide a link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def compose(title: str, text: str) -> bytes:
    """The stored payload: a plain-text fallback (notifications) and blocks (the message itself); both the
    fallback and the section are mrkdwn, escaped (the header is plain text, shown as it is)."""
    text = escape(text)
    body = {
        "text": f"{escape(title)}\n{text}"[:3000],
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
            # a section holds at most 3,000 characters; the mail and its attachment carry the rest
            {"type": "section", "text": {"type": "mrkdwn", "text": text[:2990] or "-"}},
        ],
    }
    return json.dumps(body, ensure_ascii=False).encode()

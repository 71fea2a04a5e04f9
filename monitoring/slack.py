"""Slack: a message as JSON (pure). Posting it is `monitoring.slack_channel`'s, which loads slack-sdk."""

from __future__ import annotations

import json


def compose(title: str, text: str) -> bytes:
    """The stored payload: a plain-text fallback (notifications) and blocks (the message itself)."""
    body = {
        "text": f"{title}\n{text}"[:3000],
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
            # a section holds at most 3,000 characters; the mail and its attachment carry the rest
            {"type": "section", "text": {"type": "mrkdwn", "text": text[:2990] or "-"}},
        ],
    }
    return json.dumps(body, ensure_ascii=False).encode()

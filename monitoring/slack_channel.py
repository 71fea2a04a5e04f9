"""Posting Slack messages composed by `monitoring.slack` through an incoming webhook or chat.postMessage (the
edge): loaded only where Slack is configured, as slack-sdk takes some 0.04 s to load."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.webhook import WebhookClient

from kernel.settings import SlackSettings
from monitoring.outbox import SendFailed


def _retry_after(headers: Mapping[str, Any]) -> float:
    for k, v in headers.items():
        if k.lower() == "retry-after":
            value = v[0] if isinstance(v, list) else v
            try:
                return max(1.0, float(value))
            except ValueError:
                break
    return 30.0


class SlackChannel:
    """Posts composed messages; slack-sdk's own retries are off, the outbox retries."""

    name = "slack"

    def __init__(self, settings: SlackSettings) -> None:
        self.settings = settings
        self.deadline = float(settings.timeout_s)  # for the whole post, however slowly the server answers
        s = settings
        self.webhook = (
            WebhookClient(s.webhook_url.get_secret_value(), timeout=s.timeout_s, retry_handlers=[])
            if s.webhook_url
            else None
        )
        self.client = (
            WebClient(s.token.get_secret_value(), base_url=s.api_url, timeout=s.timeout_s, retry_handlers=[])
            if s.token and not s.webhook_url
            else None
        )

    def send(self, payload: bytes) -> None:
        """Post one message; raises SendFailed (with Retry-After on HTTP 429)."""
        body = json.loads(payload)
        try:
            if self.webhook is not None:
                resp = self.webhook.send(text=body["text"], blocks=body["blocks"])
                if resp.status_code == 429:
                    raise SendFailed("Slack rate limit (HTTP 429)", retry_after=_retry_after(resp.headers))
                if resp.status_code != 200:
                    raise SendFailed(f"Slack webhook: HTTP {resp.status_code} {resp.body[:200]}")
            else:
                assert self.client is not None
                self.client.chat_postMessage(
                    channel=self.settings.channel or "", text=body["text"], blocks=body["blocks"]
                )
        except SlackApiError as exc:
            if exc.response.status_code == 429:
                raise SendFailed("Slack rate limit (HTTP 429)", retry_after=_retry_after(exc.response.headers)) from exc
            raise SendFailed(f"Slack API: {exc.response.get('error', exc.response.status_code)}") from exc
        except (OSError, SlackClientError) as exc:  # refused, DNS, timeouts (urllib's URLError is an OSError)
            raise SendFailed(f"Slack: {exc}") from exc

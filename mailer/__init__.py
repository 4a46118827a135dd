"""Enqueue email for the relay: `mailer.send`, `mailer.send_many`, `await mailer.asend`.

Importing this package starts nothing: the broker connection opens on the first send.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from mailer.client import Mailer, default_mailer, reset_default_mailer
from mailer.errors import ConfigError, InvalidMessage, MailerError, PublishError
from mailer.lifecycle import MessageStatus, status
from mailer.message import Attachment, Message
from mailer.smtpapi import SMTPAPIHeader

__all__ = [
    "Attachment",
    "ConfigError",
    "InvalidMessage",
    "Mailer",
    "MailerError",
    "Message",
    "MessageStatus",
    "PublishError",
    "SMTPAPIHeader",
    "asend",
    "cancel",
    "reset_default_mailer",
    "send",
    "send_many",
    "status",
]


def send(
    *,
    to: str | Sequence[str],
    subject: str,
    text: str | None = None,
    html: str | None = None,
    from_addr: str | None = None,
    cc: str | Sequence[str] | None = None,
    bcc: str | Sequence[str] | None = None,
    reply_to: str | Sequence[str] | None = None,
    headers: Mapping[str, str] | None = None,
    attachments: Sequence[Any] | None = None,
    smtpapi: SMTPAPIHeader | Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
    lane: str | None = None,
    send_at: datetime | float | None = None,
    ignore_suppressions: bool = False,
    relay: str | None = None,
) -> str:
    """Validates, renders and enqueues one message; returns its id (the Message-ID's local part).
    `lane`: its priority lane (MAILER_LANES; default MAILER_DEFAULT_LANE). `send_at`: an aware
    datetime or UNIX seconds to send it at (any horizon; `cancel(id)` calls it back).
    `ignore_suppressions`: send even to recipients on a suppression list (mail that must go,
    such as legal notices). `relay`: the named relay it goes through (docs/relays.md; one not
    configured is refused here); None: the workers' `default` relay."""
    return default_mailer().send_message(
        Message(
            to=to,
            subject=subject,
            text=text,
            html=html,
            from_addr=from_addr,
            cc=cc,
            bcc=bcc,
            reply_to=reply_to,
            headers=headers,
            attachments=attachments,
            smtpapi=smtpapi,
            idempotency_key=idempotency_key,
        ),
        lane=lane,
        send_at=send_at,
        ignore_suppressions=ignore_suppressions,
        relay=relay,
    )


def cancel(message_id: str) -> bool:
    """Cancels a scheduled or still-queued message; False when it is sent or being sent."""
    return default_mailer().cancel(message_id)


def send_many(
    messages: Iterable[Message | Mapping[str, Any]],
    *,
    lane: str | None = None,
    send_at: datetime | float | None = None,
    relay: str | None = None,
) -> list[str]:
    """Enqueues many messages in few broker round trips; ids come back in order. A mapping may
    name its own `lane`, `send_at` and `relay`; the arguments are the others'."""
    return default_mailer().send_many(messages, lane=lane, send_at=send_at, relay=relay)


async def asend(**fields: Any) -> str:
    """`send` for asyncio apps: never blocks the event loop."""
    return await default_mailer().asend(**fields)


async def asend_many(
    messages: Iterable[Message | Mapping[str, Any]], *, relay: str | None = None
) -> list[str]:
    return await default_mailer().asend_many(messages, relay=relay)

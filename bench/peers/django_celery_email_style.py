"""Peer "django-celery-email style": what django-celery-email does, with Django's own mail stack.

The producer builds `django.core.mail.EmailMessage`s, turns each into a dict and publishes one
task per chunk of 10 (CELERY_EMAIL_CHUNK_SIZE); the task opens a fresh connection with Django's
SMTP backend, sends the chunk one message at a time (each rendered in the worker) and closes
it: a new SMTP session per chunk. Prefork with 2 processes, Celery defaults otherwise.

    BENCH_BROKER_URL=... BENCH_SMTP_HOST=127.0.0.1 BENCH_SMTP_PORT=PORT \\
        celery -A bench.peers.django_celery_email_style worker --pool prefork -c 2 -Q djce
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from django.conf import settings

from bench.common import BODY, FROM_ADDR, SUBJECT, recipient

if not settings.configured:
    settings.configure(
        EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
        EMAIL_HOST=os.environ.get("BENCH_SMTP_HOST", "127.0.0.1"),
        EMAIL_PORT=int(os.environ.get("BENCH_SMTP_PORT", "25")),
        EMAIL_HOST_USER="",  # smtp-sink cannot authenticate: no AUTH, like ours in the bench
        EMAIL_HOST_PASSWORD="",
        EMAIL_USE_TLS=False,
        DEFAULT_CHARSET="utf-8",
        USE_TZ=True,
    )

from django.core.mail import EmailMessage, get_connection

QUEUE = "djce"
CHUNK_SIZE = 10

log = logging.getLogger(__name__)

app = Celery("djce", broker=os.environ.get("BENCH_BROKER_URL", "memory://"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)


def email_to_dict(message: EmailMessage) -> dict[str, Any]:
    """As djcelery_email.utils.email_to_dict, for a plain text message."""
    return {
        "subject": message.subject,
        "body": message.body,
        "from_email": message.from_email,
        "to": message.to,
        "bcc": message.bcc,
        "cc": message.cc,
        "reply_to": message.reply_to,
        "headers": message.extra_headers,
        "attachments": [],
    }


def dict_to_email(data: dict[str, Any]) -> EmailMessage:
    return EmailMessage(
        subject=data["subject"],
        body=data["body"],
        from_email=data["from_email"],
        to=data["to"],
        bcc=data["bcc"],
        cc=data["cc"],
        reply_to=data["reply_to"],
        headers=data["headers"],
    )


@app.task(name="djcelery_email_send_multiple", ignore_result=True)
def send_emails(messages: list[dict[str, Any]], backend_kwargs: dict[str, Any]) -> int:
    """As djcelery_email.tasks.send_emails: one connection for the chunk, one send per message."""
    conn = get_connection(backend=settings.EMAIL_BACKEND, **backend_kwargs)
    try:
        conn.open()
    except Exception:
        log.exception("Cannot reach EMAIL_BACKEND %s", settings.EMAIL_BACKEND)
    sent = 0
    for message in messages:
        try:
            sent += conn.send_messages([dict_to_email(message)]) or 0
        except Exception as exc:
            log.warning("Failed to send email message to %r, retrying. (%r)", message["to"], exc)
            send_emails.retry([[message], backend_kwargs], exc=exc, throw=False)
    conn.close()
    return sent


def build(i: int) -> EmailMessage:
    return EmailMessage(
        subject=SUBJECT,
        body=BODY,
        from_email=FROM_ADDR,
        to=[recipient(i)],
    )


def produce(count: int, offset: int = 0) -> None:
    """The app side (CeleryEmailBackend.send_messages): chunks of 10, one task each."""
    messages = [build(i) for i in range(offset, offset + count)]
    for start in range(0, len(messages), CHUNK_SIZE):
        chunk = messages[start : start + CHUNK_SIZE]
        send_emails.delay([email_to_dict(m) for m in chunk], {})

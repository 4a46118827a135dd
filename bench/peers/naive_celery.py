"""Peer "naive Celery": the common hand-rolled setup.

One task per message; the producer builds each message with `email.message.EmailMessage` and
publishes it with `.delay()`; a prefork worker with 2 processes, each child holding one
persistent `smtplib` connection that it reopens when the server drops it. Celery defaults
otherwise (early acks, prefetch 4, JSON).

    BENCH_BROKER_URL=redis://127.0.0.1:PORT/1 BENCH_SMTP_HOST=127.0.0.1 BENCH_SMTP_PORT=PORT \\
        celery -A bench.peers.naive_celery worker --pool prefork -c 2 -Q naive
"""

from __future__ import annotations

import os
import smtplib
from email.message import EmailMessage
from email.utils import make_msgid

from celery import Celery, signals

from bench.common import BODY, ENVELOPE_FROM, FROM_ADDR, SUBJECT, recipient

QUEUE = "naive"

app = Celery("naive_celery", broker=os.environ.get("BENCH_BROKER_URL", "memory://"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)

_smtp: smtplib.SMTP | None = None


@signals.worker_process_init.connect
def _forget_parent_connection(**_: object) -> None:
    """A connection opened before the fork must not be shared by the children."""
    global _smtp
    _smtp = None


def _connection() -> smtplib.SMTP:
    global _smtp
    if _smtp is None:
        _smtp = smtplib.SMTP(
            os.environ["BENCH_SMTP_HOST"], int(os.environ["BENCH_SMTP_PORT"]), timeout=60
        )
        _smtp.ehlo()
    return _smtp


@app.task(name="naive.send_email")
def send_email(mail_from: str, rcpt_to: list[str], message: str) -> None:
    global _smtp
    try:
        _connection().sendmail(mail_from, rcpt_to, message)
    except smtplib.SMTPServerDisconnected:
        _smtp = None
        _connection().sendmail(mail_from, rcpt_to, message)


def build(i: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = FROM_ADDR
    msg["To"] = recipient(i)
    msg["Subject"] = SUBJECT
    msg["Message-ID"] = make_msgid(domain="example.com")
    msg.set_content(BODY)
    return msg


def produce(count: int, offset: int = 0) -> None:
    """The app side: build a message, publish one task."""
    for i in range(offset, offset + count):
        msg = build(i)
        send_email.delay(ENVELOPE_FROM, [recipient(i)], msg.as_string())

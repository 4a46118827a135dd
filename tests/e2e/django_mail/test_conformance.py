"""Django's own email backend tests (vendored.py) against `mailer.django.EmailBackend`, through
the real queue, a real worker process and the development SMTP sink.

The mailbox is what the sink received, read as Django's SMTP tests read theirs (the bytes,
trailing blank stripped, parsed with the modern email policy), in the order the backend queued
the messages. docs/django.md lists the tests the mailer deliberately differs on.
"""

from __future__ import annotations

import email.message
import secrets
import unittest
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import pytest
import redis

from tests.support.django_settings import configure

configure()

from django.core import mail  # noqa: E402
from django.core.mail import EmailMessage  # noqa: E402
from django.test import SimpleTestCase  # noqa: E402

import mailer  # noqa: E402
from devkit.redis_server import RedisServer  # noqa: E402
from devkit.sink import Received, SinkServer, TLSMaterial  # noqa: E402
from devkit.worker import WorkerProcess  # noqa: E402
from mailer.client import Mailer  # noqa: E402
from mailer.message import Rendered  # noqa: E402
from tests.e2e.django_mail.vendored import (  # noqa: E402
    BaseEmailBackendTests,
    SMTPBackendBehaviours,
    message_from_bytes,
)
from tests.support.helpers import wait_until  # noqa: E402
from tests.support.relay import relay_env  # noqa: E402

# The tests we deliberately differ on, each explained in docs/django.md.
DIFFERENCES = {
    # Encoding formats; Django's later versions expect what the mailer sends.
    "test_send_unicode": "a non-ASCII Subject as base64 encoded-words, not Q",
    "test_send_verbose_name": "a non-ASCII display name as base64 encoded-words, not Q",
    "test_send_long_lines": "mostly non-ASCII text as base64, not quoted-printable",
    "test_html_send_mail": "a text part ends with a line break",
    "test_html_mail_admins": "a text part ends with a line break",
    "test_html_mail_managers": "a text part ends with a line break",
    # The relay delivers to real mailboxes only.
    "test_recipient_without_domain": "addresses without a domain are refused",
    "test_lazy_addresses": "addresses without a domain are refused",
    # Display-only To headers naming non-recipients are refused.
    "test_encodes_idna_in_smtp_commands": "a To header differing from to= is refused",
}


@pytest.fixture(scope="class")
def django_relay(
    request: pytest.FixtureRequest, redis_server: RedisServer, tls_material: TLSMaterial
) -> Iterator[None]:
    """A sink, a worker and the producer's environment for the whole class; every message the
    backend queues is recorded (by id, in order) so the mailbox can wait for exactly those."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    key = "SG." + secrets.token_urlsafe(16)[:22] + "." + secrets.token_urlsafe(32)[:43]
    sink = SinkServer(tls="starttls", auth=("apikey", key), tls_material=tls_material).start()
    env = relay_env(redis_server.url, sink, tls_material, key)
    published: list[str] = []
    publish = Mailer.publish_rendered

    def recording(self: Mailer, rendered: Sequence[Rendered], **kwargs: Any) -> list[str]:
        ids = publish(self, rendered, **kwargs)
        published.extend(ids)
        return ids

    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.setattr(Mailer, "publish_rendered", recording)
        mailer.reset_default_mailer()
        worker = WorkerProcess(env, name="django-conformance").start()
        request.cls.sink = sink
        request.cls.queued = published
        try:
            yield
        finally:
            worker.stop(timeout=20)
            sink.stop()
            mailer.reset_default_mailer()


@pytest.mark.usefixtures("django_relay")
class RelayMailerBackendTests(BaseEmailBackendTests, SMTPBackendBehaviours, SimpleTestCase):
    email_backend = "mailer.django.EmailBackend"
    sink: ClassVar[SinkServer]
    queued: ClassVar[list[str]]

    def setUp(self) -> None:
        super().setUp()
        self.flush_mailbox()

    def published(self) -> list[str]:
        return list(self.queued)

    def _delivered(self) -> list[Received]:
        """What the sink received for every message queued since the last flush, in queue
        order (waits for each; the worker delivers asynchronously)."""
        wanted = list(self.queued)

        def by_id() -> dict[str, Received]:
            return {
                (r.message_id or "").split("@", 1)[0]: r for r in self.sink.received if r.message_id
            }

        arrived = wait_until(lambda: set(wanted) <= set(by_id()), timeout=60)
        assert arrived, f"not delivered: {sorted(set(wanted) - set(by_id()))}"
        received = by_id()
        return [received[i] for i in wanted]

    def get_mailbox_content(self) -> list[email.message.EmailMessage]:
        return [message_from_bytes(r.data.rstrip()) for r in self._delivered()]

    def get_smtp_envelopes(self) -> list[dict[str, Any]]:
        return [{"mail_from": r.mail_from, "rcpt_tos": list(r.rcpt_tos)} for r in self._delivered()]

    def flush_mailbox(self) -> None:
        self._delivered()
        self.queued.clear()
        self.sink.reset()

    def test_idn_envelope_without_display_headers(self) -> None:
        """Django's test_encodes_idna_in_smtp_commands without its display-only To header."""
        email = EmailMessage(
            from_email="lists@discussão.example.org",
            to=["To Example <to@漢字.example.com>"],
            bcc=["monitor@discussão.example.org"],
            headers={"From": "Gestor de listas <lists@discussão.example.org>"},
        )
        self.assertEqual(mail.get_connection().send_messages([email]), 1)
        envelope = self.get_smtp_envelopes()[0]
        self.assertEqual(envelope["mail_from"], "lists@xn--discusso-xza.example.org")
        self.assertEqual(
            envelope["rcpt_tos"],
            ["to@xn--p8s937b.example.com", "monitor@xn--discusso-xza.example.org"],
        )
        message = self.get_the_message()
        self.assertEqual(message["From"], "Gestor de listas <lists@xn--discusso-xza.example.org>")
        self.assertEqual(message["To"], "To Example <to@xn--p8s937b.example.com>")


# A documented difference must still fail (an unexpected success fails the run): when Django or
# the mailer changes so that it passes, the entry goes.
for _name in DIFFERENCES:
    setattr(
        RelayMailerBackendTests,
        _name,
        unittest.expectedFailure(getattr(RelayMailerBackendTests, _name)),
    )

"""`EMAIL_BACKEND = "mailer.django.EmailBackend"` with real Django, through a real worker to the
SMTP test server: what Django users build arrives with the right envelope and parts."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from email.mime.image import MIMEImage

import pytest
import redis

from tests.support.django_settings import configure

configure()

from django.core import mail  # noqa: E402
from django.core.mail import EmailMessage, EmailMultiAlternatives  # noqa: E402

import mailer  # noqa: E402
from devkit.worker import WorkerProcess  # noqa: E402
from mailer.django import EmailBackend  # noqa: E402
from tests.support.relay import Relay  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def unix(text: str) -> str:
    """Text parts come back with the wire's CRLF line endings."""
    return text.replace("\r\n", "\n")


def test_django_messages_arrive_with_envelope_headers_and_parts(
    relay: Callable[..., Relay],
    workers: Callable[..., WorkerProcess],
) -> None:
    sink, env = relay()
    workers(env)

    rich = EmailMultiAlternatives(
        subject="Rechnung für März",
        body="Plain text body\nsecond line\n",
        from_email="Billing <billing@example.com>",
        to=["Alice <alice@example.com>"],
        cc=["carol@example.com"],
        bcc=["audit@example.com"],
        reply_to=["support@example.com"],
        headers={"X-Campaign": "march-2026"},
    )
    rich.attach_alternative("<p>HTML <b>body</b></p>", "text/html")
    rich.attach("invoice.csv", "item,price\nwidget,3\n", "text/csv")
    logo = MIMEImage(PNG, "png")
    logo.add_header("Content-Disposition", "attachment", filename="logo.png")
    rich.attach(logo)
    simple = [
        EmailMessage(subject=f"simple {i}", body=f"body {i}\n", to=[f"u{i}@example.com"])
        for i in range(3)
    ]
    # Through Django's own API: the configured backend, one send_messages call for all four.
    with mail.get_connection() as connection:
        assert isinstance(connection, EmailBackend)
        assert connection.send_messages([rich, *simple]) == 4
    assert mail.send_mail("via send_mail", "hi\n", None, ["v@example.com"]) == 1
    assert sink.wait_for(5, timeout=60), f"only {len(sink.received)} arrived"

    by_subject = {}
    for received in sink.received:
        parsed = email.message_from_bytes(received.data, policy=email.policy.default)
        by_subject[str(parsed["Subject"])] = (received, parsed)
    assert set(by_subject) == {
        "Rechnung für März",
        "simple 0",
        "simple 1",
        "simple 2",
        "via send_mail",
    }
    received, parsed = by_subject["Rechnung für März"]
    # Envelope: bcc is a recipient but never a header.
    assert received.mail_from == "billing@example.com"
    assert sorted(received.rcpt_tos) == [
        "alice@example.com",
        "audit@example.com",
        "carol@example.com",
    ]
    assert "Bcc" not in parsed and b"audit@example.com" not in received.data
    assert parsed["From"].addresses[0].display_name == "Billing"
    assert str(parsed["To"]) == "Alice <alice@example.com>"
    assert str(parsed["Cc"]) == "carol@example.com"
    assert str(parsed["Reply-To"]) == "support@example.com"
    assert parsed["X-Campaign"] == "march-2026"
    # Parts: text and HTML alternatives, a text/csv and an image/png attachment.
    assert unix(parsed.get_body(("plain",)).get_content()) == "Plain text body\nsecond line\n"
    assert parsed.get_body(("html",)).get_content().strip() == "<p>HTML <b>body</b></p>"
    attachments = {a.get_filename(): a for a in parsed.iter_attachments()}
    assert set(attachments) == {"invoice.csv", "logo.png"}
    assert attachments["invoice.csv"].get_content_type() == "text/csv"
    assert unix(attachments["invoice.csv"].get_content()) == "item,price\nwidget,3\n"
    assert attachments["logo.png"].get_content_type() == "image/png"
    assert attachments["logo.png"].get_content() == PNG

    received, parsed = by_subject["via send_mail"]
    assert received.mail_from == "app@example.com"  # DEFAULT_FROM_EMAIL
    assert received.rcpt_tos == ("v@example.com",)


def _queued(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.llen("mailer"))
    finally:
        client.close()


def test_an_invalid_address_refuses_the_call_and_publishes_nothing(
    redis_url: str, producer_env: Callable[[dict[str, str]], None]
) -> None:
    producer_env({"MAILER_BROKER_URL": redis_url})
    good = EmailMessage(subject="fine", body="x", to=["ok@example.com"])
    bad = EmailMessage(subject="bad", body="x", to=["ok@example.com"], cc=["not an address"])
    backend = EmailBackend()
    with pytest.raises(mailer.InvalidMessage) as info:
        backend.send_messages([good, bad])
    assert info.value.field == "messages[1].cc"
    with pytest.raises(mailer.InvalidMessage) as info:
        backend.send_messages([bad])
    assert info.value.field == "cc"
    assert _queued(redis_url) == 0, "something was published for a refused call"

    silent = EmailBackend(fail_silently=True)
    assert silent.send_messages([bad]) == 0
    assert _queued(redis_url) == 0
    # fail_silently skips the bad one and enqueues the rest, like Django's SMTP backend.
    assert silent.send_messages([bad, good]) == 1
    assert _queued(redis_url) == 1
    assert mail.send_mail("s", "b", None, ["a@ex ample.com"], fail_silently=True) == 0


ICS = (
    "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Example//Planner//EN\r\nMETHOD:REQUEST\r\n"
    "BEGIN:VEVENT\r\nUID:review-42@example.com\r\nDTSTAMP:20260301T090000Z\r\n"
    "DTSTART:20260302T100000Z\r\nDTEND:20260302T110000Z\r\nSUMMARY:Quartalsrückblick\r\n"
    "ORGANIZER;CN=Planner:mailto:planner@example.com\r\n"
    "ATTENDEE;RSVP=TRUE:mailto:jörg@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
)


def test_a_django_project_sends_lazy_idn_mass_and_calendar_mail_unchanged(
    relay: Callable[..., Relay],
    workers: Callable[..., WorkerProcess],
) -> None:
    """What a Django project builds, as the sink received it (bytes): gettext_lazy subjects and
    addresses, an IDN recipient, send_mass_mail with one recipient-less message, a meeting
    invitation (text/calendar; method=REQUEST), a Reply-To header with two addresses."""
    from django.utils.translation import gettext_lazy as _

    sink, env = relay()
    workers(env)

    invite = EmailMultiAlternatives(
        subject=_("Einladung: Quartalsrückblick"),
        body=_("Sie sind eingeladen.\n"),
        from_email=_("Planner <planner@example.com>"),
        to=[_("Jörg <joerg@bücher.example>")],
        headers={"Reply-To": "planner@example.com, Assistenz <assist@example.com>"},
    )
    invite.attach_alternative("<p>Sie sind eingeladen.</p>", "text/html")
    invite.attach_alternative(ICS, "text/calendar; method=REQUEST")
    with mail.get_connection() as connection:
        assert connection.send_messages([invite]) == 1
    mass = (
        (_("Newsletter März"), "Hallo 1\n", None, ["n1@example.com"]),
        ("no recipients", "skipped\n", None, []),
        ("Newsletter März", "Hallo 2\n", "News <news@öäü.com>", [_("n2@example.com")]),
    )
    assert mail.send_mass_mail(mass) == 2
    assert sink.wait_for(3, timeout=60), f"only {len(sink.received)} arrived"

    by_rcpt = {received.rcpt_tos: received for received in sink.received}
    assert set(by_rcpt) == {
        ("joerg@xn--bcher-kva.example",),
        ("n1@example.com",),
        ("n2@example.com",),
    }

    data = by_rcpt[("joerg@xn--bcher-kva.example",)].data
    head, _sep, body = data.partition(b"\r\n\r\n")
    # The header block as sent: IDN domain in xn-- form, Reply-To split into two mailboxes.
    assert b"\r\nFrom: Planner <planner@example.com>\r\n" in b"\r\n" + head
    assert b"\r\nTo: =?utf-8?b?SsO2cmc=?= <joerg@xn--bcher-kva.example>\r\n" in head
    assert b"\r\nReply-To: planner@example.com, Assistenz <assist@example.com>\r\n" in head
    assert b"\r\nSubject: =?utf-8?b?" in head
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert str(parsed["Subject"]) == "Einladung: Quartalsrückblick"
    # One multipart/alternative: text, HTML, then the invitation with its method parameter.
    assert parsed.get_content_type() == "multipart/alternative"
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html", "text/calendar"]
    calendar = parts[2]
    assert calendar.get_param("method") == "REQUEST"
    assert b'Content-Type: text/calendar; charset="utf-8"; method="REQUEST"\r\n' in body
    assert calendar.get_content().replace("\r\n", "\n") == ICS.replace("\r\n", "\n")
    assert unix(parts[0].get_content()) == "Sie sind eingeladen.\n"

    first = by_rcpt[("n1@example.com",)]
    assert first.mail_from == "app@example.com"  # DEFAULT_FROM_EMAIL
    second = by_rcpt[("n2@example.com",)]
    assert second.mail_from == "news@xn--4ca9at.com"
    assert b"\r\nFrom: News <news@xn--4ca9at.com>\r\n" in b"\r\n" + second.data
    for received in (first, second):
        parsed = email.message_from_bytes(received.data, policy=email.policy.default)
        assert str(parsed["Subject"]) == "Newsletter März"
    print(data.decode("ascii"))  # the bytes, for whoever reads the test log (-s)

"""`mailer.django` in-process: the sender-settings check, and how Django messages become
`mailer.Message`s (lazy strings, Reply-To, recipients). Delivery is in tests/e2e/."""

from __future__ import annotations

import pytest

from tests.support.django_settings import configure

configure()

from django.core import checks, mail  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.core.mail import EmailMessage  # noqa: E402
from django.test import override_settings  # noqa: E402
from django.utils.translation import gettext_lazy  # noqa: E402

import mailer  # noqa: E402
from mailer.django import EmailBackend, check_sender_settings, to_message  # noqa: E402


def _ids(errors: list[checks.CheckMessage]) -> list[str | None]:
    return [e.id for e in errors]


def test_the_configured_senders_pass_the_check() -> None:
    assert check_sender_settings() == []
    # Registered by MailerConfig (INSTALLED_APPS), so `manage.py check` runs it.
    assert [e for e in checks.run_checks() if (e.id or "").startswith("mailer.")] == []


@override_settings(DEFAULT_FROM_EMAIL="webmaster@localhost")
def test_django_default_sender_is_a_system_check_error_naming_the_setting() -> None:
    errors = [e for e in checks.run_checks() if (e.id or "").startswith("mailer.")]
    assert _ids(errors) == ["mailer.E001"]
    assert "DEFAULT_FROM_EMAIL = 'webmaster@localhost'" in errors[0].msg
    assert errors[0].hint is not None and "Set DEFAULT_FROM_EMAIL to an address" in errors[0].hint
    with pytest.raises(ImproperlyConfigured, match="DEFAULT_FROM_EMAIL"):
        EmailBackend()


@override_settings(SERVER_EMAIL="root@localhost", ADMINS=[("Ops", "ops@example.com")])
def test_default_server_email_with_admins_fails_loudly_even_with_fail_silently() -> None:
    assert _ids(check_sender_settings()) == ["mailer.E002"]
    # Django's error reports call mail_admins(..., fail_silently=True): without this the
    # reports would be dropped without a trace.
    with pytest.raises(ImproperlyConfigured, match="SERVER_EMAIL"):
        mail.mail_admins("500", "trace", fail_silently=True)


@override_settings(SERVER_EMAIL="root@localhost", ADMINS=[], MANAGERS=[])
def test_default_server_email_without_admins_is_not_an_error() -> None:
    assert check_sender_settings() == []


def test_lazy_strings_are_resolved() -> None:
    _ = gettext_lazy
    email = EmailMessage(
        _("Subject"),
        _("body"),
        _("from@example.com"),
        [_("to@example.com")],
        cc=[_("cc@example.com")],
        bcc=[_("bcc@example.com")],
        reply_to=[_("reply@example.com")],
        headers={_("X-Campaign"): _("spring")},
    )
    message = to_message(email)
    assert message.subject == "Subject" and type(message.subject) is str
    assert message.text == "body" and type(message.text) is str
    assert message.from_addr == "from@example.com"
    assert message.to == ["to@example.com"] and type(message.to[0]) is str
    assert message.headers == {"X-Campaign": "spring"}
    rendered = message.render()
    assert rendered.rcpt_to == ("to@example.com", "cc@example.com", "bcc@example.com")
    assert b"\r\nReply-To: reply@example.com\r\n" in rendered.data


def test_reply_to_header_wins_and_is_split_into_addresses() -> None:
    email = EmailMessage(
        "s",
        "b",
        to=["to@example.com"],
        reply_to=["ignored@example.com"],
        headers={"reply-to": '"Help, Desk" <help@example.com>, b@example.com'},
    )
    message = to_message(email)
    assert message.reply_to == ['"Help, Desk" <help@example.com>', "b@example.com"]
    assert message.headers is None
    rendered = message.render()
    assert b'\r\nReply-To: "Help, Desk" <help@example.com>, b@example.com\r\n' in rendered.data


def test_an_unparsable_reply_to_header_names_the_header() -> None:
    email = EmailMessage("s", "b", to=["to@example.com"], headers={"Reply-To": "a@, <"})
    backend = EmailBackend()
    with pytest.raises(mailer.InvalidMessage) as info:
        backend.send_messages([email])
    assert info.value.field.startswith("headers.Reply-To")


def test_invalid_addresses_say_invalid_address_as_django_does() -> None:
    backend = EmailBackend()
    with pytest.raises(ValueError, match="Invalid address") as info:
        backend.send_messages([EmailMessage("s", "b", to=["to@"])])
    assert isinstance(info.value, mailer.InvalidMessage) and info.value.field == "to"


def test_messages_without_recipients_are_skipped_before_the_broker() -> None:
    # No broker is configured here: nothing may be rendered or published for them.
    backend = EmailBackend()
    empty = EmailMessage("s", "b", "from@example.com", to=[])
    blank = EmailMessage("s", "b", "from@example.com", to=[""], cc=[gettext_lazy("")])
    assert backend.send_messages(iter([empty, blank])) == 0
    assert backend.send_messages([]) == 0


def test_from_header_wins_over_from_email_and_header_values_are_strings() -> None:
    email = EmailMessage(
        "s",
        "b",
        "plain@example.com",
        ["to@example.com"],
        headers={"From": "Support Team <plain@example.com>", "X-Priority": 1},
    )
    message = to_message(email)
    assert message.from_addr == "Support Team <plain@example.com>"
    assert message.headers == {"X-Priority": "1"}  # Django writes str(value)
    rendered = message.render()
    assert rendered.mail_from == "plain@example.com"
    assert b"\r\nFrom: Support Team <plain@example.com>\r\n" in b"\r\n" + rendered.data


def test_display_only_to_header_is_refused_naming_it() -> None:
    email = EmailMessage(
        "s", "b", to=["real@example.com"], headers={"To": "Everyone <list@example.com>"}
    )
    with pytest.raises(mailer.InvalidMessage) as info:
        EmailBackend().send_messages([email])
    assert info.value.field == "headers.To"
    assert "the mailer writes To from to=" in info.value.problem


def test_an_invalid_from_header_names_the_header() -> None:
    email = EmailMessage("s", "b", to=["to@example.com"], headers={"from": "nobody@"})
    with pytest.raises(ValueError, match="Invalid address") as info:
        EmailBackend().send_messages([email])
    assert isinstance(info.value, mailer.InvalidMessage) and info.value.field == "headers.from"


def test_lane_and_send_at_ride_on_the_django_message(redis_url: str) -> None:
    """`message.lane` picks the lane's queue; `message.send_at` puts the batch in the schedule."""
    import time

    import redis
    from django.core.mail import EmailMessage

    from mailer.client import Mailer
    from mailer.config import Settings
    from mailer.django import EmailBackend
    from mailer.wire import SCHEDULE_DUE

    settings = Settings.from_env(
        {"MAILER_BROKER_URL": redis_url, "MAILER_LANES": "transactional,bulk"}
    )
    backend = EmailBackend(mailer=Mailer(settings))
    urgent = EmailMessage("reset", "x", "shop@example.com", ["a@example.com"])
    urgent.lane = "transactional"  # type: ignore[attr-defined]
    later = EmailMessage("digest", "x", "shop@example.com", ["b@example.com"])
    later.send_at = time.time() + 3600  # type: ignore[attr-defined]
    assert backend.send_messages([urgent, later]) == 2
    client = redis.Redis.from_url(redis_url)
    assert client.llen("mailer.transactional") == 1
    assert client.llen("mailer.bulk") == 0 and client.zcard(SCHEDULE_DUE) == 1


def test_a_relay_rides_on_the_django_message(redis_url: str) -> None:
    """`message.relay` names the relay (checked against the registry); an unknown one is an
    InvalidMessage naming `relay`, and nothing of the call is queued."""
    import base64
    import json

    import redis
    from django.core.mail import EmailMessage

    from mailer.client import Mailer
    from mailer.config import Settings
    from mailer.django import EmailBackend
    from mailer.relays import RelaySpec, RelayStore

    client = redis.Redis.from_url(redis_url)
    RelayStore(client).apply([RelaySpec.from_mapping("tenant-42", {"host": "smtp.example.com"})])
    backend = EmailBackend(mailer=Mailer(Settings.from_env({"MAILER_BROKER_URL": redis_url})))
    tenant = EmailMessage("hi", "x", "shop@example.com", ["a@example.com"])
    tenant.relay = "tenant-42"  # type: ignore[attr-defined]
    plain = EmailMessage("hi", "x", "shop@example.com", ["b@example.com"])
    unknown = EmailMessage("hi", "x", "shop@example.com", ["c@example.com"])
    unknown.relay = "tenant-43"  # type: ignore[attr-defined]
    with pytest.raises(mailer.InvalidMessage) as info:
        backend.send_messages([tenant, unknown])
    assert info.value.field == "messages[1].relay" and client.llen("mailer") == 0
    assert backend.send_messages([tenant, plain]) == 2
    envelope = json.loads(client.lrange("mailer", 0, -1)[0])
    payloads = json.loads(base64.b64decode(envelope["body"]))[0][0]
    assert [p["meta"].get("relay") for p in payloads] == ["tenant-42", None]

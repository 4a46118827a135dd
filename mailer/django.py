"""A Django email backend: ``EMAIL_BACKEND = "mailer.django.EmailBackend"``.

Django's `EmailMessage` / `EmailMultiAlternatives` become `mailer.Message`s, are validated and
rendered in the web process, and are enqueued with one broker round trip (one batch task per 100
messages) instead of one SMTP session per request. What Django's own SMTP backend accepts is
accepted here (docs/django.md lists the deliberate differences): lazy strings, IDN domains
(sent in their ``xn--`` form), any iterable of messages, messages without recipients (skipped
and not counted), a ``Reply-To`` in ``headers=`` (it wins over ``reply_to=``, and may hold
several addresses), alternatives of any type (``text/calendar; method=REQUEST``).

Extras read from each Django message, if set: ``message.smtpapi`` (an `SMTPAPIHeader` or a dict
of X-SMTPAPI fields), ``message.idempotency_key``, ``message.lane`` (a priority lane,
MAILER_LANES), ``message.relay`` (a named relay, docs/relays.md) and ``message.send_at`` (an
aware datetime or UNIX seconds: held in the durable schedule until then, docs/scheduling.md).

Settings that cannot work (Django's default ``webmaster@localhost`` / ``root@localhost``
senders) are reported by the system check of `MailerConfig` (``INSTALLED_APPS``:
``"mailer.django.MailerConfig"``) and, without it, when the backend is first created.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from email.mime.base import MIMEBase
from email.utils import getaddresses
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.utils.encoding import force_str
from django.utils.functional import Promise

from mailer.client import Mailer, default_mailer
from mailer.errors import InvalidMessage, MailerError, PublishError
from mailer.headers import parse_mailbox
from mailer.message import Attachment, Message, Rendered
from mailer.schedule import due_time
from mailer.smtpapi import SMTPAPIHeader
from mailer.wire import DEFAULT_RELAY

__all__ = ["EmailBackend", "MailerConfig", "check_sender_settings", "to_message"]

log = logging.getLogger("mailer.django")


# ---------------------------------------------------------------------------------------------
# Settings check


def check_sender_settings() -> list[checks.CheckMessage]:
    """Errors for sender settings the relay would refuse: ``DEFAULT_FROM_EMAIL`` (every message
    without a from_email) and, when ``ADMINS`` or ``MANAGERS`` is set, ``SERVER_EMAIL`` (the
    sender of `mail_admins`, which Django's error reports call with fail_silently=True, so a bad
    value would lose every report without a trace)."""
    wanted = [("DEFAULT_FROM_EMAIL", "mailer.E001")]
    if getattr(settings, "ADMINS", None) or getattr(settings, "MANAGERS", None):
        wanted.append(("SERVER_EMAIL", "mailer.E002"))
    errors: list[checks.CheckMessage] = []
    for name, error_id in wanted:
        value = force_str(getattr(settings, name, ""))
        try:
            parse_mailbox(name, value)
        except InvalidMessage as exc:
            errors.append(
                checks.Error(
                    f"{name} = {value!r} cannot be sent through the relay ({exc.problem}).",
                    hint=(
                        f"Set {name} to an address on a domain verified with the relay, e.g. "
                        f'{name} = "Example <noreply@example.com>".'
                    ),
                    id=error_id,
                )
            )
    return errors


def _check(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    return check_sender_settings()


class MailerConfig(AppConfig):
    """Optional: ``INSTALLED_APPS += ["mailer.django.MailerConfig"]`` reports bad sender
    settings at start-up (`manage.py check`, runserver, migrate) rather than at the first
    send."""

    name = "mailer"
    label = "relay_mailer"
    verbose_name = "relay-mailer"

    def ready(self) -> None:
        checks.register(_check, checks.Tags.compatibility)


def _raise_for_sender_settings() -> None:
    errors = check_sender_settings()
    if errors:
        raise ImproperlyConfigured(
            " ".join(f"{e.msg} {e.hint}" for e in errors)
            + " (mailer.django.EmailBackend; see README, Django.)"
        )


# ---------------------------------------------------------------------------------------------
# Django message -> mailer.Message


def _text(value: Any) -> Any:
    """A lazy string (gettext_lazy) as the str it stands for; anything else unchanged (the
    model reports wrong types, naming the field)."""
    return force_str(value) if isinstance(value, Promise) else value


def _addresses(values: Any) -> list[str]:
    """An address list with lazy strings resolved and empty entries dropped, as Django's
    `EmailMessage.recipients()` drops them."""
    if values is None:
        return []
    if isinstance(values, str):
        return [values] if values else []
    return [address for address in (_text(v) for v in values) if address]


def _quoted(name: str, address: str) -> str:
    if not name:
        return address
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + f'" <{address}>'


def _split_header_addresses(field: str, value: str) -> list[str]:
    """A header value holding several addresses ("a@x, B <b@y>"), split the way Django's
    message() splits address headers (`email.utils.getaddresses`)."""
    pairs = getaddresses([value])
    if not pairs or any(not address for _, address in pairs):
        raise InvalidMessage(field, f"{value!r} is not a list of addresses")
    return [_quoted(name, address) for name, address in pairs]


def _attachment(index: int, item: Any) -> Attachment:
    """A Django attachment: a (filename, content, mimetype) tuple or a MIMEBase part."""
    field = f"attachments[{index}]"
    if isinstance(item, MIMEBase):
        if item.is_multipart():
            raise InvalidMessage(field, "a multipart MIMEBase attachment is not supported")
        content = item.get_payload(decode=True)
        if not isinstance(content, bytes):
            raise InvalidMessage(field, "the MIMEBase part has no payload")
        filename = item.get_filename()
        content_id = item.get("Content-ID")
        if not filename:
            # Django allows an unnamed part (usually an inline image); name it after its type.
            filename = f"part{index}.{item.get_content_subtype()}"
        return Attachment(
            filename=filename,
            content=content,
            mimetype=item.get_content_type(),
            content_id=str(content_id) if content_id else None,
        )
    if isinstance(item, tuple | list) and len(item) == 3:
        filename, content, mimetype = item
        return Attachment(
            filename=_text(filename), content=_text(content), mimetype=_text(mimetype) or None
        )
    raise InvalidMessage(field, f"unsupported Django attachment {type(item).__name__}")


def _has_smtpapi_to(value: Any) -> bool:
    if isinstance(value, SMTPAPIHeader):
        return bool(value.to_dict().get("to"))
    return isinstance(value, Mapping) and bool(value.get("to"))


def to_message(email: EmailMessage) -> Message:
    """One Django message as a `mailer.Message`; raises `InvalidMessage` naming the field."""
    body = _text(email.body)
    text: str | None = None
    html: str | None = None
    if getattr(email, "content_subtype", "plain") == "html":
        html = body
    else:
        text = body
    others: list[tuple[Any, str]] = []
    for alternative in getattr(email, "alternatives", None) or []:
        content, mimetype = _text(alternative[0]), _text(alternative[1])
        if mimetype == "text/html" and html is None:
            html = content
        elif mimetype == "text/plain" and text is None:
            text = content
        else:
            others.append((content, mimetype))
    if text is not None and html is not None and not text:
        text = None  # an HTML-only message Django-style: body "" plus an HTML alternative
    # Django writes str(value) for every header value.
    headers = {_text(k): force_str(v) for k, v in (email.extra_headers or {}).items()}
    reply_to = _addresses(email.reply_to)
    from_addr = _text(email.from_email) or None
    for name in list(headers):
        lower = name.lower()
        if lower == "reply-to":
            # Django writes the header's value over reply_to=, splitting it into addresses.
            reply_to = _split_header_addresses(f"headers.{name}", headers.pop(name))
        elif lower == "from":
            # Django writes it over from_email; here it is the envelope sender too (SendGrid
            # replaces the envelope sender with its own bounce address anyway).
            from_addr = headers.pop(name)
            parse_mailbox(f"headers.{name}", from_addr)  # a refusal names the header
        elif lower in ("to", "cc"):
            raise InvalidMessage(
                f"headers.{name}",
                f"a {name} header differing from {lower}= is not supported: the mailer writes "
                f"{name} from {lower}= (the recipients); pass the addresses there",
            )
    return Message(
        to=_addresses(email.to),
        subject=_text(email.subject),
        text=text,
        html=html,
        alternatives=others or None,
        from_addr=from_addr,
        cc=_addresses(email.cc) or None,
        bcc=_addresses(email.bcc) or None,
        reply_to=reply_to or None,
        headers=headers or None,
        attachments=[_attachment(i, a) for i, a in enumerate(email.attachments or [])] or None,
        smtpapi=getattr(email, "smtpapi", None),
        idempotency_key=getattr(email, "idempotency_key", None),
    )


_ADDRESS_FIELDS = frozenset(
    {"from_addr", "to", "cc", "bcc", "reply_to", "headers.reply-to", "headers.from"}
)


def _django_wording(error: InvalidMessage) -> InvalidMessage:
    """An address refusal says "Invalid address", as Django's (callers match on it)."""
    field = error.field.lower()
    if field in _ADDRESS_FIELDS and not error.problem.startswith("Invalid address"):
        return InvalidMessage(error.field, f"Invalid address: {error.problem}")
    return error


class EmailBackend(BaseEmailBackend):
    """Enqueues Django email for the mailer's workers; no SMTP in the web process.

    `send_messages` validates every message before publishing any: an invalid one refuses the
    whole call (an `InvalidMessage`, a ValueError naming the field, as Django's "Invalid
    address" is) and nothing is queued. With ``fail_silently`` an invalid message is logged and
    skipped, a broker failure is swallowed, and the return value counts only what was enqueued.
    Messages without recipients are skipped and not counted, as Django's SMTP backend does.
    """

    def __init__(
        self, fail_silently: bool = False, mailer: Mailer | None = None, **kwargs: Any
    ) -> None:
        _raise_for_sender_settings()  # a misconfiguration is an error even with fail_silently
        super().__init__(fail_silently=fail_silently, **kwargs)
        self._mailer = mailer

    @property
    def mailer(self) -> Mailer:
        return self._mailer or default_mailer()

    def send_messages(self, email_messages: Iterable[EmailMessage]) -> int:
        messages = list(email_messages)  # Django accepts any iterable
        client: Mailer | None = None
        rendered: list[tuple[Rendered, str, float | None]] = []
        options: dict[str, dict[str, Any]] = {}
        for index, email in enumerate(messages):
            try:
                if not email.recipients() and not _has_smtpapi_to(getattr(email, "smtpapi", None)):
                    continue  # Django's SMTP backend sends nothing and does not count it
                message = to_message(email)
                client = client or self.mailer
                lane = client.lane(getattr(email, "lane", None))
                due = due_time(getattr(email, "send_at", None))
                relay = client.relay(getattr(email, "relay", None))
                rendered.append((client.render(message), lane, due))
                client.check_portable(rendered[-1][0], relay)
                if relay != DEFAULT_RELAY:
                    options[rendered[-1][0].id] = {"relay": relay}
            except InvalidMessage as error:
                exc = _django_wording(error)
                if self.fail_silently:
                    log.warning("skipped an invalid Django message (fail_silently): %s", exc)
                    continue
                if len(messages) == 1:
                    raise exc from None
                raise InvalidMessage(f"messages[{index}].{exc.field}", exc.problem) from None
            except PublishError:  # the relay registry could not be read: nothing was queued
                if self.fail_silently:
                    return 0
                raise
        if not rendered or client is None:
            return 0
        try:
            client.publish_rendered(rendered, options=options)
        except MailerError:
            if self.fail_silently:
                return 0
            raise
        return len(rendered)

"""A Django email backend: ``EMAIL_BACKEND = "mailer.django.EmailBackend"``.

Django's `EmailMessage` / `EmailMultiAlternatives` become `mailer.Message`s, are validated and
rendered in the web process, and are enqueued with one `send_many` call (one broker connection,
one batch task per 100 messages) instead of one SMTP session per request.

Extras read from each Django message, if set: ``message.smtpapi`` (an `SMTPAPIHeader` or a dict
of X-SMTPAPI fields) and ``message.idempotency_key``. A ``Reply-To`` in ``extra_headers`` is
used as the reply-to; From/To/Cc/Message-ID/Date there are refused (the mailer writes those).
"""

from __future__ import annotations

from collections.abc import Sequence
from email.mime.base import MIMEBase
from typing import Any

from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend

from mailer.client import Mailer, default_mailer
from mailer.errors import InvalidMessage, MailerError
from mailer.message import Attachment, Message, Rendered

__all__ = ["EmailBackend", "to_message"]


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
        return Attachment(filename=filename, content=content, mimetype=mimetype or None)
    raise InvalidMessage(field, f"unsupported Django attachment {type(item).__name__}")


def to_message(email: EmailMessage) -> Message:
    """One Django message as a `mailer.Message`; raises `InvalidMessage` naming the field."""
    text: str | None = None
    html: str | None = None
    if getattr(email, "content_subtype", "plain") == "html":
        html = email.body
    else:
        text = email.body
    alternatives: Sequence[Any] = getattr(email, "alternatives", None) or []
    for index, alternative in enumerate(alternatives):
        content, mimetype = alternative[0], alternative[1]
        if mimetype == "text/html" and html is None:
            html = content
        elif mimetype == "text/plain" and text is None:
            text = content
        else:
            raise InvalidMessage(
                f"alternatives[{index}]",
                f"{mimetype}: only one text/html (or text/plain) alternative is supported",
            )
    if text is not None and html is not None and not text:
        text = None  # an HTML-only message Django-style: body "" plus an HTML alternative
    headers = dict(email.extra_headers or {})
    reply_to: list[str] = list(email.reply_to or [])
    for name in list(headers):
        if name.lower() == "reply-to":
            value = headers.pop(name)
            if not reply_to:
                reply_to = [value]
    return Message(
        to=list(email.to or []),
        subject=email.subject,
        text=text,
        html=html,
        from_addr=email.from_email or None,
        cc=list(email.cc or []) or None,
        bcc=list(email.bcc or []) or None,
        reply_to=reply_to or None,
        headers={str(k): str(v) for k, v in headers.items()} or None,
        attachments=[_attachment(i, a) for i, a in enumerate(email.attachments or [])] or None,
        smtpapi=getattr(email, "smtpapi", None),
        idempotency_key=getattr(email, "idempotency_key", None),
    )


class EmailBackend(BaseEmailBackend):
    """Enqueues Django email for the mailer's workers; no SMTP in the web process.

    With ``fail_silently`` an invalid message is skipped (and a broker failure swallowed) and
    the return value counts only what was enqueued, as Django's SMTP backend does.
    """

    def __init__(
        self, fail_silently: bool = False, mailer: Mailer | None = None, **kwargs: Any
    ) -> None:
        super().__init__(fail_silently=fail_silently, **kwargs)
        self._mailer = mailer

    @property
    def mailer(self) -> Mailer:
        return self._mailer or default_mailer()

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        if not email_messages:
            return 0
        client = self.mailer
        rendered: list[Rendered] = []
        for index, email in enumerate(email_messages):
            try:
                rendered.append(client.render(to_message(email)))
            except InvalidMessage as exc:
                if self.fail_silently:
                    continue
                if len(email_messages) == 1:
                    raise
                raise InvalidMessage(f"messages[{index}].{exc.field}", exc.problem) from None
        if not rendered:
            return 0
        try:
            client.publish_rendered(rendered)
        except MailerError:
            if self.fail_silently:
                return 0
            raise
        return len(rendered)

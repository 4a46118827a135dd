"""A message as app code gives it (`Message`), and as the workers send it (`Rendered`).

`Message.render()` validates every field (each refusal is an `InvalidMessage` naming the field),
then renders RFC 5322 bytes once, here, at enqueue time: pure ASCII, CRLF line endings, no line
over 998 octets, no Bcc, exactly one X-SMTPAPI header carrying our message id as
``unique_args.mailer_id``. The workers send those bytes as they are.

The wire payload (`Rendered.to_payload()`) is small, JSON-able and carries no secret:

    {"v": 1, "id": "<32 hex>", "mail_from": "a@x", "rcpt_to": ["b@y", ...],
     "data": "<the message, ASCII>",
     "meta": {"subject": "...", "to": ["Name <b@y>", ...], "idempotency_key": null,
              "created_at": 1700000000.0}}
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mailer.errors import InvalidMessage
from mailer.headers import (
    CONTROL,
    check_decoded,
    check_header_text,
    display,
    extra_header,
    parse_mailbox,
)
from mailer.mime import Alternative, Part, guess_mimetype
from mailer.render import ID_NAMESPACE, Fields, message_id_for, render_fields
from mailer.smtpapi import SMTPAPIHeader

__all__ = [
    "ID_NAMESPACE",
    "MAX_RECIPIENTS",
    "MAX_SIZE",
    "PAYLOAD_VERSION",
    "Attachment",
    "Message",
    "Rendered",
    "message_id_for",
]

PAYLOAD_VERSION = 1
MAX_SIZE = 20_000_000  # SendGrid: "should not exceed 20MB", headers and attachments included
MAX_RECIPIENTS = 1000  # plain RCPT TO per message (SendGrid's old documented figure)
MAX_FILENAME = 255
MAX_CONTENT_ID = 250
MAX_IDEMPOTENCY_KEY = 1000

_MIMETYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")
_PARAM_NAME = re.compile(r"[a-z0-9!#$&^_.+-]+")  # an RFC 2045 token, lower-cased
_PARAM_VALUE = re.compile(r"[ !#-\[\]-~]+")  # printable ASCII but '"' and '\\'
_CONTENT_ID = re.compile(r"[!-;=?-~]+")  # printable ASCII without space, '<' or '>'
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_ENVELOPE_ADDRESS = re.compile(r"[!-~]+@[!-~]+")


@dataclass
class Attachment:
    """A file to attach. `mimetype` None means: guess from the filename, else
    application/octet-stream. With `content_id` the part is inline (``<img src="cid:ID">``)."""

    filename: str
    content: bytes | str
    mimetype: str | None = None
    content_id: str | None = None


AttachmentLike = Attachment | tuple[str, bytes | str, str | None]


@dataclass
class Message:
    """One email as app code describes it; `render()` validates it and makes the bytes."""

    to: str | Sequence[str]
    subject: str
    text: str | None = None
    html: str | None = None
    from_addr: str | None = None
    cc: str | Sequence[str] | None = None
    bcc: str | Sequence[str] | None = None
    reply_to: str | Sequence[str] | None = None
    headers: Mapping[str, str] | None = None
    attachments: Sequence[AttachmentLike] | None = None
    smtpapi: SMTPAPIHeader | Mapping[str, Any] | None = None
    idempotency_key: str | None = None
    alternatives: Sequence[tuple[str | bytes, str]] | None = None
    """More parts of the multipart/alternative after `text` and `html`, as (content, mimetype)
    pairs; a mimetype may carry parameters: ``(ics, "text/calendar; method=REQUEST")`` is a
    meeting invitation. Last in the field order so positional callers keep working."""

    def render(
        self,
        *,
        default_from: str | None = None,
        max_size: int = MAX_SIZE,
        max_recipients: int = MAX_RECIPIENTS,
    ) -> Rendered:
        """Validates every field and renders the message; raises `InvalidMessage` naming the
        first offending field."""
        return _render(self, default_from, max_size, max_recipients)


@dataclass(frozen=True)
class Rendered:
    """A validated, rendered message: the envelope, the bytes, display-only metadata."""

    id: str
    mail_from: str
    rcpt_to: tuple[str, ...]
    data: bytes
    subject: str
    to: tuple[str, ...]
    idempotency_key: str | None
    created_at: float

    def __repr__(self) -> str:
        return (
            f"Rendered(id={self.id!r}, mail_from={self.mail_from!r}, "
            f"rcpt_to=<{len(self.rcpt_to)} recipients>, size={len(self.data)}, "
            f"subject={self.subject!r})"
        )

    def to_payload(self) -> dict[str, Any]:
        """The JSON-able task payload (the wire contract between `mailer` and `workers`)."""
        return {
            "v": PAYLOAD_VERSION,
            "id": self.id,
            "mail_from": self.mail_from,
            "rcpt_to": list(self.rcpt_to),
            "data": self.data.decode("ascii"),
            "meta": {
                "subject": self.subject,
                "to": list(self.to),
                "idempotency_key": self.idempotency_key,
                "created_at": self.created_at,
            },
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Rendered:
        """The inverse of `to_payload`; strict: raises ValueError naming the bad key."""
        top = _exact_keys("payload", payload, ("v", "id", "mail_from", "rcpt_to", "data", "meta"))
        version = top["v"]
        if isinstance(version, bool) or version != PAYLOAD_VERSION:
            raise ValueError(f"payload['v']: unsupported payload version {version!r}")
        message_id = top["id"]
        if not isinstance(message_id, str) or not _HEX_ID.fullmatch(message_id):
            raise ValueError("payload['id']: expected 32 lowercase hex digits")
        mail_from = _envelope_address("payload['mail_from']", top["mail_from"])
        rcpt = top["rcpt_to"]
        if not isinstance(rcpt, list | tuple) or not rcpt:
            raise ValueError("payload['rcpt_to']: expected a non-empty list of addresses")
        rcpt_to = tuple(_envelope_address("payload['rcpt_to']", r) for r in rcpt)
        data = top["data"]
        if not isinstance(data, str) or not data or not data.isascii():
            raise ValueError("payload['data']: expected the message as a non-empty ASCII string")
        meta = _exact_keys(
            "payload['meta']", top["meta"], ("subject", "to", "idempotency_key", "created_at")
        )
        subject = meta["subject"]
        if not isinstance(subject, str):
            raise ValueError("payload['meta']['subject']: expected a string")
        to = meta["to"]
        if not isinstance(to, list | tuple) or not all(isinstance(t, str) for t in to):
            raise ValueError("payload['meta']['to']: expected a list of strings")
        key = meta["idempotency_key"]
        if key is not None and not isinstance(key, str):
            raise ValueError("payload['meta']['idempotency_key']: expected a string or null")
        created_at = meta["created_at"]
        if (
            isinstance(created_at, bool)
            or not isinstance(created_at, int | float)
            or not math.isfinite(created_at)
        ):
            raise ValueError("payload['meta']['created_at']: expected a UNIX timestamp")
        return cls(
            id=message_id,
            mail_from=mail_from,
            rcpt_to=rcpt_to,
            data=data.encode("ascii"),
            subject=subject,
            to=tuple(to),
            idempotency_key=key,
            created_at=float(created_at),
        )


def _exact_keys(where: str, value: object, keys: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
    for key in value:
        if key not in keys:
            raise ValueError(f"{where}[{key!r}]: unknown key")
    for key in keys:
        if key not in value:
            raise ValueError(f"{where}[{key!r}]: missing")
    return value


def _envelope_address(where: str, value: object) -> str:
    if not isinstance(value, str) or not _ENVELOPE_ADDRESS.fullmatch(value):
        raise ValueError(f"{where}: expected an ASCII address without spaces, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Validation of each field, then rendering (mailer/render.py)


def _render(
    message: Message,
    default_from: str | None,
    max_size: int,
    max_recipients: int,
    *,
    fast_mime_ok: bool = True,
    created_at: float | None = None,
) -> Rendered:
    created_at = time.time() if created_at is None else created_at
    fields = _fields(message, default_from, created_at)
    out = render_fields(
        fields,
        created_at=created_at,
        max_size=max_size,
        max_recipients=max_recipients,
        fast_mime_ok=fast_mime_ok,
    )
    return Rendered(
        id=out.id,
        mail_from=fields.sender[1],
        rcpt_to=tuple(out.rcpt_to),
        data=out.data,
        subject=fields.subject,
        to=tuple(display(name, addr) for name, addr in fields.to),
        idempotency_key=fields.idempotency_key,
        created_at=created_at,
    )


def _fields(m: Message, default_from: str | None, created_at: float) -> Fields:
    """Every field validated on its own, in a fixed order (the first problem is the one named)."""
    sender = _sender(m.from_addr, default_from)
    to = _mailboxes("to", m.to)
    cc = _mailboxes("cc", m.cc)
    bcc = _mailboxes("bcc", m.bcc)
    reply_to = _mailboxes("reply_to", m.reply_to)
    subject = check_header_text("subject", m.subject)
    for name in ("text", "html"):
        body = getattr(m, name)
        if body is not None and not isinstance(body, str):
            raise InvalidMessage(name, f"must be a string, got {type(body).__name__}")
    if m.text is None and m.html is None:
        raise InvalidMessage("text", "no body: pass text=, html= or both")
    header_lines = _extra_headers(m.headers)
    parts = _attachments(m.attachments)
    alternatives = _alternatives(m.alternatives)
    api = _smtpapi(m.smtpapi)
    key = _idempotency_key(m.idempotency_key)
    return Fields(
        sender=sender,
        to=to,
        cc=cc,
        bcc=bcc,
        reply_to=reply_to,
        subject=subject,
        text=m.text,
        html=m.html,
        header_lines=header_lines,
        parts=parts,
        alternatives=alternatives,
        smtpapi=api.to_dict(now=created_at) if api is not None else {},
        idempotency_key=key,
    )


def _mailboxes(field: str, value: object) -> list[tuple[str, str]]:
    if value is None:
        return []
    if isinstance(value, str):
        return [parse_mailbox(field, value)]
    if isinstance(value, bytes | bytearray | Mapping) or not isinstance(value, Sequence):
        raise InvalidMessage(
            field, f"expected an address or a list of addresses, got {type(value).__name__}"
        )
    return [parse_mailbox(field, item) for item in value]


def _sender(from_addr: object, default_from: str | None) -> tuple[str, str]:
    if from_addr is not None:
        return parse_mailbox("from_addr", from_addr)
    if default_from:
        # Same field name: the value came from MAILER_DEFAULT_FROM on the caller's behalf.
        return parse_mailbox("from_addr", default_from)
    raise InvalidMessage("from_addr", "no From: pass from_addr= or set MAILER_DEFAULT_FROM")


def _extra_headers(headers: object) -> list[str]:
    """Validated extra headers, each already folded: "Name: value\\r\\n"."""
    if headers is None:
        return []
    if not isinstance(headers, Mapping):
        raise InvalidMessage("headers", f"expected a dict, got {type(headers).__name__}")
    lines: list[str] = []
    seen: set[str] = set()
    for name, value in headers.items():
        line = extra_header(name, value)
        lower = name.lower()  # a valid name: extra_header checked it
        if lower in seen:
            raise InvalidMessage(
                f"headers.{name}", "given twice (header names are case-insensitive)"
            )
        seen.add(lower)
        lines.append(line)
    return lines


def _attachments(items: object) -> list[Part]:
    if items is None:
        return []
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Sequence):
        raise InvalidMessage("attachments", "expected a list of attachments")
    parts: list[Part] = []
    cids: set[str] = set()
    for i, item in enumerate(items):
        field = f"attachments[{i}]"
        content_id: str | None = None
        if isinstance(item, Attachment):
            filename, content, mimetype = item.filename, item.content, item.mimetype
            content_id = item.content_id
        elif isinstance(item, tuple | list) and len(item) == 3:
            filename, content, mimetype = item
        else:
            raise InvalidMessage(
                field, "expected an Attachment or a (filename, content, mimetype) tuple"
            )
        check_header_text(field, filename, "the filename ")
        if "=?" in filename:
            # The email package decodes RFC 2047 in a filename it is given (and readers decode
            # what it writes): "=?utf-8?q?a=0D=0A...?=" would become a header line of the part.
            raise InvalidMessage(
                field,
                "the filename contains '=?', which the email package and mail readers decode as "
                "an RFC 2047 encoded-word; give the name itself (any Unicode is fine)",
            )
        check_decoded(field, filename, "the filename ")
        filename = filename.strip()  # mail readers drop surrounding blanks anyway
        if not filename:
            raise InvalidMessage(field, "the filename is empty")
        if len(filename) > MAX_FILENAME:
            raise InvalidMessage(field, f"the filename is over {MAX_FILENAME} characters")
        params: dict[str, str] | None = None
        if isinstance(content, str):
            try:
                data = content.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidMessage(field, "content is not valid Unicode") from None
        elif isinstance(content, bytes | bytearray | memoryview):
            data = bytes(content)
        else:
            raise InvalidMessage(
                field, f"content must be bytes or str, got {type(content).__name__}"
            )
        if mimetype is None:
            mimetype = guess_mimetype(filename)
        elif not isinstance(mimetype, str) or not _MIMETYPE.fullmatch(mimetype):
            raise InvalidMessage(field, f"{mimetype!r} is not a MIME type like 'text/csv'")
        maintype, subtype = mimetype.lower().split("/")
        if maintype in ("message", "multipart"):
            raise InvalidMessage(
                field,
                f"{mimetype}: attachments are base64-encoded, which {maintype}/* may not be; "
                "send it as application/octet-stream",
            )
        if maintype == "text" and isinstance(content, str):
            params = {"charset": "utf-8"}
        if content_id is not None:
            if not isinstance(content_id, str):
                raise InvalidMessage(field, "content_id must be a string")
            cid = content_id.strip()
            if cid.startswith("<") and cid.endswith(">"):
                cid = cid[1:-1]
            if "=?" in cid:  # the email package decodes it as RFC 2047, like a filename
                raise InvalidMessage(field, "content_id contains '=?' (RFC 2047 syntax)")
            if not _CONTENT_ID.fullmatch(cid) or len(cid) > MAX_CONTENT_ID:
                raise InvalidMessage(
                    field,
                    f"content_id {content_id!r}: printable ASCII without spaces or <>, "
                    f"at most {MAX_CONTENT_ID} characters",
                )
            if cid in cids:
                raise InvalidMessage(field, f"content_id {cid!r} is used twice")
            cids.add(cid)
            content_id = f"<{cid}>"
        parts.append(Part(filename, data, maintype, subtype, content_id, params))
    return parts


def _content_type(field: str, value: object) -> tuple[str, str, dict[str, str]]:
    """ "type/subtype; name=value; ..." as (maintype, subtype, params), lower-cased names."""
    if not isinstance(value, str):
        raise InvalidMessage(field, f"the mimetype must be a string, got {type(value).__name__}")
    mimetype, *pieces = (piece.strip() for piece in value.split(";"))
    if not _MIMETYPE.fullmatch(mimetype):
        raise InvalidMessage(field, f"{value!r} is not a MIME type like 'text/calendar'")
    maintype, subtype = mimetype.lower().split("/")
    params: dict[str, str] = {}
    for piece in pieces:
        name, eq, raw = piece.partition("=")
        name, raw = name.strip().lower(), raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1]
        if not eq or not _PARAM_NAME.fullmatch(name) or not _PARAM_VALUE.fullmatch(raw):
            raise InvalidMessage(
                field, f"{piece!r} in {value!r} is not a parameter like 'method=REQUEST'"
            )
        check_decoded(field, raw, f"the {name} parameter ")
        if name == "charset":
            if raw.lower() in ("utf-8", "utf8"):
                continue  # the part says charset="utf-8" anyway
            raise InvalidMessage(field, f"text is sent as utf-8, not {raw}; leave charset out")
        params[name] = raw
    return maintype, subtype, params


def _alternatives(items: object) -> list[Alternative]:
    if items is None:
        return []
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Sequence):
        raise InvalidMessage("alternatives", "expected a list of (content, mimetype) pairs")
    out: list[Alternative] = []
    for i, item in enumerate(items):
        field = f"alternatives[{i}]"
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise InvalidMessage(
                field, "expected a (content, mimetype) pair like (ics, 'text/calendar')"
            )
        content, mimetype = item
        maintype, subtype, params = _content_type(field, mimetype)
        if maintype in ("message", "multipart"):
            raise InvalidMessage(field, f"{maintype}/* cannot be an alternative body")
        data: str | bytes
        if isinstance(content, bytes | bytearray | memoryview):
            data = bytes(content)
            if maintype == "text":
                try:
                    data = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidMessage(field, "text content is not valid UTF-8") from None
        elif isinstance(content, str):
            data = content
            if maintype != "text":
                try:
                    data = content.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidMessage(field, "content is not valid Unicode") from None
        else:
            raise InvalidMessage(
                field, f"content must be str or bytes, got {type(content).__name__}"
            )
        out.append(Alternative(field, maintype, subtype, params, data))
    return out


def _smtpapi(value: SMTPAPIHeader | Mapping[str, Any] | None) -> SMTPAPIHeader | None:
    if value is None:
        return None
    if isinstance(value, SMTPAPIHeader):
        return value
    return SMTPAPIHeader.from_dict(value)


def _idempotency_key(key: object) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str):
        raise InvalidMessage("idempotency_key", f"must be a string, got {type(key).__name__}")
    if not key or len(key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidMessage("idempotency_key", f"must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    if CONTROL.search(key):
        raise InvalidMessage("idempotency_key", "contains a control character")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessage("idempotency_key", "is not valid Unicode") from None
    return key

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

import base64
import binascii
import math
import mimetypes
import random
import re
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy as email_policy
from email import quoprimime
from email.headerregistry import Address, BaseHeader, HeaderRegistry, UnstructuredHeader
from email.message import EmailMessage
from email.utils import format_datetime
from functools import lru_cache
from typing import Any

from mailer.errors import InvalidMessage
from mailer.smtpapi import (
    HEADER_NAME,
    MAX_UNIQUE_ARGS_BYTES,
    SMTPAPIHeader,
    fold_header_value,
    header_json,
    parse_mailbox,
    unique_args_size,
)

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
MAX_LINE = 998
MAX_HEADER_NAME = 76
MAX_FILENAME = 255
MAX_CONTENT_ID = 250
MAX_IDEMPOTENCY_KEY = 1000
# Fixed forever: the same idempotency key must give the same message id in every release,
# because the workers' ledger deduplicates on that id.
ID_NAMESPACE = uuid.UUID("5f0c6f2e-8a3b-5c47-9d0e-6b1a2c3d4e5f")


class _HeaderRegistry(HeaderRegistry):
    """The stdlib registry builds a new class on every lookup; cache them."""

    @lru_cache(maxsize=256)  # noqa: B019 - one module-level instance, lives forever
    def __getitem__(self, name: str) -> type[BaseHeader]:
        return super().__getitem__(name)


# The email package writes the MIME structure of messages with attachments (`_fast_mime` writes
# the others, byte for byte the same) and structured extra headers with non-ASCII values; the
# top-level headers are written by this module, exactly.
_REGISTRY = _HeaderRegistry()
_WIDTH = 78  # the email package folds and encodes to this width
POLICY = email_policy.SMTP.clone(max_line_length=_WIDTH, cte_type="7bit", header_factory=_REGISTRY)

# Headers the message owns; `headers=` may not set them (X-SMTPAPI goes through smtpapi=).
RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "message-id",
        "date",
        "mime-version",
        "x-smtpapi",
    }
)

# C0 controls except TAB, DEL, and what str.splitlines() treats as a line break.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
_LINE_BREAK = re.compile("[\r\n]")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # printable ASCII, no space, no colon
_MIMETYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")
_CONTENT_ID = re.compile(r"[!-;=?-~]+")  # printable ASCII without space, '<' or '>'
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_ENVELOPE_ADDRESS = re.compile(r"[!-~]+@[!-~]+")
_7BIT_BYTES = b"\t\n\r" + bytes(range(0x20, 0x7F))
_NEWLINE = re.compile(r"\r\n|\r|\n")  # what the email package's generator turns into CRLF
_BOUNDARY_DIGITS = len(repr(sys.maxsize - 1))  # the email package's boundary: 15 "=", digits, "=="
_HIGH_BYTES = bytes(range(128, 256))
_COMPRESSED_TYPES = {"gzip": "application/gzip", "bzip2": "application/x-bzip2"}


@lru_cache(maxsize=4)
def _date_header(second: int) -> str:
    """The Date header (whole seconds, as RFC 5322 writes it): formatted once per second, not
    per message (email.utils' formatter is a large share of what rendering a message costs)."""
    return f"Date: {format_datetime(datetime.fromtimestamp(second, UTC))}\r\n"


def message_id_for(idempotency_key: str | None) -> str:
    """The message id: random, or derived from the idempotency key (same key, same id)."""
    if idempotency_key is None:
        return uuid.uuid4().hex
    return uuid.uuid5(ID_NAMESPACE, idempotency_key).hex


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

    def render(
        self,
        *,
        default_from: str | None = None,
        max_size: int = MAX_SIZE,
        max_recipients: int = MAX_RECIPIENTS,
    ) -> Rendered:
        """Validates every field and renders the message; raises `InvalidMessage` naming the
        first offending field."""
        return _Renderer(self, default_from, max_size, max_recipients).render()


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
# Rendering


def _display(name: str, addr: str) -> str:
    """ "Name <addr>" for display (Unicode kept, quoted when needed), or just the address."""
    if not name:
        return addr
    return str(Address(display_name=name, addr_spec=addr))


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PHRASE = re.compile(f"{_ATEXT}(?: {_ATEXT})*")


def _mailbox(name: str, addr: str) -> str:
    """One mailbox as header text. The display name is written so that RFC 5322/2047 readers
    get it back exactly: single-spaced atoms as they are, other ASCII as a quoted-string (which
    keeps every blank), non-ASCII as encoded-words. ("=?" in names is refused earlier.)"""
    if not name:
        return addr
    if not name.isascii():
        phrase = _encoded_words(name)
    elif _PLAIN_PHRASE.fullmatch(name):
        phrase = name
    else:
        phrase = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{phrase} <{addr}>"


def _address_header(name: str, mailboxes: Sequence[tuple[str, str]]) -> str:
    value = ", ".join(_mailbox(*mailbox) for mailbox in mailboxes)
    # Cannot fail: no token is longer than a 256-character name or a 254-character address.
    return f"{name}: {fold_header_value(name, value)}\r\n"


def _check_header_text(field: str, value: object, what: str = "") -> str:
    if not isinstance(value, str):
        raise InvalidMessage(field, f"{what}must be a string, got {type(value).__name__}")
    if _CONTROL.search(value):
        kind = "a line break (CR or LF)" if _LINE_BREAK.search(value) else "a control character"
        raise InvalidMessage(field, f"{what}contains {kind}; header values may not")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidMessage(field, f"{what}is not valid Unicode (lone surrogate)") from None
    return value


def _encoded_words(text: str) -> str:
    """`text` as RFC 2047 base64 encoded-words of at most 68 characters, separated by spaces
    (fold points).

    Decoders join adjacent encoded-words and drop the whitespace between them, so every
    character comes back, leading spaces and literal "=?" sequences included."""
    words: list[str] = []
    chunk: list[str] = []
    size = 0
    for ch in text:
        n = len(ch.encode("utf-8"))
        if size + n > 42 and chunk:
            words.append("".join(chunk))
            chunk, size = [], 0
        chunk.append(ch)
        size += n
    if chunk or not words:
        words.append("".join(chunk))
    return " ".join(
        "=?utf-8?b?" + base64.b64encode(w.encode("utf-8")).decode("ascii") + "?=" for w in words
    )


def _subject_header(subject: str) -> str:
    """The Subject line(s), exact: the email package's folding can lose blanks (a fold right
    after "Subject:" comes back as a leading space) and lets literal "=?...?=" decode."""
    if subject.isascii() and "=?" not in subject and subject[:1] not in (" ", "\t"):
        try:
            return f"Subject: {fold_header_value('Subject', subject)}\r\n"
        except InvalidMessage:
            pass  # a word too long for one line: encoded-words can be split anywhere
    return f"Subject: {fold_header_value('Subject', _encoded_words(subject))}\r\n"


def _bad_output(data: bytes) -> bool:
    """Whether `data` has a bare CR, a bare LF or a line over 998 octets (not a regex: one
    doing the same retries the 999-octet run at every offset)."""
    lines = data.split(b"\r\n")
    crlf = len(lines) - 1
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        return True
    return max(map(len, lines)) > MAX_LINE


def _is_7bit(text: str) -> bool:
    """Only TAB, LF, CR and printable ASCII (bytes.translate: cheaper than a regex search)."""
    return text.isascii() and not text.encode("ascii").translate(None, _7BIT_BYTES)


def _body_cte(field: str, text: str) -> str:
    """7bit when the text already is 7-bit with short lines; else quoted-printable for mostly
    ASCII text, base64 for mostly non-ASCII text (whichever is smaller)."""
    # In 7-bit text, str.splitlines() splits at CR, LF and CRLF only: the email package's lines.
    if _is_7bit(text) and (len(text) <= MAX_LINE or max(map(len, text.splitlines())) <= MAX_LINE):
        return "7bit"
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessage(field, "is not valid Unicode (lone surrogate)") from None
    high = len(raw) - len(raw.translate(None, _HIGH_BYTES))
    # QP costs ~3 octets per high byte and ~1 per ASCII byte; base64 4/3 for every byte.
    return "quoted-printable" if high * 5 < len(raw) - high else "base64"


def _text_part(field: str, subtype: str, text: str) -> tuple[str, str]:
    """A text part's Content-* header lines and its encoded body, as the email package writes
    them with POLICY (`contentmanager._encode_text`, then the generator's CRLF line endings)."""
    cte = _body_cte(field, text)
    if cte == "7bit":
        body = "\r\n".join(text.splitlines()) + "\r\n"  # CR, LF, CRLF only (see _body_cte)
    else:
        lines = text.encode("utf-8").splitlines()  # bytes: CR, LF, CRLF only
        if cte == "quoted-printable":
            payload = quoprimime.body_encode(b"\n".join(lines).decode("latin-1") + "\n", _WIDTH)
        else:
            raw = b"\r\n".join(lines) + b"\r\n"
            step = _WIDTH // 4 * 3
            payload = "".join(
                binascii.b2a_base64(raw[i : i + step]).decode("ascii")
                for i in range(0, len(raw), step)
            )
        body = _NEWLINE.sub("\r\n", payload)
    head = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n'
    return head, body


def _make_boundary() -> str:
    """A multipart boundary in the email package's format (`Generator._make_boundary`)."""
    return f"{'=' * 15}{random.randrange(sys.maxsize):0{_BOUNDARY_DIGITS}d}=="


def _fast_mime(text: str | None, html: str | None, boundary: str | None = None) -> str | None:
    """The MIME structure of a message without attachments, written directly: the bytes
    `_Renderer._email_mime` makes through the email package (up to the random boundary), for
    far less (bench/README.md). None when unsure (a body containing the boundary): the package."""
    if text is None or html is None:
        field, subtype, body = ("text", "plain", text) if html is None else ("html", "html", html)
        assert body is not None
        head, encoded = _text_part(field, subtype, body)
        return f"{head}MIME-Version: 1.0\r\n\r\n{encoded}"
    text_head, text_body = _text_part("text", "plain", text)
    html_head, html_body = _text_part("html", "html", html)
    b = boundary or _make_boundary()
    if b in text_body or b in html_body:
        return None
    return (
        f'MIME-Version: 1.0\r\nContent-Type: multipart/alternative;\r\n boundary="{b}"\r\n\r\n'
        f"--{b}\r\n{text_head}\r\n{text_body}\r\n"
        f"--{b}\r\n{html_head}\r\n{html_body}\r\n"
        f"--{b}--\r\n"
    )


def _guess_mimetype(filename: str) -> str:
    guessed, encoding = mimetypes.guess_type(filename)
    if encoding is not None:
        return _COMPRESSED_TYPES.get(encoding, "application/octet-stream")
    if guessed is None or guessed.split("/", 1)[0] in ("message", "multipart"):
        # message/* may not be base64-encoded (RFC 2046 5.2), and we encode every attachment.
        return "application/octet-stream"
    return guessed


@dataclass
class _Part:
    filename: str
    data: bytes
    maintype: str
    subtype: str
    content_id: str | None
    params: dict[str, str] | None


class _Renderer:
    """One rendering of one message (a class only to keep `render` readable)."""

    def __init__(
        self,
        message: Message,
        default_from: str | None,
        max_size: int,
        max_recipients: int,
        *,
        fast_mime: bool = True,  # False: always the email package (tests compare the two)
    ) -> None:
        self.m = message
        self.default_from = default_from
        self.max_size = max_size
        self.max_recipients = max_recipients
        self.fast_mime = fast_mime
        self.created_at = time.time()

    # -- fields --------------------------------------------------------------------------------

    def _mailboxes(self, field: str, value: object) -> list[tuple[str, str]]:
        if value is None:
            return []
        if isinstance(value, str):
            return [parse_mailbox(field, value)]
        if isinstance(value, bytes | bytearray | Mapping) or not isinstance(value, Sequence):
            raise InvalidMessage(
                field, f"expected an address or a list of addresses, got {type(value).__name__}"
            )
        return [parse_mailbox(field, item) for item in value]

    def _from(self) -> tuple[str, str]:
        if self.m.from_addr is not None:
            return parse_mailbox("from_addr", self.m.from_addr)
        if self.default_from:
            # Same field name: the value came from MAILER_DEFAULT_FROM on the caller's behalf.
            return parse_mailbox("from_addr", self.default_from)
        raise InvalidMessage("from_addr", "no From: pass from_addr= or set MAILER_DEFAULT_FROM")

    def _extra_headers(self) -> list[str]:
        """Validated extra headers, each already folded: "Name: value\\r\\n"."""
        headers = self.m.headers
        if headers is None:
            return []
        if not isinstance(headers, Mapping):
            raise InvalidMessage("headers", f"expected a dict, got {type(headers).__name__}")
        out: list[str] = []
        for name, value in headers.items():
            if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
                raise InvalidMessage(
                    f"headers.{name}",
                    "a header name is printable ASCII without spaces or ':'",
                )
            field = f"headers.{name}"
            if len(name) > MAX_HEADER_NAME:
                raise InvalidMessage(
                    field, f"a header name is at most {MAX_HEADER_NAME} characters"
                )
            lower = name.lower()
            if lower in RESERVED_HEADERS or lower.startswith("content-"):
                hint = (
                    "pass smtpapi= instead"
                    if lower == "x-smtpapi"
                    else "use the Message field for it"
                    if lower in ("from", "to", "cc", "bcc", "reply-to", "subject")
                    else "the mailer sets it"
                )
                raise InvalidMessage(field, f"{name} cannot be set through headers=: {hint}")
            _check_header_text(field, value)
            if value.isascii():
                # Sent exactly as given, folded at its own spaces; never encoded.
                out.append(f"{name}: {fold_header_value(name, value, field=field)}\r\n")
                continue
            if issubclass(_REGISTRY[name], UnstructuredHeader):
                # Free text: all of it as encoded-words, so it decodes back exactly.
                out.append(f"{name}: {fold_header_value(name, _encoded_words(value))}\r\n")
                continue
            try:  # a structured header (Sender, Resent-*...): the email package knows its syntax
                folded = POLICY.header_factory(name, value).fold(policy=POLICY)
            except Exception as exc:  # the email package's parsers raise a variety of errors
                raise InvalidMessage(field, f"cannot be encoded: {exc}") from None
            if not folded.isascii() or _bad_output(folded.encode("ascii")):
                raise InvalidMessage(field, "cannot be encoded into lines of at most 998 octets")
            out.append(folded)
        return out

    def _attachments(self) -> list[_Part]:
        items = self.m.attachments
        if items is None:
            return []
        if isinstance(items, str | bytes | Mapping) or not isinstance(items, Sequence):
            raise InvalidMessage("attachments", "expected a list of attachments")
        parts: list[_Part] = []
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
            _check_header_text(field, filename, "the filename ")
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
                mimetype = _guess_mimetype(filename)
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
            parts.append(_Part(filename, data, maintype, subtype, content_id, params))
        return parts

    def _smtpapi(self) -> SMTPAPIHeader | None:
        value = self.m.smtpapi
        if value is None:
            return None
        if isinstance(value, SMTPAPIHeader):
            return value
        return SMTPAPIHeader.from_dict(value)

    def _idempotency_key(self) -> str | None:
        key = self.m.idempotency_key
        if key is None:
            return None
        if not isinstance(key, str):
            raise InvalidMessage("idempotency_key", f"must be a string, got {type(key).__name__}")
        if not key or len(key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidMessage(
                "idempotency_key", f"must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
            )
        if _CONTROL.search(key):
            raise InvalidMessage("idempotency_key", "contains a control character")
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidMessage("idempotency_key", "is not valid Unicode") from None
        return key

    # -- the whole message ---------------------------------------------------------------------

    def render(self) -> Rendered:
        m = self.m
        sender = self._from()
        to = self._mailboxes("to", m.to)
        cc = self._mailboxes("cc", m.cc)
        bcc = self._mailboxes("bcc", m.bcc)
        reply_to = self._mailboxes("reply_to", m.reply_to)
        subject = _check_header_text("subject", m.subject)
        for name in ("text", "html"):
            body = getattr(m, name)
            if body is not None and not isinstance(body, str):
                raise InvalidMessage(name, f"must be a string, got {type(body).__name__}")
        if m.text is None and m.html is None:
            raise InvalidMessage("text", "no body: pass text=, html= or both")
        extra_headers = self._extra_headers()
        parts = self._attachments()
        api = self._smtpapi()
        key = self._idempotency_key()
        api_dict = api.to_dict(now=self.created_at) if api is not None else {}

        # Envelope.
        if api_dict.get("to"):
            # SendGrid treats each X-SMTPAPI `to` entry as a recipient; more than one RCPT TO
            # on top of it would duplicate the mail, so the envelope has exactly one.
            if not to:
                raise InvalidMessage(
                    "to",
                    "with smtpapi 'to', give to= as well: its first address is the single "
                    "envelope recipient SendGrid requires",
                )
            for name, given in (("cc", cc), ("bcc", bcc)):
                if given:
                    raise InvalidMessage(
                        name,
                        "cannot be combined with smtpapi 'to' (the envelope has a single "
                        "recipient); add the addresses to smtpapi 'to' instead",
                    )
            rcpt_to: list[str] = [to[0][1]]
        else:
            rcpt_to = []
            seen: set[str] = set()
            for name, group in (("to", to), ("cc", cc), ("bcc", bcc)):
                for _, addr in group:
                    folded = addr.lower()
                    if folded in seen:
                        continue
                    seen.add(folded)
                    rcpt_to.append(addr)
                    if len(rcpt_to) > self.max_recipients:
                        raise InvalidMessage(
                            name,
                            f"more than {self.max_recipients} distinct recipients across to, cc "
                            "and bcc; split the message or use smtpapi 'to'",
                        )
            if not rcpt_to:
                raise InvalidMessage("to", "no recipient: give at least one of to, cc or bcc")

        # Size, before encoding anything big (encoded sizes are never smaller than these).
        sizes = {
            "text": len(m.text or ""),
            "html": len(m.html or ""),
            "attachments": sum(len(p.data) for p in parts),
        }
        self._check_size(sizes, sum(sizes.values()) + sizes["attachments"] // 3)

        # Ids and the X-SMTPAPI value.
        message_id = message_id_for(key)
        unique_args = dict(api_dict.get("unique_args", {}))
        if "mailer_id" in unique_args:
            raise InvalidMessage(
                "smtpapi.unique_args",
                "'mailer_id' is reserved: the mailer puts the message id there",
            )
        unique_args["mailer_id"] = message_id
        ua_size = unique_args_size(unique_args)
        if ua_size > MAX_UNIQUE_ARGS_BYTES:
            raise InvalidMessage(
                "smtpapi.unique_args",
                f"{ua_size} bytes serialised with the mailer's own 'mailer_id'; at most "
                f"{MAX_UNIQUE_ARGS_BYTES}",
            )
        api_dict["unique_args"] = unique_args
        api_json = header_json(api_dict)
        smtpapi_line = (
            f"{HEADER_NAME}: {fold_header_value(HEADER_NAME, api_json, field='smtpapi')}\r\n"
        )

        # The MIME structure (parts, Content-*, encodings): written directly for text and/or
        # HTML (the common case), through the email package when there are attachments.
        mime = None if parts or not self.fast_mime else _fast_mime(m.text, m.html)
        flat = mime.encode("ascii") if mime is not None else self._email_mime(parts)

        domain = sender[1].rpartition("@")[2]
        # Every top-level header but the MIME ones is written here, exactly (see _mailbox,
        # _subject_header, fold_header_value).
        head = "".join(
            (
                _address_header("From", [sender]),
                _address_header("To", to) if to else "",
                _address_header("Cc", cc) if cc else "",
                _address_header("Reply-To", reply_to) if reply_to else "",
                _subject_header(subject),
                _date_header(math.floor(self.created_at)),
                f"Message-ID: <{message_id}@{domain}>\r\n",
                *extra_headers,
                smtpapi_line,
            )
        )
        data = head.encode("ascii") + flat
        if not data.isascii() or _bad_output(data):
            # Every field was checked so that this cannot happen; refuse rather than send junk.
            raise RuntimeError("rendering produced non-ASCII bytes, a bare CR/LF or a long line")
        sizes["smtpapi"] = len(smtpapi_line)
        self._check_size(sizes, len(data))

        return Rendered(
            id=message_id,
            mail_from=sender[1],
            rcpt_to=tuple(rcpt_to),
            data=data,
            subject=subject,
            to=tuple(_display(name, addr) for name, addr in to),
            idempotency_key=key,
            created_at=self.created_at,
        )

    def _check_size(self, sizes: Mapping[str, int], total: int) -> None:
        if total > self.max_size:
            biggest = max(sizes, key=lambda k: sizes[k])
            raise InvalidMessage(
                biggest,
                f"the message is {total:,} bytes once encoded, over the limit of "
                f"{self.max_size:,} (SendGrid: 20 MB, headers and attachments included)",
            )

    def _email_mime(self, parts: list[_Part]) -> bytes:
        """The MIME structure (parts, Content-*, encodings), through the email package."""
        msg = EmailMessage(policy=POLICY)
        self._body(msg, parts)
        for part in msg.walk():
            if part is not msg:
                del part["MIME-Version"]
        flat = msg.as_bytes(policy=POLICY)
        if b"MIME-Version: 1.0\r\n" not in flat[: flat.find(b"\r\n\r\n") + 2]:  # pragma: no cover
            raise RuntimeError("the email package produced an unexpected header block")
        return flat

    def _body(self, msg: EmailMessage, parts: list[_Part]) -> None:
        m = self.m
        html_part: EmailMessage | None = None
        if m.text is not None:
            msg.set_content(m.text, subtype="plain", charset="utf-8", cte=_body_cte("text", m.text))
            if m.html is not None:
                msg.add_alternative(
                    m.html, subtype="html", charset="utf-8", cte=_body_cte("html", m.html)
                )
                payload = msg.get_payload()
                assert isinstance(payload, list) and isinstance(payload[1], EmailMessage)
                html_part = payload[1]
        else:
            assert m.html is not None
            msg.set_content(m.html, subtype="html", charset="utf-8", cte=_body_cte("html", m.html))
            html_part = msg
        # Inline parts first: once the message is multipart/mixed, the HTML part moves.
        for part in sorted(parts, key=lambda p: p.content_id is None):
            kwargs: dict[str, Any] = {"filename": part.filename, "cte": "base64"}
            if part.params:
                kwargs["params"] = part.params
            if part.content_id is not None:
                kwargs.update(cid=part.content_id, disposition="inline")
                if html_part is not None:
                    # Inline parts belong with the HTML that refers to them: multipart/related.
                    html_part.add_related(part.data, part.maintype, part.subtype, **kwargs)
                    continue
            msg.add_attachment(part.data, part.maintype, part.subtype, **kwargs)

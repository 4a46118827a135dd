"""MIME assembly: the body parts, their Content-* headers and transfer encodings.

A message with text and/or HTML and no attachment is written directly (`fast_mime`), byte for
byte what the email package writes for it with `POLICY` (tests/unit/test_render_fast.py compares the
two), for far less; messages with attachments or other alternatives (a calendar invitation) go
through the email package (`email_mime`). Either way the result starts with the MIME headers
(MIME-Version, Content-Type, ...) and ends with the body: mailer/render.py puts the other
headers in front.
"""

from __future__ import annotations

import binascii
import mimetypes
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from email import quoprimime
from email.message import EmailMessage
from typing import Any

from mailer.errors import InvalidMessage
from mailer.headers import MAX_LINE, POLICY, WIDTH

__all__ = ["Alternative", "Part", "body_cte", "email_mime", "fast_mime", "guess_mimetype"]

_7BIT_BYTES = b"\t\n\r" + bytes(range(0x20, 0x7F))
_NEWLINE = re.compile(r"\r\n|\r|\n")  # what the email package's generator turns into CRLF
_BOUNDARY_DIGITS = len(repr(sys.maxsize - 1))  # the email package's boundary: 15 "=", digits, "=="
_HIGH_BYTES = bytes(range(128, 256))
_COMPRESSED_TYPES = {"gzip": "application/gzip", "bzip2": "application/x-bzip2"}


def is_7bit(text: str) -> bool:
    """Only TAB, LF, CR and printable ASCII (bytes.translate: cheaper than a regex search)."""
    return text.isascii() and not text.encode("ascii").translate(None, _7BIT_BYTES)


def body_cte(field: str, text: str) -> str:
    """7bit when the text already is 7-bit with short lines; else quoted-printable for mostly
    ASCII text, base64 for mostly non-ASCII text (whichever is smaller)."""
    # In 7-bit text, str.splitlines() splits at CR, LF and CRLF only: the email package's lines.
    if is_7bit(text) and (len(text) <= MAX_LINE or max(map(len, text.splitlines())) <= MAX_LINE):
        return "7bit"
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessage(field, "is not valid Unicode (lone surrogate)") from None
    high = len(raw) - len(raw.translate(None, _HIGH_BYTES))
    # QP costs ~3 octets per high byte and ~1 per ASCII byte; base64 4/3 for every byte.
    return "quoted-printable" if high * 5 < len(raw) - high else "base64"


def text_part(field: str, subtype: str, text: str) -> tuple[str, str]:
    """A text part's Content-* header lines and its encoded body, as the email package writes
    them with POLICY (`contentmanager._encode_text`, then the generator's CRLF line endings)."""
    cte = body_cte(field, text)
    if cte == "7bit":
        body = "\r\n".join(text.splitlines()) + "\r\n"  # CR, LF, CRLF only (see _body_cte)
    else:
        lines = text.encode("utf-8").splitlines()  # bytes: CR, LF, CRLF only
        if cte == "quoted-printable":
            payload = quoprimime.body_encode(b"\n".join(lines).decode("latin-1") + "\n", WIDTH)
        else:
            raw = b"\r\n".join(lines) + b"\r\n"
            step = WIDTH // 4 * 3
            payload = "".join(
                binascii.b2a_base64(raw[i : i + step]).decode("ascii")
                for i in range(0, len(raw), step)
            )
        body = _NEWLINE.sub("\r\n", payload)
    head = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n'
    return head, body


def make_boundary() -> str:
    """A multipart boundary in the email package's format (`Generator._make_boundary`)."""
    return f"{'=' * 15}{random.randrange(sys.maxsize):0{_BOUNDARY_DIGITS}d}=="


def fast_mime(text: str | None, html: str | None, boundary: str | None = None) -> str | None:
    """The MIME structure of a message without attachments, written directly: the bytes
    `email_mime` makes through the email package (up to the random boundary), for far less
    (bench/README.md). None when unsure (a body containing the boundary): the package."""
    if text is None or html is None:
        field, subtype, body = ("text", "plain", text) if html is None else ("html", "html", html)
        assert body is not None
        head, encoded = text_part(field, subtype, body)
        return f"{head}MIME-Version: 1.0\r\n\r\n{encoded}"
    text_head, text_body = text_part("text", "plain", text)
    html_head, html_body = text_part("html", "html", html)
    b = boundary or make_boundary()
    if b in text_body or b in html_body:
        return None
    return (
        f'MIME-Version: 1.0\r\nContent-Type: multipart/alternative;\r\n boundary="{b}"\r\n\r\n'
        f"--{b}\r\n{text_head}\r\n{text_body}\r\n"
        f"--{b}\r\n{html_head}\r\n{html_body}\r\n"
        f"--{b}--\r\n"
    )


def guess_mimetype(filename: str) -> str:
    guessed, encoding = mimetypes.guess_type(filename)
    if encoding is not None:
        return _COMPRESSED_TYPES.get(encoding, "application/octet-stream")
    if guessed is None or guessed.split("/", 1)[0] in ("message", "multipart"):
        # message/* may not be base64-encoded (RFC 2046 5.2), and we encode every attachment.
        return "application/octet-stream"
    return guessed


@dataclass
class Part:
    """One attachment, validated (mailer/message.py), ready to be encoded."""

    filename: str
    data: bytes
    maintype: str
    subtype: str
    content_id: str | None
    params: dict[str, str] | None


@dataclass
class Alternative:
    """One more part of the multipart/alternative, after the text and the HTML (a calendar
    invitation: text/calendar with its method parameter), validated (mailer/message.py)."""

    field: str
    maintype: str
    subtype: str
    params: dict[str, str]
    content: str | bytes  # str: text/*, encoded as the body is; bytes: base64


def email_mime(
    text: str | None,
    html: str | None,
    parts: list[Part],
    alternatives: Sequence[Alternative] = (),
) -> bytes:
    """The MIME structure (parts, Content-*, encodings), through the email package."""
    msg = EmailMessage(policy=POLICY)
    _body(msg, text, html, parts, alternatives)
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]
    flat = msg.as_bytes(policy=POLICY)
    if b"MIME-Version: 1.0\r\n" not in flat[: flat.find(b"\r\n\r\n") + 2]:  # pragma: no cover
        raise RuntimeError("the email package produced an unexpected header block")
    return flat


def _body(
    msg: EmailMessage,
    text: str | None,
    html: str | None,
    parts: list[Part],
    alternatives: Sequence[Alternative],
) -> None:
    if text is not None:
        msg.set_content(text, subtype="plain", charset="utf-8", cte=body_cte("text", text))
        if html is not None:
            msg.add_alternative(html, subtype="html", charset="utf-8", cte=body_cte("html", html))
    else:
        assert html is not None
        msg.set_content(html, subtype="html", charset="utf-8", cte=body_cte("html", html))
    for alt in alternatives:
        if isinstance(alt.content, str):
            cte = body_cte(alt.field, alt.content)
            msg.add_alternative(
                alt.content, subtype=alt.subtype, charset="utf-8", cte=cte, params=alt.params
            )
        else:
            msg.add_alternative(
                alt.content, alt.maintype, alt.subtype, cte="base64", params=alt.params
            )
    html_part: EmailMessage | None = None
    if html is not None:
        payload = msg.get_payload()
        if isinstance(payload, list):  # multipart/alternative: the first text/html part
            html_part = next(
                p
                for p in payload
                if isinstance(p, EmailMessage) and p.get_content_type() == "text/html"
            )
        else:
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

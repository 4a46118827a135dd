"""Turning a validated message (`Fields`, built by mailer/message.py) into wire bytes.

Here the envelope is decided (RCPT TO), the message id and the X-SMTPAPI value are made, the
top-level headers are written (exactly, by mailer/headers.py) in front of the MIME structure
(mailer/mime.py), and the result is checked: pure ASCII, CRLF line endings, no line over 998
octets, the size under the limit, and the header names exactly those intended (mailer/guard.py).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from mailer.errors import InvalidMessage
from mailer.guard import check_rendered
from mailer.headers import (
    address_header,
    date_header,
    fold_header_value,
    subject_header,
)
from mailer.mime import Alternative, Part, email_mime, fast_mime
from mailer.smtpapi import HEADER_NAME, MAX_UNIQUE_ARGS_BYTES, header_json, unique_args_size

__all__ = ["ID_NAMESPACE", "Fields", "Output", "message_id_for", "render_fields"]

# Fixed forever: the same idempotency key must give the same message id in every release,
# because the workers' ledger deduplicates on that id.
ID_NAMESPACE = uuid.UUID("5f0c6f2e-8a3b-5c47-9d0e-6b1a2c3d4e5f")

Mailbox = tuple[str, str]  # (display name, ASCII address)


def message_id_for(idempotency_key: str | None) -> str:
    """The message id: random, or derived from the idempotency key (same key, same id)."""
    if idempotency_key is None:
        return uuid.uuid4().hex
    return uuid.uuid5(ID_NAMESPACE, idempotency_key).hex


@dataclass(slots=True)
class Fields:
    """A message's fields once each has been validated on its own (mailer/message.py)."""

    sender: Mailbox
    to: list[Mailbox]
    cc: list[Mailbox]
    bcc: list[Mailbox]
    reply_to: list[Mailbox]
    subject: str
    text: str | None
    html: str | None
    header_lines: list[str]  # the extra headers, each "Name: value\r\n", folded
    parts: list[Part]
    alternatives: list[Alternative]
    smtpapi: dict[str, Any]  # SMTPAPIHeader.to_dict(), validated
    idempotency_key: str | None


class Output(NamedTuple):
    id: str
    rcpt_to: list[str]
    data: bytes


def render_fields(
    fields: Fields,
    *,
    created_at: float,
    max_size: int,
    max_recipients: int,
    fast_mime_ok: bool = True,  # False: always the email package (tests compare the two)
) -> Output:
    """The envelope and the bytes; raises `InvalidMessage` naming the field that does not fit
    (too many recipients, too big, a reserved unique argument)."""
    to, cc = fields.to, fields.cc
    api_dict = fields.smtpapi
    rcpt_to = _envelope(fields, max_recipients)

    # Size, before encoding anything big (encoded sizes are never smaller than these).
    sizes = {
        "text": len(fields.text or ""),
        "html": len(fields.html or ""),
        "attachments": sum(len(p.data) for p in fields.parts),
        "alternatives": sum(len(a.content) for a in fields.alternatives),
    }
    _check_size(sizes, sum(sizes.values()) + sizes["attachments"] // 3, max_size)

    # Ids and the X-SMTPAPI value.
    message_id = message_id_for(fields.idempotency_key)
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
    api_dict = {**api_dict, "unique_args": unique_args}
    api_json = header_json(api_dict)
    smtpapi_line = f"{HEADER_NAME}: {fold_header_value(HEADER_NAME, api_json, field='smtpapi')}\r\n"

    # The MIME structure (parts, Content-*, encodings): written directly for text and/or
    # HTML (the common case), through the email package when there are attachments or other
    # alternatives.
    slow = fields.parts or fields.alternatives or not fast_mime_ok
    mime = None if slow else fast_mime(fields.text, fields.html)
    if mime is not None:
        flat = mime.encode("ascii")
    else:
        try:
            flat = email_mime(fields.text, fields.html, fields.parts, fields.alternatives)
        except InvalidMessage:
            raise
        except Exception as exc:  # the email package's many errors: name the field instead
            field = (
                "attachments" if fields.parts else "alternatives" if fields.alternatives else "text"
            )
            raise InvalidMessage(field, f"cannot be encoded: {exc}") from None

    sender = fields.sender
    domain = sender[1].rpartition("@")[2]
    # Every top-level header but the MIME ones is written here, exactly (see mailer/headers.py);
    # Bcc never is: those recipients are in the envelope only.
    head = "".join(
        (
            address_header("From", [sender]),
            address_header("To", to) if to else "",
            address_header("Cc", cc) if cc else "",
            address_header("Reply-To", fields.reply_to) if fields.reply_to else "",
            subject_header(fields.subject),
            date_header(math.floor(created_at)),
            f"Message-ID: <{message_id}@{domain}>\r\n",
            *fields.header_lines,
            smtpapi_line,
        )
    )
    data = head.encode("ascii") + flat
    # Every field was checked so that the guard cannot fire; it holds whatever the email
    # package (or a bug of ours) does.
    check_rendered(data, _intended(fields))
    sizes["smtpapi"] = len(smtpapi_line)
    _check_size(sizes, len(data), max_size)
    return Output(message_id, rcpt_to, data)


def _intended(fields: Fields) -> list[str]:
    """The top-level header names the message must have, lower-cased, in the order written."""
    names = ["from"]
    if fields.to:
        names.append("to")
    if fields.cc:
        names.append("cc")
    if fields.reply_to:
        names.append("reply-to")
    names += ("subject", "date", "message-id")
    names += [line.partition(":")[0].lower() for line in fields.header_lines]
    if fields.parts or fields.alternatives or (fields.text is not None and fields.html is not None):
        names += _MULTIPART_HEAD
    else:
        names += _SINGLE_PART_HEAD
    return names


# After the extra headers: X-SMTPAPI, then the MIME headers as mailer/mime.py writes them.
_MULTIPART_HEAD = ("x-smtpapi", "mime-version", "content-type")
_SINGLE_PART_HEAD = ("x-smtpapi", "content-type", "content-transfer-encoding", "mime-version")


def _envelope(fields: Fields, max_recipients: int) -> list[str]:
    """RCPT TO: every distinct address of to, cc and bcc, or one with X-SMTPAPI `to`."""
    to, cc, bcc = fields.to, fields.cc, fields.bcc
    if fields.smtpapi.get("to"):
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
        return [to[0][1]]
    rcpt_to: list[str] = []
    seen: set[str] = set()
    for name, group in (("to", to), ("cc", cc), ("bcc", bcc)):
        for _, addr in group:
            folded = addr.lower()
            if folded in seen:
                continue
            seen.add(folded)
            rcpt_to.append(addr)
            if len(rcpt_to) > max_recipients:
                raise InvalidMessage(
                    name,
                    f"more than {max_recipients} distinct recipients across to, cc "
                    "and bcc; split the message or use smtpapi 'to'",
                )
    if not rcpt_to:
        raise InvalidMessage("to", "no recipient: give at least one of to, cc or bcc")
    return rcpt_to


def _check_size(sizes: Mapping[str, int], total: int, max_size: int) -> None:
    if total > max_size:
        biggest = max(sizes, key=lambda k: sizes[k])
        raise InvalidMessage(
            biggest,
            f"the message is {total:,} bytes once encoded, over the limit of "
            f"{max_size:,} (SendGrid: 20 MB, headers and attachments included)",
        )

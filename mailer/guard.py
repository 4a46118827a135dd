"""The last check on a message's bytes, whatever wrote them (us or the email package).

Every field is validated before rendering, so nothing here should ever fire; it exists so that
a bug of ours, or a change in the email package, cannot put a header line on the wire that app
code did not ask for. Two entry points:

- `check_rendered(data, intended)`, run by `Message.render()` on every message: the structural
  checks below, plus the top-level header names must be exactly `intended`, in order.
- `check_wire(data)`, for the worker, which has only the bytes: the structural checks.

Structural checks: ASCII only, no NUL, every CR part of a CRLF and every LF too, no line over
998 octets, every header line a field (``Name: value``) or a continuation, no Bcc header, and
in every MIME part (found through the multipart boundaries) the singleton headers (From, To,
Subject, Content-Type, X-SMTPAPI, Message-ID, ...) at most once; a part's header block holds
only Content-* and MIME-Version headers. Each refusal is an `InvalidMessage` naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mailer.errors import InvalidMessage
from mailer.headers import MAX_LINE

__all__ = ["FIELD_OF", "check_rendered", "check_wire"]

# Headers a message or a part may carry at most once (RFC 5322 3.6, RFC 2045, SendGrid).
SINGLETONS = frozenset(
    {
        "from",
        "sender",
        "reply-to",
        "to",
        "cc",
        "subject",
        "date",
        "message-id",
        "x-smtpapi",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "content-id",
    }
)
# What a MIME part's own header block may hold (we write no other header there).
_PART_HEADERS = frozenset(
    {"content-type", "content-transfer-encoding", "content-disposition", "content-id"}
)
# The Message field each top-level header comes from: a refusal names it.
FIELD_OF: Mapping[str, str] = {
    "from": "from_addr",
    "to": "to",
    "cc": "cc",
    "reply-to": "reply_to",
    "subject": "subject",
    "x-smtpapi": "smtpapi",
    "date": "message",
    "message-id": "idempotency_key",
}
_FIELD_NAME = re.compile(rb"([!-9;-~]+):")
# The name of every line that starts a field (a continuation starts with a blank).
_FIELD_NAMES = re.compile(r"^([!-9;-~]+):", re.MULTILINE)
_BOUNDARY = re.compile(rb'boundary="?([^";\r\n]+)"?', re.IGNORECASE)
_MULTIPART = re.compile(rb"content-type:[ \t]*multipart/", re.IGNORECASE)


def _field(name: str) -> str:
    """The Message field a header line of this name comes from."""
    if name in FIELD_OF:
        return FIELD_OF[name]
    if name.startswith(("content-", "mime-")):
        return "body"
    return f"headers.{name}"


def _header_names(block: bytes, where: str) -> list[str]:
    """The field names of a header block (lower-cased, in order); refuses a line that is neither
    a field nor a continuation, naming the field it follows."""
    names: list[str] = _FIELD_NAMES.findall(block.decode("ascii").lower())
    continuations = block.count(b"\r\n ") + block.count(b"\r\n\t")
    if len(names) + continuations == block.count(b"\r\n") + 1:
        return names  # every line is a field or a continuation
    names = []
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and names:
            continue
        if line[:1] not in (b" ", b"\t") and _FIELD_NAME.match(line):
            names.append(line.partition(b":")[0].decode("ascii").lower())
            continue
        after = _field(names[-1]) if names else where
        raise InvalidMessage(after, f"renders to a header line that is not a field: {line!r}")
    raise InvalidMessage(where, "a header block the checks disagree on")  # pragma: no cover


def _once_each(names: list[str], where: str) -> None:
    if len(set(names)) == len(names) and "bcc" not in names:
        return
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen and name in SINGLETONS:
            # An injected line follows the header whose value carried it.
            culprit = _field(names[i - 1]) if where == "message" and i else where
            raise InvalidMessage(culprit, f"renders to a second {name!r} header line")
        seen.add(name)
        if name == "bcc":
            raise InvalidMessage("bcc", "renders to a Bcc header line")


def _structure(data: bytes) -> list[str]:
    """The byte-level checks, then the header names of the top level; every part is checked."""
    if not data.isascii() or b"\x00" in data:
        raise InvalidMessage("message", "the rendered message has NUL or non-ASCII octets")
    lines = data.split(b"\r\n")
    crlf = len(lines) - 1
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        raise InvalidMessage("message", "the rendered message has a bare CR or LF")
    if max(map(len, lines)) > MAX_LINE:
        raise InvalidMessage("message", f"the rendered message has a line over {MAX_LINE} octets")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise InvalidMessage("message", "the rendered message has no header/body separator")
    names = _header_names(head, "message")
    _once_each(names, "message")
    _parts(head, body, depth=0)
    return names


def _parts(head: bytes, body: bytes, depth: int) -> None:
    """Checks the parts of a multipart entity (recursively)."""
    if b"multipart/" not in head.lower() or not _MULTIPART.search(head):
        return
    if depth > 8:
        raise InvalidMessage("attachments", "MIME parts nested too deep")
    found = _BOUNDARY.search(head)
    if found is None:
        raise InvalidMessage("body", "a multipart entity without a boundary")
    delimiter = b"--" + found.group(1)
    chunks = (b"\r\n" + body).split(b"\r\n" + delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise InvalidMessage("body", "a multipart entity whose parts are not delimited")
    for chunk in chunks[1:-1]:
        part = chunk.removeprefix(b"\r\n")
        if part.startswith(b"\r\n"):
            part_head, part_body = b"", part[2:]
        else:
            part_head, _, part_body = part.partition(b"\r\n\r\n")
        names = _header_names(part_head, "attachments")
        _once_each(names, "attachments")
        extra = set(names) - _PART_HEADERS
        if extra:
            raise InvalidMessage(
                "attachments", f"a MIME part renders with a {sorted(extra)[0]!r} header line"
            )
        _parts(part_head, part_body, depth + 1)


def check_wire(data: bytes) -> None:
    """Structural checks on a message's bytes (see the module docstring); raises
    `InvalidMessage` naming what is wrong."""
    _structure(data)


def check_rendered(data: bytes, intended: list[str]) -> None:
    """`check_wire`, and the top-level header names are exactly `intended` (lower-cased, in
    the order the renderer writes them)."""
    names = _structure(data)
    if names != intended:
        expected = set(intended)
        for at, name in enumerate(names):
            if name not in expected:
                culprit = _field(names[at - 1]) if at else "message"
                raise InvalidMessage(culprit, f"renders to an unexpected {name!r} header line")
        raise InvalidMessage("message", f"renders headers {names}, expected {intended}")

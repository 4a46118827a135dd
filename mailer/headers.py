"""RFC 5322 header text: folding, mailbox parsing and address validation, encoded words.

Everything here writes or checks one header line; nothing here knows about MIME parts or the
X-SMTPAPI JSON. Addresses are ASCII (the relay offers no SMTPUTF8); display names may be any
Unicode and are written as RFC 2047 encoded-words. Values are folded at their own whitespace
only, so that unfolding gives them back exactly; they are never encoded behind the caller's
back (see `fold_header_value`).

A little over 500 lines: the checks on what readers decode (encoded-words, RFC 2231) sit next
to the writers they protect, so a change to one shows the other.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from email import policy as email_policy
from email.headerregistry import (
    Address,
    BaseHeader,
    DateHeader,
    HeaderRegistry,
    UnstructuredHeader,
)
from email.utils import format_datetime, getaddresses
from functools import lru_cache
from urllib.parse import unquote_to_bytes

import idna
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

try:  # not email_validator's public API: without it every address takes the full check
    from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES as _MAILBOXES

    _LOWERED: frozenset[str] | None = frozenset(_MAILBOXES)
except ImportError:  # pragma: no cover
    _LOWERED = None

from mailer.errors import InvalidMessage

__all__ = [
    "CONTROL",
    "MAX_DISPLAY_NAME",
    "MAX_HEADER_NAME",
    "MAX_LINE",
    "POLICY",
    "RESERVED_HEADERS",
    "address_header",
    "bad_output",
    "check_decoded",
    "check_header_text",
    "date_header",
    "display",
    "encoded_words",
    "extra_header",
    "fold_header_value",
    "parse_mailbox",
    "subject_header",
]

MAX_LINE = 998  # octets per physical line, CRLF excluded (RFC 5322 2.1.1)
MAX_DISPLAY_NAME = 256
MAX_HEADER_NAME = 76

# C0 controls except TAB, DEL, and what str.splitlines() treats as a line break (the email
# package splits on those too). TAB is allowed: it is folding whitespace.
CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
_LINE_BREAK = re.compile("[\r\n]")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # printable ASCII, no space, no colon
_WHITESPACE = re.compile(r"\s")

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


class _HeaderRegistry(HeaderRegistry):
    """The stdlib registry builds a new class on every lookup; cache them."""

    @lru_cache(maxsize=256)  # noqa: B019 - one module-level instance, lives forever
    def __getitem__(self, name: str) -> type[BaseHeader]:
        return super().__getitem__(name)


# The email package writes the MIME structure of messages with attachments (mailer/mime.py
# writes the others, byte for byte the same) and structured extra headers with non-ASCII
# values; the top-level headers are written by this module, exactly.
REGISTRY = _HeaderRegistry()
WIDTH = 78  # the email package folds and encodes to this width
POLICY = email_policy.SMTP.clone(max_line_length=WIDTH, cte_type="7bit", header_factory=REGISTRY)


@lru_cache(maxsize=4)
def date_header(second: int) -> str:
    """The Date header (whole seconds, as RFC 5322 writes it): formatted once per second, not
    per message (email.utils' formatter is a large share of what rendering a message costs)."""
    return f"Date: {format_datetime(datetime.fromtimestamp(second, UTC))}\r\n"


# Characters that must be quoted in a display name (RFC 5322 specials, minus '.', which
# every mail reader accepts unquoted in names like "John Q. Public").
_NAME_SPECIALS = frozenset('()<>[]:;@\\,"')
# A bare dot-atom address of letters, digits, "_", "+" and "-": the standard library's address
# parser reads it as exactly itself (tests/unit/test_render_fast.py checks), so it needs no parse.
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
)

# The shape nearly every recipient has: a dot-atom local part and a lower-case host name under
# a top-level domain of letters, with no "--" (Punycode, R-LDH) in it. email_validator takes
# such an address as it is, but needs far longer than this regex to find that out (a visible
# share of what `send_many` costs per message). `_common_address` leaves everything else to it,
# and tests/unit/test_headers.py checks the shortcut against it with hypothesis, so a stricter
# release of email_validator shows up there.
_COMMON_ADDRESS = re.compile(
    r"([A-Za-z0-9_+=-]{1,64}(?:\.[A-Za-z0-9_+=-]+)*)"
    r"@((?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63})",
    re.ASCII,
)


def _common_address(addr: str) -> bool:
    """Whether email_validator would accept `addr` unchanged, known without asking it."""
    match = _COMMON_ADDRESS.fullmatch(addr)
    if match is None or _LOWERED is None or len(addr) > 254:
        return False
    local, domain = match.groups()
    if len(local) > 64 or len(domain) > 253 or "--" in domain:
        return False
    if local.lower() in _LOWERED:  # postmaster@... is lower-cased
        return False
    return not any(domain == d or domain.endswith("." + d) for d in SPECIAL_USE_DOMAIN_NAMES)


# ---------------------------------------------------------------------------------------------
# Header folding


def _fold_pieces(value: str) -> list[str]:
    """Splits `value` into pieces that each start with a whitespace run (except the first)."""
    pieces = re.findall(r"[ \t]*[^ \t]+", value)
    body = value.rstrip(" \t")
    if len(body) != len(value):
        trailing = value[len(body) :]
        if pieces:
            pieces[-1] += trailing
        else:
            pieces = [trailing]
    return pieces


def fold_header_value(
    name: str,
    value: str,
    limit: int = MAX_LINE,
    *,
    width: int = 78,
    field: str | None = None,
) -> str:
    """Folds `value` for the header `name` at existing whitespace only and returns it.

    A fold is a CRLF inserted *before* a run of spaces/tabs, which stays in place, so removing
    every CRLF gives back `value` exactly. Lines are filled up to `width` octets when possible
    (``f"{name}: "`` counts on the first line) and never exceed `limit`. Nothing is ever
    encoded. Raises `InvalidMessage(field or name, ...)` when the value contains a line break,
    a control character or non-ASCII text, or has a run of non-whitespace too long to fit.
    """
    field = field or name
    if not value.isascii():
        raise InvalidMessage(field, "non-ASCII text cannot be folded without encoding it")
    if CONTROL.search(value):
        raise InvalidMessage(field, "contains a line break or a control character")
    width = min(width, limit)
    prefix = len(name) + 2  # "Name: "
    if prefix + len(value) <= width:
        return value
    lines: list[str] = []
    buf: list[str] = []
    used = prefix
    for piece in _fold_pieces(value):
        size = len(piece)
        if buf and used + size > width:
            lines.append("".join(buf))
            buf = [piece]
            used = size
        else:
            buf.append(piece)
            used += size
        if used > limit:
            run = len(piece.lstrip(" \t"))
            raise InvalidMessage(
                field,
                f"has a run of {run} characters without a space; a header can only be folded "
                f"at spaces and a line may not exceed {limit} octets",
            )
    lines.append("".join(buf))
    return "\r\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Mailboxes


def _unquote(quoted: str) -> str | None:
    """The content of a quoted-string (with its quotes), or None if it is not exactly one."""
    out: list[str] = []
    i, end = 1, len(quoted) - 1
    if end < 1 or quoted[0] != '"' or quoted[end] != '"':
        return None
    while i < end:
        ch = quoted[i]
        if ch == "\\":
            if i + 1 >= end:
                return None
            out.append(quoted[i + 1])
            i += 2
            continue
        if ch == '"':
            return None
        out.append(ch)
        i += 1
    return "".join(out)


@lru_cache(maxsize=32768)
def _parse_mailbox_cached(value: str) -> tuple[str, str] | str:
    """(display name, ASCII address) or a problem description (errors cannot be cached)."""
    if CONTROL.search(value):
        return "contains a line break or a control character"
    text = value.strip()
    if not text:
        return "is empty"
    if text.endswith(">"):
        lt = text.rfind("<")
        if lt < 0:
            return f"{value!r} has a '>' without a '<'"
        addr = text[lt + 1 : -1].strip()
        raw_name = text[:lt].strip()
        name: str
        if raw_name.startswith('"'):
            unquoted = _unquote(raw_name)
            if unquoted is None:
                return f"{value!r}: the quoted display name is not closed properly"
            name = unquoted
        else:
            if _NAME_SPECIALS.intersection(raw_name):
                return (
                    f"{value!r} is ambiguous: one address per string, and a display name with "
                    'any of ( ) < > [ ] : ; @ \\ , " must be in double quotes'
                )
            name = raw_name
    else:
        if "<" in text or ">" in text:
            return f"{value!r} has unbalanced angle brackets"
        addr, name = text, ""
    if len(name) > MAX_DISPLAY_NAME:
        return f"the display name is over {MAX_DISPLAY_NAME} characters"
    if "=?" in name:
        return "the display name contains '=?', which mail readers would decode as RFC 2047"
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return "the display name is not valid Unicode (lone surrogate)"
    if not addr:
        return f"{value!r} has no address"
    if _WHITESPACE.search(addr) or "," in addr or ";" in addr:
        return f"{value!r} is ambiguous: one address per string"
    if not addr.rpartition("@")[0].isascii():
        return (
            f"{addr!r} has non-ASCII characters before the '@'; the relay does not offer "
            "SMTPUTF8, so the local part must be ASCII (the display name and the domain may be "
            "non-ASCII: an IDN domain is sent in its xn-- form)"
        )
    # Cross-check with the standard library's parser: any disagreement means the string can
    # be read in two ways, and a mail reader might pick the other one.
    if not _PLAIN_ADDRESS.fullmatch(text):
        parsed = getaddresses([text])
        if len(parsed) != 1 or parsed[0][1] != addr:
            return f"{value!r} is ambiguous (it can be read as more than one address)"
    if _common_address(addr):
        return name, addr
    try:
        result = validate_email(addr, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        encoded = _pre_encoded_idn(addr)
        if encoded is None:
            return f"{addr!r} is not a valid address: {exc}"
        return name, encoded
    if result.ascii_email is None:  # not reached with allow_smtputf8=False
        return f"{addr!r} would need SMTPUTF8, which the relay does not offer"
    return name, result.ascii_email


def _pre_encoded_idn(addr: str) -> str | None:
    """`addr` (domain lower-cased) when its domain is already in IDNA 2008 A-label form and the
    address is otherwise valid. email_validator refuses the joiners (ZWJ, ZWNJ) in a decoded
    label as unsafe to display, but IDNA 2008 allows them in context (RFC 5892 CONTEXTJ, e.g.
    Sinhala "xn--10cl1a0b660p"), so a domain given encoded is checked by the idna package and
    sent as given, as Django's SMTP backend sends it."""
    local, _, domain = addr.rpartition("@")
    labels = domain.lower().split(".")
    if not addr.isascii() or not any(label.startswith("xn--") for label in labels):
        return None
    try:
        idna.decode(domain)  # IDNA 2008, the context rules for the joiners included
    except (idna.IDNAError, UnicodeError):
        return None
    # Everything else about the address through email_validator, with the A-labels stood in
    # for by plain labels of the same length.
    stand_in = ".".join("x" * len(label) if label.startswith("xn--") else label for label in labels)
    try:
        validate_email(f"{local}@{stand_in}", check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError:
        return None
    return f"{local}@{'.'.join(labels)}"


def parse_mailbox(field: str, value: object) -> tuple[str, str]:
    """Parses one ``"a@x"`` or ``"Name <a@x>"`` into (display name, ASCII address)."""
    if not isinstance(value, str):
        raise InvalidMessage(field, f"expected an address string, got {type(value).__name__}")
    result = _parse_mailbox_cached(value)
    if isinstance(result, str):
        raise InvalidMessage(field, result)
    return result


# ---------------------------------------------------------------------------------------------
# What mail readers decode: RFC 2047 encoded-words and RFC 2231 extended values

# An encoded-word as decoders find it (lenient on purpose: RFC 2047 allows no spaces inside, but
# some decoders do).
_ENCODED_WORD = re.compile(r"=\?([^?]*)\?([bBqQ])\?(.*?)\?=")
# An RFC 2231 extended value: charset'language'percent-encoded text.
_RFC2231 = re.compile(r"[A-Za-z0-9!#$&+^_`{}~-]*'[A-Za-z0-9-]*'(.*)", re.S)
# Octets that are control characters in every charset we could be given.
_CONTROL_OCTET = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _decode_word(charset: str, encoding: str, text: str) -> str | None:
    """One encoded-word's text, as a lenient decoder would read it; None if it is not one."""
    try:
        if encoding in "bB":
            raw = base64.b64decode(text + "=" * (-len(text) % 4))
        else:
            raw = binascii.a2b_qp(text.replace("_", " ").encode("ascii"), header=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    if _CONTROL_OCTET.search(raw):
        return "\x00"  # a control octet: whatever the charset, the decoded text has one
    try:
        return raw.decode(charset.partition("*")[0] or "ascii", errors="replace")
    except LookupError:
        return raw.decode("latin-1")


def check_decoded(field: str, value: str, what: str = "") -> None:
    """Refuses a value whose RFC 2047 encoded-words or RFC 2231 form decode to a control
    character (a line break there becomes a header line of its own in the reader's view, or in
    the email package's output)."""
    if "=?" in value:
        for match in _ENCODED_WORD.finditer(value):
            decoded = _decode_word(*match.groups())
            if decoded is not None and CONTROL.search(decoded):
                raise InvalidMessage(
                    field,
                    f"{what}contains an RFC 2047 encoded-word ({match.group()[:40]!r}) that "
                    "decodes to a line break or a control character",
                )
    if "%" in value and "'" in value:
        extended = _RFC2231.fullmatch(value)
        if extended and _CONTROL_OCTET.search(unquote_to_bytes(extended.group(1))):
            raise InvalidMessage(
                field,
                f"{what}is in RFC 2231 form (charset'lang'text) and decodes to a line break or a "
                "control character",
            )


# ---------------------------------------------------------------------------------------------
# Writing header lines


def display(name: str, addr: str) -> str:
    """ "Name <addr>" for display (Unicode kept, quoted when needed), or just the address."""
    if not name:
        return addr
    return str(Address(display_name=name, addr_spec=addr))


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PHRASE = re.compile(f"{_ATEXT}(?: {_ATEXT})*")


def mailbox(name: str, addr: str) -> str:
    """One mailbox as header text. The display name is written so that RFC 5322/2047 readers
    get it back exactly: single-spaced atoms as they are, other ASCII as a quoted-string (which
    keeps every blank), non-ASCII as encoded-words. ("=?" in names is refused earlier.)"""
    if not name:
        return addr
    if not name.isascii():
        phrase = encoded_words(name)
    elif _PLAIN_PHRASE.fullmatch(name):
        phrase = name
    else:
        phrase = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{phrase} <{addr}>"


def address_header(name: str, mailboxes: Sequence[tuple[str, str]]) -> str:
    value = ", ".join(mailbox(*item) for item in mailboxes)
    # Cannot fail: no token is longer than a 256-character name or a 254-character address.
    return f"{name}: {fold_header_value(name, value)}\r\n"


def check_header_text(field: str, value: object, what: str = "") -> str:
    if not isinstance(value, str):
        raise InvalidMessage(field, f"{what}must be a string, got {type(value).__name__}")
    if CONTROL.search(value):
        kind = "a line break (CR or LF)" if _LINE_BREAK.search(value) else "a control character"
        raise InvalidMessage(field, f"{what}contains {kind}; header values may not")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidMessage(field, f"{what}is not valid Unicode (lone surrogate)") from None
    return value


def encoded_words(text: str) -> str:
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


def subject_header(subject: str) -> str:
    """The Subject line(s), exact: the email package's folding can lose blanks (a fold right
    after "Subject:" comes back as a leading space) and lets literal "=?...?=" decode."""
    if subject.isascii() and "=?" not in subject and subject[:1] not in (" ", "\t"):
        try:
            return f"Subject: {fold_header_value('Subject', subject)}\r\n"
        except InvalidMessage:
            pass  # a word too long for one line: encoded-words can be split anywhere
    return f"Subject: {fold_header_value('Subject', encoded_words(subject))}\r\n"


def bad_output(data: bytes) -> bool:
    """Whether `data` has a bare CR, a bare LF or a line over 998 octets (not a regex: one
    doing the same retries the 999-octet run at every offset)."""
    lines = data.split(b"\r\n")
    crlf = len(lines) - 1
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        return True
    return max(map(len, lines)) > MAX_LINE


def extra_header(name: object, value: object) -> str:
    """One `headers=` entry, validated and folded: "Name: value\\r\\n"."""
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        raise InvalidMessage(
            f"headers.{name}",
            "a header name is printable ASCII without spaces or ':'",
        )
    field = f"headers.{name}"
    if len(name) > MAX_HEADER_NAME:
        raise InvalidMessage(field, f"a header name is at most {MAX_HEADER_NAME} characters")
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
    text = check_header_text(field, value)
    kind = REGISTRY[name]
    if text.isascii():
        # Sent exactly as given, folded at its own spaces; never encoded. Readers decode its
        # encoded-words, though: none may hide a line break.
        check_decoded(field, text)
        return f"{name}: {fold_header_value(name, text, field=field)}\r\n"
    if issubclass(kind, UnstructuredHeader):
        # Free text: all of it as encoded-words (a literal "=?" included), so it decodes back
        # exactly.
        return f"{name}: {fold_header_value(name, encoded_words(text))}\r\n"
    if issubclass(kind, DateHeader):
        # The email package writes a non-ASCII date as an empty header: refuse instead.
        raise InvalidMessage(field, "a date is ASCII text (RFC 5322 date-time), got non-ASCII")
    if "=?" in text:
        # The email package decodes encoded-words in a structured value before writing it
        # again: what they hide would be written out raw.
        raise InvalidMessage(
            field,
            "contains '=?': in a non-ASCII address header the email package decodes RFC 2047 "
            "encoded-words; give the text itself",
        )
    try:  # a structured header (Sender, Resent-*...): the email package knows its syntax
        folded: str = POLICY.header_factory(name, text).fold(policy=POLICY)
    except Exception as exc:  # the email package's parsers raise a variety of errors
        raise InvalidMessage(field, f"cannot be encoded: {exc}") from None
    lines = folded.split("\r\n")
    if (
        not folded.isascii()
        or bad_output(folded.encode("ascii"))
        or any(line[:1] not in (" ", "\t") for line in lines[1:-1])
    ):
        raise InvalidMessage(field, "cannot be encoded into one header of lines of 998 octets")
    return folded

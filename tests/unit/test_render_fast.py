"""The direct MIME writer (mailer/mime.py `fast_mime`) against the email package (`email_mime`):
the same bytes for every text and/or HTML body and whole message, and the cheap checks equal to
the regexes they replaced."""

from __future__ import annotations

import re
import time
import warnings
from email.utils import getaddresses
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailer.errors import InvalidMessage
from mailer.headers import _PLAIN_ADDRESS, bad_output
from mailer.message import MAX_RECIPIENTS, MAX_SIZE, Attachment, Message, _render
from mailer.mime import body_cte, email_mime, fast_mime

BOUNDARY = re.compile(rb'boundary="([^"]+)"')
# The email package's format: 15 "=", the token zero-padded to 19 digits, "==".
BOUNDARY_FORMAT = re.compile(rb"={15}[0-9]{19}==")

# The checks as they were written before (the references for the cheaper ones).
_NOT_7BIT = re.compile(r"[^\t\n\r\x20-\x7e]")
_LONG_LINE = re.compile(r"[^\r\n]{999}")
_BAD_OUTPUT = re.compile(rb"[^\r\n]{999}|\r(?!\n)|(?<!\r)\n")


def _oldbody_cte(field: str, text: str) -> str:
    if not _NOT_7BIT.search(text) and not _LONG_LINE.search(text):
        return "7bit"
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessage(field, "is not valid Unicode (lone surrogate)") from None
    high = sum(1 for octet in raw if octet >= 0x80)
    return "quoted-printable" if high * 5 < len(raw) - high else "base64"


def _outcome(fn: Any) -> Any:
    """fn()'s result, or the refusal (field, problem) it raised."""
    try:
        return fn()
    except InvalidMessage as exc:
        return ("refused", exc.field, exc.problem)


def _mime_both(text: str | None, html: str | None) -> tuple[Any, Any]:
    """(direct, email package) MIME bytes for these bodies, the direct one written with the
    email package's boundary so that the two can be compared octet for octet."""
    slow = _outcome(lambda: email_mime(text, html, []))
    if not isinstance(slow, bytes):
        return _outcome(lambda: fast_mime(text, html)), slow
    found = BOUNDARY.search(slow)
    boundary = found.group(1).decode("ascii") if found else None
    fast = fast_mime(text, html, boundary)
    return (fast.encode("ascii") if fast is not None else None), slow


def _render_both(message: Message) -> tuple[Any, Any]:
    """(fast path, email package) renderings of the whole message, at the same instant, with
    each multipart boundary replaced by a placeholder (after checking its format)."""
    now = time.time()
    out = []
    for fast_mime_ok in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            result = _outcome(
                lambda ok=fast_mime_ok: _render(
                    message, None, MAX_SIZE, MAX_RECIPIENTS, fast_mime_ok=ok, created_at=now
                )
            )
        if not isinstance(result, tuple):
            data = result.data
            for boundary in BOUNDARY.findall(data):
                assert BOUNDARY_FORMAT.fullmatch(boundary)
                data = data.replace(boundary, b"BOUNDARY")
            result = (result.id, result.rcpt_to, data)
        out.append(result)
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# Hand-picked bodies

LINE_77 = "a" * 77
BODIES = [
    "",
    "\n",
    "\r\n",
    "\r",
    "\n\n\n",
    "x",
    "no newline at the end",
    "Hi there.\n",
    "a\r\nb\rc\nd\n\re",
    "mixed\r\r\n\n\r\rend\r",
    "trailing spaces   \nand tabs\t\t\n  \n",
    " leading space\n\tleading tab\n",
    ".\n..\n.leading dot\n.\r\n",
    "From me\nFrom \n>From quoted\nFrom",
    "--\n-- \n--==\n",
    LINE_77 + "\n" + LINE_77 + "b\n" + LINE_77 + "bc\n",
    "a" * 998,
    "a" * 998 + "\n" + "b" * 998 + "\r\n",
    "a" * 999,
    "a" * 997 + "\r\n" + "b" * 999 + "\n",
    ("word " * 300).strip() + "\n",
    "x" * 1024,
    "\n".join("x" * 70 for _ in range(15)) + "\n",
    "caf\u00e9\n",
    "na\u00efve r\u00e9sum\u00e9 with mostly ASCII text around it, long enough\n",
    "\u4e2d\u6587\u5b57" * 50,
    "\u00e9" * 1000,
    "=\n=3D\n= \n=\r\n",
    "tab\tin\tthe\tmiddle and = signs and trailing =",
    "\u00e9 trailing space \n\u00e9 trailing tab\t\n",
    "\u00e9\r\u00e9\r\n\u00e9\n",
    "control \x01 char\n",
    "form\x0cfeed and vertical\x0btab\n",
    "unicode\u2028line\u2029separators\x85next\n",
    "\x1c\x1d\x1e separators\n",
    "del \x7f\n",
    "nul \x00 byte\n",
    "emoji \U0001f600\n",
    "lone \ud800 surrogate\n",
    "<p>Hello <b>world</b></p>",
    "<html>\n<body>\n<p>" + "y" * 990 + "</p>\n</body>\n</html>\n",
]


@pytest.mark.parametrize("body", BODIES)
def test_text_only(body: str) -> None:
    fast, slow = _mime_both(body, None)
    assert fast == slow


@pytest.mark.parametrize("body", BODIES)
def test_html_only(body: str) -> None:
    fast, slow = _mime_both(None, body)
    assert fast == slow


@pytest.mark.parametrize("body", BODIES)
def test_text_and_html(body: str) -> None:
    for text, html in ((body, "<p>Hi</p>\n"), ("Hi\n", body), (body, body)):
        fast, slow = _mime_both(text, html)
        assert fast == slow


def test_the_benchmark_message_takes_the_direct_path() -> None:
    text = "\n".join("x" * 70 for _ in range(15)) + "\n"
    mime = fast_mime(text, None)
    assert mime is not None
    message = Message(
        to="user1@example.com", subject="Hello", text=text, from_addr="s@x.org", idempotency_key="k"
    )
    assert message.render().data.endswith(mime.encode("ascii"))
    fast, slow = _render_both(message)
    assert fast == slow


def test_multipart_boundaries_are_random_in_the_email_package_format() -> None:
    message = Message(
        to="to@example.com", subject="s", text="a", html="<p>a</p>", from_addr="f@x.org"
    )
    boundaries = {BOUNDARY.findall(message.render().data)[0] for _ in range(3)}
    assert len(boundaries) == 3
    assert all(BOUNDARY_FORMAT.fullmatch(b) for b in boundaries)


def test_a_body_containing_the_boundary_goes_to_the_email_package() -> None:
    boundary = "===============1234567890123456789=="
    assert fast_mime(f"--{boundary}\n", "<p>x</p>", boundary) is None
    assert fast_mime("x", f"<p>{boundary}</p>", boundary) is None
    assert fast_mime("x", "<p>x</p>", boundary) is not None


@pytest.mark.parametrize(
    "fields",
    [
        {"text": "Hi\n"},
        {"html": "<p>Hi</p>"},
        {"text": "Hi\n", "html": "<p>Hi</p>"},
        {"text": "caf\u00e9\n", "html": "<p>caf\u00e9</p>"},
        {"text": "Hi\n", "attachments": [("a.txt", "data", None)]},
        {
            "html": "<img src='cid:logo'>",
            "attachments": [Attachment("l.png", b"\x89", None, "logo")],
        },
        {"text": "x", "html": "y", "cc": "Cc <c@example.com>", "headers": {"X-A": "\u00e9"}},
        {"text": "lone \ud800"},
        {"text": "ok", "html": "lone \udfff"},
        {"text": None},
    ],
)
def test_whole_messages(fields: dict[str, Any]) -> None:
    message = Message(
        to="Ann <to@example.com>",
        subject="Hello",
        from_addr="Sender <sender@example.com>",
        idempotency_key="same id for both",
        **fields,
    )
    fast, slow = _render_both(message)
    assert fast == slow


# ---------------------------------------------------------------------------------------------
# Generated bodies

# Fragments that stress line breaks, line lengths, QP/base64 choices and mbox-isms.
_fragments = st.one_of(
    st.sampled_from(["\r", "\n", "\r\n", ".", "From ", " ", "\t", "=", "--", "\u00e9", "\u4e2d"]),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", " ", "\u00e9"]), st.integers(70, 80)),
    st.builds(lambda n: "b" * n, st.integers(994, 1001)),
    st.text(max_size=20),
)
_bodies = st.one_of(
    st.text(max_size=300),
    st.lists(_fragments, max_size=12).map("".join),
    st.text(alphabet="ab \t\r\n.=", max_size=200),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.none(), _bodies), html=st.one_of(st.none(), _bodies))
@example(text="\r\n.\r\nFrom x", html=None)
@example(text=None, html="a" * 998 + "\n")
def test_generated_bodies(text: str | None, html: str | None) -> None:
    if text is None and html is None:
        return
    fast, slow = _mime_both(text, html)
    assert fast == slow


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.one_of(st.none(), _bodies),
    html=st.one_of(st.none(), _bodies),
    attach=st.booleans(),
    subject=st.text(max_size=40),
)
def test_generated_messages(text: str | None, html: str | None, attach: bool, subject: str) -> None:
    message = Message(
        to="to@example.com",
        subject=subject,
        text=text,
        html=html,
        from_addr="f@example.org",
        attachments=[("a.bin", b"\x00", None)] if attach else None,
        idempotency_key="k",
    )
    fast, slow = _render_both(message)
    assert fast == slow


# ---------------------------------------------------------------------------------------------
# The cheaper checks


_wire = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b"x", b"x" * 997, b"x" * 998, b"x" * 999]), max_size=8
).map(b"".join)


@settings(max_examples=500)
@given(data=st.one_of(_wire, st.binary(max_size=64)))
@example(data=b"")
@example(data=b"x" * 998 + b"\r\n" + b"y" * 998)
@example(data=b"\r\n" + b"x" * 999)
def test_bad_output_is_the_regex(data: bytes) -> None:
    assert bad_output(data) == bool(_BAD_OUTPUT.search(data))


_texts = st.one_of(
    st.text(max_size=100),
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=100),
    _wire.map(lambda b: b.decode("ascii")),
    st.lists(_fragments, max_size=6).map("".join),
    st.lists(st.sampled_from(["a" * 300, " ", "\t", "\r\n", "\u00e9"]), max_size=8).map("".join),
)


@settings(max_examples=500)
@given(text=_texts)
@example(text="\x0b")
@example(text="a\x85b")
@example(text="a" * 999)
@example(text="a" * 998 + "\u2028" + "a")
def test_body_cte_is_unchanged(text: str) -> None:
    assert _outcome(lambda: body_cte("text", text)) == _outcome(lambda: _oldbody_cte("text", text))


@pytest.mark.parametrize("body", BODIES)
def test_body_cte_is_unchanged_for_hand_picked_bodies(body: str) -> None:
    assert _outcome(lambda: body_cte("html", body)) == _outcome(lambda: _oldbody_cte("html", body))


@settings(max_examples=200)
@given(address=st.from_regex(_PLAIN_ADDRESS, fullmatch=True))
@example(address="user@example.com")
@example(address="first.last+tag@sub-domain.example.co.uk")
@example(address="-@-")
@example(address="_._@a.-")
def test_plain_addresses_need_no_cross_check(address: str) -> None:
    """`parse_mailbox` skips the standard library's parse for these: it reads them as-is."""
    assert getaddresses([address]) == [("", address)]

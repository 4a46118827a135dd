"""Hostile input (issue 16): every value, through every way in, is refused with an
`InvalidMessage` naming the field, or rendered into bytes that pass the guard and carry only
the header lines app code asked for. Never another exception.

Ways in: `Message(...).render()`, `Mailer.send_many` (validation happens before anything is
published), the Django backend's public `to_message`, and the CLI's file readers.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
from collections.abc import Callable
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.bulk import BadFile, read_rows
from mailer.client import message_from_mapping
from mailer.errors import InvalidMessage
from mailer.guard import check_rendered, check_wire
from mailer.message import Attachment, Message

FROM = "Sender <sender@example.com>"
BASE: dict[str, Any] = {"to": "to@example.com", "subject": "s", "text": "t", "from_addr": FROM}


def q(text: str) -> str:
    """`text` as one RFC 2047 Q encoded-word (every octet escaped)."""
    return "=?utf-8?q?" + "".join(f"={b:02X}" for b in text.encode()) + "?="


def b(text: str) -> str:
    return "=?utf-8?b?" + base64.b64encode(text.encode()).decode() + "?="


# The hostile values: literal controls, encoded words hiding them (Q and B, lower and upper
# case, other charsets), RFC 2231 forms, renames, header-looking text, Unicode oddities.
INJECTIONS = [
    "\r\nBcc: evil@example.com",
    '\r\nX-SMTPAPI: {"to": ["evil@example.com"]}',
    "\r\nContent-Type: text/html",
    "\nBcc: evil@example.com",
    "\rBcc: evil@example.com",
    "\r\n\r\n<html>body</html>",
    "\x00",
    "\x0b",
    "\x1b[31m",
    "\x7f",
]
HOSTILE: list[str] = [
    *(f"a{i}" for i in INJECTIONS),
    *(q(f"a{i}") for i in INJECTIONS),
    *(b(f"a{i}") for i in INJECTIONS),
    "=?utf-8?q?a=0D=0AContent-Type:_text/html?=",
    "=?utf-8?q?evil.exe=00?=.pdf",
    "=?utf-8?b?ZXZpbC5leGU=?=",
    "=?UTF-8?Q?a=0Db?=",
    "=?utf-8?q?a=0Ab?=",
    "=?iso-8859-1?q?a=0D=0AX:_y?=",
    "=?bogus-charset?q?a=0D=0AX:_y?=",
    "=?utf-8*en?q?a=0D=0AX:_y?=",
    "=?utf-8?q?a?= =?utf-8?q?=0D=0AX:_y?=",
    "utf-8''a%0D%0AContent-Type%3A%20text%2Fhtml",
    "utf-8'en'evil.exe%00.pdf",
    "us-ascii''a%0Ab",
    "Grüße =?utf-8?q?=0D=0ABcc:_evil@example.com?=",
    "Grüße <g@example.com> =?utf-8?q?=0D=0AX-SMTPAPI:_{}?=",
    "Mön, 1 Jan 2024 00:00:00 +0000",
    "=?",
    "?=",
    "=?utf-8?q??=",
    "report\u202egpj.exe",
    "\ufeffbom",
    "\u2028line",
    "\u0085nel",
    "\ud800",
    "x" * 2000,
    "a " * 600,
    "Content-Type: text/html",
    "Bcc: evil@example.com",
]

# Where each value goes: (name, the field a refusal must name, how to build the message).
Target = tuple[str, str, Callable[[str], dict[str, Any]]]
TARGETS: list[Target] = [
    ("subject", "subject", lambda v: {"subject": v}),
    ("to name", "to", lambda v: {"to": f'"{v}" <to@example.com>'}),
    ("from name", "from_addr", lambda v: {"from_addr": f'"{v}" <f@example.com>'}),
    ("cc name", "cc", lambda v: {"cc": [f'"{v}" <cc@example.com>']}),
    ("reply_to name", "reply_to", lambda v: {"reply_to": f'"{v}" <r@example.com>'}),
    ("X header", "headers.X-Custom", lambda v: {"headers": {"X-Custom": v}}),
    ("Sender", "headers.Sender", lambda v: {"headers": {"Sender": f"Bö <b@example.com> {v}"}}),
    ("Resent-To", "headers.Resent-To", lambda v: {"headers": {"Resent-To": f"Rö <r@x.org>{v}"}}),
    ("Resent-Date", "headers.Resent-Date", lambda v: {"headers": {"Resent-Date": v}}),
    ("Orig-Date", "headers.Orig-Date", lambda v: {"headers": {"Orig-Date": v}}),
    ("filename", "attachments[0]", lambda v: {"attachments": [Attachment(v, b"data")]}),
    (
        "inline filename",
        "attachments[0]",
        lambda v: {"html": "<img src=cid:c>", "attachments": [Attachment(v, b"x", None, "c")]},
    ),
    (
        "content_id",
        "attachments[0]",
        lambda v: {"attachments": [Attachment("a.png", b"x", None, v)]},
    ),
    ("idempotency_key", "idempotency_key", lambda v: {"idempotency_key": v}),
    ("category", "smtpapi.category", lambda v: {"smtpapi": {"category": v}}),
    ("unique_arg", "smtpapi.unique_args", lambda v: {"smtpapi": {"unique_args": {"k": v}}}),
    ("text", "text", lambda v: {"text": v}),
    ("html", "html", lambda v: {"html": v}),
]

# Top-level headers a message may have, by where they come from.
MIME_TOP = {"mime-version", "content-type", "content-transfer-encoding"}
OWN_TOP = {"from", "to", "cc", "reply-to", "subject", "date", "message-id", "x-smtpapi"}
PART_HEADERS = {"content-type", "content-transfer-encoding", "content-disposition", "content-id"}


def assert_safe(data: bytes, extra: set[str] | frozenset[str] = frozenset()) -> None:
    """The bytes pass the worker's guard, and the email package finds only the header lines we
    write: our own, the extra ones asked for, MIME ones; one X-SMTPAPI; parts with Content-*."""
    check_wire(data)
    parsed = message_from_bytes(data, policy=policy.compat32)
    names = [name.lower() for name in parsed]
    assert set(names) <= OWN_TOP | MIME_TOP | {n.lower() for n in extra}, names
    assert names.count("x-smtpapi") == 1 and "bcc" not in names
    for part in parsed.walk():
        if part is not parsed:
            assert {n.lower() for n in part} <= PART_HEADERS | {"mime-version"}
    assert b"\x00" not in data


def outcome(fields: dict[str, Any], field: str) -> str:
    """Renders; checks the refusal names `field`, or that the output is safe."""
    message = Message(**{**BASE, **fields})
    try:
        rendered = message.render()
    except InvalidMessage as exc:
        assert exc.field == field or exc.field.startswith(field), (exc.field, field, str(exc))
        return "refused"
    assert_safe(rendered.data, set((fields.get("headers") or {}).keys()))
    return "accepted"


CORPUS = [
    pytest.param(target, value, id=f"{target[0]}-{i}")
    for target, (i, value) in itertools.product(TARGETS, enumerate(HOSTILE))
]


def test_corpus_size() -> None:
    assert len(CORPUS) >= 300


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(("target", "value"), CORPUS)
def test_render_refuses_or_renders_safely(target: Target, value: str) -> None:
    _, field, build = target
    outcome(build(value), field)


# The inputs the issue names, with what must happen to each.
ISSUE_CASES = [
    (
        "attachments[0]",
        {"attachments": [Attachment("=?utf-8?q?a=0D=0AContent-Type:_text/html?=", b"x")]},
    ),
    ("attachments[0]", {"attachments": [Attachment("=?utf-8?q?evil.exe=00?=.pdf", b"x")]}),
    ("attachments[0]", {"attachments": [Attachment("=?utf-8?b?ZXZpbC5leGU=?=", b"x")]}),
    ("attachments[0]", {"attachments": [Attachment("=?utf-8?q?a=0Db?=", b"x")]}),
    ("attachments[0]", {"attachments": [("=?utf-8?q?a=0Ab?=", b"x", None)]}),
    *(
        (f"headers.{name}", {"headers": {name: f"Bö <b@example.com> {q(inj)}"}})
        for name in (
            "Sender",
            "Resent-From",
            "Resent-To",
            "Resent-Cc",
            "Resent-Bcc",
            "Resent-Sender",
        )
        for inj in (
            '\r\nX-SMTPAPI: {"to": ["e@x.org"]}',
            "\r\nBcc: e@x.org",
            "\r\nContent-Type: text/html",
        )
    ),
    ("headers.Resent-Date", {"headers": {"Resent-Date": "Mön, 1 Jan 2024"}}),
    ("headers.Orig-Date", {"headers": {"Orig-Date": "tüesday"}}),
]


@pytest.mark.parametrize(("field", "fields"), ISSUE_CASES)
def test_the_issues_inputs_are_refused_naming_the_field(field: str, fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidMessage) as exc:
        Message(**{**BASE, **fields}).render()
    assert exc.value.field == field


def test_plain_unicode_filenames_and_structured_headers_still_render() -> None:
    rendered = Message(
        **{
            **BASE,
            "headers": {
                "Sender": "Bö <b@example.com>",
                "Resent-Date": "Mon, 1 Jan 2024 00:00:00 +0000",
            },
            "attachments": [Attachment("Grüße 2024.pdf", b"%PDF")],
        }
    ).render()
    assert_safe(rendered.data, {"Sender", "Resent-Date"})
    parsed = message_from_bytes(rendered.data, policy=policy.default)
    attachment = next(parsed.iter_attachments())
    assert attachment.get_filename() == "Grüße 2024.pdf"


# ---------------------------------------------------------------------------------------------
# Generated: headers, names and filenames built from encoded words and control characters

_CONTROLS = st.sampled_from(["\r", "\n", "\r\n", "\x00", "\x0b", "\x1f", "\x7f", "\x85"])
_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
_PIECE = st.one_of(
    _TEXT,
    _CONTROLS,
    st.builds(lambda t, c: q(t + c), _TEXT, _CONTROLS),
    st.builds(lambda t, c: b(t + c), _TEXT, _CONTROLS),
    st.builds(lambda t: q(t), _TEXT),
    st.sampled_from(
        ["=?", "?=", "=?utf-8?q?", "Bcc: x@y.org", "X-SMTPAPI: {}", "Content-Type: x/y"]
    ),
)
_VALUES = st.lists(_PIECE, min_size=1, max_size=5).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_VALUES, target=st.sampled_from(TARGETS))
def test_generated_values(value: str, target: Target) -> None:
    _, field, build = target
    outcome(build(value), field)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.from_regex(r"X-[A-Za-z0-9-]{1,20}", fullmatch=True),
    value=_VALUES,
    filename=_VALUES,
)
def test_generated_headers_and_filenames_together(name: str, value: str, filename: str) -> None:
    fields = {"headers": {name: value}, "attachments": [Attachment(filename, b"x")]}
    try:
        rendered = Message(**{**BASE, **fields}).render()
    except InvalidMessage as exc:
        assert exc.field in (f"headers.{name}", "attachments[0]")
        return
    assert_safe(rendered.data, {name})


# ---------------------------------------------------------------------------------------------
# The guard itself


def _good() -> bytes:
    return Message(**BASE).render().data


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.replace(b"Subject: s\r\n", b"Subject: s\r\nBcc: e@x.org\r\n"),
        lambda d: d.replace(b"Subject: s\r\n", b"Subject: s\r\nX-SMTPAPI: {}\r\n"),
        lambda d: d.replace(b"Subject: s\r\n", b"Subject: s\r\nFrom: e@x.org\r\n"),
        lambda d: d.replace(b"Subject: s\r\n", b"Subject: s\r\nnot a field\r\n"),
        lambda d: d.replace(b"Subject: s\r\n", b"Subject: s\x00\r\n"),
        lambda d: d.replace(b"Subject: s\r\n", b"Subject: s\n"),
        lambda d: d.replace(b"Subject: s\r\n", b"Subject: s\r"),
        lambda d: d.replace(b"Subject: s\r\n", b"Subject: " + b"x" * 999 + b"\r\n"),
        lambda d: d.replace(b"\r\n\r\n", b"\r\n"),
        lambda d: d.replace(b"Subject: s\r\n", "Subject: é\r\n".encode()),
    ],
)
def test_check_wire_refuses_structural_problems(mutate: Callable[[bytes], bytes]) -> None:
    with pytest.raises(InvalidMessage):
        check_wire(mutate(_good()))


def test_check_wire_refuses_injected_part_headers() -> None:
    data = Message(**{**BASE, "attachments": [Attachment("a.txt", b"x")]}).render().data
    check_wire(data)
    bad = data.replace(b"Content-Disposition:", b"Bcc: e@x.org\r\nContent-Disposition:", 1)
    with pytest.raises(InvalidMessage):
        check_wire(bad)
    twice = data.replace(
        b"Content-Disposition:", b"Content-Type: text/html\r\nContent-Disposition:", 1
    )
    with pytest.raises(InvalidMessage):
        check_wire(twice)


def test_check_rendered_wants_exactly_the_intended_names() -> None:
    data = _good()
    names = [
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "x-smtpapi",
        "content-type",
        "content-transfer-encoding",
        "mime-version",
    ]
    check_rendered(data, names)
    with pytest.raises(InvalidMessage):
        check_rendered(data, [*names, "x-missing"])
    with pytest.raises(InvalidMessage) as exc:
        check_rendered(data.replace(b"Subject: s\r\n", b"Subject: s\r\nX-New: 1\r\n"), names)
    assert exc.value.field == "subject"  # the line it follows: whose value would have carried it


# ---------------------------------------------------------------------------------------------
# send_many (validation comes before any publish: a refused batch publishes nothing)


@pytest.mark.parametrize("value", HOSTILE[:40])
def test_send_many_refuses_a_hostile_message_before_publishing(redis_url: str, value: str) -> None:
    import dataclasses

    import redis

    from mailer.client import Mailer
    from mailer.config import Settings

    mailer = Mailer(dataclasses.replace(Settings(), broker_url=redis_url, redis_url=redis_url))
    hostile = {**BASE, "attachments": [Attachment(value, b"x")], "headers": {"X-A": value}}
    try:
        ids = mailer.send_many([dict(BASE), hostile])
    except InvalidMessage as exc:
        assert exc.field in ("messages[1].attachments[0]", "messages[1].headers.X-A"), exc.field
        assert redis.Redis.from_url(redis_url).llen("mailer") == 0
    else:
        assert len(ids) == 2
    finally:
        mailer.close()


# ---------------------------------------------------------------------------------------------
# The Django backend's public conversion


@pytest.fixture(scope="module")
def django_ready() -> None:
    import django
    from django.conf import settings as django_settings

    if not django_settings.configured:
        django_settings.configure(EMAIL_BACKEND="mailer.django.EmailBackend")
        django.setup()


@pytest.mark.parametrize("value", HOSTILE)
def test_django_messages(django_ready: None, value: str) -> None:
    from django.core.mail import EmailMessage

    from mailer.django import to_message

    email = EmailMessage(
        subject="s",
        body="t",
        from_email=FROM,
        to=["to@example.com"],
        headers={"X-Custom": value},
    )
    email.attach(value, b"data", "application/octet-stream")
    try:
        rendered = to_message(email).render()
    except InvalidMessage as exc:
        assert exc.field in ("headers.X-Custom", "attachments[0]"), exc.field
        return
    assert_safe(rendered.data, {"X-Custom"})


# ---------------------------------------------------------------------------------------------
# The CLI's file readers


def _file(tmp_path: Path, content: bytes | str, name: str = "rows.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize(
    ("content", "line", "words"),
    [
        ('to,subject,text\na@example.com,"unclosed,t\nb@example.com,s,t\n', 2, "never closed"),
        ("to,subject,text\na@example.com,s\n", 2, "ragged"),
        ("to,subject,text\na@example.com,s,t,extra\n", 2, "ragged"),
        ("to,subject,to\na@example.com,s,b@example.com\n", 1, "twice"),
        ("to,,text\na@example.com,s,t\n", 1, "no name"),
        ("", 0, "empty"),
        ("to,subject,text\n", 0, "no rows"),
        (b"to,subject,text\na@example.com,s,\xff\xfe\n", 2, "not UTF-8"),
        ("to,subject,text\na@example.com,s," + "x" * 200_000 + "\n", 2, "over"),
        ('to,subject,headers\na@example.com,s,"' + "[" * 5000 + '"\n', 2, ""),
    ],
)
def test_csv_files_are_refused_naming_the_line(
    tmp_path: Path, content: str | bytes, line: int, words: str
) -> None:
    with pytest.raises(BadFile) as exc:
        read_rows(_file(tmp_path, content), "csv")
    assert exc.value.line == line
    assert words in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("content", "line", "words"),
    [
        ('{"to": "a@example.com"}\n' + "[" * 100_000 + "\n", 2, "nested too deep"),
        ('{"to": "a@example.com"}\nnot json\n', 2, "not JSON"),
        ('["a list"]\n', 1, "JSON object"),
        ("\n\n", 0, "empty"),
        (b'{"to": "\xc3("}\n', 1, "not UTF-8"),
    ],
)
def test_jsonl_files_are_refused_naming_the_line(
    tmp_path: Path, content: str | bytes, line: int, words: str
) -> None:
    with pytest.raises(BadFile) as exc:
        read_rows(_file(tmp_path, content, "rows.jsonl"), "jsonl")
    assert exc.value.line == line and words in str(exc.value)


def test_a_bom_is_accepted_and_keys_are_stable(tmp_path: Path) -> None:
    text = "to,subject,text\na@example.com,s,t\nb@example.com,s,t\na@example.com,s,t\n"
    rows = read_rows(_file(tmp_path, "\ufeff" + text), "csv")
    assert [r["to"] for _, r in rows] == [["a@example.com"], ["b@example.com"], ["a@example.com"]]
    keys = [r["idempotency_key"] for _, r in rows]
    assert len(set(keys)) == 3  # identical rows stay two messages
    # Inserting a row before them changes none of their keys: a rerun skips what was queued.
    moved = read_rows(_file(tmp_path, "to,subject,text\nnew@example.com,s,t\n" + text[16:]), "csv")
    assert [r["idempotency_key"] for _, r in moved][1:] == keys
    own = read_rows(
        _file(tmp_path, "to,subject,text,idempotency_key\na@example.com,s,t,k1\n"), "csv"
    )
    assert own[0][1]["idempotency_key"] == "k1"


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_cells_are_refused_or_safe(tmp_path: Path, value: str) -> None:
    row = {
        "to": "to@example.com",
        "subject": value,
        "text": "t",
        "from_addr": FROM,
        "headers": {"X-Custom": value},
    }
    path = _file(tmp_path, json.dumps(row) + "\n", "rows.jsonl")
    try:
        ((_, fields),) = read_rows(path, "jsonl")
    except BadFile:
        return
    try:
        rendered = message_from_mapping(fields).render()
    except InvalidMessage as exc:
        assert exc.field in ("subject", "headers.X-Custom"), exc.field
        return
    assert_safe(rendered.data, {"X-Custom"})
    assert re.search(rb"^Subject:", rendered.data, re.M)

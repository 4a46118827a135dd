"""Message validation and rendering: every refusal names its field; the bytes are 7-bit clean."""

from __future__ import annotations

import email
import email.policy
import json
import re
import uuid
import warnings
from email.header import decode_header
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.errors import InvalidMessage
from mailer.headers import parse_mailbox
from mailer.message import ID_NAMESPACE, Attachment, Message, Rendered
from mailer.smtpapi import SMTPAPIHeader

FROM = "Sender <sender@example.com>"


def make(**fields: Any) -> Message:
    base: dict[str, Any] = {
        "to": "to@example.com",
        "subject": "Hello",
        "text": "Hi there.\n",
        "from_addr": FROM,
    }
    base.update(fields)
    return Message(**base)


def refused(message: Message, **render: Any) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as exc:
        message.render(**render)
    assert exc.value.field
    return exc.value


def parse(rendered: Rendered) -> EmailMessage:
    msg = email.message_from_bytes(rendered.data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def header_block(data: bytes) -> str:
    return data.split(b"\r\n\r\n", 1)[0].decode("ascii")


def smtpapi_headers(data: bytes) -> list[str]:
    """Every X-SMTPAPI header of the top-level block, unfolded."""
    block = header_block(data)
    fields = re.split(r"\r\n(?![ \t])", block)
    return [
        re.sub(r"\r\n(?=[ \t])", "", f).split(":", 1)[1][1:]
        for f in fields
        if f.lower().startswith("x-smtpapi:")
    ]


def top_header(data: bytes, name: str) -> str:
    """The unfolded value of a top-level header, exactly as on the wire."""
    fields = re.split(r"\r\n(?![ \t])", header_block(data))
    (value,) = [f for f in fields if f.lower().startswith(name.lower() + ":")]
    return re.sub(r"\r\n(?=[ \t])", "", value)[len(name) + 2 :]


def rfc2047_display_name(mailbox: str) -> str:
    """The display name of one `phrase <addr>` as an RFC 2047 reader sees it (whitespace between
    adjacent encoded-words dropped; Python's header parser keeps it, which RFC 2047 forbids)."""
    phrase = mailbox.rsplit(" <", 1)[0] if mailbox.endswith(">") else ""
    if phrase.startswith('"'):
        return re.sub(r"\\(.)", r"\1", phrase[1:-1])
    if phrase.startswith("=?"):
        return "".join(
            part.decode(charset or "ascii") if isinstance(part, bytes) else part
            for part, charset in decode_header(phrase)
        )
    return phrase


def check_wire_format(data: bytes) -> None:
    assert data.isascii()
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", data), "bare CR or LF"
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))


def content(part: Any) -> str:
    """A text part's content with line breaks as "\n" (the parser keeps CRLF in 7bit bodies)."""
    assert part is not None
    value = part.get_content()
    assert isinstance(value, str)
    return value.replace("\r\n", "\n")


def normalized_body(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


# ---------------------------------------------------------------------------------------------
# The happy path


def test_render_basic() -> None:
    r = make(cc="cc@example.com", bcc="Hidden <hidden@example.com>").render()
    check_wire_format(r.data)
    assert re.fullmatch(r"[0-9a-f]{32}", r.id)
    assert r.mail_from == "sender@example.com"
    assert r.rcpt_to == ("to@example.com", "cc@example.com", "hidden@example.com")
    assert r.to == ("to@example.com",)
    assert r.subject == "Hello"
    assert b"hidden" not in r.data.lower()
    head = r.data.lower().split(b"\r\n\r\n", 1)[0]
    assert not head.startswith(b"bcc:") and b"\r\nbcc:" not in head  # no Bcc header line
    msg = parse(r)
    assert msg["Message-ID"] == f"<{r.id}@example.com>"
    assert msg["Date"] is not None
    assert msg["From"].addresses[0].display_name == "Sender"
    assert msg["Subject"] == "Hello"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "text/plain"
    assert content(msg) == "Hi there.\n"
    apis = smtpapi_headers(r.data)
    assert len(apis) == 1
    assert json.loads(apis[0]) == {"unique_args": {"mailer_id": r.id}}


def test_text_and_html_make_multipart_alternative() -> None:
    r = make(html="<p>Hi</p>").render()
    msg = parse(r)
    assert msg.get_content_type() == "multipart/alternative"
    assert content(msg.get_body(("html",))) == "<p>Hi</p>\n"
    assert content(msg.get_body(("plain",))) == "Hi there.\n"


def test_html_only() -> None:
    msg = parse(make(text=None, html="<b>x</b>").render())
    assert msg.get_content_type() == "text/html"


def test_attachments_make_multipart_mixed() -> None:
    r = make(
        html="<img src='cid:logo'>",
        attachments=[
            ("report.csv", "a,b\n1,2\n", None),
            Attachment("logo.png", b"\x89PNG\r\n", content_id="logo"),
            Attachment("blob", b"\x00\x01\x02"),
            ("data.bin", b"\xff" * 10, "application/x-custom"),
            ["mail.eml", b"From: a@example.com\r\n\r\nhi\r\n", None],
        ],
    ).render()
    check_wire_format(r.data)
    msg = parse(r)
    assert msg.get_content_type() == "multipart/mixed"
    found = {part.get_filename(): part for part in msg.iter_attachments()}
    assert found["report.csv"].get_content_type() == "text/csv"
    assert content(found["report.csv"]) == "a,b\n1,2\n"
    assert found["blob"].get_content_type() == "application/octet-stream"
    assert found["data.bin"].get_content_type() == "application/x-custom"
    assert found["data.bin"].get_content() == b"\xff" * 10
    assert found["mail.eml"].get_content_type() == "application/octet-stream"
    related = [p for p in msg.walk() if p.get_content_type() == "multipart/related"]
    assert len(related) == 1
    inline = [p for p in msg.walk() if p["Content-ID"] == "<logo>"]
    assert len(inline) == 1 and inline[0].get_content() == b"\x89PNG\r\n"
    assert inline[0].get_content_disposition() == "inline"
    # Only the top level says MIME-Version.
    assert r.data.count(b"MIME-Version") == 1


def test_inline_part_with_html_only_and_attachments() -> None:
    r = make(
        text=None,
        html="<img src='cid:a'>",
        attachments=[("x.txt", "x", None), Attachment("a.gif", b"GIF89a", content_id="<a@x>")],
    ).render()
    msg = parse(r)
    assert msg.get_content_type() == "multipart/mixed"
    assert [p.get_content_type() for p in msg.walk()] == [
        "multipart/mixed",
        "multipart/related",
        "text/html",
        "image/gif",
        "text/plain",
    ]


def test_non_ascii_everything_is_7bit_clean_and_round_trips() -> None:
    subject = "R\u00e9sum\u00e9 \u2014 \u4e2d\u6587 \U0001f600"
    text = "Gr\u00fc\u00dfe\r\nline two\rline three " + "\u00e9" * 5 + "x" * 500
    html = "<p>" + "\u4e2d" * 3000 + "</p>"
    r = make(
        to="J\u00fcrgen M\u00fcller <jm@example.com>",
        subject=subject,
        text=text,
        html=html,
        from_addr="\u00c9quipe <team@example.com>",
        headers={"X-Note": "na\u00efve " * 40, "Sender": "\u00c9 <e@example.com>"},
        attachments=[("\u00fcber " * 20 + ".pdf", b"%PDF", None)],
    ).render()
    check_wire_format(r.data)
    assert b"=?" not in smtpapi_headers(r.data)[0].encode()
    msg = parse(r)
    assert msg["Subject"] == subject
    assert msg["To"].addresses[0].display_name == "J\u00fcrgen M\u00fcller"
    assert msg["From"].addresses[0].display_name == "\u00c9quipe"
    assert msg["Sender"].addresses[0].display_name == "\u00c9"
    assert str(msg["X-Note"]) == "na\u00efve " * 40
    plain = msg.get_body(("plain",))
    html_part = msg.get_body(("html",))
    assert plain is not None and html_part is not None
    assert content(plain) == normalized_body(text)
    assert plain["Content-Transfer-Encoding"] == "quoted-printable"
    assert content(html_part) == normalized_body(html)
    assert html_part["Content-Transfer-Encoding"] == "base64"
    assert [p.get_filename() for p in msg.iter_attachments()] == ["\u00fcber " * 20 + ".pdf"]
    assert r.to == ("J\u00fcrgen M\u00fcller <jm@example.com>",)


def test_long_ascii_lines_are_encoded() -> None:
    text = "x" * 5000 + "\n" + ". starts with a dot\n"
    r = make(text=text).render()
    check_wire_format(r.data)
    msg = parse(r)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert content(msg) == text


def test_control_characters_in_bodies_are_encoded() -> None:
    text = "nul\x00 ff\x0c vt\x0b del\x7f sep\u2028end"
    r = make(text=text).render()
    check_wire_format(r.data)
    assert content(parse(r)) == text + "\n"


@pytest.mark.parametrize(
    "subject",
    [
        "  leading blanks",
        "\tleading tab",
        "literal =?utf-8?q?x?= text",
        "=?utf-8?b?SGk=?=",
        " ",
        "",
        "trailing  ",
        "x" * 2000,
        "a  b\tc",
    ],
)
def test_subjects_round_trip_exactly(subject: str) -> None:
    r = make(subject=subject).render()
    check_wire_format(r.data)
    assert parse(r)["Subject"] == subject


@pytest.mark.parametrize(
    ("mailbox", "wire", "name"),
    [
        ("a@example.com", "a@example.com", ""),
        ("<a@example.com>", "a@example.com", ""),
        ("Ann Lee <a@example.com>", "Ann Lee <a@example.com>", "Ann Lee"),
        ("John Q. Public <a@example.com>", '"John Q. Public" <a@example.com>', "John Q. Public"),
        ('"Doe, John" <a@example.com>', '"Doe, John" <a@example.com>', "Doe, John"),
        ('" two  blanks " <a@example.com>', '" two  blanks " <a@example.com>', " two  blanks "),
        ('"say \\"hi\\"" <a@example.com>', '"say \\"hi\\"" <a@example.com>', 'say "hi"'),
        ("J\u00fcrgen <a@example.com>", "=?utf-8?b?SsO8cmdlbg==?= <a@example.com>", "J\u00fcrgen"),
    ],
)
def test_address_headers_are_written_exactly(mailbox: str, wire: str, name: str) -> None:
    r = make(to=mailbox, from_addr=mailbox).render()
    assert top_header(r.data, "To") == wire
    assert top_header(r.data, "From") == wire
    (address,) = parse(r)["To"].addresses
    assert (address.display_name, address.addr_spec) == (name, "a@example.com")


def test_long_address_lists_fold() -> None:
    to = [f"Person Number {i} <p{i}@example.com>" for i in range(200)]
    r = make(to=to).render()
    check_wire_format(r.data)
    block = header_block(r.data)
    assert all(len(line) <= 78 for line in block.split("\r\n"))
    assert [a.addr_spec for a in parse(r)["To"].addresses] == [
        f"p{i}@example.com" for i in range(200)
    ]


def test_display_names_refused() -> None:
    assert refused(make(to='"=?utf-8?q?x?=" <a@example.com>')).field == "to"
    assert refused(make(from_addr="x" * 257 + " <a@example.com>")).field == "from_addr"


def test_header_order_and_single_copies() -> None:
    r = make(cc="c@example.com", reply_to="r@example.com", headers={"X-A": "1"}).render()
    names = [line.split(":", 1)[0] for line in header_block(r.data).split("\r\n") if line[:1] > " "]
    assert names[:9] == [
        "From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID", "X-A", "X-SMTPAPI"
    ]  # fmt: skip
    assert sorted(names) == sorted(set(names))
    assert top_header(r.data, "Subject") == "Hello"  # ASCII subjects are not encoded


def test_extra_ascii_headers_are_sent_verbatim() -> None:
    url = "<https://example.com/unsubscribe?token=" + "t" * 400 + ">"
    r = make(headers={"List-Unsubscribe": url, "X-Tags": "a  b " * 50}).render()
    check_wire_format(r.data)
    assert f"List-Unsubscribe: {url}\r\n" in header_block(r.data)
    msg = parse(r)
    assert msg["List-Unsubscribe"] == url
    assert "=?" not in header_block(r.data).split("X-Tags:")[1].split("X-SMTPAPI")[0]


def test_idempotency_key_gives_a_stable_id() -> None:
    a = make(idempotency_key="order-42").render()
    b = make(idempotency_key="order-42", subject="other").render()
    c = make(idempotency_key="order-43").render()
    assert a.id == b.id == uuid.uuid5(ID_NAMESPACE, "order-42").hex
    assert a.id != c.id
    assert a.idempotency_key == "order-42"
    assert make().render().id != make().render().id


def test_default_from_is_used() -> None:
    r = make(from_addr=None).render(default_from="Ops <ops@example.org>")
    assert r.mail_from == "ops@example.org"
    assert parse(r)["Message-ID"].endswith("@example.org>")


def test_from_addr_wins_over_default_from() -> None:
    assert make().render(default_from="ops@example.org").mail_from == "sender@example.com"


def test_recipients_are_deduplicated_case_insensitively() -> None:
    r = make(
        to=["A@Example.com", "b@example.com"],
        cc=["a@example.com", "Bee <B@example.com>"],
        bcc="c@example.com",
    ).render()
    assert r.rcpt_to == ("A@example.com", "b@example.com", "c@example.com")


def test_bcc_only() -> None:
    r = make(to=[], bcc="x@example.com").render()
    assert r.rcpt_to == ("x@example.com",)
    assert parse(r)["To"] is None


def test_smtpapi_to_means_a_single_rcpt() -> None:
    api = SMTPAPIHeader(to=["a@example.com", "Bee <b@example.com>"], sub={"-n-": ["A", "B"]})
    r = make(to=["list@example.com", "other@example.com"], smtpapi=api).render()
    assert r.rcpt_to == ("list@example.com",)
    (value,) = smtpapi_headers(r.data)
    assert json.loads(value) == {**api.to_dict(), "unique_args": {"mailer_id": r.id}}


def test_smtpapi_dict_and_unique_args_keep_mailer_id_last() -> None:
    api = {"category": ["a", "b"], "unique_args": {"campaign": "c1"}}
    r = make(smtpapi=api).render()
    (value,) = smtpapi_headers(r.data)
    assert json.loads(value) == {
        "category": ["a", "b"],
        "unique_args": {"campaign": "c1", "mailer_id": r.id},
    }
    assert api == {"category": ["a", "b"], "unique_args": {"campaign": "c1"}}  # not mutated


def test_smtpapi_with_many_recipients_folds() -> None:
    tos = [f"User {i} <user{i}@example.com>" for i in range(2000)]
    api = SMTPAPIHeader(to=tos, sub={"-name-": [f"User {i}" for i in range(2000)]})
    r = make(smtpapi=api).render()
    check_wire_format(r.data)
    (value,) = smtpapi_headers(r.data)
    assert json.loads(value)["to"] == tos


# ---------------------------------------------------------------------------------------------
# Every rule names its field


def test_no_from() -> None:
    exc = refused(make(from_addr=None))
    assert exc.field == "from_addr"
    assert "MAILER_DEFAULT_FROM" in exc.problem


def test_bad_default_from() -> None:
    assert refused(make(from_addr=None), default_from="not an address").field == "from_addr"


@pytest.mark.parametrize("name", ["to", "cc", "bcc", "reply_to", "from_addr"])
@pytest.mark.parametrize(
    "value",
    [
        "nobody",
        "a@example.com, b@example.com",
        "a@example.com <b@example.com>",
        "Ann <a@example.com>\r\nBcc: evil@example.com",
        "a@example.com\n",
        "a@localhost",
        b"a@example.com",
    ],
)
def test_bad_addresses(name: str, value: Any) -> None:
    assert refused(make(**{name: value})).field == name


@pytest.mark.parametrize("name", ["to", "cc", "bcc", "reply_to", "from_addr"])
def test_non_ascii_local_parts_need_smtputf8(name: str) -> None:
    exc = refused(make(**{name: "J\u00fcrgen <j\u00fcrgen@example.com>"}))
    assert exc.field == name
    assert "SMTPUTF8" in exc.problem


def test_idn_domains_are_sent_as_xn_in_envelope_and_headers() -> None:
    rendered = make(
        from_addr="B\u00fccher <info@b\u00fccher.example>",
        to="J\u00f6rg <j@\u00f6\u00e4\u00fc.com>",
        cc="cc@xn--10cl1a0b660p.example.com",
    ).render()
    assert rendered.mail_from == "info@xn--bcher-kva.example"
    assert rendered.rcpt_to == ("j@xn--4ca9at.com", "cc@xn--10cl1a0b660p.example.com")
    assert b"\r\nTo: =?utf-8?b?SsO2cmc=?= <j@xn--4ca9at.com>\r\n" in rendered.data
    assert b"\r\nCc: cc@xn--10cl1a0b660p.example.com\r\n" in rendered.data


def test_address_list_items_are_checked() -> None:
    assert refused(make(cc=["ok@example.com", 3])).field == "cc"
    assert refused(make(to={"a@example.com": 1})).field == "to"


def test_no_recipient() -> None:
    assert refused(make(to=[])).field == "to"
    assert refused(make(to=None)).field == "to"


def test_too_many_recipients() -> None:
    message = make(to=["a@example.com", "b@example.com"], cc=["c@example.com"])
    assert refused(message, max_recipients=2).field == "cc"
    assert message.render(max_recipients=3).rcpt_to


def test_smtpapi_to_needs_message_to() -> None:
    assert refused(make(to=[], bcc="x@example.com", smtpapi={"to": ["a@example.com"]})).field in (
        "to",
        "bcc",
    )
    assert refused(make(to=[], smtpapi={"to": ["a@example.com"]})).field == "to"


@pytest.mark.parametrize("name", ["cc", "bcc"])
def test_smtpapi_to_excludes_cc_and_bcc(name: str) -> None:
    message = make(**{name: "x@example.com"}, smtpapi={"to": ["a@example.com"]})
    assert refused(message).field == name


@pytest.mark.parametrize("subject", ["a\r\nBcc: x@example.com", "a\nb", "a\rb", "a\x00b", "a\x0bb"])
def test_subject_line_breaks_and_controls(subject: str) -> None:
    assert refused(make(subject=subject)).field == "subject"


def test_subject_must_be_a_string() -> None:
    assert refused(make(subject=None)).field == "subject"


def test_subject_lone_surrogate() -> None:
    assert refused(make(subject="a\ud800b")).field == "subject"


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        ({"X-A": "v\r\nBcc: x@example.com"}, "headers.X-A"),
        ({"X-A": "v\n"}, "headers.X-A"),
        ({"X-A": "v\x00"}, "headers.X-A"),
        ({"X-A": 3}, "headers.X-A"),
        ({"X A": "v"}, "headers.X A"),
        ({"X:A": "v"}, "headers.X:A"),
        ({"X-\u00e9": "v"}, "headers.X-\u00e9"),
        ({"": "v"}, "headers."),
        ({"X-A\r\nBcc": "v"}, "headers.X-A\r\nBcc"),
        ({"X-" + "a" * 80: "v"}, "headers.X-" + "a" * 80),
        ({"X-A": "a " + "b" * 1000}, "headers.X-A"),
    ],
)
def test_bad_extra_headers(headers: dict[str, Any], field: str) -> None:
    assert refused(make(headers=headers)).field == field


@pytest.mark.parametrize(
    "name",
    [
        "From",
        "to",
        "CC",
        "Bcc",
        "Reply-To",
        "Subject",
        "Message-ID",
        "Date",
        "MIME-Version",
        "Content-Type",
        "content-transfer-encoding",
        "X-SMTPAPI",
        "x-smtpapi",
    ],
)
def test_reserved_headers_cannot_be_overridden(name: str) -> None:
    assert refused(make(headers={name: "x"})).field == f"headers.{name}"


def test_headers_must_be_a_mapping() -> None:
    assert refused(make(headers=[("X-A", "b")])).field == "headers"


def test_no_body() -> None:
    assert refused(make(text=None)).field == "text"


@pytest.mark.parametrize("name", ["text", "html"])
def test_body_types(name: str) -> None:
    assert refused(make(**{name: b"bytes"})).field == name


def test_body_lone_surrogate() -> None:
    assert refused(make(html="x\udc80")).field == "html"


@pytest.mark.parametrize(
    "attachment",
    [
        ("a\r\nb.txt", b"x", None),
        ("a\nb.txt", b"x", None),
        ("a\x00.txt", b"x", None),
        ("", b"x", None),
        ("x" * 256, b"x", None),
        (None, b"x", None),
        ("a.txt", 42, None),
        ("a.txt", b"x", "not a type"),
        ("a.txt", b"x", "multipart/mixed"),
        ("a.eml", b"x", "message/rfc822"),
        ("a.txt", b"x"),
        "a.txt",
        Attachment("a.png", b"x", content_id="has space"),
        Attachment("a.png", b"x", content_id="<a<b>"),
    ],
)
def test_bad_attachments(attachment: Any) -> None:
    exc = refused(make(attachments=[("ok.txt", b"fine", None), attachment]))
    assert exc.field == "attachments[1]"


def test_duplicate_content_ids() -> None:
    parts = [Attachment("a.png", b"a", content_id="x"), Attachment("b.png", b"b", content_id="<x>")]
    assert refused(make(html="<p>", attachments=parts)).field == "attachments[1]"


def test_attachments_must_be_a_list() -> None:
    assert refused(make(attachments="file.txt")).field == "attachments"


def test_size_limit() -> None:
    message = make(attachments=[("big.bin", b"\0" * 3000, None)])
    exc = refused(message, max_size=3000)
    assert exc.field == "attachments"
    assert "3,000" in exc.problem
    assert message.render(max_size=10_000).data
    # The limit applies to the encoded size, not the raw one.
    exc = refused(make(text="\u00e9" * 1000), max_size=2500)
    assert exc.field == "text"


def test_default_size_limit_is_sendgrids() -> None:
    exc = refused(make(attachments=[("big.bin", b"\0" * 16_000_000, None)]))
    assert exc.field == "attachments"
    assert "20,000,000" in exc.problem


@pytest.mark.parametrize("key", ["", 42, "a\nb", "x" * 1001])
def test_bad_idempotency_key(key: Any) -> None:
    assert refused(make(idempotency_key=key)).field == "idempotency_key"


def test_mailer_id_is_reserved() -> None:
    exc = refused(make(smtpapi={"unique_args": {"mailer_id": "mine"}}))
    assert exc.field == "smtpapi.unique_args"


def test_unique_args_limit_includes_mailer_id() -> None:
    near = {"k": "a " * 4990}  # fits alone, not with mailer_id
    SMTPAPIHeader(unique_args=near).validate()
    assert refused(make(smtpapi={"unique_args": near})).field == "smtpapi.unique_args"


@pytest.mark.parametrize(
    ("smtpapi", "field"),
    [
        ("category", "smtpapi"),
        ({"nope": 1}, "smtpapi.nope"),
        ({"category": "caf\u00e9"}, "smtpapi.category"),
        ({"send_at": 1}, "smtpapi.send_at"),
        ({"unique_args": {"k": "x" * 1200}}, "smtpapi.unique_args"),
        ({"to": ["a@example.com"], "sub": {"-n-": []}}, "smtpapi.sub"),
    ],
)
def test_bad_smtpapi(smtpapi: Any, field: str) -> None:
    assert refused(make(smtpapi=smtpapi)).field == field


# ---------------------------------------------------------------------------------------------
# The wire payload


def test_payload_round_trip() -> None:
    r = make(
        to=["Ann <a@example.com>", "b@example.com"],
        subject="S\u00e9",
        idempotency_key="k",
        attachments=[("a.bin", b"\x00" * 100, None)],
    ).render()
    payload = r.to_payload()
    wire = json.loads(json.dumps(payload))
    assert wire == payload
    assert set(payload) == {"v", "id", "mail_from", "rcpt_to", "data", "meta"}
    assert payload["v"] == 1
    assert payload["meta"] == {
        "subject": "S\u00e9",
        "to": ["Ann <a@example.com>", "b@example.com"],
        "idempotency_key": "k",
        "created_at": r.created_at,
    }
    assert Rendered.from_payload(wire) == r


def test_repr_is_short() -> None:
    r = make(text="x" * 10_000).render()
    assert len(repr(r)) < 300
    assert "to@example.com" not in repr(r)


def _payload() -> dict[str, Any]:
    return make().render().to_payload()


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda p: p.update(extra=1), "extra"),
        (lambda p: p.pop("data"), "data"),
        (lambda p: p.update(v=2), "v"),
        (lambda p: p.update(v=True), "v"),
        (lambda p: p.update(id="XYZ"), "id"),
        (lambda p: p.update(id=5), "id"),
        (lambda p: p.update(mail_from="has space@example.com"), "mail_from"),
        (lambda p: p.update(rcpt_to="a@example.com"), "rcpt_to"),
        (lambda p: p.update(rcpt_to=[]), "rcpt_to"),
        (lambda p: p.update(rcpt_to=[1]), "rcpt_to"),
        (lambda p: p.update(data="caf\u00e9"), "data"),
        (lambda p: p.update(data=b"bytes"), "data"),
        (lambda p: p.update(meta=[]), "meta"),
        (lambda p: p["meta"].pop("subject"), "subject"),
        (lambda p: p["meta"].update(more=1), "more"),
        (lambda p: p["meta"].update(subject=1), "subject"),
        (lambda p: p["meta"].update(to="a"), "to"),
        (lambda p: p["meta"].update(idempotency_key=1), "idempotency_key"),
        (lambda p: p["meta"].update(created_at="now"), "created_at"),
        (lambda p: p["meta"].update(created_at=float("nan")), "created_at"),
    ],
)
def test_from_payload_is_strict(mutate: Any, key: str) -> None:
    payload = _payload()
    mutate(payload)
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        Rendered.from_payload(payload)


def test_from_payload_refuses_non_mappings() -> None:
    with pytest.raises(ValueError, match="payload"):
        Rendered.from_payload([])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Properties: refusal with a field, or clean bytes that parse back to what was given


def _mostly(valid: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` nine times in ten, so that most examples render and get checked."""
    # (Not `i == 0`: Hypothesis draws the ends of a range far more often than the middle.)
    return st.integers(0, 99).flatmap(lambda i: wild if i % 10 == 7 else valid)


_long = st.builds(
    lambda unit, n: unit * n,
    st.sampled_from(["x", "ab ", "\u00e9", "\u00e9 ", "a b", "\u4e2d", "=?", "\t", "\\", '"', " "]),
    st.integers(min_value=1, max_value=1200),
)
# Printable text of any script (no controls, surrogates or line separators) ...
_printable = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=80
)
_ascii = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=40
)
# ... and anything at all, now and then.
_texts = _mostly(st.one_of(_printable, _long), st.text(max_size=80))
_bodies = _mostly(st.one_of(st.text(max_size=200), _long), st.none())
_smtpapi = _mostly(
    st.fixed_dictionaries(
        {},
        optional={
            "to": st.lists(
                _mostly(
                    st.sampled_from(["a@example.com", "Ann <b@example.com>"]),
                    st.sampled_from(["\u00e9@example.com", "x"]),
                ),
                max_size=3,
            ),
            "sub": st.dictionaries(st.sampled_from(["-a-", "%b%"]), st.lists(_texts, max_size=3)),
            "category": _mostly(
                st.one_of(_ascii, st.lists(_ascii, max_size=10)),
                st.one_of(_texts, st.lists(_texts, max_size=11)),
            ),
            "unique_args": st.dictionaries(
                _mostly(_printable.filter(bool), st.text(max_size=12)),
                _mostly(_texts, st.integers()),
                max_size=4,
            ),
            "filters": st.just({"clicktrack": {"settings": {"enable": 1}}}),
            "asm_group_id": st.integers(-1, 100),
            "section": st.dictionaries(st.just("-s-"), _texts, max_size=1),
        },
    ),
    st.none(),
)
_display_names = st.one_of(
    st.just(""),
    _mostly(st.text(alphabet=st.characters(whitelist_categories=("L", "Zs")), max_size=40), _texts),
    st.sampled_from(['"Doe, John"', "J\u00fcrgen", '"a \\"b\\""', '" x  y "', "x" * 256]),
)
_filenames = _mostly(
    st.one_of(
        st.none(), _printable.filter(lambda f: f.strip()), st.sampled_from(["a.pdf", "b.txt"])
    ),
    _texts,
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    subject=_texts,
    text=_bodies,
    html=st.one_of(st.none(), _bodies),
    name=_display_names,
    header_value=st.one_of(st.none(), _texts),
    smtpapi=_smtpapi,
    filename=_filenames,
)
def test_render_property(
    subject: str,
    text: str | None,
    html: str | None,
    name: str,
    header_value: str | None,
    smtpapi: dict[str, Any] | None,
    filename: str | None,
) -> None:
    to = f"{name} <to@example.com>" if name else "to@example.com"
    message = Message(
        to=to,
        subject=subject,
        text=text,
        html=html,
        from_addr=FROM,
        headers={"X-Custom": header_value} if header_value is not None else None,
        attachments=[(filename, b"\x00data", None)] if filename is not None else None,
        smtpapi=smtpapi,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            r = message.render()
        except InvalidMessage as exc:
            assert exc.field
            return
        expected_api = SMTPAPIHeader.from_dict(smtpapi).to_dict(now=r.created_at) if smtpapi else {}

    check_wire_format(r.data)
    apis = smtpapi_headers(r.data)
    assert len(apis) == 1
    assert "=?" not in apis[0]
    raw_api = next(
        f for f in re.split(r"\r\n(?![ \t])", header_block(r.data)) if f.startswith("X-SMTPAPI:")
    )
    assert "=?" not in raw_api
    expected_api["unique_args"] = {**expected_api.get("unique_args", {}), "mailer_id": r.id}
    assert json.loads(apis[0]) == expected_api

    msg = parse(r)
    assert msg["Subject"] == subject
    (address,) = msg["To"].addresses
    assert address.addr_spec == "to@example.com"
    display_name = parse_mailbox("to", to)[0]
    assert rfc2047_display_name(top_header(r.data, "To")) == display_name
    if display_name.isascii() or len(display_name.encode()) <= 42:  # one encoded-word at most
        assert address.display_name == display_name
    if text is not None:
        assert content(msg.get_body(("plain",))) == normalized_body(text)
    if html is not None:
        assert content(msg.get_body(("html",))) == normalized_body(html)
    if filename is not None:
        (attachment,) = msg.iter_attachments()
        assert attachment.get_payload(decode=True) == b"\x00data"
        expected = filename.strip()
        if expected[:1] + expected[-1:] in ('""', "<>") and len(expected) > 1:
            # The wire has filename="\"a\"" (correct); email.utils.unquote then strips once more.
            expected = expected[1:-1]
        assert attachment.get_filename() == expected
    assert Rendered.from_payload(json.loads(json.dumps(r.to_payload()))) == r


ICS = "BEGIN:VCALENDAR\r\nMETHOD:REQUEST\r\nSUMMARY:R\u00fcckblick\r\nEND:VCALENDAR\r\n"


@pytest.mark.parametrize(
    "bodies",
    [{"text": "Hi\n", "html": "<p>Hi</p>"}, {"text": "Hi\n"}, {"html": "<p>Hi</p>"}],
)
def test_alternatives_follow_text_and_html(bodies: dict[str, str]) -> None:
    """A meeting invitation: text/calendar with its method parameter, last alternative."""
    rendered = make(
        **{"text": None, **bodies},
        alternatives=[(ICS, "text/calendar; method=REQUEST"), (b"\x00ics", "application/ics")],
    ).render()
    parsed = email.message_from_bytes(rendered.data, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/alternative"
    parts = list(parsed.iter_parts())
    expected = [t for t, k in (("text/plain", "text"), ("text/html", "html")) if k in bodies]
    assert [p.get_content_type() for p in parts] == [*expected, "text/calendar", "application/ics"]
    calendar, binary = parts[-2:]
    assert calendar.get_param("method") == "REQUEST" and calendar.get_param("charset") == "utf-8"
    assert calendar.get_content().replace("\r\n", "\n") == ICS.replace("\r\n", "\n")
    assert "Content-Disposition" not in calendar
    assert binary.get_content() == b"\x00ics"


def test_alternatives_keep_inline_parts_with_the_html() -> None:
    rendered = make(
        html='<img src="cid:logo">',
        alternatives=[(ICS, "text/calendar; method=REQUEST")],
        attachments=[Attachment("logo.png", b"png", "image/png", content_id="logo")],
    ).render()
    parsed = email.message_from_bytes(rendered.data, policy=email.policy.default)
    types = [p.get_content_type() for p in parsed.walk()]
    assert types == [
        "multipart/alternative",
        "text/plain",
        "multipart/related",
        "text/html",
        "image/png",
        "text/calendar",
    ]


def test_alternative_charset_utf8_is_accepted() -> None:
    rendered = make(alternatives=[(ICS, 'text/calendar; charset="UTF-8"; method=PUBLISH')])
    parsed = email.message_from_bytes(rendered.render().data, policy=email.policy.default)
    calendar = list(parsed.iter_parts())[-1]
    assert calendar.get_param("method") == "PUBLISH" and calendar.get_param("charset") == "utf-8"


@pytest.mark.parametrize(
    ("alternatives", "problem"),
    [
        ("x", "list of (content, mimetype) pairs"),
        ([("x",)], "pair"),
        ([(1, "text/calendar")], "str or bytes"),
        ([("x", "calendar")], "not a MIME type"),
        ([("x", "text/calendar; method")], "not a parameter"),
        ([("x", 'text/calendar; method="a\\"b"')], "not a parameter"),
        ([("x", "text/calendar; charset=latin-1")], "utf-8"),
        ([("x", "text/calendar; method=utf-8''%0d%0aBcc%3a%20x")], "RFC 2231"),
        ([("x", "multipart/mixed")], "cannot be an alternative"),
        ([(b"\xff", "text/calendar")], "not valid UTF-8"),
    ],
)
def test_bad_alternatives(alternatives: Any, problem: str) -> None:
    exc = refused(make(alternatives=alternatives))
    assert exc.field.startswith("alternatives") and problem in exc.problem


def test_positional_fields_are_unchanged() -> None:
    """alternatives= is the last field: positional callers of the older API keep working."""
    message = Message("to@example.com", "Hi", "text", None, FROM)
    assert message.from_addr == FROM and message.alternatives is None

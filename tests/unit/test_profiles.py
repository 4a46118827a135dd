"""Relay profiles (mailer/profiles.py): a message rendered for SendGrid, rewritten for SES,
Postmark or a plain SMTP relay. Every message here is rendered by `Message.render`, and every
rewrite is read back with the email package and checked with the worker's own guard."""

from __future__ import annotations

import email
import email.policy
import re
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.guard import check_wire
from mailer.message import Attachment, Message
from mailer.profiles import (
    MAX_NOTE,
    PROFILE_NAMES,
    Unportable,
    adapt,
    blockers,
    check_configuration_set,
    portable,
    unportable,
)

NOW = time.time()


def render(smtpapi: dict[str, Any] | None = None, **fields: Any) -> str:
    message = Message(
        to=fields.pop("to", "ann@example.com"),
        subject=fields.pop("subject", "Your receipt"),
        text=fields.pop("text", "Thanks!\n"),
        from_addr="Shop <shop@example.com>",
        smtpapi=smtpapi,
        **fields,
    )
    return message.render().data.decode("ascii")


def head_of(data: str) -> str:
    return data[: data.index("\r\n\r\n")]


def headers(data: str) -> email.message.EmailMessage:
    parsed = email.message_from_string(data, policy=email.policy.SMTP)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def unfolded(message: email.message.EmailMessage, name: str) -> str:
    value = message[name]
    assert value is not None, name
    return re.sub(r"\r\n(?=[ \t])", "", str(value))


def mailer_id(data: str) -> str:
    found = re.search(r'"mailer_id": "([0-9a-f]{32})"', data.replace("\r\n", ""))
    assert found is not None
    return found.group(1)


RICH = {
    "category": ["receipts", "has space"],
    "unique_args": {"order": "A-1", "bad key": "x", "accent": "caf\u00e9"},
    "asm_group_id": 42,
    "filters": {"clicktrack": {"settings": {"enable": 1}}},
    "ip_pool": "transactional",
}


# ---- sendgrid: untouched, unread --------------------------------------------------------------


def test_sendgrid_returns_the_very_same_text() -> None:
    data = render(RICH)
    adapted = adapt(data, "sendgrid", "ignored-set")
    assert adapted.data is data and adapted.note == "" and adapted.dropped == ()
    # Not even looked at: a message only SendGrid can send goes through unchanged.
    fan_out = render({"to": ["a@example.com", "b@example.com"], "sub": {"-n-": ["A", "B"]}})
    assert adapt(fan_out, "sendgrid").data is fan_out


# ---- ses ------------------------------------------------------------------------------------


def test_ses_turns_categories_and_unique_args_into_message_tags() -> None:
    data = render(RICH)
    adapted = adapt(data, "ses", "transactional-set")
    check_wire(adapted.data.encode("ascii"))
    parsed = headers(adapted.data)
    assert parsed["X-SMTPAPI"] is None
    tags = unfolded(parsed, "X-SES-MESSAGE-TAGS")
    assert tags == f"mailer_id={mailer_id(data)}, category=receipts, order=A-1"
    assert parsed["X-SES-CONFIGURATION-SET"] == "transactional-set"
    # Only SES's characters survive: a space, a non-ASCII letter are dropped, by name.
    assert adapted.dropped == (
        "category 'has space'",
        "unique_args.bad key",
        "unique_args.accent",
        "filters",
        "asm_group_id",
        "ip_pool",
    )
    assert adapted.note == (
        "X-SMTPAPI for relay profile ses: 3 tags as X-SES-MESSAGE-TAGS; dropped category "
        "'has space', unique_args.bad key, unique_args.accent, filters, asm_group_id, ip_pool"
    )
    # The body and the other headers are untouched, in order.
    assert adapted.data[adapted.data.index("\r\n\r\n") :] == data[data.index("\r\n\r\n") :]
    before = [n for n in headers(data) if n != "X-SMTPAPI"]
    after = [n for n in parsed if not n.startswith("X-SES-")]
    assert before == after


def test_ses_second_categories_and_the_configuration_set_alone() -> None:
    adapted = adapt(render({"category": ["a", "b-2", "c_3"]}), "ses")
    tags = unfolded(headers(adapted.data), "X-SES-MESSAGE-TAGS")
    assert tags.endswith("category=a, category_2=b-2, category_3=c_3")
    assert headers(adapted.data)["X-SES-CONFIGURATION-SET"] is None  # none configured
    assert adapted.note.endswith("4 tags as X-SES-MESSAGE-TAGS; nothing dropped")


def test_a_header_the_message_has_itself_wins() -> None:
    data = render({"category": ["a"]}, headers={"X-SES-CONFIGURATION-SET": "own-set"})
    adapted = adapt(data, "ses", "relay-set")
    parsed = headers(adapted.data)
    assert parsed.get_all("X-SES-CONFIGURATION-SET") == ["own-set"]
    data = render({"category": ["a"]}, headers={"X-PM-Tag": "own-tag"})
    adapted = adapt(data, "postmark")
    assert headers(adapted.data).get_all("X-PM-Tag") == ["own-tag"]
    assert "category 'a'" in adapted.dropped


def test_bad_configuration_set_names_are_refused() -> None:
    assert check_configuration_set("my_set-2") == "my_set-2"
    for bad in ("", "has space", "x" * 65, "new\r\nline", "caf\u00e9"):
        with pytest.raises(ValueError, match="configuration set"):
            check_configuration_set(bad)
    with pytest.raises(ValueError, match="configuration set"):
        adapt(render(), "ses", "bad set")


# ---- postmark -------------------------------------------------------------------------------


def test_postmark_gets_one_tag_and_metadata_headers() -> None:
    data = render(RICH)
    adapted = adapt(data, "postmark")
    check_wire(adapted.data.encode("ascii"))
    parsed = headers(adapted.data)
    assert parsed["X-SMTPAPI"] is None
    assert parsed["X-PM-Tag"] == "receipts"
    assert parsed["X-PM-Metadata-mailer_id"] == mailer_id(data)
    assert parsed["X-PM-Metadata-order"] == "A-1"
    # Postmark: one tag per message; a key needs to be a header name, a value ASCII.
    assert adapted.dropped[:3] == (
        "category 'has space'",
        "unique_args.bad key",
        "unique_args.accent",
    )
    assert adapted.note.startswith(
        "X-SMTPAPI for relay profile postmark: category as X-PM-Tag, 2 unique_args as "
        "X-PM-Metadata-*; dropped"
    )


def test_postmark_metadata_limits() -> None:
    args = {f"k{i:02d}": f"v{i}" for i in range(12)} | {"k" * 21: "long key", "v": "x" * 81}
    adapted = adapt(render({"unique_args": args}), "postmark")
    parsed = headers(adapted.data)
    names = [n for n in parsed if n.startswith("X-PM-Metadata-")]
    assert len(names) == 10 and names[0] == "X-PM-Metadata-mailer_id"  # ours first
    assert {f"unique_args.{'k' * 21}", "unique_args.v", "unique_args.k11"} <= set(adapted.dropped)


# ---- smtp -----------------------------------------------------------------------------------


def test_smtp_drops_the_header_and_says_what_was_in_it() -> None:
    data = render(RICH)
    adapted = adapt(data, "smtp")
    check_wire(adapted.data.encode("ascii"))
    assert headers(adapted.data)["X-SMTPAPI"] is None
    field = re.compile(r"X-SMTPAPI:[^\r]*(\r\n[ \t][^\r]*)*\r\n")
    assert head_of(adapted.data) + "\r\n" == field.sub("", head_of(data) + "\r\n")
    assert adapted.dropped == ("category", "unique_args", "filters", "asm_group_id", "ip_pool")
    assert adapted.note.startswith("X-SMTPAPI for relay profile smtp: dropped category,")


# ---- what only SendGrid can do ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("smtpapi", "fields", "expected"),
    [
        ({"to": ["a@example.com", "b@example.com"]}, {}, ("to",)),
        ({"to": ["a@example.com"], "sub": {"-name-": ["Ann"]}}, {}, ("to", "sub")),
        ({"send_at": int(NOW) + 3600}, {}, ("send_at",)),
        (
            {"filters": {"templates": {"settings": {"enable": 1, "template_id": "t"}}}},
            {},
            ("filters.templates",),
        ),
        (
            {"filters": {"subscriptiontrack": {"settings": {"enable": 1, "replace": "[unsub]"}}}},
            {},
            ("filters.subscriptiontrack",),
        ),
        (
            {"asm_group_id": 7},
            {"text": "Leave: <%asm_group_unsubscribe_raw_url%>\n"},
            ("asm_group_id",),
        ),
    ],
)
def test_unportable_messages_are_refused_by_every_other_profile(
    smtpapi: dict[str, Any], fields: dict[str, Any], expected: tuple[str, ...]
) -> None:
    data = render(smtpapi, **fields)
    assert unportable(data) == expected and not portable(data)
    for profile in ("ses", "postmark", "smtp"):
        with pytest.raises(Unportable) as refused:
            adapt(data, profile)  # type: ignore[arg-type]
        assert refused.value.fields == expected
        assert f"profile {profile!r}" in str(refused.value)


def test_what_other_profiles_can_drop_is_portable() -> None:
    for smtpapi in (
        RICH,
        {"send_at": int(NOW) - 60},  # already due: sending now is what SendGrid would do
        {"asm_group_id": 7},  # no SendGrid tags in the text
        {"filters": {"subscriptiontrack": {"settings": {"enable": 1, "text/plain": "Bye"}}}},
        {"filters": {"templates": {"settings": {"enable": 0}}}},
        None,
    ):
        assert portable(render(smtpapi)), smtpapi
    assert blockers({}) == () and portable("From: a@example.com\r\n\r\nno X-SMTPAPI\r\n")


def test_foreign_or_missing_headers() -> None:
    plain = "From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"
    for profile in ("postmark", "smtp"):
        assert adapt(plain, profile).data is plain  # type: ignore[arg-type]
    with_set = adapt(plain, "ses", "s1").data
    assert (
        with_set
        == "From: a@example.com\r\nSubject: x\r\nX-SES-CONFIGURATION-SET: s1\r\n\r\nbody\r\n"
    )
    # An X-SMTPAPI that is not JSON (some other producer): dropped, said.
    broken = "From: a@example.com\r\nx-smtpapi: {oops\r\nSubject: x\r\n\r\nbody\r\n"
    adapted = adapt(broken, "smtp")
    assert adapted.data == "From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"
    assert adapted.dropped == ("X-SMTPAPI (not a JSON object)",)
    # The field last in the header block, folded, with an unknown key.
    last = 'From: a@example.com\r\nX-SMTPAPI: {"category": "a",\r\n "zzz": 1}\r\n\r\nb\r\n'
    adapted = adapt(last, "postmark")
    assert adapted.data == "From: a@example.com\r\nX-PM-Tag: a\r\n\r\nb\r\n"
    assert adapted.dropped == ("X-SMTPAPI 'zzz'",)
    with pytest.raises(ValueError, match="unknown relay profile"):
        adapt(last, "mailgun")  # type: ignore[arg-type]


def test_attachments_keep_their_parts() -> None:
    data = render(
        {"category": ["a"]},
        attachments=[Attachment("r.pdf", b"%PDF-1.4 " * 50, "application/pdf")],
        html="<p>Thanks!</p>",
    )
    adapted = adapt(data, "ses")
    check_wire(adapted.data.encode("ascii"))
    parts = [p.get_content_type() for p in headers(adapted.data).walk()]
    assert parts == [p.get_content_type() for p in headers(data).walk()]
    assert "application/pdf" in parts


def test_the_note_fits_the_status_record() -> None:
    args = {f"bad key {i}": "v" for i in range(40)}
    adapted = adapt(render({"unique_args": args}), "ses")
    assert len(adapted.note) <= MAX_NOTE and adapted.note.endswith("more)")
    assert len(adapted.dropped) == 40


# ---- any message the renderer accepts: every profile's result passes the guard ----------------

_ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40)
_ANY = st.text(min_size=1, max_size=30).filter(lambda s: s.strip() == s and s.isprintable())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    categories=st.lists(_ASCII.filter(lambda s: s.strip() == s), max_size=10, unique=True),
    args=st.dictionaries(
        st.one_of(_ASCII, _ANY).filter(lambda k: k != "mailer_id"), _ANY, max_size=15
    ),
)
def test_every_profile_gives_a_message_the_guard_accepts(
    categories: list[str], args: dict[str, str]
) -> None:
    data = render(
        {"category": categories, "unique_args": args} if categories else {"unique_args": args}
    )
    for profile in PROFILE_NAMES:
        adapted = adapt(data, profile, "set-1")
        check_wire(adapted.data.encode("ascii"))
        parsed = headers(adapted.data)
        if profile == "sendgrid":
            continue
        assert parsed["X-SMTPAPI"] is None
        lost = sum(d.startswith(("category ", "unique_args.")) for d in adapted.dropped)
        total = len(categories) + len(args) + 1  # + mailer_id
        if profile == "ses":
            pairs = unfolded(parsed, "X-SES-MESSAGE-TAGS").split(", ")
            for pair in pairs:
                name, _, value = pair.partition("=")
                assert re.fullmatch(r"[A-Za-z0-9_-]{1,256}", name), pair
                assert re.fullmatch(r"[A-Za-z0-9_-]{1,256}", value), pair
            assert len(pairs) + lost == total  # each one kept as a tag or named as dropped
        elif profile == "postmark":
            kept = adapted.data.count("X-PM-Metadata-") + (parsed["X-PM-Tag"] is not None)
            assert kept + lost == total
        else:
            assert "unique_args" in adapted.dropped


def test_a_foreign_x_smtpapi_first_and_an_own_header_first() -> None:
    first = 'x-smtpapi: {"category": "a"}\r\nX-PM-Tag: mine\r\nFrom: a@example.com\r\n\r\nb\r\n'
    adapted = adapt(first, "postmark")
    assert adapted.data == "X-PM-Tag: mine\r\nFrom: a@example.com\r\n\r\nb\r\n"
    assert adapted.dropped == ("category 'a'",)
    own_first = "X-SES-CONFIGURATION-SET: mine\r\nFrom: a@example.com\r\n\r\nb\r\n"
    assert adapt(own_first, "ses", "relay-set").data == own_first

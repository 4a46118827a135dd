"""X-SMTPAPI builder rules and the header folder (never RFC 2047, unfolding restores the value)."""

from __future__ import annotations

import json
import re
import time
import warnings
from typing import Any

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.errors import InvalidMessage
from mailer.smtpapi import (
    SMTPAPIHeader,
    _common_address,
    _fold_pieces,
    fold_header_value,
    parse_mailbox,
)

NOW = time.time()


def unfold(folded: str) -> str:
    return re.sub(r"\r\n(?=[ \t])", "", folded)


def field_of(exc: pytest.ExceptionInfo[InvalidMessage]) -> str:
    return exc.value.field


# ---------------------------------------------------------------------------------------------
# fold_header_value


def test_fold_short_value_is_unchanged() -> None:
    assert fold_header_value("X-A", "short value") == "short value"


def test_fold_breaks_only_before_whitespace_and_unfolds_exactly() -> None:
    value = "word  " * 40 + "\tend"
    folded = fold_header_value("X-SMTPAPI", value)
    assert "\r\n" in folded
    assert unfold(folded) == value
    lines = ("X-SMTPAPI: " + folded).split("\r\n")
    assert all(len(line) <= 78 for line in lines)
    assert all(line[0] in " \t" for line in lines[1:])
    assert all(line.strip() for line in lines)  # no whitespace-only line


def test_fold_keeps_long_tokens_whole_up_to_998() -> None:
    token = "x" * 900
    value = f"a {token} b"
    folded = fold_header_value("X-A", value)
    assert unfold(folded) == value
    assert max(len(line) for line in ("X-A: " + folded).split("\r\n")) == 901


def test_fold_refuses_a_token_that_cannot_fit() -> None:
    with pytest.raises(InvalidMessage) as exc:
        fold_header_value("X-A", "a " + "x" * 998, field="headers.X-A")
    assert field_of(exc) == "headers.X-A"
    assert "998" in exc.value.problem


def test_fold_exact_limit() -> None:
    # A continuation line is " " + token: a 997-character token fits, 998 does not.
    assert unfold(fold_header_value("X-A", "a " + "x" * 997)) == "a " + "x" * 997
    with pytest.raises(InvalidMessage):
        fold_header_value("X-A", "a " + "x" * 998)


def test_fold_first_line_counts_the_name() -> None:
    name = "X-" + "N" * 60
    with pytest.raises(InvalidMessage) as exc:
        fold_header_value(name, "y" * (998 - len(name) - 1))
    assert field_of(exc) == name
    fold_header_value(name, "y" * (998 - len(name) - 2))


@pytest.mark.parametrize("value", ["a\r\nb", "a\nb", "a\rb", "a\x00b"])
def test_fold_refuses_line_breaks_and_controls(value: str) -> None:
    with pytest.raises(InvalidMessage) as exc:
        fold_header_value("X-A", value, field="f")
    assert field_of(exc) == "f"


def test_fold_never_encodes_non_ascii() -> None:
    with pytest.raises(InvalidMessage) as exc:
        fold_header_value("X-A", "h\u00e9", field="f")
    assert field_of(exc) == "f"


def test_fold_trailing_whitespace_is_kept() -> None:
    value = ("abc " * 30) + "   "
    assert unfold(fold_header_value("X-A", value)) == value


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet=st.sampled_from('ab{}":,\\ \t'), max_size=3000),
    st.integers(min_value=20, max_value=998),
)
def test_fold_property(value: str, limit: int) -> None:
    try:
        folded = fold_header_value("X-SMTPAPI", value, limit=limit)
    except InvalidMessage as exc:
        assert exc.field == "X-SMTPAPI"
        # Only a piece (a whitespace run and the word after it) too long for a line fails.
        assert max(len(piece) for piece in _fold_pieces(value)) > limit - len("X-SMTPAPI: ")
        return
    assert unfold(folded) == value
    lines = ("X-SMTPAPI: " + folded).split("\r\n")
    assert all(len(line) <= limit for line in lines)
    assert all(line[:1] in (" ", "\t") and line.strip(" \t") for line in lines[1:])


# ---------------------------------------------------------------------------------------------
# parse_mailbox


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a@example.com", ("", "a@example.com")),
        ("  a@example.com ", ("", "a@example.com")),
        ("Ann <a@example.com>", ("Ann", "a@example.com")),
        ("<a@example.com>", ("", "a@example.com")),
        ('"Doe, John" <j@example.com>', ("Doe, John", "j@example.com")),
        ('"a \\"q\\" b" <j@example.com>', ('a "q" b', "j@example.com")),
        ("John Q. Public <j@example.com>", ("John Q. Public", "j@example.com")),
        ("J\u00f6rg <j@EXAMPLE.com>", ("J\u00f6rg", "j@example.com")),
        ("a@xn--bcher-kva.example", ("", "a@xn--bcher-kva.example")),
    ],
)
def test_parse_mailbox_accepts(value: str, expected: tuple[str, str]) -> None:
    assert parse_mailbox("to", value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "a@example.com, b@example.com",
        "a@example.com b@example.com",
        "a@example.com <b@example.com>",
        "Ann <a@example.com> <b@example.com>",
        "Doe, John <j@example.com>",
        "Ann <a@example.com",
        '"Ann <a@example.com>',
        "Ann (x) <a@example.com>",
        "not an address",
        "a@localhost",
        "",
        "Ann <a@example.com>\r\nBcc: x@example.com",
        "a@example.com\n",
        '"=?utf-8?q?x?=" <a@example.com>',
        "=?utf-8?q?x?= <a@example.com>",
        "x" * 257 + " <a@example.com>",
    ],
)
def test_parse_mailbox_refuses(value: str) -> None:
    with pytest.raises(InvalidMessage) as exc:
        parse_mailbox("cc", value)
    assert field_of(exc) == "cc"


@pytest.mark.parametrize("value", ["j\u00f6rg@example.com", "a@b\u00fccher.example"])
def test_parse_mailbox_refuses_non_ascii_addresses_for_lack_of_smtputf8(value: str) -> None:
    with pytest.raises(InvalidMessage) as exc:
        parse_mailbox("to", value)
    assert field_of(exc) == "to"
    assert "SMTPUTF8" in exc.value.problem


def test_parse_mailbox_refuses_non_strings() -> None:
    with pytest.raises(InvalidMessage) as exc:
        parse_mailbox("reply_to", 42)
    assert field_of(exc) == "reply_to"


def _validator_says(addr: str) -> str | None:
    """email_validator's own verdict: the address it would send to, or None."""
    try:
        return validate_email(addr, check_deliverability=False, allow_smtputf8=False).ascii_email
    except EmailNotValidError:
        return None


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_ADDRESS = st.builds(
    lambda local, labels, tld: f"{local}@{'.'.join([*labels, tld])}",
    st.from_regex(r"[A-Za-z0-9_+=.-]{1,70}", fullmatch=True)
    | st.sampled_from(["postmaster", "Abuse", "a..b", ".a", "a.", "x" * 65]),
    st.lists(_LABEL, min_size=1, max_size=3) | st.just([]),
    st.from_regex(r"[a-z]{2,6}", fullmatch=True)
    | st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True)
    | st.sampled_from(["test", "local", "localhost", "invalid", "onion", "arpa", "com"]),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_ADDRESS)
def test_common_address_shortcut_agrees_with_email_validator(addr: str) -> None:
    """The shortcut only ever says yes to an address email_validator takes unchanged."""
    if _common_address(addr):
        assert _validator_says(addr) == addr


@pytest.mark.parametrize(
    "addr",
    [
        "postmaster@example.com",
        "a@b--c.example.com",
        "a@xn--bcher-kva.example",
        "a@Example.com",
        "a@example.test",
        "a@mail.localhost",
        "a@example.123",
        "a@" + "b" * 64 + ".com",
        "x" * 65 + "@example.com",
        "a@" + ".".join(["b" * 60] * 5) + ".com",
    ],
)
def test_uncommon_addresses_take_the_full_check(addr: str) -> None:
    assert not _common_address(addr)


def test_common_addresses_take_the_shortcut() -> None:
    for addr in ("john.smith+tag@mail.example.co.uk", "A_b=c-d@example.com", "x@a1.io"):
        assert _common_address(addr) and _validator_says(addr) == addr
        assert parse_mailbox("to", f"Ann <{addr}>") == ("Ann", addr)


# ---------------------------------------------------------------------------------------------
# SMTPAPIHeader: building


def test_fluent_building_and_json() -> None:
    header = (
        SMTPAPIHeader()
        .add_to("Ann <a@example.com>")
        .add_to("b@example.com")
        .add_substitution("-name-", "Ann")
        .add_substitution("-name-", "B\u00e9a")
        .add_category("news")
        .set_unique_arg("campaign", "7")
        .add_filter("clicktrack", "enable", True)
        .set_asm_group_id(42)
        .set_asm_groups_to_display([42, 43])
        .set_batch_id("BATCH123")
        .set_ip_pool("transactional")
    )
    assert header.to_dict() == {
        "to": ["Ann <a@example.com>", "b@example.com"],
        "sub": {"-name-": ["Ann", "B\u00e9a"]},
        "category": ["news"],
        "unique_args": {"campaign": "7"},
        "filters": {"clicktrack": {"settings": {"enable": 1}}},
        "asm_group_id": 42,
        "asm_groups_to_display": [42, 43],
        "batch_id": "BATCH123",
        "ip_pool": "transactional",
    }
    text = header.to_json()
    assert text.isascii()
    assert "\\u00e9" in text
    assert '", "' in text and '": ' in text
    assert json.loads(text) == header.to_dict()


def test_from_dict_round_trips_and_copies() -> None:
    data: dict[str, Any] = {
        "to": ["a@example.com"],
        "sub": {"%n%": ["x"]},
        "category": "single",
        "unique_args": {"k": "v"},
        "send_at": int(NOW) + 60,
    }
    header = SMTPAPIHeader.from_dict(data)
    out = header.to_dict()
    assert out == data
    assert out["category"] == "single"  # a string stays a string
    out["to"].append("b@example.com")
    assert header.to_dict()["to"] == ["a@example.com"]
    assert SMTPAPIHeader.from_dict(data) == header
    assert header.copy() == header


def test_empty_header_is_an_empty_object() -> None:
    assert SMTPAPIHeader().to_dict() == {}
    assert SMTPAPIHeader().to_json() == "{}"


def test_from_dict_refuses_unknown_keys() -> None:
    with pytest.raises(InvalidMessage) as exc:
        SMTPAPIHeader.from_dict({"category": "x", "categories": ["y"]})
    assert field_of(exc) == "smtpapi.categories"


def test_from_dict_refuses_non_mappings() -> None:
    with pytest.raises(InvalidMessage) as exc:
        SMTPAPIHeader.from_dict(["to"])  # type: ignore[arg-type]
    assert field_of(exc) == "smtpapi"


def test_section_is_accepted_with_a_warning() -> None:
    with pytest.warns(FutureWarning, match="section"):
        header = SMTPAPIHeader.from_dict({"section": {"-s-": "text"}})
    assert header.to_dict() == {"section": {"-s-": "text"}}


# ---------------------------------------------------------------------------------------------
# SMTPAPIHeader: every rule names its field


def _invalid(data: dict[str, Any], now: float | None = None) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(InvalidMessage) as exc:
            SMTPAPIHeader.from_dict(data).validate(now)
    return field_of(exc)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"to": "a@example.com"}, "smtpapi.to"),
        ({"to": ["a@example.com, b@example.com"]}, "smtpapi.to"),
        ({"to": ["j\u00f6rg@example.com"]}, "smtpapi.to"),
        ({"to": [f"u{i}@example.com" for i in range(10_001)]}, "smtpapi.to"),
        ({"to": ["a@example.com"], "sub": {"-n-": ["1", "2"]}}, "smtpapi.sub"),
        ({"sub": {"-n -": ["1"]}}, "smtpapi.sub"),
        ({"sub": {"-n-": [1]}}, "smtpapi.sub"),
        ({"sub": {"-n-": "x"}}, "smtpapi.sub"),
        ({"to": ["a@example.com"], "sub": {"-n-": ["x" * 10_001]}}, "smtpapi.sub"),
        ({"section": {"-s-": 1}}, "smtpapi.section"),
        ({"category": "caf\u00e9"}, "smtpapi.category"),
        ({"category": ""}, "smtpapi.category"),
        ({"category": [f"c{i}" for i in range(11)]}, "smtpapi.category"),
        ({"category": ["ok", 3]}, "smtpapi.category"),
        ({"category": "x" * 256}, "smtpapi.category"),
        ({"unique_args": {"k": 1}}, "smtpapi.unique_args"),
        ({"unique_args": {"": "v"}}, "smtpapi.unique_args"),
        ({"unique_args": ["k"]}, "smtpapi.unique_args"),
        ({"unique_args": {f"k{i}": "v" * 100 for i in range(100)}}, "smtpapi.unique_args"),
        ({"unique_args": {"k": "x" * 2000}}, "smtpapi.unique_args"),
        ({"unique_args": {"k": "\u00e9" * 200}}, "smtpapi.unique_args"),
        ({"asm_group_id": "42"}, "smtpapi.asm_group_id"),
        ({"asm_group_id": True}, "smtpapi.asm_group_id"),
        ({"asm_group_id": 0}, "smtpapi.asm_group_id"),
        ({"asm_groups_to_display": list(range(1, 27))}, "smtpapi.asm_groups_to_display"),
        ({"asm_groups_to_display": [1, "2"]}, "smtpapi.asm_groups_to_display"),
        ({"send_at": int(NOW) + 73 * 3600}, "smtpapi.send_at"),
        ({"send_at": int(NOW * 1000)}, "smtpapi.send_at"),
        ({"send_at": int(NOW) - 3 * 86400}, "smtpapi.send_at"),
        ({"send_at": 1.5}, "smtpapi.send_at"),
        ({"send_at": 0}, "smtpapi.send_at"),
        (
            {"to": ["a@example.com"], "send_at": int(NOW), "send_each_at": [int(NOW)]},
            "smtpapi.send_each_at",
        ),
        ({"to": ["a@example.com"], "send_each_at": [int(NOW)] * 2}, "smtpapi.send_each_at"),
        ({"send_each_at": [int(NOW)]}, "smtpapi.send_each_at"),
        ({"to": ["a@example.com"], "send_each_at": [int(NOW) + 4 * 86400]}, "smtpapi.send_each_at"),
        ({"batch_id": "has space"}, "smtpapi.batch_id"),
        ({"batch_id": ""}, "smtpapi.batch_id"),
        ({"ip_pool": ""}, "smtpapi.ip_pool"),
        ({"ip_pool": "p" * 65}, "smtpapi.ip_pool"),
        ({"filters": {"clicktrack": {"enable": 1}}}, "smtpapi.filters"),
        ({"filters": {"ClickTrack": {"settings": {"enable": 1}}}}, "smtpapi.filters"),
        ({"filters": {"clicktrack": {"settings": {"enable": 1.0}}}}, "smtpapi.filters"),
        ({"filters": {"clicktrack": {"settings": {}}}}, "smtpapi.filters"),
        ({"filters": {"clicktrack": "on"}}, "smtpapi.filters"),
    ],
)
def test_rules_name_the_field(data: dict[str, Any], field: str) -> None:
    assert _invalid(data) == field


def test_schedule_window_edges() -> None:
    now = 1_700_000_000.0
    SMTPAPIHeader(send_at=int(now) + 72 * 3600).validate(now)
    SMTPAPIHeader(send_at=int(now) - 3600).validate(now)
    assert _invalid({"send_at": int(now) + 72 * 3600 + 1}, now) == "smtpapi.send_at"


def test_send_each_at_matches_to() -> None:
    now = int(NOW)
    header = SMTPAPIHeader(to=["a@example.com", "b@example.com"], send_each_at=[now, now + 60])
    assert header.to_dict()["send_each_at"] == [now, now + 60]


def test_unique_args_size_limit_counts_the_serialised_form() -> None:
    SMTPAPIHeader(unique_args={"k": "a " * 4990}).validate()  # 9,980 + quoting ≤ 10,000
    assert _invalid({"unique_args": {"k": "a " * 5000}}) == "smtpapi.unique_args"


def test_long_values_with_spaces_are_fine() -> None:
    value = " ".join(["word"] * 1000)
    assert SMTPAPIHeader(unique_args={"k": value}).to_dict()["unique_args"]["k"] == value


def test_setter_failure_leaves_previous_value() -> None:
    header = SMTPAPIHeader(unique_args={"a": "1"})
    with pytest.raises(InvalidMessage):
        header.set_unique_args({"b": 2})  # type: ignore[dict-item]
    assert header.to_dict() == {"unique_args": {"a": "1"}}


def test_repr_does_not_dump_recipient_lists() -> None:
    header = SMTPAPIHeader(to=[f"u{i}@example.com" for i in range(50)])
    assert "u49@example.com" not in repr(header)


# ---------------------------------------------------------------------------------------------
# Property: whatever the input, refusal names a smtpapi field, or the JSON folds and round-trips

_long_values = st.builds(
    lambda unit, n: unit * n,
    st.sampled_from(["x", "ab ", "\u00e9", "\u00e9 ", "a b", "\u4e2d", "\\", '"']),
    st.integers(min_value=1, max_value=1500),
)
_strings = st.one_of(st.text(max_size=30), _long_values)
_smtpapi_dicts = st.fixed_dictionaries(
    {},
    optional={
        "to": st.lists(
            st.sampled_from(["a@example.com", "Ann <b@example.com>", "bad", "\u00e9@example.com"]),
            max_size=3,
        ),
        "sub": st.dictionaries(
            st.sampled_from(["-a-", "%b%", "bad tag"]), st.lists(_strings, max_size=3), max_size=2
        ),
        "category": st.one_of(_strings, st.lists(st.text(max_size=12), max_size=12)),
        "unique_args": st.dictionaries(
            st.text(max_size=12), st.one_of(_strings, st.integers()), max_size=4
        ),
        "filters": st.dictionaries(
            st.sampled_from(["clicktrack", "opentrack", "Bad"]),
            st.fixed_dictionaries(
                {
                    "settings": st.dictionaries(
                        st.sampled_from(["enable", "text/html"]),
                        st.one_of(st.integers(0, 1), st.booleans(), _strings),
                        min_size=1,
                    )
                }
            ),
            max_size=2,
        ),
        "asm_group_id": st.one_of(st.integers(-2, 10**6), st.booleans()),
        "asm_groups_to_display": st.lists(st.integers(-1, 100), max_size=27),
        "send_at": st.integers(int(NOW) - 2 * 86400, int(NOW) + 4 * 86400),
        "batch_id": st.text(max_size=20),
        "ip_pool": st.text(max_size=70),
    },
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_smtpapi_dicts)
def test_smtpapi_property(data: dict[str, Any]) -> None:
    try:
        header = SMTPAPIHeader.from_dict(data)
        text = header.to_json()
        folded = fold_header_value("X-SMTPAPI", text, field="smtpapi")
    except InvalidMessage as exc:
        assert exc.field.startswith("smtpapi")
        return
    assert text.isascii()
    assert "=?" not in folded
    assert json.loads(unfold(folded)) == header.to_dict()
    assert all(len(line) <= 998 for line in ("X-SMTPAPI: " + folded).split("\r\n"))

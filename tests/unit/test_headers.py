"""RFC 5322 header text (mailer/headers.py): the folder (never RFC 2047, unfolding restores the
value) and the mailbox parser (one ASCII address per string, the email_validator shortcut)."""

from __future__ import annotations

import re

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.errors import InvalidMessage
from mailer.headers import _common_address, _fold_pieces, fold_header_value, parse_mailbox


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


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # IDN domains go out in their xn-- form (as Django's sanitize_address sends them).
        ("a@b\u00fccher.example", ("", "a@xn--bcher-kva.example")),
        ("from@\u00f6\u00e4\u00fc.com", ("", "from@xn--4ca9at.com")),
        ("To Example <to@\u6f22\u5b57.example.com>", ("To Example", "to@xn--p8s937b.example.com")),
        # IDNA 2008, not 2003: sharp s stays (2003 would map it to "ss", another domain).
        ("a@fa\u00df.example.com", ("", "a@xn--fa-hia.example.com")),
        # Already encoded, with the joiners IDNA 2008 allows in context (ZWJ, ZWNJ): as given.
        ("a@xn--10cl1a0b660p.example.com", ("", "a@xn--10cl1a0b660p.example.com")),
        ("a@XN--mgba3gch31f060k.Example.com", ("", "a@xn--mgba3gch31f060k.example.com")),
    ],
)
def test_parse_mailbox_sends_idn_domains_in_their_ascii_form(
    value: str, expected: tuple[str, str]
) -> None:
    assert parse_mailbox("to", value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "a@xn--zz.example.com",  # not a valid A-label
        "a@xn--10cl1a0b660p.localhost",  # the rest of the address is still checked
        "a b@xn--10cl1a0b660p.example.com",
    ],
)
def test_parse_mailbox_refuses_bad_encoded_domains(value: str) -> None:
    with pytest.raises(InvalidMessage) as exc:
        parse_mailbox("to", value)
    assert field_of(exc) == "to"


@pytest.mark.parametrize("value", ["j\u00f6rg@example.com", "J\u00f6rg <j\u00f6rg@b\u00fccher.de>"])
def test_parse_mailbox_refuses_non_ascii_local_parts_for_lack_of_smtputf8(value: str) -> None:
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

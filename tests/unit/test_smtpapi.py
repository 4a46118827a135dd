"""X-SMTPAPI builder rules (mailer/smtpapi.py); the header folder is in test_headers.py."""

from __future__ import annotations

import json
import re
import time
import warnings
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.errors import InvalidMessage
from mailer.headers import fold_header_value
from mailer.smtpapi import SMTPAPIHeader

NOW = time.time()


def unfold(folded: str) -> str:
    return re.sub(r"\r\n(?=[ \t])", "", folded)


def field_of(exc: pytest.ExceptionInfo[InvalidMessage]) -> str:
    return exc.value.field


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

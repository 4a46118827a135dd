"""The wire contract (mailer/wire.py): what producers publish, what workers accept."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mailer import Message
from mailer.wire import (
    DEFAULT_LANE,
    QUEUE,
    InvalidPayload,
    batch_args,
    from_payload,
    lane_of,
    message_id_of,
    queue_for,
    send_args,
    to_payload,
)


def _payload(**kw: Any) -> dict[str, Any]:
    m = Message(to="a@example.com", subject="s", text="t", from_addr="f@example.com")
    return json.loads(json.dumps(to_payload(m.render(), **kw)))


def test_round_trip_through_json() -> None:
    payload = _payload()
    assert from_payload(payload).id == payload["id"]
    assert send_args([payload], {}) == (payload, 0, "")
    assert send_args([payload], {"attempts": 3, "released": "o1 o2"})[1:] == (3, "o1 o2")


def test_lanes_name_their_queue_and_default_keeps_the_historical_one() -> None:
    assert queue_for(DEFAULT_LANE) == QUEUE
    assert queue_for("transactional") == f"{QUEUE}.transactional"
    payload = _payload(lane="transactional")
    assert lane_of(payload) == "transactional" and from_payload(payload)
    assert lane_of(_payload()) == DEFAULT_LANE


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        ([], {}, "one payload"),
        ([{}, {}], {}, "one payload"),
        (["x"], {}, "mapping"),
        (["PAYLOAD"], {"bogus": 1}, "bogus"),
        (["PAYLOAD"], {"attempts": -1}, "attempts"),
        (["PAYLOAD"], {"attempts": True}, "attempts"),
        (["PAYLOAD"], {"released": 5}, "released"),
    ],
)
def test_send_args_refuse_what_the_producer_never_sends(
    args: list[Any], kwargs: dict[str, Any], named: str
) -> None:
    args = [_payload() if a == "PAYLOAD" else a for a in args]
    with pytest.raises(InvalidPayload, match=named):
        send_args(args, kwargs)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"v": 2}, "version"),
        ({"id": "nothex"}, "id"),
        ({"rcpt_to": []}, "rcpt_to"),
        ({"mail_from": "a b"}, "mail_from"),
        ({"data": "é"}, "data"),
        ({"extra": 1}, "extra"),
        ({"meta": {"lane": "no lane!"}}, "lane"),
    ],
)
def test_payloads_are_checked_key_by_key(change: dict[str, Any], named: str) -> None:
    payload = _payload()
    if "meta" in change:
        payload["meta"].update(change["meta"])
    else:
        payload.update(change)
    with pytest.raises(InvalidPayload, match=named):
        from_payload(payload)


def test_batches() -> None:
    assert batch_args([[_payload()]], {}) and len(batch_args([[1, 2]], {})) == 2
    for args, kwargs in (([], {}), (["x"], {}), ([[]], {}), ([[1]], {"k": 1})):
        with pytest.raises(InvalidPayload):
            batch_args(args, kwargs)


def test_an_invalid_payload_is_filed_under_its_own_id_only_when_it_looks_like_ours() -> None:
    assert message_id_of({"id": "a" * 32}, "task") == "a" * 32
    assert message_id_of({"id": "A" * 32}, "task") == "task"
    assert message_id_of("junk", "task") == "task"

"""The pieces of a message's life in-process, on a real Redis: the status record and how the
reader merges it with the ledger, the signature check, the worker's suppression check, the wire
contract's optional meta keys, and the event batch applied directly (the webhook process is
tested end to end in tests/e2e/test_webhook.py)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
import redis
import redis.asyncio as aioredis

from events import ingest
from events.ingest import Ingestor
from events.signature import Refused, Verifier
from mailer import lifecycle as reader
from mailer.errors import ConfigError
from mailer.message import Message, message_id_for
from mailer.wire import InvalidPayload, from_payload, group_of, ignores_suppressions, to_payload
from tests.support.webhook import Signer, event
from workers.state import keys, lifecycle
from workers.state.suppressions import SuppressionCheck, Suppressions


def test_the_readers_keys_are_the_workers() -> None:
    assert reader.LEDGER_PREFIX == keys.LEDGER_PREFIX
    assert keys.status("x") == reader.STATUS_PREFIX + "x"


def test_queue_id_from_the_relays_250() -> None:
    assert (
        lifecycle.queue_id("250 Ok: queued as Yo60h6C5ScGPeP5fUWU3Kw") == "Yo60h6C5ScGPeP5fUWU3Kw"
    )
    assert lifecycle.queue_id("250 2.0.0 Ok") == ""


def test_status_merges_the_ledger_and_ranks_states() -> None:
    ledger = json.dumps({"state": "uncertain", "at": 10.0, "reply": "timed out"})
    st = reader.merge("a" * 32, None, ledger)
    assert (st.state, st.recorded, st.replies) == ("held", True, ("timed out",))
    record = json.dumps(
        {"state": "bounced", "at": 30, "transitions": [["bounced", 30], ["delivered", 20]]}
    )
    st = reader.merge("a" * 32, record, json.dumps({"state": "sent", "at": 5.5, "reply": "ok"}))
    assert st.state == "bounced"
    assert [t.state for t in st.transitions] == ["sent", "delivered", "bounced"]
    unknown = reader.merge("b" * 32, None, None)
    assert (unknown.state, unknown.recorded) == ("queued", False)


def test_status_by_idempotency_key_and_bad_ids(redis_url: str) -> None:
    from mailer.config import Settings

    settings = Settings.from_env({"MAILER_BROKER_URL": redis_url})
    client = redis.Redis.from_url(redis_url)
    mid = message_id_for("order-1")
    lifecycle.note(client, mid, "sent", 60, reply="250 Ok: queued as QID")
    st = reader.status(idempotency_key="order-1", settings=settings)
    assert (st.message_id, st.state, st.relay_id) == (mid, "sent", "QID")
    assert client.get(keys.relay_id("QID")) == mid.encode()
    assert 0 < client.ttl(keys.status(mid)) <= 60
    with pytest.raises(ValueError, match="32 hex digits"):
        reader.status("not-an-id", settings=settings)
    with pytest.raises(ValueError, match="not both"):
        reader.status()


def test_signature_is_checked_over_timestamp_and_body() -> None:
    signer = Signer()
    verifier = Verifier(signer.public, tolerance=60)
    body = b'[{"event":"delivered"}]'
    verifier.verify(signer.headers(body), body)
    for headers, data, why in [
        (Signer().headers(body), body, "bad signature"),
        (signer.headers(body), body + b" ", "bad signature"),
        (signer.headers(body, int(time.time()) - 120), body, "stale timestamp"),
        ({}, body, "missing"),
    ]:
        with pytest.raises(Refused, match=why):
            verifier.verify(headers, data)
    with pytest.raises(ConfigError, match="MAILER_SENDGRID_WEBHOOK_KEY"):
        Verifier("not base64!")


def test_wire_meta_keys_are_optional_and_checked() -> None:
    rendered = Message(
        to="a@example.com", subject="s", text="t", from_addr="f@example.com"
    ).render()
    plain = to_payload(rendered)
    assert "ignore_suppressions" not in plain["meta"] and group_of(plain) is None
    marked = to_payload(rendered, ignore_suppressions=True, asm_group=7)
    assert ignores_suppressions(marked) and group_of(marked) == 7
    assert from_payload(marked).id == rendered.id
    bad = {**marked, "meta": {**marked["meta"], "asm_group": "7"}}
    with pytest.raises(InvalidPayload, match="asm_group"):
        from_payload(bad)


def test_suppression_check_one_round_trip_for_many_messages(redis_url: str) -> None:
    lists = Suppressions(redis.Redis.from_url(redis_url))
    lists.add("Gone@Example.com", "bounce")
    lists.add("left@example.com", "group_unsubscribe", group=3)

    async def check() -> list[dict[str, str]]:
        client = aioredis.Redis.from_url(redis_url)
        checker = SuppressionCheck(client)
        try:
            return list(
                await asyncio.gather(
                    checker.suppressed(["gone@example.com", "ok@example.com"], None),
                    checker.suppressed(["left@example.com"], 3),
                    checker.suppressed(["left@example.com"], None),
                )
            )
        finally:
            await client.aclose()

    assert asyncio.run(check()) == [
        {"gone@example.com": "bounce"},
        {"left@example.com": "group_unsubscribe:3"},
        {},
    ]


def test_events_apply_once_and_resolve_a_hold(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    mid = uuid.uuid4().hex
    held = {"state": "data", "owner": "o", "at": time.time(), "reply": "", "until": 0}
    client.set(keys.ledger(mid), json.dumps(held))
    ingestor = Ingestor(client, 60)
    batch = [event("processed", "a@example.com", mailer_id=mid), event("open", "a@example.com")]
    first = ingestor.apply(batch)
    assert (first.applied, first.resolved, first.unmatched) == (2, 1, 1)
    again = ingestor.apply(batch)
    assert (again.applied, again.duplicates) == (0, 2)
    assert json.loads(client.get(keys.ledger(mid)) or b"{}")["owner"] == "relay-event"
    assert reader.read(client, mid).state == "sent"
    assert lifecycle.event_counts(client)["processed"] == 1


def test_a_batch_of_many_messages_applies_each_event_once_in_order(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events are grouped by message into script calls of PER_CALL events (3 here, so a
    message's events and the batch span several calls); each is applied once, in the batch's
    order for its message, and a copy within the same batch is a duplicate."""
    monkeypatch.setattr(ingest, "PER_CALL", 3)
    client = redis.Redis.from_url(redis_url)
    one, two = uuid.uuid4().hex, uuid.uuid4().hex
    lifecycle.note(client, one, "sent", 60, reply="250 Ok: queued as QONE")
    lifecycle.note(client, two, "sent", 60)
    at = int(time.time())
    kinds = ["processed", "deferred", "delivered", "open", "click"]
    batch = [event(kind, "a@example.com", mailer_id=one, at=at) for kind in kinds]
    batch.insert(2, event("delivered", "b@example.com", mailer_id=two, at=at))
    batch.insert(4, event("open", "nobody@example.com"))  # no message of ours
    batch.append(event("bounce", "c@example.com", sg_message_id="QONE.filter-1", at=at + 1))
    batch.append(dict(batch[0]))  # SendGrid's duplicate, in the same batch
    done = Ingestor(client, 60).apply(batch)
    assert (done.applied, done.duplicates, done.unmatched) == (8, 1, 1)
    assert done.by_type == {
        "processed": 1,
        "deferred": 1,
        "delivered": 2,
        "open": 2,
        "click": 1,
        "bounce": 1,
    }
    st = reader.read(client, one)
    assert [e["event"] for e in st.events] == [*kinds, "bounce"]
    assert st.state == "bounced"
    assert st.recipients == {"a@example.com": "delivered", "c@example.com": "bounced"}
    assert reader.read(client, two).state == "delivered"
    assert lifecycle.event_counts(client)["open"] == 2
    assert Suppressions(client).get("c@example.com") is not None
    again = Ingestor(client, 60).apply(batch)
    assert (again.applied, again.duplicates) == (0, len(batch))


def test_suppressions_follow_the_events_own_times(redis_url: str) -> None:
    """An event does not replace a newer entry, and a resubscribe does not remove one newer
    than itself (a SendGrid retry may bring an older event a day later); within a batch a
    resubscribe stays between what came before and after it, whatever the grouping."""
    client = redis.Redis.from_url(redis_url)
    lists = Suppressions(client)
    ingestor = Ingestor(client, 60)
    at = int(time.time())
    later_unsub = event("group_unsubscribe", "a@example.com", asm_group_id=5, at=at)
    earlier_resub = event("group_resubscribe", "a@example.com", asm_group_id=5, at=at - 60)
    ingestor.apply([later_unsub, earlier_resub])
    assert lists.get("a@example.com", 5) is not None
    ingestor.apply([event("group_resubscribe", "a@example.com", asm_group_id=5, at=at + 60)])
    assert lists.get("a@example.com", 5) is None

    lists.add("c@example.com", "manual")  # an operator's entry, now
    ingestor.apply([event("bounce", "c@example.com", at=at - 3600)])
    found = lists.get("c@example.com")
    assert found is not None and found.reason == "manual"
    ingestor.apply([event("spamreport", "c@example.com", at=at + 3600)])
    found = lists.get("c@example.com")
    assert found is not None and found.reason == "spamreport"

    # Grouped by message, m's unsubscribe would run before the resubscribe it came after.
    m, n = uuid.uuid4().hex, uuid.uuid4().hex
    ingestor.apply(
        [
            event("processed", "b@example.com", mailer_id=m, at=at),
            event("group_unsubscribe", "b@example.com", mailer_id=n, asm_group_id=5, at=at),
            event("group_resubscribe", "b@example.com", mailer_id=n, asm_group_id=5, at=at),
            event("group_unsubscribe", "b@example.com", mailer_id=m, asm_group_id=5, at=at),
        ]
    )
    assert lists.get("b@example.com", 5) is not None


def test_an_event_without_a_usable_time_is_applied_at_time_zero(redis_url: str) -> None:
    """JSON parsers accept NaN: such a batch must not stop the drain (it would retry forever)."""
    client = redis.Redis.from_url(redis_url)
    done = Ingestor(client, 60).apply(
        [
            {"event": "open", "email": "a@example.com", "timestamp": float("nan")},
            {"event": "click", "email": "a@example.com", "timestamp": "yesterday"},
        ]
    )
    assert (done.applied, done.duplicates) == (2, 0)
    assert client.hgetall(keys.event_counts(0)) == {b"open": b"1", b"click": b"1"}

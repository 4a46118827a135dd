"""The durable schedule on a real Redis: release is atomic and takes only what is due;
`cancel` wins over a release or a claim, and is refused once the relay may have the message."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
import redis

from mailer.config import Settings
from mailer.errors import InvalidMessage
from mailer.schedule import cancel, due_time
from mailer.wire import LEDGER_PREFIX, SCHEDULE_DUE, SCHEDULE_ITEMS
from workers.state.schedule import pending, release_due


def test_release_moves_what_is_due_onto_its_queue_once(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    now = time.time()
    for name, at, queue in (
        ("a", now - 5, "mailer"),
        ("b", now - 1, "mailer.bulk"),
        ("c", now + 60, "mailer"),
    ):
        client.hset(SCHEDULE_ITEMS, name, f'{queue}\n{{"m": "{name}"}}')
        client.zadd(SCHEDULE_DUE, {name: at})
    assert release_due(client) == 2
    assert release_due(client) == 0  # nothing released twice
    assert [json.loads(x)["m"] for x in client.lrange("mailer", 0, -1)] == ["a"]
    assert [json.loads(x)["m"] for x in client.lrange("mailer.bulk", 0, -1)] == ["b"]
    assert pending(client) == 1 and client.hexists(SCHEDULE_ITEMS, "c")


def test_a_backlog_is_released_in_bounded_batches(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    past = time.time() - 1
    pipe = client.pipeline()
    for i in range(2500):
        pipe.hset(SCHEDULE_ITEMS, f"m{i}", f"mailer\n{i}")
        pipe.zadd(SCHEDULE_DUE, {f"m{i}": past})
    pipe.execute()
    assert [release_due(client, 1000) for _ in range(4)] == [1000, 1000, 500, 0]
    assert client.llen("mailer") == 2500


def test_send_at_takes_aware_datetimes_and_unix_seconds_only() -> None:
    later = datetime.now(UTC) + timedelta(days=7)
    assert due_time(later) == pytest.approx(later.timestamp())
    assert due_time(time.time() + 3600) is not None
    assert due_time(time.time() - 10) is None  # already due: sent now
    for bad in (datetime.now() + timedelta(hours=1), "tomorrow", float("nan"), True):
        with pytest.raises(InvalidMessage, match="send_at"):
            due_time(bad)  # type: ignore[arg-type]


def test_cancel_marks_the_ledger_and_clears_the_schedule(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    settings = Settings(broker_url=redis_url, redis_url=redis_url)
    client.hset(SCHEDULE_ITEMS, "m1", "mailer\n{}")
    client.zadd(SCHEDULE_DUE, {"m1": time.time() + 60})
    assert cancel(settings, "m1")
    assert json.loads(client.get(LEDGER_PREFIX + "m1"))["state"] == "cancelled"
    assert pending(client) == 0 and not client.hexists(SCHEDULE_ITEMS, "m1")
    # A worker's claim in progress loses to the cancel (its `data` step will find it gone) ...
    client.set(LEDGER_PREFIX + "m2", json.dumps({"state": "claimed", "owner": "w"}))
    assert cancel(settings, "m2")
    # ... but once the terminator may have left, it is too late.
    for state in ("data", "sent", "uncertain"):
        client.set(LEDGER_PREFIX + "m3", json.dumps({"state": state, "owner": "w"}))
        assert not cancel(settings, "m3")

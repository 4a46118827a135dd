"""MAILER_WAIT_REPLICAS: the producer is told "queued", and the ledger's `data` mark lets the
DATA terminator go, only once a replica confirms the write (WAIT). Real primary and replica."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from devkit.redis_server import RedisServer
from mailer.config import Settings
from mailer.errors import PublishError
from mailer.publish import Publisher
from tests.unit.test_publish import payload
from workers.state.ledger import Ledger


@pytest.fixture
def primary() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


def publisher(url: str, replicas: int, retry_for: float = 0.0) -> Publisher:
    settings = dataclasses.replace(
        Settings(), broker_url=url, wait_replicas=replicas, publish_retry_for=retry_for
    )
    return Publisher(settings)


async def mark_data(url: str, replicas: int) -> bool:
    client = aioredis.from_url(url)
    ledger = Ledger(client, ttl=60, claim_ttl=10, replicas=replicas)
    try:
        assert await ledger.claim("m1", "owner") is None
        return await ledger.begin_data("m1", "owner", 30)
    finally:
        await ledger.close()
        await client.aclose()


def test_without_a_replica_nothing_is_confirmed(primary: RedisServer) -> None:
    with pytest.raises(PublishError, match="within 0 s"):
        publisher(primary.url, 1).send(payload(1))
    with pytest.raises(redis.ConnectionError, match="no 1 replica"):
        asyncio.run(mark_data(primary.url, 1))
    # Without the setting nothing waits (a single Redis, the default).
    publisher(primary.url, 0).send(payload(2))
    assert asyncio.run(mark_data(primary.url.replace("/0", "/1"), 0))


def test_with_a_replica_the_write_is_confirmed_and_on_it(primary: RedisServer) -> None:
    replica = RedisServer(replicaof=primary).start()
    try:
        client = redis.Redis(port=primary.port)
        client.wait(1, 5000)  # the replica has synced
        publisher(primary.url, 1, retry_for=5).send(payload(3))
        assert asyncio.run(mark_data(primary.url, 1))
        # Confirmed means on the replica already, not on its way.
        mirror = redis.Redis(port=replica.port)
        assert mirror.llen("mailer") == 1
        assert b'"state":"data"' in (mirror.get("mailer:ledger:m1") or b"")
    finally:
        replica.close()

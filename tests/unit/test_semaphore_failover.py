"""A replica promoted to primary may lack the newest leases: the semaphore grants nothing on
it for a TTL (holders of leases it lacks fence themselves meanwhile), while a plain restart or
a first start is not held back. Real primary and replica processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from devkit.redis_server import RedisServer
from tests.support.helpers import wait_until
from workers.state.semaphore import LeaseSemaphore, Limit


@pytest.fixture
def pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = RedisServer().start()
    replica = RedisServer(replicaof=primary).start()
    yield primary, replica
    replica.close()
    primary.close()


async def acquire(url: str, ttl: float = 10.0) -> tuple[bool, float]:
    """(granted, quarantine seconds reported by a snapshot)."""
    client = aioredis.from_url(url)
    try:
        sem = LeaseSemaphore(client, [Limit("smtp", 5)], ttl=ttl, host="h", restart_grace=False)
        lease = await sem.acquire(time.monotonic() + 0.5)
        snapshot = await sem.snapshot()
        await sem.close()
        return lease is not None, float(snapshot.get("quarantine_s") or 0)
    finally:
        await client.aclose()


def test_a_promoted_replica_grants_nothing_for_a_ttl(
    pair: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = pair
    granted, quarantine = asyncio.run(acquire(primary.url))
    assert granted and quarantine == 0  # a first start is not a failover
    client = redis.Redis(port=replica.port)
    assert wait_until(lambda: client.exists("mailer:sem:epoch:primary") == 1, timeout=10)
    client.execute_command("REPLICAOF", "NO", "ONE")  # what Sentinel does to promote it
    granted, quarantine = asyncio.run(acquire(replica.url))
    assert not granted and 0 < quarantine <= 10
    client.close()


def test_a_restarted_primary_is_not_a_failover(pair: tuple[RedisServer, RedisServer]) -> None:
    primary, _ = pair
    assert asyncio.run(acquire(primary.url))[0]
    primary.restart()  # AOF: its data, a new replication id, no previous one
    granted, quarantine = asyncio.run(acquire(primary.url))
    assert granted and quarantine == 0

"""`mailer status`: what the fleet is doing, read from Redis alone (no worker is asked)."""

from __future__ import annotations

import asyncio
from typing import Any

import redis
import redis.asyncio as aioredis

from mailer.config import Settings
from mailer.publish import QUEUE, redact_url
from workers.circuit import Circuit
from workers.deadletters import DeadLetters
from workers.semaphore import LeaseSemaphore, Limit


async def _leases(settings: Settings) -> dict[str, Any]:
    client = aioredis.from_url(settings.redis_url)
    try:
        limits = [Limit("smtp", settings.max_connections)]
        if settings.max_connections_per_host:
            limits.append(Limit(f"host:{settings.hostname}", settings.max_connections_per_host))
        semaphore = LeaseSemaphore(client, limits, settings.lease_ttl, host=settings.hostname)
        try:
            return await semaphore.snapshot()
        finally:
            await semaphore.close()
    finally:
        await client.aclose()


def collect(settings: Settings) -> dict[str, Any]:
    sync = redis.Redis.from_url(settings.broker_url)
    state = redis.Redis.from_url(settings.redis_url)
    circuit = Circuit(state).state(max_age=0)
    data = {
        "broker": redact_url(settings.broker_url),
        "queue": {
            "name": QUEUE,
            "waiting": int(sync.llen(QUEUE)),
            "unacked": int(sync.hlen("unacked")),
        },
        "leases": asyncio.run(_leases(settings)),
        "circuit": {"open": circuit.open, "reason": circuit.reason, "since": circuit.since},
        "dead_letters": DeadLetters(state).count(),
    }
    sync.close()
    state.close()
    return data


def render(data: dict[str, Any]) -> str:
    lines = [f"broker        {data['broker']}"]
    q = data["queue"]
    lines.append(
        f"queue         {q['name']}: {q['waiting']} waiting, {q['unacked']} delivered unacked"
    )
    circuit = data["circuit"]
    lines.append("circuit       " + (f"OPEN: {circuit['reason']}" if circuit["open"] else "closed"))
    lines.append(f"dead letters  {data['dead_letters']}")
    for name, limit in sorted(data["leases"].get("limits", {}).items()):
        lines.append(
            f"leases {name:<7} {limit.get('held', 0)}/{limit.get('cap', '?')} held, "
            f"oldest {limit.get('oldest_age_s') or 0:.1f}s"
        )
        for host, n in sorted(limit.get("hosts", {}).items()):
            lines.append(f"  host {host:<30} {n}")
        for proc, n in sorted(limit.get("processes", {}).items()):
            lines.append(f"  process {proc:<27} {n}")
    return "\n".join(lines)

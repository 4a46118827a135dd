"""Redis memory per queued message, per ledger record and per dead letter, and what a day of
traffic needs: `python bench/redis_memory.py [--n 20000] [--body 1024,4096]`.

A private redis-server (AOF on, `noeviction`, like production); each figure is the growth of
`used_memory` over N items written the way the project writes them (the producer's publish,
the ledger's claim -> data -> sent, `DeadLetters.add`) divided by N. Messages are rendered by
`mailer` with a plain-text body of the given size. Printed, never asserted; the table in README
("Production Redis", capacity) comes from a run of this.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import sys
from pathlib import Path

import redis
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devkit.redis_server import RedisServer
from mailer.client import Mailer
from mailer.config import Settings
from mailer.message import Message
from mailer.publish import Publisher
from workers.state.deadletters import DeadLetters, record
from workers.state.ledger import Ledger

DAY = 86400


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def payloads(n: int, body: int, tag: str) -> list[dict[str, object]]:
    settings = dataclasses.replace(Settings(), default_from="Sender <sender@example.com>")
    mailer = Mailer(settings)
    text = ("lorem ipsum dolor sit amet " * (body // 27 + 1))[:body] + "\n"
    out = []
    for i in range(n):
        message = Message(
            to=f"recipient{i}@example.com", subject=f"Your order {tag}-{i}", text=text
        )
        out.append(mailer.render(message).to_payload())
    return out


def per_queued(url: str, client: redis.Redis, items: list[dict[str, object]]) -> float:
    publisher = Publisher(dataclasses.replace(Settings(), broker_url=url))
    publisher.send(items[0])  # the queue and kombu's binding exist before the count starts
    client.delete("mailer")
    before = used(client)
    for item in items:
        publisher.send(item)
    after = used(client)
    publisher.close()
    client.delete("mailer")
    return (after - before) / len(items)


def per_ledger(url: str, client: redis.Redis, n: int) -> float:
    async def run() -> None:
        r = aioredis.from_url(url)
        ledger = Ledger(r, ttl=7 * DAY, claim_ttl=190)
        for start in range(0, n, 500):
            ids = [f"{i:032x}" for i in range(start, min(n, start + 500))]
            await asyncio.gather(*(ledger.claim(m, "o" * 32) for m in ids))
            await asyncio.gather(*(ledger.begin_data(m, "o" * 32, 680) for m in ids))
            reply = "250 Ok: queued as 3k0Nq2vSTmuKDCb1zLuXYA"
            await asyncio.gather(*(ledger.settle(m, "o" * 32, "sent", reply) for m in ids))
        await ledger.close()
        await r.aclose()

    before = used(client)
    asyncio.run(run())
    return (used(client) - before) / n


def per_dead_letter(client: redis.Redis, items: list[dict[str, object]]) -> float:
    store = DeadLetters(client)
    before = used(client)
    for item in items:
        store.add(
            record(
                item,
                kind="permanent",
                code=550,
                text="5.1.1 The email account that you tried to reach does not exist",
                attempts=1,
            )
        )
    return (used(client) - before) / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20000, help="items per measurement")
    parser.add_argument("--body", default="1024,4096", help="text body sizes in bytes")
    args = parser.parse_args()
    server = RedisServer().start()
    client = redis.Redis(port=server.port)
    try:
        print(f"redis-server {client.info('server')['redis_version']}, {args.n} items each\n")
        print(f"{'what':<34}{'bytes each':>12}")
        ledger = per_ledger(server.url, client, args.n)
        print(f"{'ledger record (sent, 7-day TTL)':<34}{ledger:>12.0f}")
        figures = {}
        for body in (int(b) for b in args.body.split(",")):
            items = payloads(args.n, body, f"b{body}")
            gc.collect()
            queued = per_queued(server.url, client, items)
            dead = per_dead_letter(client, items)
            client.delete("mailer:dead:records", "mailer:dead:index")
            figures[body] = (queued, dead)
            print(f"{f'queued message ({body} B body)':<34}{queued:>12.0f}")
            print(f"{f'dead letter ({body} B body)':<34}{dead:>12.0f}")
        print("\nA day of traffic, default TTLs (ledger 7 days; dead letters kept until purged,")
        print("here 1% of messages for 30 days; the queue holds one hour of backlog):\n")
        print(
            f"{'per day':>10} {'body':>6} {'ledger':>10} {'backlog 1 h':>12} "
            f"{'dead 1%x30d':>12} {'total':>10}"
        )
        for daily in (1_000_000, 10_000_000):
            for body, (queued, dead) in figures.items():
                parts = (
                    ledger * daily * 7,
                    queued * daily / 24,
                    dead * daily * 0.01 * 30,
                )
                cells = " ".join(f"{p / 2**30:>9.2f}G" for p in parts)
                print(f"{daily:>10,} {body:>6} {cells}  {sum(parts) / 2**30:>9.2f}G")
    finally:
        client.close()
        server.close()


if __name__ == "__main__":
    main()

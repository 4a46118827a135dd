"""Release lag of the durable schedule: N messages due in the same second, released by R
releasers (what R worker processes run), measured from the due time to when each lands on its
queue. Prints the figures; asserts nothing.

    python bench/schedule.py [--messages 100000] [--releasers 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from devkit.redis_server import RedisServer
from mailer.config import Settings
from mailer.message import Message
from mailer.publish import Publisher
from mailer.wire import QUEUE, SCHEDULE_DUE, to_payload
from workers.state.schedule import Releaser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--releasers", type=int, default=2)
    args = parser.parse_args()
    server = RedisServer().start()
    try:
        settings = Settings(broker_url=server.url, redis_url=server.url)
        publisher = Publisher(settings)
        assert publisher.fast is not None
        message = Message(to="a@example.com", subject="s", text="x", from_addr="f@example.com")
        rendered = message.render()
        parked = time.time() + 3600  # scheduled far ahead; all made due at once below
        started = time.monotonic()
        chunk = 1000
        for first in range(0, args.messages, chunk):
            tasks, when = [], []
            for i in range(first, min(first + chunk, args.messages)):
                payload = dict(to_payload(rendered))
                payload["id"] = f"{i:032x}"
                tasks.append(("mailer.send", (payload,), "{}", QUEUE))
                when.append((payload["id"], parked))
            publisher.fast.publish(tasks, due=when)
        enqueue_s = time.monotonic() - started
        client = redis.Redis.from_url(server.url)
        assert client.zcard(SCHEDULE_DUE) == args.messages
        used = client.info("memory")["used_memory"]
        due = time.time() + 2.0  # every one due in the same second
        pipe = client.pipeline(transaction=False)
        for i in range(args.messages):
            pipe.zadd(SCHEDULE_DUE, {f"{i:032x}": due}, xx=True)
        pipe.execute()
        releasers = [
            Releaser(redis.Redis.from_url(server.url)).start() for _ in range(args.releasers)
        ]
        landed: list[float] = []
        while len(landed) < args.messages:
            n = client.llen(QUEUE)
            now = time.time()
            landed.extend([now] * (n - len(landed)))
            time.sleep(0.005)
        for releaser in releasers:
            releaser.stop()
        lags = [t - due for t in landed]
        print(
            f"{args.messages:,} due at once, {args.releasers} releasers: first on its queue "
            f"{min(lags):+.2f} s after the due time, median {statistics.median(lags):+.2f} s, "
            f"last {max(lags):+.2f} s; scheduling them took {enqueue_s:.1f} s "
            f"({args.messages / enqueue_s:,.0f}/s); Redis used {used / 1e6:.0f} MB meanwhile"
        )
        publisher.close()
    finally:
        server.close()


if __name__ == "__main__":
    main()

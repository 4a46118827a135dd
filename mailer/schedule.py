"""Sending later, and changing one's mind: `send_at` and `cancel`, the producer's side.

A scheduled message is not a Celery ETA task (held in a worker's memory and redelivered when it
outlives the visibility timeout): it waits in Redis, in the durable schedule beside the queues
(`mailer.wire.SCHEDULE_DUE`/`SCHEDULE_ITEMS`), for any horizon, and the workers release it into
its lane's queue when due (workers/state/schedule.py). docs/scheduling.md has the design.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime

import redis

from mailer import redisconn
from mailer.config import Settings
from mailer.errors import InvalidMessage, PublishError
from mailer.publish import redact_url
from mailer.wire import LEDGER_PREFIX, SCHEDULE_DUE, SCHEDULE_ITEMS

#: What `send_at` takes: an aware datetime, or UNIX seconds; None sends now.
SendAt = datetime | int | float | None

#: A due time this close (seconds) is sent at once: the release would come later than that.
NOW = 0.5

#: Ledger states after which a message can no longer be called back.
TOO_LATE = frozenset({"data", "sent", "uncertain", "failed"})


def due_time(send_at: SendAt) -> float | None:
    """The UNIX time to send at, or None for now; InvalidMessage naming `send_at` otherwise."""
    if send_at is None:
        return None
    if isinstance(send_at, datetime):
        if send_at.tzinfo is None or send_at.utcoffset() is None:
            raise InvalidMessage("send_at", "a datetime must be timezone-aware")
        due = send_at.timestamp()
    elif isinstance(send_at, int | float) and not isinstance(send_at, bool):
        due = float(send_at)
    else:
        raise InvalidMessage(
            "send_at", f"expected an aware datetime or UNIX seconds, got {type(send_at).__name__}"
        )
    if not math.isfinite(due) or due < 0:
        raise InvalidMessage("send_at", "not a time")
    return None if due <= time.time() + NOW else due


def cancel(settings: Settings, message_id: str) -> bool:
    """See `Mailer.cancel`. The ledger first (state Redis): once it says `cancelled`, no worker
    sends the message, wherever it is; then the schedule entry goes (broker Redis)."""
    key = LEDGER_PREFIX + message_id
    state = redisconn.client(settings.redis_url, settings, socket_timeout=10, max_connections=2)
    broker = redisconn.client(settings.broker_url, settings, socket_timeout=10, max_connections=2)
    try:
        with state.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    current = json.loads(raw).get("state") if raw else None
                    if current in TOO_LATE:
                        pipe.unwatch()
                        return False
                    if current != "cancelled":
                        now = time.time()
                        record = {
                            "state": "cancelled",
                            "owner": "",
                            "at": now,
                            "reply": "",
                            "until": now,
                        }
                        pipe.multi()
                        pipe.set(key, json.dumps(record), ex=settings.ledger_ttl)
                        pipe.execute()
                    break
                except redis.WatchError:
                    continue
        with broker.pipeline() as bpipe:
            bpipe.zrem(SCHEDULE_DUE, message_id)
            bpipe.hdel(SCHEDULE_ITEMS, message_id)
            bpipe.execute()
        return True
    except (redis.RedisError, OSError) as exc:
        raise PublishError(
            f"could not cancel {message_id}: Redis at {redact_url(settings.redis_url)} "
            f"unavailable ({type(exc).__name__})"
        ) from None
    finally:
        state.close()
        broker.close()

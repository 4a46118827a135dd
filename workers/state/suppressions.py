"""Recipients we never mail again (docs/lifecycle.md, "Suppressions").

Two kinds of list, each a Redis hash address -> JSON {reason, at, source, message_id}: the
global list (hard bounces, blocks, spam reports, unsubscribes) and one per SendGrid unsubscribe
group (`asm_group_id`: a group unsubscribe suppresses that group's mail only). Each relay has
its own lists (SendGrid keeps suppressions per subuser: tenant A's bounce must not stop tenant
B's mail); the `default` relay's are the historical unscoped keys. The Event Webhook adds to
them (`events/`), operators manage them (`mailer suppressions --relay`), and the worker checks
every message's recipients against its own relay's lists before the ledger claim
(`SuppressionCheck`), in one round trip shared by the messages of one loop iteration. Addresses
are compared in lower case.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from mailer.wire import DEFAULT_RELAY
from workers.state import keys

#: Reasons the webhook records (an operator may give any).
REASONS = ("bounce", "blocked", "spamreport", "unsubscribe", "group_unsubscribe", "manual")


@dataclass(frozen=True)
class Suppression:
    address: str
    reason: str
    at: float
    source: str = "manual"  # event | manual | import
    message_id: str = ""
    group: int | None = None  # None: the global list

    @classmethod
    def parse(cls, address: str, raw: bytes | str, group: int | None = None) -> Suppression:
        data: dict[str, Any] = json.loads(raw)
        return cls(
            address=address,
            reason=str(data.get("reason", "")),
            at=float(data.get("at", 0)),
            source=str(data.get("source", "")),
            message_id=str(data.get("message_id", "")),
            group=group,
        )

    def entry(self) -> str:
        return json.dumps(
            {"reason": self.reason, "at": self.at, "source": self.source, "message_id": ""}
        )


def normal(address: str) -> str:
    return address.strip().lower()


def _key(group: int | None, relay: str = DEFAULT_RELAY) -> str:
    return keys.suppress_global(relay) if group is None else keys.suppress_group(group, relay)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


class Suppressions:
    """One relay's lists, synchronously (the CLI, tests)."""

    def __init__(self, client: redis.Redis, relay: str = DEFAULT_RELAY) -> None:
        self.redis = client
        self.relay = relay

    def add(
        self, address: str, reason: str = "manual", group: int | None = None, source: str = "manual"
    ) -> None:
        entry = Suppression(normal(address), reason, time.time(), source, group=group)
        self.redis.hset(_key(group, self.relay), entry.address, entry.entry())

    def add_many(self, entries: Iterable[Suppression]) -> int:
        pipe = self.redis.pipeline(transaction=False)
        n = 0
        for entry in entries:
            pipe.hset(_key(entry.group, self.relay), normal(entry.address), entry.entry())
            n += 1
            if n % 1000 == 0:
                pipe.execute()
        pipe.execute()
        return n

    def remove(self, address: str, group: int | None = None) -> bool:
        return bool(self.redis.hdel(_key(group, self.relay), normal(address)))

    def get(self, address: str, group: int | None = None) -> Suppression | None:
        raw = self.redis.hget(_key(group, self.relay), normal(address))
        return None if raw is None else Suppression.parse(normal(address), raw, group)

    def groups(self) -> list[int]:
        prefix = keys.suppress_group("", self.relay)
        found = self.redis.scan_iter(match=prefix + "*", count=1000)
        return sorted(int(_text(k)[len(prefix) :]) for k in found)

    def list(self, group: int | None = None) -> Iterator[Suppression]:
        for address, raw in self.redis.hscan_iter(_key(group, self.relay), count=1000):
            yield Suppression.parse(_text(address), raw, group)

    def count(self) -> int:
        """The relay's suppressed addresses, global and per group together."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hlen(keys.suppress_global(self.relay))
        for group in self.groups():
            pipe.hlen(keys.suppress_group(group, self.relay))
        return sum(int(n) for n in pipe.execute())


#: How long the worker trusts what it read about which suppression lists exist (seconds).
FRESH = 1.0
#: Lists whose existence the worker remembers at most (a few per active relay: 1,000 relays
#: with their groups fit; past it the oldest answers are read again).
KNOWN_LISTS = 4096


_Check = tuple[Sequence[str], str, str | None, "asyncio.Future[dict[str, str]]"]


class SuppressionCheck:
    """The worker's check: which of a message's recipients are suppressed, and why.

    Concurrent checks of one loop iteration leave as one pipeline (an HMGET of the relay's
    global list, and of its group's list when the message names a group, per message): the
    delivery path waits one round trip, shared. A Redis error is the caller's to handle."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        # (recipients, the relay's global list, its group's list or None, the answer)
        self._queue: list[_Check] = []
        self._flusher: asyncio.Task[None] | None = None
        self._exists: dict[str, tuple[float, bool]] = {}  # list key -> (when seen, exists)

    async def suppressed(
        self, recipients: Sequence[str], group: int | None, relay: str = DEFAULT_RELAY
    ) -> dict[str, str]:
        """recipient -> reason (`group_unsubscribe:<id>` for a group's list) for each one
        suppressed in relay `relay`'s lists; {} when none is. While none of them exists (no
        suppression recorded yet, the common case before the webhook is set up, and for most
        tenants) nothing is asked per message: whether a list exists is read at most once per
        FRESH seconds, so an address suppressed into a new list may still be sent to within
        that long."""
        general = keys.suppress_global(relay)
        grouped = None if group is None else keys.suppress_group(group, relay)
        if not await self._listed(general) and (grouped is None or not await self._listed(grouped)):
            return {}
        future: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self._queue.append((recipients, general, grouped, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _listed(self, key: str) -> bool:
        now = time.monotonic()
        seen = self._exists.get(key)
        if seen is not None and now - seen[0] < FRESH:
            return seen[1]
        exists = bool(await self.redis.hlen(key))  # HLEN: in the documented ACL rule
        self._exists.pop(key, None)  # re-inserted last: the dict's order is the reading order
        if len(self._exists) >= KNOWN_LISTS:
            del self._exists[next(iter(self._exists))]
        self._exists[key] = (now, exists)
        return exists

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            pipe = self.redis.pipeline(transaction=False)
            for recipients, general, grouped, _ in batch:
                lowered = [normal(r) for r in recipients]
                pipe.hmget(general, lowered)
                if grouped is not None:
                    pipe.hmget(grouped, lowered)
            try:
                replies = iter(await pipe.execute())
            except Exception as exc:
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for recipients, _, grouped, future in batch:
                found: dict[str, str] = {}
                lists = [next(replies)] + ([next(replies)] if grouped is not None else [])
                for index, values in enumerate(lists):
                    for recipient, raw in zip(recipients, values, strict=True):
                        if raw is not None and recipient not in found:
                            reason = str(json.loads(raw).get("reason", ""))
                            group = "" if grouped is None else grouped.rsplit(":", 1)[1]
                            found[recipient] = reason if index == 0 else f"{reason}:{group}"
                if not future.done():
                    future.set_result(found)

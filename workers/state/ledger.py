"""The idempotency ledger: what the relay already has, so a redelivered task never sends twice.

Celery on Redis is at-least-once (late acks, visibility-timeout redelivery, publish-then-ack
retries), so every attempt first *claims* its message id here (the id is derived from the
caller's `idempotency_key` when there is one, so the key is covered too). One key per message:

    claimed   an attempt is between MAIL and the DATA terminator (short TTL: if its worker
              dies, the claim lapses and a later attempt may send; nothing reached the relay)
    data      the DATA terminator is about to be written: from here the relay may have the
              message even if we never see its reply. A copy that finds `data` waits while
              the record's window (the attempt's longest wait for the reply) lasts
    sent      the relay answered 250
    uncertain no reply after the terminator (or found in `data` by a redelivered copy, whose
              sender died inside the ambiguous window); what happens next is
              MAILER_UNCERTAIN_POLICY: `hold` keeps it here, `retry` lets one attempt take over
    failed    permanently refused

Every transition is one Lua script that checks who owns the record, so two copies of a task
running at once (a redelivery racing the original) can never both get past `claimed`.
Records other than `claimed` live for MAILER_LEDGER_TTL (docs/ledger.md: the state machine).

Hundreds of sessions on one event loop each make three of these calls per message; awaited one
by one, their round trips are a large share of the loop's CPU. So the calls are coalesced (see
`_Coalescer`): what many sessions ask at about the same time leaves as one pipeline.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from workers.state import keys, scripts

log = logging.getLogger("mailer.ledger")

# Each transition is a Lua function of one record, `step(key, argv)`, in
# `workers/state/lua/ledger_<name>.lua`, with the helpers of `ledger_lib.lua`. The ledger runs it
# over many records at once (`ledger_each.lua`: one EVALSHA per transition and round trip, see
# `_Coalescer`); `_Script.single` runs it once, KEYS[1] and ARGV as usual (tests compare the two).


@dataclass(frozen=True)
class Record:
    state: str
    owner: str = ""
    at: float = 0.0
    reply: str = ""
    until: float = 0.0  # `data`: the attempt is alive until then (Redis server time)

    @classmethod
    def parse(cls, raw: bytes | str) -> Record:
        data: dict[str, Any] = json.loads(raw)
        return cls(
            state=str(data.get("state", "")),
            owner=str(data.get("owner", "")),
            at=float(data.get("at", 0)),
            reply=str(data.get("reply", "")),
            until=float(data.get("until", 0)),
        )


class _Script:
    """A transition run over many records per call (`ledger_each.lua`), sent by its SHA1
    (EVALSHA); its source goes over only if Redis lacks it."""

    __slots__ = ("confirm", "load", "sha", "sha_bulk", "single", "source")

    def __init__(self, name: str, confirm: bool = False) -> None:
        #: A replica must have its result before the caller goes on (see `Ledger.replicas`).
        self.confirm = confirm
        step = scripts.source(f"ledger_{name}")
        function = f"{scripts.source('ledger_lib')}local function step(key, argv)\n{step}\nend\n"
        self.source = function + scripts.source("ledger_each")
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        self.single = function + "return step(KEYS[1], ARGV)\n"  # one record, as usual
        self.sha_bulk = _bulk(self.sha.encode())
        self.load = b"*3\r\n" + _bulk(b"SCRIPT") + _bulk(b"LOAD") + _bulk(self.source.encode())


def _bulk(data: bytes) -> bytes:
    """A RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


_CLAIM_SCRIPT = _Script("claim")
_DATA_SCRIPT = _Script("data", confirm=True)
_SETTLE_SCRIPT = _Script("settle")
_RELEASE_SCRIPT = _Script("release")

#: How long a WAIT for replicas blocks the ledger's round trip (ms).
WAIT_TIMEOUT_MS = 1000


# The most calls in one pipeline: the queue is bounded by the callers anyway (one call at a time
# per attempt, `worker_connections` attempts), this only caps one write and its replies.
MAX_BATCH = 1000


class _Call:
    __slots__ = ("args", "future", "key", "nargs", "script")

    def __init__(
        self, script: _Script, key: bytes, args: list[bytes], future: asyncio.Future[Any]
    ) -> None:
        self.script = script
        self.key = _bulk(key)
        # Its argument count first, as `ledger_each.lua` reads them; as RESP, ready for the wire.
        self.nargs = len(args) + 1
        self.args = _bulk(b"%d" % len(args)) + b"".join(map(_bulk, args))
        self.future = future


class _Coalescer:
    """Runs concurrent transitions together: one round trip, one script call per transition.

    Each call is queued with a future of its own. The first call of a burst starts the flusher
    task, whose first step runs on the next loop iteration (no timer, no added wait): every call
    made until then rides in the same round trip. While that is in flight new calls queue up,
    and leave together as soon as it returns; the flusher ends when the queue is empty.

    One round trip in flight at a time, on purpose. The CPU saved is per batch, and with a
    single flight batches grow with the load, when CPU is shortest (the busier the loop, the
    more calls queue behind a round trip): Nagle without the timer. It also keeps the ledger on
    one pooled connection instead of one per session, and Redis runs commands one at a time
    anyway, so parallel pipelines would not finish sooner. A call waits for at most the round
    trip in flight before its own.

    The calls of one transition leave as a single EVALSHA over all their records (ledger_each):
    per call, Redis then runs a Lua function instead of a command, and redis-py packs and parses
    a few arguments instead of a command. Each record's step is atomic, as a script of its own
    would be; one caller's error (a script error on a garbled record) is returned to that caller
    only. An error of a whole command (NOSCRIPT, OOM) or of the round trip (connection,
    timeout) is raised in each of its callers, who may not know whether their step ran: exactly
    what an error of a single EVALSHA means. The calls of one transition run in the order they
    were made; transitions run in the order their first call was made, except those retried
    after NOSCRIPT, which run after the rest of their round trip. Concurrent callers never had
    an order anyway (each used a pooled connection of its own); one attempt makes one call at a
    time, so its own steps never share a round trip.
    """

    def __init__(self, redis: aioredis.Redis, replicas: int = 0) -> None:
        self.redis = redis
        self.replicas = replicas
        # Arguments are encoded when the call is made, so a bad one fails that call, not the
        # round trip it would have joined (packing then passes the bytes through).
        self._encode = redis.connection_pool.get_encoder().encode
        self._queue: list[_Call] = []
        self._flusher: asyncio.Task[None] | None = None
        self._conn: Any = None  # redis.asyncio Connection, taken from the pool on first use
        self.round_trips = 0  # round trips (pipelines) sent

    async def call(self, script: _Script, key: str, args: Sequence[Any]) -> Any:
        loop = asyncio.get_running_loop()
        encode = self._encode
        call = _Call(script, encode(key), [encode(arg) for arg in args], loop.create_future())
        self._queue.append(call)
        if self._flusher is None or self._flusher.done():  # done: cancelled before it started
            self._flusher = loop.create_task(self._flush(), name="ledger-flusher")
        try:
            return await call.future
        except asyncio.CancelledError:
            # Cancelled (a timeout): the flusher skips a call it has not sent yet and drops the
            # reply of one in flight. A result that arrived as we were cancelled is dropped here.
            if call.future.done() and not call.future.cancelled():
                call.future.exception()  # retrieved: no "exception never retrieved" report
            raise

    async def _flush(self) -> None:
        batch: list[_Call] = []
        try:
            while self._queue:
                if len(self._queue) <= MAX_BATCH:
                    batch, self._queue = self._queue, []
                else:
                    batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    await self._send(batch)
                except Exception as exc:  # a bug: its callers get it, the flusher carries on
                    log.exception("ledger pipeline failed")
                    _fail(batch, exc)
        except BaseException:
            # Cancelled (the loop is shutting down): nobody may be left waiting. The callers
            # were not cancelled themselves, and like after a lost connection they cannot know
            # whether their script ran: that is a connection error.
            pending, self._queue = [*batch, *self._queue], []
            _fail(pending, RedisConnectionError("ledger pipeline cancelled"))
            log.warning("ledger flusher cancelled with %d calls pending", len(pending))
            raise
        finally:
            self._flusher = None

    async def _send(self, batch: list[_Call]) -> None:
        groups: dict[_Script, list[_Call]] = {}
        for call in batch:
            if not call.future.done():  # cancelled while queued: not sent
                groups.setdefault(call.script, []).append(call)
        if not groups:
            return
        calls = list(groups.values())
        replies = await self._pipeline(calls, ())
        # NOSCRIPT: Redis restarted or its scripts were flushed. Those calls did not run: load
        # their scripts and send them again, once, in one more round trip.
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            again = [calls[i] for i in missing]
            load = [group[0].script for group in again]
            for i, reply in zip(missing, await self._pipeline(again, load), strict=True):
                replies[i] = reply
        for group, reply in zip(calls, replies, strict=True):
            if isinstance(reply, Exception):
                _fail(group, reply)
                continue
            for call, result in zip(group, reply, strict=True):
                if call.future.done():  # its caller was cancelled meanwhile
                    continue
                if isinstance(result, Exception):
                    call.future.set_exception(result)
                else:
                    call.future.set_result(result)

    async def _pipeline(self, groups: list[list[_Call]], load: Sequence[_Script]) -> list[Any]:
        """One round trip: the reply of each group (a list, one result per call), in order; an
        error of the whole round trip is returned once per group.

        Packed by hand from arguments encoded when each call was made, and sent on a
        connection the coalescer keeps (one round trip in flight at a time): redis-py's
        pipeline (packing every argument again, its retry wrapper, a pool checkout with a
        readiness probe per round trip) cost more than the commands. Nothing is retried
        here: after a lost connection no caller knows whether its step ran."""
        packed = [script.load for script in load]
        for group in groups:
            nargs = sum(call.nargs for call in group)
            packed.append(b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(group) + nargs))
            packed += (group[0].script.sha_bulk, _bulk(b"%d" % len(group)))
            packed += [call.key for call in group]
            packed += [call.args for call in group]
        # WAIT for replicas after a step that must survive a failover (docs/redis.md): it
        # covers every write of the round trip, and its caller goes on only once confirmed.
        confirm = self.replicas > 0 and any(group[0].script.confirm for group in groups)
        if confirm:
            packed.append(b"*3\r\n$4\r\nWAIT\r\n" + _bulk(b"%d" % self.replicas))
            packed.append(_bulk(b"%d" % WAIT_TIMEOUT_MS))
        self.round_trips += 1
        try:
            count = len(load) + len(groups) + confirm
            replies = await self._round_trip(b"".join(packed), count)
        except Exception as exc:
            return [exc for _ in groups]
        if confirm and not (isinstance(replies[-1], int) and replies[-1] >= self.replicas):
            unconfirmed = RedisConnectionError(
                f"no {self.replicas} replica(s) confirmed the ledger write within "
                f"{WAIT_TIMEOUT_MS} ms"
            )
            replies[-1:] = []
            return [
                unconfirmed if group[0].script.confirm else reply
                for group, reply in zip(groups, replies[len(load) :], strict=True)
            ]
        return replies[len(load) : len(load) + len(groups)]

    async def _round_trip(self, packed: bytes, count: int) -> list[Any]:
        """Writes `packed` and reads `count` replies; a command's error reply is its reply."""
        conn = self._conn
        if conn is None:
            conn = self._conn = await self.redis.connection_pool.get_connection()
        try:
            await conn.send_packed_command(packed, check_health=False)
            replies: list[Any] = []
            for _ in range(count):
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:  # NOSCRIPT, OOM...: that command's reply
                    replies.append(exc)
            return replies
        except BaseException:
            # Lost, timed out or cancelled mid-way: replies may be left unread on it.
            self._conn = None
            await conn.disconnect(nowait=True)
            await self.redis.connection_pool.release(conn)
            raise

    async def close(self, timeout: float = 5.0) -> None:
        """Lets the round trip in flight land (its callers may be settling), then closes the
        connection and gives it back to the pool."""
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            await asyncio.wait([flusher], timeout=timeout)
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect()
            await self.redis.connection_pool.release(conn)


def _copy(exc: Exception) -> Exception:
    try:
        dup = copy.copy(exc)
    except Exception:
        return exc
    dup.__cause__, dup.__context__ = exc.__cause__, exc.__context__
    dup.__suppress_context__ = exc.__suppress_context__
    return dup.with_traceback(exc.__traceback__)


def _fail(calls: list[_Call], exc: Exception) -> None:
    """`exc` (a copy each) for every call still waiting: no caller is ever left hanging."""
    for call in calls:
        if not call.future.done():
            call.future.set_exception(_copy(exc))


class Ledger:
    """Async ledger on the process's Redis client; every transition is one atomic script, and
    concurrent transitions share round trips (see `_Coalescer`)."""

    def __init__(
        self, redis: aioredis.Redis, *, ttl: int, claim_ttl: float, replicas: int = 0
    ) -> None:
        """`replicas`: how many replicas must confirm the `data` mark before `begin_data`
        returns (so the DATA terminator follows only a mark a failover cannot lose)."""
        self.redis = redis
        self.ttl = ttl
        self.claim_ttl_ms = int(claim_ttl * 1000)
        self._calls = _Coalescer(redis, replicas)

    @property
    def round_trips(self) -> int:
        """Pipelines sent so far (each carrying one or more transitions)."""
        return self._calls.round_trips

    @staticmethod
    def key(message_id: str) -> str:
        return keys.ledger(message_id)

    async def claim(
        self,
        message_id: str,
        owner: str,
        *,
        takeover: bool = False,
        released: Sequence[str] = (),
    ) -> Record | None:
        """Takes the message for this attempt; returns the blocking record if it can't.

        With `takeover` (policy `retry`) an ambiguous record is taken over; without it a
        stale `data` record is turned into `uncertain` and returned. `released` names the
        earlier attempts of this same task, known to have left nothing at the relay: all of
        them, because each failed write of ours may or may not have landed, so any of them
        may own the record."""
        raw = await self._calls.call(
            _CLAIM_SCRIPT,
            self.key(message_id),
            (owner, self.claim_ttl_ms, "1" if takeover else "0", self.ttl, *released),
        )
        return None if raw is None else Record.parse(raw)

    async def begin_data(self, message_id: str, owner: str, window: float) -> bool:
        """`claimed` -> `data`, just before the terminator; False if the claim is not ours.

        `window`: the longest this attempt can wait for the final reply (plus a margin). Until
        then a copy that finds `data` waits (the attempt is alive); after it, the sender is
        known to have died inside the ambiguous window."""
        return bool(
            await self._calls.call(_DATA_SCRIPT, self.key(message_id), (owner, self.ttl, window))
        )

    async def settle(self, message_id: str, owner: str, state: str, reply: str = "") -> bool:
        """`sent` (always: the relay's 250 is the truth), `failed` or `uncertain` (if ours)."""
        return bool(
            await self._calls.call(
                _SETTLE_SCRIPT, self.key(message_id), (owner, state, reply[:200], self.ttl)
            )
        )

    async def close(self) -> None:
        """At shutdown, once no attempt is left: closes the coalescer's connection."""
        await self._calls.close()

    async def get(self, message_id: str) -> Record | None:
        raw = await self.redis.get(self.key(message_id))
        return None if raw is None else Record.parse(raw)

    async def release(self, message_id: str, owner: str) -> None:
        """Forgets our attempt when the relay certainly does not have the message (failed before
        the terminator, or a definite 4xx/421 reply to it), so a retry may send at once."""
        await self._calls.call(_RELEASE_SCRIPT, self.key(message_id), (owner,))

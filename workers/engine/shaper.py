"""A worker process's side of traffic shaping: it admits each attempt when the fleet's rate
allows, paces session opens, and reports the relay's throttling replies.

Tokens come from Redis in batches (workers/state/ratelimit.py), each with the time from which it
may be used, so a batch never turns into a burst: the process releases its waiters one by one
at their tokens' times, lanes in priority order. With no window configured and no adaptive
ceiling in force, admission costs nothing but a local count (reported once a second: it is the
measure the adaptive ceiling starts from). Waiting here never spends a message's attempts: a
wait that outlasts its deadline is a THROTTLED failure, which the settle policy retries for free.
One shaper per relay (workers/engine/relayparts.py): its own windows, adaptive ceiling and
session-open rate, on the relay's own keys. docs/shaping.md has the whole design.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis

from mailer.config import Lane, RateWindow, Settings
from mailer.wire import DEFAULT_RELAY
from workers.engine.classify import Failure, Kind, Phase
from workers.observe.logs import log_event
from workers.state.ratelimit import RateLimiter

log = logging.getLogger("mailer.shaper")

#: How far ahead one batch may reserve the fleet's schedule: bounds how long a token waits
#: unused in one process while another could have used it.
HORIZON = 0.25
#: Each window's burst tolerance is split: LATE_SHARE of it is kept for tokens used late (a
#: worker's loop or its Redis round trips held up between the token's time and the MAIL), the
#: rest is the burst a grant may take ahead of the pace. A token is used at most that late, or
#: dropped (its slot went by unused), so every window holds exactly, counted when the MAIL
#: leaves: at most burst + L * rate in any interval L, however late tokens bunch.
LATE_SHARE = 0.8
#: ... and never more than this (a slow window's first token would wait for it).
LATE_MAX = 0.1
#: The most tokens one Redis call asks for.
MAX_BATCH = 256
#: Bursts allowed by the adaptive ceiling, in seconds of its rate.
CEILING_BURST = 0.1
#: Unmetered use is reported this often (the adaptive ceiling's measure of the fleet's rate).
REPORT_EVERY = 0.2
#: Throttling replies are gathered this long before one report (a burst is one report).
GATHER = 0.2
#: Adaptive ceiling: at most one decrease per COOLDOWN seconds; it then grows by RECOVERY of
#: the rate it fell from per second; it never falls below FLOOR messages per second.
COOLDOWN = 1.0
RECOVERY = 0.08
FLOOR = 0.1
#: A refusal that says nothing of the relay's rate (slow start's first, or a relay refusing
#: nearly everything: a spent budget) starts a probe: PROBE of the rate the ceiling would fall
#: to (at most PROBE_MAX msg/s), halving while refused, until a message admitted during the
#: probe is delivered. Refusals that lasted less than LONG_REFUSAL seconds were a per-second
#: limit (the ceiling comes back to that rate); longer ones a budget spent early (it comes
#: back to the rate the relay accepted over the whole cycle).
PROBE = 0.05
PROBE_MAX = 5.0
LONG_REFUSAL = 2.0
#: Slow start, for a relay with no window configured whose limits the fleet has not learned
#: yet (no throttling reply ever, no slow start before: Redis keeps that, so a warm fleet, or
#: one that restarts, does not pay it again): the fleet begins at SLOW_START msg/s and the
#: ceiling grows by SLOW_START_GAIN msg/s per message sent (an e-fold every 1/GAIN seconds
#: while the fleet uses it all, to at most twice what it was granted in the last second) until
#: the first throttling reply, which ends it with a probe (above), or until SLOW_START_END
#: msg/s or SLOW_START_FOR seconds, when admission is free.
SLOW_START = 20.0
SLOW_START_GAIN = 0.5
SLOW_START_END = 2000.0
#: ... and it ends after this many seconds without a throttling reply (the relay takes what
#: this fleet sends: a fleet that cannot reach SLOW_START_END would otherwise stay paced).
SLOW_START_FOR = 10.0


@dataclass(eq=False, slots=True)
class _Waiter:
    future: asyncio.Future[float | None]  # the time its last token allows (None: unmetered)
    tokens: int


@dataclass(eq=False)
class _Bucket:
    """The tokens of one rate (a lane's message rate, or the session-open rate) in this
    process: the stock granted (times from which each may be used), waiters first come first
    served, and one task that refills and serves while anyone waits."""

    name: str
    limiter: RateLimiter | None
    windows: tuple[RateWindow, ...]
    share: float = 1.0
    adaptive: bool = True  # the adaptive ceiling applies (message rates; not session opens)
    rank: int = 0  # lane priority: 0 is the highest
    stock: deque[float] = field(default_factory=deque)
    waiters: deque[_Waiter] = field(default_factory=deque)
    server: asyncio.Task[None] | None = None


class Shaper:
    def __init__(
        self,
        settings: Settings,
        limiter: RateLimiter | None,
        connect_limiter: RateLimiter | None = None,
        *,
        relay: str = DEFAULT_RELAY,
    ) -> None:
        self.settings = settings
        self.limiter = limiter
        self.relay = relay
        self.ceiling: float | None = None  # the adaptive ceiling in force, msg/s
        self.ceiling_reason = ""
        #: The ceiling is slow start's; `_known`: Redis has told us whether a ceiling or slow
        #: start is in force (until then, with no window configured, admission asks it).
        self.slow = False
        #: The ceiling is a probe's since this monotonic time (None: it is not): a message
        #: admitted after it and delivered tells Redis the relay takes mail again.
        self._probe_since: float | None = None
        self._accepting = False
        self._known = bool(settings.rate_limits) or limiter is None
        self._lanes: dict[str, _Bucket] = {}
        for rank, lane in enumerate(settings.lanes):
            self._lanes[lane.name] = self._lane_bucket(lane, rank)
        self._connect: _Bucket | None = None
        if settings.connect_rate and connect_limiter is not None:
            rate = settings.connect_rate
            # One slot of tolerance, no burst: the point is to spread a start.
            window = RateWindow(rate, 1.0, 1, f"connect:{rate:g}/s")
            self._connect = _Bucket("connect", connect_limiter, (window,), adaptive=False)
        self._unmetered = 0
        self._throttles = 0
        self._throttle_reason = ""
        self._reported = 0.0  # monotonic time of the last throttling report
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    def _lane_bucket(self, lane: Lane, rank: int) -> _Bucket:
        share = self.settings.lane_share(lane.name)
        windows = self.settings.rate_limits
        if share < 1.0:
            windows = windows + tuple(w.scaled(share, lane.name) for w in windows)
        return _Bucket(lane.name, self.limiter, windows, share, rank=rank)

    @property
    def cautious(self) -> bool:
        """The relay throttled us recently: sessions stop pipelining until the rate recovers."""
        return self.ceiling is not None and not self.slow

    @property
    def paced(self) -> bool:
        """Some lane's messages wait for tokens: a message's commands must leave when its
        token allows, so the pool does not write them early behind another message's body
        (where nobody checks the token: a queue of attempts waiting for sessions at start-up
        would leave back to back)."""
        return any(self._metered(bucket) for bucket in self._lanes.values())

    def _metered(self, bucket: _Bucket) -> bool:
        if bucket.limiter is None:
            return False
        return bool(bucket.windows) or (
            bucket.adaptive and (self.ceiling is not None or not self._known)
        )

    def tokens_for(self, recipients: int) -> int:
        return max(1, recipients) if self.settings.rate_unit == "recipients" else 1

    # -- admission -----------------------------------------------------------------------------

    async def admit(
        self, lane: str, tokens: int, deadline: float, *, holding: bool = False
    ) -> float | None:
        """Returns when the fleet's rate lets this attempt start (the time its token allows,
        None when nothing is metered); THROTTLED past `deadline`. `holding`: the attempt
        already holds a session (its token went by while it waited for one): it goes first,
        or at a slow rate the sessions would sit with attempts queued behind waiters that
        have tokens and no session."""
        bucket = self._bucket(lane)
        if not self._metered(bucket):
            self._count(tokens)
            return None
        what = "waiting for the fleet's message rate"
        return await self._wait(bucket, tokens, deadline, what, first=holding)

    def late(self, lane: str, slot: float | None) -> bool:
        """The token an attempt was admitted with went by while it waited for a session (a
        session opening, a busy pool), or it was admitted unmetered and the relay has
        throttled us since: sending now would add to a moment the rate did not grant it, so
        the attempt takes a fresh token first."""
        bucket = self._bucket(lane)
        if slot is None:
            return self._metered(bucket)
        return time.monotonic() - slot > self._late_limit(bucket)

    def _bucket(self, lane: str) -> _Bucket:
        return self._lanes.get(lane) or self._lanes[self.settings.default_lane]

    async def connect(self, deadline: float) -> None:
        """Returns when a new session may open (MAILER_CONNECT_RATE), with jitter."""
        bucket = self._connect
        if bucket is None:
            return
        slot = await self._wait(bucket, 1, deadline, "waiting for the fleet's session-open rate")
        # Jitter within how late the token may be used, so no fleet-wide edge at slot starts.
        room = (slot or 0.0) + self._late_limit(bucket) - time.monotonic()
        if room > 0:
            await asyncio.sleep(random.uniform(0.0, room))

    async def _wait(
        self, bucket: _Bucket, tokens: int, deadline: float, what: str, first: bool = False
    ) -> float | None:
        waiter = _Waiter(asyncio.get_running_loop().create_future(), tokens)
        if first:
            bucket.waiters.appendleft(waiter)
        else:
            bucket.waiters.append(waiter)
        self._serve(bucket)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await asyncio.shield(waiter.future)
        except TimeoutError:
            raise Failure(Kind.THROTTLED, None, what, Phase.CONNECT) from None
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
                if waiter in bucket.waiters:
                    bucket.waiters.remove(waiter)

    def _serve(self, bucket: _Bucket) -> None:
        if bucket.server is None or bucket.server.done():
            bucket.server = asyncio.get_running_loop().create_task(self._serving(bucket))

    async def _serving(self, bucket: _Bucket) -> None:
        while bucket.waiters and not self._closing:
            waiter = bucket.waiters[0]
            if waiter.future.done():
                bucket.waiters.popleft()
                continue
            if not self._metered(bucket):  # the ceiling lifted: everyone goes
                self._release_all(bucket)
                return
            now = time.monotonic()
            stale = self._late_limit(bucket)
            while bucket.stock and bucket.stock[0] < now - stale:
                bucket.stock.popleft()
            if bucket.stock and self._higher_waiting(bucket):
                await asyncio.sleep(0.005)  # strict preference: a higher lane borrows it first
                continue
            self._borrow(bucket, waiter.tokens)
            if len(bucket.stock) >= waiter.tokens:
                ready = bucket.stock[waiter.tokens - 1]
                for _ in range(waiter.tokens):
                    bucket.stock.popleft()
                if ready > now:
                    await asyncio.sleep(ready - now)
                if bucket.waiters and bucket.waiters[0] is waiter:
                    bucket.waiters.popleft()
                elif waiter in bucket.waiters:  # one holding a session went ahead meanwhile
                    bucket.waiters.remove(waiter)
                if not waiter.future.done():
                    waiter.future.set_result(ready)
                continue
            await self._refill(bucket)

    async def _refill(self, bucket: _Bucket) -> None:
        assert bucket.limiter is not None
        while self._higher_waiting(bucket):
            await asyncio.sleep(0.005)  # strict preference: a higher lane here asks first
        wanted = sum(w.tokens for w in bucket.waiters if not w.future.done())
        want = max(1, min(MAX_BATCH, wanted - len(bucket.stock)))
        try:
            grant = await bucket.limiter.take(
                want,
                bucket.windows,
                horizon=HORIZON,
                burst=CEILING_BURST,
                lane=bucket.name if bucket.adaptive else "",
                share=bucket.share,
                late=self._late_limit(bucket),
                slow_start=self._slow_start(bucket),
            )
        except (redis.RedisError, OSError) as exc:
            # No rate without Redis: fail the waiters as unavailable (a free wait, like the
            # ledger's), rather than send past a limit nobody can check.
            failure = Failure(
                Kind.UNAVAILABLE, None, f"rate unavailable ({type(exc).__name__})", Phase.CONNECT
            )
            while bucket.waiters:
                waiter = bucket.waiters.popleft()
                if not waiter.future.done():
                    waiter.future.set_exception(failure)
            return
        if bucket.adaptive:
            self._known = True
            self._set_ceiling(grant.ceiling, self.ceiling_reason, slow=grant.slow)
            first = grant.at(1) if grant.count else grant.received
            self._probing(grant.probing, min(first, grant.received))
        if grant.count:
            bucket.stock.extend(grant.at(j) for j in range(1, grant.count + 1))
            return
        # Refused for now: wait until the schedule has room, taking meanwhile what a lower
        # lane of this process got and has not handed out.
        until = time.monotonic() + min(max(grant.wait, 0.002), 0.5)
        while time.monotonic() < until and not bucket.stock:
            await asyncio.sleep(min(0.01, max(0.0, until - time.monotonic())))
            self._borrow(bucket, 1)

    def _slow_start(self, bucket: _Bucket) -> tuple[float, float, float, float]:
        if not bucket.adaptive or self.settings.rate_limits:
            return (0.0, 0.0, 0.0, 0.0)  # a configured rate is what the fleet knows of the relay
        return (SLOW_START, SLOW_START_GAIN, SLOW_START_END, SLOW_START_FOR)

    def _late_limit(self, bucket: _Bucket) -> float:
        """How late a token of `bucket` may still be used: LATE_SHARE of the tightest burst
        tolerance among its windows and the adaptive ceiling's. Grants take that much less
        burst (`RateLimiter.take`'s `late`), so late tokens never add up past a window."""
        tolerances = [w.tolerance for w in bucket.windows]
        if bucket.adaptive and (self.ceiling or not self._known):
            rate = max((self.ceiling or SLOW_START) * bucket.share, 1e-6)
            tolerances.append(max(1.0, rate * CEILING_BURST) / rate)
        return min(LATE_MAX, LATE_SHARE * min(tolerances, default=0.0))

    def _borrow(self, bucket: _Bucket, wanted: int) -> None:
        """A lane takes the tokens lower lanes of this process hold (not handed out yet) when
        they come earlier than its own `wanted`-th: a lower lane's token conforms to every
        window a higher lane's must (and to its own lane's too), never the other way round."""
        if not bucket.adaptive:
            return
        for lower in self._lanes.values():
            if lower.rank <= bucket.rank:
                continue
            while lower.stock and (
                len(bucket.stock) < wanted or lower.stock[0] < bucket.stock[wanted - 1]
            ):
                bisect.insort(bucket.stock, lower.stock.popleft())

    def _higher_waiting(self, bucket: _Bucket) -> bool:
        return (
            any(
                b.rank < bucket.rank and any(not w.future.done() for w in b.waiters)
                for b in self._lanes.values()
            )
            if bucket.adaptive
            else False
        )

    def _release_all(self, bucket: _Bucket) -> None:
        while bucket.waiters:
            waiter = bucket.waiters.popleft()
            if not waiter.future.done():
                self._count(waiter.tokens)
                waiter.future.set_result(None)
        bucket.stock.clear()

    # -- the adaptive ceiling --------------------------------------------------------------------

    def throttled(self, reason: str) -> None:
        """The relay answered a transaction with a throttling reply: counted, and reported
        with the others of the next GATHER seconds in one call. The first reply during slow
        start is reported at once, and this process drops the tokens it holds: the relay's
        limit is behind us, and every message sent at the slow-start rate meanwhile is one
        more refusal."""
        if self.limiter is None:
            return
        self._throttles += 1
        self._throttle_reason = reason
        if self._throttles == 1:
            if self.slow:
                self._drop_stock()
            # The first reply after a quiet spell goes at once; a burst's others gather.
            quiet = time.monotonic() - self._reported >= GATHER
            self._spawn(self._report_throttles(0.0 if quiet else GATHER))

    def _drop_stock(self) -> None:
        """Tokens granted at a rate the relay has just refused: each would be one more
        refusal."""
        for bucket in self._lanes.values():
            bucket.stock.clear()

    async def _report_throttles(self, gather: float) -> None:
        await asyncio.sleep(gather)
        assert self.limiter is not None
        self._reported = time.monotonic()
        count, self._throttles = self._throttles, 0
        cap = min((w.per_second for w in self.settings.rate_limits), default=0.0)
        try:
            ceiling = await self.limiter.throttle(
                count,
                reason=self._throttle_reason,
                floor=FLOOR,
                cooldown=COOLDOWN,
                recovery=RECOVERY,
                cap=cap,
                probe=PROBE,
                long=LONG_REFUSAL,
                probe_max=PROBE_MAX,
            )
        except (redis.RedisError, OSError) as exc:
            log.warning("could not report throttling to Redis: %s", type(exc).__name__)
            return
        self._set_ceiling(ceiling, self._throttle_reason)

    def _probing(self, probing: bool, since: float) -> None:
        if not probing:
            self._probe_since = None
        elif self._probe_since is None:
            self._probe_since = since

    def accepted(self, slot: float | None) -> None:
        """A message admitted at `slot` was delivered. During a probe, one admitted after the
        probe began is the news that the relay takes mail again: reported at once (one report
        at a time), so the whole fleet's ceiling is restored."""
        since = self._probe_since
        if since is None or slot is None or slot < since or self._accepting or not self.limiter:
            return
        self._accepting = True
        self._spawn(self._report_accept())

    async def _report_accept(self) -> None:
        assert self.limiter is not None
        try:
            ceiling = await self.limiter.accept()
        except (redis.RedisError, OSError) as exc:
            log.debug("probe success not reported: %s", type(exc).__name__)
            return
        finally:
            self._accepting = False
        self._probe_since = None
        if ceiling is None or self.ceiling is None or ceiling > self.ceiling:
            rate = None if ceiling is None else round(ceiling, 1)
            log_event("probe_passed", rate=rate, relay=self.relay)
        self._set_ceiling(ceiling, self.ceiling_reason)

    def _count(self, tokens: int) -> None:
        if self.limiter is None:
            return
        self._unmetered += tokens
        if self._unmetered == tokens:
            self._spawn(self._report_use())

    async def _report_use(self) -> None:
        await asyncio.sleep(REPORT_EVERY)
        assert self.limiter is not None
        used, self._unmetered = self._unmetered, 0
        try:
            self._set_ceiling(await self.limiter.count(used), self.ceiling_reason)
        except (redis.RedisError, OSError) as exc:
            log.debug("rate count not reported: %s", type(exc).__name__)

    def _set_ceiling(self, ceiling: float | None, reason: str, slow: bool = False) -> None:
        was, was_slow = self.ceiling, self.slow
        self.ceiling, self.slow = ceiling, slow and ceiling is not None
        if ceiling is not None and was is not None and ceiling < was * 0.5:
            self._drop_stock()  # a probe began: what this process holds is the old rate's
        if self.slow:
            if not was_slow:
                self.ceiling_reason = "slow start"
                log_event("slow_start", rate=round(ceiling or 0.0, 1), end=SLOW_START_END)
            return
        if was_slow and ceiling is None:
            log_event("slow_start_done")
            return
        if ceiling is not None and (was is None or was_slow or ceiling < was * 0.95):
            self.ceiling_reason = reason
            log_event(
                "throttled",
                rate=round(ceiling, 1),
                configured=self.configured_rate,
                reason=reason,
                relay=self.relay,
                level=logging.WARNING,
            )
        elif ceiling is None and was is not None:
            log_event("rate_recovered", configured=self.configured_rate, relay=self.relay)

    @property
    def configured_rate(self) -> float | None:
        """The tightest configured window, in messages per second."""
        return min((w.per_second for w in self.settings.rate_limits), default=None)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self, why: str = "worker is shutting down") -> None:
        """Shutdown (or the relay's parts retired): nobody waits for tokens any more (they see
        THROTTLED, a free wait)."""
        self._closing = True
        buckets: list[_Bucket] = [*self._lanes.values()]
        if self._connect is not None:
            buckets.append(self._connect)
        for bucket in buckets:
            if bucket.server is not None:
                bucket.server.cancel()
            while bucket.waiters:
                waiter = bucket.waiters.popleft()
                if not waiter.future.done():
                    waiter.future.set_exception(Failure(Kind.THROTTLED, None, why, Phase.CONNECT))
        for task in self._tasks:
            task.cancel()

"""The fleet's shared message rate in Redis: configured windows (GCRA) and the adaptive ceiling.

One Lua call on Redis time (`lua/ratelimit.lua`) grants a worker a slice of every window's
schedule at once, so workers take tokens in batches (few Redis commands per message) without
ever sending faster than the windows allow: a token carries the time from which it may be used.
The adaptive ceiling lives beside the windows, so every host backs off together when the relay
throttles one of them. docs/shaping.md has the algorithm and its guarantees.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from mailer.config import RateWindow
from workers.state import keys, scripts

RATE_KEY = keys.RATE
CONNECT_KEY = keys.RATE_CONNECT

_SCRIPT = scripts.source("ratelimit")


@dataclass(frozen=True, slots=True)
class Grant:
    """Tokens granted by one `take`: token j (1-based) may be used `at(j)` (monotonic time)."""

    count: int
    wait: float  # after a refusal: seconds before asking again makes sense
    ceiling: float | None  # the adaptive ceiling in force (msg/s), None when there is none
    received: float  # monotonic time of the reply
    schedule: tuple[tuple[float, float], ...]  # per window: (offset of token 0, spacing)
    slow: bool = False  # the ceiling is slow start's (nothing known of the relay yet)
    probing: bool = False  # the ceiling is a probe's (the relay refused nearly everything)

    def at(self, j: int) -> float:
        if not self.schedule:
            return self.received
        return self.received + max(offset + j * spacing for offset, spacing in self.schedule)


@dataclass(frozen=True, slots=True)
class Ceiling:
    rate: float | None
    reason: str
    since: float  # UNIX time of the last decrease (0: never)


def _rate(raw: Any) -> float | None:
    text = raw.decode() if isinstance(raw, bytes) else str(raw or "")
    return float(text) if text else None


class RateLimiter:
    """The Redis side of one rate (messages, or session opens): stateless here."""

    def __init__(self, client: aioredis.Redis, key: str = RATE_KEY) -> None:
        self.redis = client
        self.key = key
        self._script = client.register_script(_SCRIPT)

    async def take(
        self,
        want: int,
        windows: tuple[RateWindow, ...],
        *,
        horizon: float,
        burst: float,
        lane: str = "",
        share: float = 1.0,
        late: float = 0.0,
        slow_start: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
    ) -> Grant:
        """Up to `want` tokens conforming to every window (and to `share` of the adaptive
        ceiling, if one is in force) within `horizon` seconds. `late`: how late the caller may
        use a token; every window's burst tolerance is that much smaller for the grant, so
        tokens used up to `late` after their time still keep every window. `slow_start`
        (start msg/s, growth per token, end msg/s, end seconds; zeros: none) begins the
        fleet's slow start if nothing is known of the relay yet (lua/ratelimit.lua)."""
        args: list[Any] = ["take", want, horizon, burst, lane, share, late, len(windows)]
        for window in windows:
            args += [f"w:{window.spec}", window.spacing, max(0.0, window.tolerance - late)]
        args += list(slow_start)
        reply = await self._script(keys=[self.key], args=args)
        received = time.monotonic()
        state = reply[3].decode() if isinstance(reply[3], bytes) else str(reply[3])
        values = [float(x) if x not in (b"", "") else None for i, x in enumerate(reply) if i != 3]
        values.insert(3, None)
        count = int(values[0] or 0)
        pairs = values[4:]
        schedule = tuple(
            (float(pairs[i] or 0.0), float(pairs[i + 1] or 0.0)) for i in range(0, len(pairs), 2)
        )
        return Grant(
            count,
            float(values[1] or 0.0),
            values[2],
            received,
            schedule,
            slow=state == "1",
            probing=state == "p",
        )

    async def count(self, used: int) -> float | None:
        """Tokens used without a window to ask (for the measure the adaptive ceiling starts
        from); returns the ceiling in force."""
        reply = await self._script(keys=[self.key], args=["count", used])
        return _rate(reply[0])

    async def throttle(
        self,
        replies: int,
        *,
        reason: str,
        floor: float,
        cooldown: float,
        recovery: float,
        cap: float,
        probe: float = 0.05,
        long: float = 2.0,
        probe_max: float = 5.0,
    ) -> float | None:
        """`replies` throttling replies seen; returns the ceiling now in force. `probe`,
        `long`, `probe_max`: the probe a refusal that says nothing of the relay's rate starts
        (lua/ratelimit.lua)."""
        args: list[Any] = ["throttle", replies, floor, cooldown, recovery, reason[:200], cap]
        args += [probe, long, probe_max]
        reply = await self._script(keys=[self.key], args=args)
        return _rate(reply[0])

    async def accept(self) -> float | None:
        """A message admitted during a probe was delivered: the relay takes mail again, and the
        ceiling is restored (lua/ratelimit.lua). Returns the ceiling now in force."""
        reply = await self._script(keys=[self.key], args=["accept"])
        return _rate(reply[0])


def peek_ceiling(client: redis.Redis, key: str = RATE_KEY) -> Ceiling:
    """The adaptive ceiling in force, for `mailer status` and metrics (a synchronous client)."""
    rate, reason, at = client.register_script(_SCRIPT)(keys=[key], args=["peek"])
    text = reason.decode() if isinstance(reason, bytes) else str(reason)
    return Ceiling(_rate(rate), text, float(_rate(at) or 0.0))


def peek_ceilings(client: redis.Redis, rate_keys: list[str]) -> list[Ceiling]:
    """`peek_ceiling` of several rates (one per relay) in one round trip."""
    if not rate_keys:
        return []
    script = client.register_script(_SCRIPT)
    pipe = client.pipeline(transaction=False)
    for key in rate_keys:
        script(keys=[key], args=["peek"], client=pipe)
    out = []
    for rate, reason, at in pipe.execute():
        text = reason.decode() if isinstance(reason, bytes) else str(reason)
        out.append(Ceiling(_rate(rate), text, float(_rate(at) or 0.0)))
    return out

"""Failover: which relay a message goes through when its own is down (docs/profiles.md).

A relay may name a `fallback` for some lanes (`fallback_lanes`, transactional mail, say). A
message of such a lane goes to the fallback while its relay's circuit is open (a revoked key,
the quota spent, no TLS) or while the relay's trouble run (workers/state/trouble.py: refused
connections, 4xx that are not throttling, with no success since) is older than its
`failover_after`; unless the fallback is itself open or in trouble, is not configured, or
cannot send the message faithfully (a SendGrid-only X-SMTPAPI field and a fallback of another
profile: mailer/profiles.py). One message per probe interval, fleet-wide, still goes to the
relay, so its recovery is seen and its traffic returns; one hop only (a fallback's own fallback
is never used). The ledger is shared, so a message that reached one relay's DATA terminator is
never sent through the other.

Per message, `route` costs no Redis call: the trouble runs are read at most once per half
second per process, the probe asked at most as often, and only for lanes that fail over.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, NamedTuple

from mailer.profiles import unportable
from mailer.relays import Relay
from workers.engine.classify import Failure, Kind
from workers.state.trouble import TroubleRuns

__all__ = ["Route", "Router", "transient"]

RouteKind = Literal["primary", "fallback", "probe"]

#: What classify.py writes for a connection the relay refused, reset or left silent.
_SOCKET = ("connection lost", "timed out")


def transient(failure: Failure) -> bool:
    """Whether `failure` is its relay's trouble rather than the message's or ours: a refused,
    reset or timed-out connection, or a 4xx reply that is not throttling. Not counted:
    throttling and quotas (the rate and the circuit breaker handle those), recipients deferred
    one by one, permanent refusals, and our own timers and fences (no code, no socket error)."""
    if failure.kind not in (Kind.RECONNECT, Kind.RETRY) or failure.refused:
        return False
    return failure.code is not None or failure.text.startswith(_SOCKET)


class Route(NamedTuple):
    """Where one message goes: `relay_name`, and why when it is not simply its own relay
    (`reason` is "" then). `kind` "probe": the relay is down but this message tests it; while
    the relay's circuit is open, send it as the circuit's probe (do not make it wait). (A
    tuple: made for every message.)"""

    relay_name: str
    reason: str = ""
    kind: RouteKind = "primary"


class Router:
    """Chooses each message's relay; `record_failure` / `record_success` feed it the outcome
    of every attempt (see docs/profiles.md for where the engine calls what).

    `relays(name)` is the registry's lookup (None: not configured); `circuit_open(name)` the
    named relay's breaker state, cached by its owner (a bool or an awaitable of one)."""

    def __init__(
        self,
        trouble: TroubleRuns,
        relays: Callable[[str], Relay | Awaitable[Relay | None] | None],
        circuit_open: Callable[[str], bool | Awaitable[bool]],
        *,
        probe_interval: float = 10.0,
    ) -> None:
        if probe_interval <= 0:
            raise ValueError("probe_interval must be > 0")
        if trouble.ttl < 3 * probe_interval:
            # Only probes renew a failed-over relay's run: it must outlive a few intervals.
            raise ValueError(
                f"the trouble run's TTL ({trouble.ttl:g} s) must be at least three probe "
                f"intervals ({probe_interval:g} s)"
            )
        self.trouble = trouble
        self.relays = relays
        self.circuit_open = circuit_open
        self.probe_interval = probe_interval
        self._pending: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def route(
        self, relay: Relay, lane: str, circuit_open: bool, data: str | None = None
    ) -> Route:
        """The relay this message of `lane` goes through; `circuit_open` is `relay`'s own
        breaker state. `data` (the rendered message) is read only when failing over to a
        relay of another profile than SendGrid, to keep a message it could not send right
        (`mailer.profiles.unportable`) on its own relay."""
        if relay.fallback is None or lane not in relay.fallback_lanes:
            return Route(relay.name)
        down = await self._down(relay, circuit_open)
        if down is None:
            return Route(relay.name)
        why = f"{relay.name} {down}"
        found = self.relays(relay.fallback)
        fallback = await found if inspect.isawaitable(found) else found
        if fallback is None or fallback.name == relay.name:
            return Route(relay.name, f"{why}; fallback {relay.fallback} is not configured")
        fallback_down = await self._down(fallback, await self._open(fallback.name))
        if fallback_down is not None:
            return Route(relay.name, f"{why}; fallback {fallback.name} {fallback_down} too")
        if data is not None and fallback.profile != "sendgrid":
            fields = unportable(data)
            if fields:
                return Route(
                    relay.name,
                    f"{why}; X-SMTPAPI {', '.join(fields)} cannot go through "
                    f"{fallback.name} ({fallback.profile})",
                )
        if await self.trouble.try_probe(relay.name, self.probe_interval):
            return Route(relay.name, f"probe: {why}", "probe")
        return Route(fallback.name, why, "fallback")

    async def _open(self, name: str) -> bool:
        state = self.circuit_open(name)
        return bool(await state) if inspect.isawaitable(state) else bool(state)

    async def _down(self, relay: Relay, circuit_open: bool) -> str | None:
        """Why `relay` counts as down ("circuit open", "failing for 42 s"), or None."""
        if circuit_open:
            return "circuit open"
        since = await self.trouble.since(relay.name)
        if since is None:
            return None
        age = time.time() - since
        return f"failing for {age:.0f} s" if age >= relay.failover_after else None

    def record_failure(self, relay_name: str, failure: Failure) -> None:
        """After an attempt through `relay_name` failed (call on the loop thread; never waits,
        never raises): a transient failure begins or renews its trouble run, in the background,
        and only when this process's view says a write is due."""
        if transient(failure) and self.trouble.must_write(relay_name):
            self._background("failed", relay_name, self.trouble.failed)

    def record_success(self, relay_name: str) -> None:
        """After a message was sent through `relay_name` (its 250; call on the loop thread;
        never waits, never raises): ends its trouble run, so traffic returns to it. Nothing at
        all while this process knows of no run (one read per half second)."""
        if not self.trouble.known_clear(relay_name):
            self._background("succeeded", relay_name, self.trouble.succeeded)

    def _background(
        self, what: str, relay_name: str, step: Callable[[str], Coroutine[Any, Any, None]]
    ) -> None:
        """One write of each kind per relay at a time, however many messages ask for it."""
        if (what, relay_name) in self._pending:
            return
        task = asyncio.get_running_loop().create_task(step(relay_name))
        self._pending[what, relay_name] = task
        task.add_done_callback(lambda _: self._pending.pop((what, relay_name), None))

    async def settle(self) -> None:
        """Waits for the trouble-run writes started so far (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*self._pending.values())

"""The process's pool of SMTP sessions, owned by its one asyncio loop.

Every open session holds one lease of the fleet-wide semaphore. A session that reaches the
per-connection limit or its maximum age is rotated: QUIT, wait for the close, reconnect under
the same lease (close-before-open keeps the fleet under the cap without lease churn). Idle
sessions are closed and their leases released, so idle workers don't starve busy ones: after
the idle timeout, or after `CONTENDED_IDLE` seconds while another process waits for a lease.
A session whose lease lapsed (lost, or not renewed in time) is aborted, never written to or
QUIT; its lease is released only after the abort.

A busy session passes straight from one message to the next checkout in line: with PIPELINING,
the next message's commands leave behind the body (see `Session.transaction`'s `hand_over`).

One pool per relay (workers/engine/relayparts.py): its own sessions, key and login gate. The
pools of a process share one session budget (workers/engine/budget.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from mailer.config import Settings
from mailer.wire import DEFAULT_RELAY
from workers.engine.budget import SessionBudget
from workers.engine.classify import Failure, Kind, Phase
from workers.engine.session import Delivered, Session
from workers.engine.shaper import Shaper
from workers.observe.logs import log_event

log = logging.getLogger("mailer.pool")

ABORT_GRACE = 0.01  # after an abort, before the lease is released: the RST leaves first
CONTENDED_IDLE = 1.0  # how long an idle session keeps its lease while others wait for one


def _malloc_trim() -> Callable[[], object]:
    """glibc's `malloc_trim(0)`, or a no-op where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return partial(trim, 0)


#: Gives the heap's free pages back to the OS. The sweeper calls it once sessions stop opening:
#: a burst of TLS handshakes leaves tens of KiB per session freed but still resident (glibc
#: keeps freed heap memory), which made the RSS per session vary from run to run
#: (bench/README.md).
trim_heap = _malloc_trim()


class LeaseLike(Protocol):
    id: str
    valid_until: float


class Leases(Protocol):
    """What the pool needs of the semaphore (see workers.state.semaphore)."""

    async def acquire(self, deadline: float) -> LeaseLike | None: ...
    async def release(self, lease: LeaseLike) -> None: ...
    @property
    def contended(self) -> bool:
        """Someone is waiting for a lease: idle sessions should give theirs back soon."""
        ...


@dataclass
class PoolStats:
    opened: int = 0
    rotations: int = 0
    closed_idle: int = 0
    lease_waits: int = 0
    fenced: int = 0
    chained: int = 0  # messages whose commands left behind the previous message's body
    reclaimed: int = 0  # idle sessions closed to make room for another relay's (the budget)


_arrivals = itertools.count()  # process-wide: the budget serves the longest waiter of any pool


@dataclass(eq=False, slots=True)
class _Waiter:
    """A checkout in line: handed a session, or None when it may open one. `envelope`
    (sender, recipients, body size) lets a busy session write its commands early."""

    future: asyncio.Future[Session | None]
    envelope: tuple[str, list[str], int] | None
    rank: int = 0  # the message's lane: 0 is served first
    arrival: int = 0


class SessionPool:
    """Up to `worker_connections` sessions, reused across tasks; LIFO so spares idle out.
    `budget`: shared with the process's other relays' pools (None: this pool alone)."""

    def __init__(
        self,
        settings: Settings,
        leases: Leases,
        shaper: Shaper | None = None,
        *,
        budget: SessionBudget | None = None,
        relay: str = DEFAULT_RELAY,
    ) -> None:
        self.settings = settings
        self.leases = leases
        self.shaper = shaper
        self.relay = relay
        self.budget = budget
        #: What a checkout meets once the pool closes (a relay's reconfiguration is a wait).
        self._closed_failure = (Kind.RECONNECT, "worker is shutting down")
        self._ranks = {lane.name: rank for rank, lane in enumerate(settings.lanes)}
        #: Until one session of this process has logged in (and again after a refused login),
        #: sessions open one at a time: a bad key costs one failed AUTH, not one per session.
        self._logged_in = False
        self._login_gate = asyncio.Lock()
        self._login_refused: tuple[float, Failure] | None = None
        self.capacity = settings.worker_connections
        self.stats = PoolStats()
        self._idle: deque[Session] = deque()
        self._busy: set[Session] = set()
        self._opening = 0
        self._spare_leases: list[LeaseLike] = []  # from rotations: reuse before acquiring
        self._quitting: set[Session] = set()  # closing with QUIT; fence must still find them
        #: Checkouts waiting, first come first served: a freed session is handed to the first
        #: (a checkout never takes an idle session past them), or the first is woken with None
        #: when room to open one appeared.
        self._waiters: deque[_Waiter] = deque()
        self._tasks: set[asyncio.Task[None]] = set()  # check-ins of abandoned hand-overs
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        if budget is not None:
            budget.join(self)

    @property
    def open_sessions(self) -> int:
        return len(self._idle) + len(self._busy)

    @property
    def occupied(self) -> int:
        """Sessions open or opening: what this pool takes of the process's budget."""
        return len(self._idle) + len(self._busy) + self._opening

    @property
    def quiet(self) -> bool:
        """No session open or opening, none closing, nobody waiting: nothing to lose."""
        return (
            not (self._idle or self._busy or self._opening or self._waiters or self._quitting)
            and not self._tasks
        )

    def _room(self) -> bool:
        if len(self._idle) + len(self._busy) + self._opening >= self.capacity:
            return False
        return self.budget is None or self.budget.room()

    # -- the budget's view (workers/engine/budget.py `Member`) ------------------------------------

    def first_waiter(self) -> tuple[int, int] | None:
        for waiter in self._waiters:
            if not waiter.future.done():
                return waiter.rank, waiter.arrival
        return None

    def oldest_idle(self, now: float) -> float | None:
        if self._closing or not self._idle:
            return None
        return self._idle[0].idle_for(now)

    async def retire_oldest_idle(self) -> bool:
        if self._closing or not self._idle:
            return False
        session = self._idle.popleft()  # the least recently used: the stack's bottom
        self.stats.reclaimed += 1
        await self._retire(session)
        return True

    def wake_for_room(self) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(None)
                return True
        return False

    @property
    def waiting(self) -> int:
        """Checkouts queued for a session, first come first served."""
        return len(self._waiters)

    async def checkout(self) -> Session:
        """A session of the caller's own, until it hands it back with `checkin`: what `send`
        does around one transaction (lease, queueing and rotation included)."""
        return await self._checkout()

    async def checkin(self, session: Session) -> None:
        """Hands back a session from `checkout`: reused, rotated or closed as it is due."""
        await self._checkin(session)

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def send(
        self,
        mail_from: str,
        rcpt_to: list[str],
        body: bytes,
        before_body: Callable[[], Awaitable[None]] | None = None,
        lane: str = "",
        on_session: Callable[[], Awaitable[None]] | None = None,
    ) -> Delivered:
        """`on_session`: awaited once a session is ours, before its commands leave (the
        runtime re-checks the fleet's rate there); not for a session handed over with our
        commands already written behind another message's body."""
        rank = self._ranks.get(lane, 0)
        session = await self._checkout((mail_from, rcpt_to, len(body)), rank)
        passed = False
        pipeline = self.shaper is None or not self.shaper.cautious

        def hand_over(busy: Session) -> tuple[bytes, int] | None:
            nonlocal passed
            chained = self._chain(busy)
            passed = chained is not None
            return chained

        try:
            if on_session is not None and not session.owes_turn:
                await on_session()
            return await session.transaction(
                mail_from, rcpt_to, body, before_body, hand_over, pipeline=pipeline
            )
        finally:
            if not passed:  # else the next message has it and checks it in
                await self._checkin(session)

    def _chain(self, session: Session) -> tuple[bytes, int] | None:
        """The commands of the first checkout in line, if `session` may carry its message: it
        is then handed the session, before the body it rides behind is even written."""
        if self._closing or not self._waiters or not self._usable(session, time.monotonic()):
            return None
        if self.shaper is not None and (self.shaper.cautious or self.shaper.paced):
            return None  # throttled, or paced: each message's commands leave at its token
        if self.budget is not None and self.budget.over_share(self):
            return None  # another relay waits for a session: this one goes back (`_checkin`)
        while self._waiters and self._waiters[0].future.done():
            self._waiters.popleft()  # gave up
        waiter = self._waiters[0] if self._waiters else None
        if waiter is None or waiter.envelope is None:
            return None
        try:
            chained = session.commands(*waiter.envelope)
        except Failure:
            return None  # an unsendable address: it fails in its own transaction, not here
        self._waiters.popleft()
        waiter.future.set_result(session)
        self.stats.chained += 1
        return chained

    async def _checkout(
        self, envelope: tuple[str, list[str], int] | None = None, rank: int = 0
    ) -> Session:
        deadline = time.monotonic() + self.settings.lease_wait
        while True:
            if self._closing:
                kind, why = self._closed_failure
                raise Failure(kind, None, why, Phase.CONNECT)
            now = time.monotonic()
            while self._idle and not self._waiters:
                session = self._idle.pop()
                if self._usable(session, now):
                    self._busy.add(session)
                    return session
                await self._retire(session)
            if not self._waiters and self._room():
                return await self._open(deadline)
            if (
                not self._waiters
                and self.budget is not None
                and self.occupied < self.capacity
                and await self.budget.reclaim(self, now)
            ):
                continue  # another relay's idle session made room: open ours
            handed = await self._wait(deadline, envelope, rank)
            if handed is not None:
                return handed
            # Woken first in line because a session closed: the room is ours to open.
            if not self._closing and self._room():
                return await self._open(deadline)

    async def _wait(
        self, deadline: float, envelope: tuple[str, list[str], int] | None, rank: int = 0
    ) -> Session | None:
        """Queues for the next session freed (returned busy), or for room to open one (None):
        lanes in priority order, first come first served within a lane."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Failure(Kind.NO_LEASE, None, "no free session in this worker", Phase.CONNECT)
        future: asyncio.Future[Session | None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(future, envelope, rank, next(_arrivals))
        self._enqueue(waiter)
        got = False
        try:
            async with asyncio.timeout(remaining):
                handed = await waiter.future
            got = True
            return handed
        except TimeoutError:
            raise Failure(
                Kind.NO_LEASE, None, "no free session in this worker", Phase.CONNECT
            ) from None
        finally:
            if not got:
                self._abandon(waiter)

    def _enqueue(self, waiter: _Waiter) -> None:
        if not self._waiters or self._waiters[-1].rank <= waiter.rank:
            self._waiters.append(waiter)  # the common case: one lane, or the lowest
            return
        for index, queued in enumerate(self._waiters):
            if queued.rank > waiter.rank:
                self._waiters.insert(index, waiter)
                return

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter gave up (timeout, cancelled): what it was handed just then goes on."""
        future = waiter.future
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        elif future.done() and not future.cancelled():
            handed = future.result()
            if handed is None:
                self._wake_one()
            elif handed.owes_turn:  # its commands were written: the check-in closes it
                task = asyncio.get_running_loop().create_task(self._checkin(handed))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                self._busy.discard(handed)
                self._give(handed)

    def _give(self, session: Session) -> None:
        """An idle, usable session: to the first waiter, else to the idle stack."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                self._busy.add(session)
                waiter.future.set_result(session)
                return
        self._idle.append(session)

    def _wake_one(self) -> None:
        """Room to open a session appeared (one closed): the first waiter may open it, else
        the longest waiter of another relay's pool (the process's budget is shared)."""
        if not self.wake_for_room() and self.budget is not None:
            self.budget.freed(self)

    def _usable(self, session: Session, now: float, idle_limit: float | None = None) -> bool:
        lease = session.lease
        margin = 1.0
        idle_limit = self.settings.session_idle_timeout if idle_limit is None else idle_limit
        return (
            session.connected
            and not session.due_for_rotation(now)
            and session.idle_for(now) < idle_limit
            and (lease is None or getattr(lease, "valid_until", 0.0) > now + margin)
        )

    async def _open(self, deadline: float) -> Session:
        self._opening += 1
        lease: LeaseLike | None = None
        try:
            lease = self._spare_leases.pop() if self._spare_leases else None
            if lease is not None and lease.valid_until <= time.monotonic() + 1.0:
                await self.leases.release(lease)
                lease = None
            if lease is None:
                lease = await self.leases.acquire(deadline)
            if lease is None:
                self.stats.lease_waits += 1
                raise Failure(Kind.NO_LEASE, None, "fleet connection cap reached", Phase.CONNECT)
            session = Session(self.settings, lease)
            await self._login(session, deadline)
            if session.lease_expired():  # stalled mid-handshake: the lease may be gone
                session.abort()
                raise Failure(Kind.RECONNECT, None, "lease expired while connecting", Phase.CONNECT)
        except BaseException:
            if lease is not None:
                await self.leases.release(lease)
            self._wake_one()  # the room this open held is free: the first waiter may try it
            raise
        finally:
            self._opening -= 1
        self.stats.opened += 1
        self._busy.add(session)
        return session

    async def _login(self, session: Session, deadline: float) -> None:
        """Opens `session`; one at a time until a login of this process succeeded. After a
        refused login (a bad or revoked key, the quota spent) no session of this process tries
        again for most of a probe interval: the fleet's breaker lets one probe through per
        interval, and this keeps the opens already under way from adding failed logins. The
        session-open rate is asked right before the connect, past that gate: a token taken
        before it would be used late, and late opens bunch."""
        if self._logged_in:
            await self._connect_rate(deadline)
            try:
                await session.open()
            except Failure as failure:
                self._refused(failure)
                raise
            return
        async with self._login_gate:
            refused = self._login_refused
            if refused is not None and time.monotonic() < refused[0]:
                f = refused[1]  # a fresh one: the runtime annotates the failure it is given
                raise Failure(f.kind, f.code, f.text, f.phase)
            await self._connect_rate(deadline)
            try:
                await session.open()
            except Failure as failure:
                self._refused(failure)
                raise
            self._logged_in, self._login_refused = True, None

    async def _connect_rate(self, deadline: float) -> None:
        if self.shaper is not None:
            await self.shaper.connect(deadline)

    def _refused(self, failure: Failure) -> None:
        if failure.kind not in (Kind.AUTH, Kind.QUOTA):
            return
        s = self.settings
        interval = (
            s.quota_probe_interval if failure.kind is Kind.QUOTA else s.circuit_probe_interval
        )
        self._logged_in = False
        self._login_refused = (time.monotonic() + 0.9 * interval, failure)

    async def _checkin(self, session: Session) -> None:
        if session.owes_turn:
            # Its message ended before taking over the commands written for it (cancelled):
            # the relay will answer them and wait for a body nobody sends. Let the message
            # ahead read its reply, then close the session.
            await session.wait_turn()
            session.broken = True
        # Asked while the session still counts as ours: another relay waits at the budget and
        # this pool holds more than its share (workers/engine/budget.py).
        yields = self.budget is not None and self.budget.over_share(self)
        self._busy.discard(session)
        now = time.monotonic()
        if session.connected and session.due_for_rotation(now):
            self.stats.rotations += 1
            log_event("rotated", transactions=session.mail_count, relay=self.relay)
            lease = session.lease
            await self._close(session)
            session.lease = None
            if lease is not None and lease.valid_until > time.monotonic():
                self._spare_leases.append(lease)
            elif lease is not None:
                await self.leases.release(lease)
            self._wake_one()
            return
        if session.connected and not self._closing and self._usable(session, now):
            if not yields:
                self._give(session)
                return
            self.stats.reclaimed += 1
            await self._retire(session)
            if self.budget is not None:
                self.budget.freed(self)
            return
        await self._retire(session)
        self._wake_one()

    async def _retire(self, session: Session) -> None:
        """Closes the session (QUIT if it still can), then gives its lease back."""
        if session.connected and not session.lease_expired():
            await self._close(session)
        else:
            session.abort()
            await asyncio.sleep(ABORT_GRACE)  # let the RST leave before the slot frees
        lease, session.lease = session.lease, None
        if lease is not None:
            await self.leases.release(lease)

    async def _close(self, session: Session) -> None:
        """QUIT and wait for the relay to hang up, still reachable by `fence` meanwhile."""
        self._quitting.add(session)
        try:
            await session.close()
        finally:
            self._quitting.discard(session)

    def on_lease_lost(self, lease: LeaseLike) -> Coroutine[Any, Any, None]:
        """For the lease keeper: abort at once (synchronously), then give the slot back.

        The release is a formality when Redis already dropped the lease (expired, epoch
        changed); when we fenced on our own clock because Redis was slow or unreachable, it
        frees the slot before its server-side expiry.
        """
        self.fence(lease.id)
        return self._release_fenced(lease)

    async def _release_fenced(self, lease: LeaseLike) -> None:
        await asyncio.sleep(ABORT_GRACE)
        await self.leases.release(lease)

    def fence(self, lease_id: str) -> None:
        """Our lease is gone (expired, lost, Redis emptied): stop using that socket now."""
        for session in [*self._idle, *self._busy, *self._quitting]:
            if session.lease is not None and session.lease.id == lease_id:
                self.stats.fenced += 1
                log.warning("lease lost, aborting its connection", extra={"lease": lease_id})
                session.lease = None
                session.abort()
        self._spare_leases = [x for x in self._spare_leases if x.id != lease_id]

    async def _sweep(self) -> None:
        """Closes idle and lease-expiring sessions; releases spare leases nobody took.

        While the fleet is contended (some process found the cap full), an idle session keeps
        its lease only `CONTENDED_IDLE` seconds: a quiet worker must not starve a busy one.
        """
        interval = max(0.05, min(CONTENDED_IDLE / 2, self.settings.session_idle_timeout / 4))
        trimmed_at = 0  # `stats.opened` when the heap was last trimmed
        while not self._closing:
            await asyncio.sleep(interval)
            if self.stats.opened != trimmed_at and not self._opening:
                trimmed_at = self.stats.opened
                trim_heap()
            now = time.monotonic()
            idle_limit = self.settings.session_idle_timeout
            if self.leases.contended:
                idle_limit = min(idle_limit, CONTENDED_IDLE)
            keep: deque[Session] = deque()
            stale: list[Session] = []
            for session in self._idle:
                (keep if self._usable(session, now, idle_limit) else stale).append(session)
            self._idle = keep
            for session in stale:
                self.stats.closed_idle += 1
                await self._retire(session)
            if self._spare_leases and not self._opening:
                spare, self._spare_leases = self._spare_leases, []
                for lease in spare:
                    await self.leases.release(lease)
            for _ in stale:
                self._wake_one()

    async def close(self, timeout: float = 30.0, *, retiring: str = "") -> None:
        """Waits for in-flight transactions, QUITs every session and releases every lease.
        `retiring`: why the pool closes while the worker goes on (its relay was reconfigured
        or fell idle): checkouts still waiting then fail as a free wait (NO_LEASE), not as a
        shutdown."""
        if retiring:
            self._closed_failure = (Kind.NO_LEASE, retiring)
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = time.monotonic() + timeout
        # Opens under way count too: a session still in its handshake holds a lease, and once
        # the loop stops nobody would release it (it would lapse only after its TTL).
        while (self._busy or self._opening) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.1, deadline - time.monotonic()))
        sessions = [*self._idle, *self._busy]
        self._idle.clear()
        self._busy.clear()
        await asyncio.gather(*(self._retire(s) for s in sessions), return_exceptions=True)
        for lease in self._spare_leases:
            await self.leases.release(lease)
        self._spare_leases = []
        while self.wake_for_room():  # they see `_closing` and give up
            pass
        if self.budget is not None:
            self.budget.leave(self)
            for _ in sessions:  # the room they held goes to the other relays' pools
                self.budget.freed(self)

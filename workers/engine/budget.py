"""The process's sessions across relays: MAILER_WORKER_CONNECTIONS bounds them all together.

Each relay has its own session pool (its own key, its own login gate), and every pool may
use the whole budget when it is alone. When the process is at its budget, a pool that needs a
session first retires the least recently used idle session of another relay; failing that it
waits in its own queue, and a session closed in any pool wakes the longest waiter of any
relay. A relay holding more than its share while another waits gives a session up at its next
check-in, so a busy tenant cannot keep a quiet one out of a process for good.

With one pool (a single relay) every check is a sum over one member: the single-relay path
costs what it cost before the budget existed.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol


class Member(Protocol):
    """What the budget needs of a pool (workers/engine/pool.py `SessionPool`)."""

    @property
    def occupied(self) -> int:
        """Sessions open or opening."""
        ...

    @property
    def waiting(self) -> int:
        """Checkouts queued for a session."""
        ...

    def first_waiter(self) -> tuple[int, int] | None:
        """(lane rank, arrival) of the first live checkout in line, None when none waits."""
        ...

    def oldest_idle(self, now: float) -> float | None:
        """Seconds its least recently used idle session has been idle; None without one."""
        ...

    def retire_oldest_idle(self) -> Awaitable[bool]:
        """Closes (QUIT) that session and gives its lease back; False if it had none."""
        ...

    def wake_for_room(self) -> bool:
        """Wakes its first checkout in line to open a session; False if none waits."""
        ...


class SessionBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._members: list[Member] = []

    def join(self, member: Member) -> None:
        if member not in self._members:
            self._members.append(member)

    def leave(self, member: Member) -> None:
        if member in self._members:
            self._members.remove(member)

    @property
    def used(self) -> int:
        return sum(m.occupied for m in self._members)

    def room(self) -> bool:
        """A session may open somewhere in the process."""
        return self.used < self.limit

    async def reclaim(self, asking: Member, now: float) -> bool:
        """At the budget: retires the least recently used idle session of another pool so
        `asking` may open one; False when no other pool has an idle session."""
        if len(self._members) < 2:
            return False
        best: tuple[float, Member] | None = None
        for member in self._members:
            if member is asking:
                continue
            idle = member.oldest_idle(now)
            if idle is not None and (best is None or idle > best[0]):
                best = (idle, member)
        if best is None:
            return False
        return await best[1].retire_oldest_idle()

    def freed(self, origin: Member) -> None:
        """A session of `origin` closed and nobody in `origin` waits: the room goes to the
        longest waiter of another pool (higher lanes first)."""
        if len(self._members) < 2:
            return
        best: tuple[tuple[int, int], Member] | None = None
        for member in self._members:
            if member is origin:
                continue
            first = member.first_waiter()
            if first is not None and (best is None or first < best[0]):
                best = (first, member)
        if best is not None:
            best[1].wake_for_room()

    def over_share(self, member: Member) -> bool:
        """Another pool waits at the full budget while `member` holds more than an even
        share of it: `member` should give a session up rather than keep it."""
        if len(self._members) < 2 or self.room():
            return False
        if not any(m is not member and m.waiting for m in self._members):
            return False
        wanting = sum(1 for m in self._members if m.occupied or m.waiting)
        return member.occupied > self.limit // max(1, wanting)

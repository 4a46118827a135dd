"""Awaiting something unless shutdown comes first: a lease wait that SIGTERM ends, without
stranding a lease that arrives just as its waiter gives up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_orphans: set[asyncio.Future[Any]] = set()


async def unless(
    stop: asyncio.Event,
    coro: Coroutine[Any, Any, T | None],
    orphan: Callable[[T], Awaitable[Any]],
) -> T | None:
    """`coro`'s result, or None if `stop` is set first (then `coro` is cancelled). A result
    that arrives when nobody will use it (we were cancelled, or `stop` won) goes to `orphan`."""
    if stop.is_set():
        coro.close()
        return None
    task = asyncio.ensure_future(coro)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.add_done_callback(lambda done: _adopt(done, orphan))
        task.cancel()
        raise
    finally:
        stopped.cancel()
    if task.done():
        return task.result()
    await cancel(task)
    _adopt(task, orphan)
    return None


async def cancel(task: asyncio.Future[Any]) -> None:
    """Cancels `task` and waits until it ends, cancelling again while it runs: Python 3.11's
    `asyncio.wait_for` (redis-py connects through it) drops a cancellation that lands just as
    what it waits for completes (CPython gh-86296), and one lost cancel would leave an acquire
    polling until its deadline."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)


def _adopt(done: asyncio.Future[T | None], orphan: Callable[[T], Awaitable[Any]]) -> None:
    result = None if done.cancelled() or done.exception() is not None else done.result()
    if result is None:
        return
    follow = asyncio.ensure_future(orphan(result))
    _orphans.add(follow)
    follow.add_done_callback(_orphans.discard)

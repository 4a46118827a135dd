"""One asyncio event loop per worker process, in a thread of its own.

Celery tasks are synchronous; they hand coroutines to this loop and block on the result, while
the loop multiplexes every SMTP socket of the process. The loop is created lazily in the
process that uses it (after any fork), never in a prefork parent.

The loop is uvloop's when it is installed (MAILER_EVENT_LOOP=auto, the default): the loop
thread spends most of the worker's CPU, and uvloop's callbacks, futures and socket transports
cost it less per message (bench/README.md). MAILER_EVENT_LOOP=asyncio keeps
the standard loop.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from workers.compat import Private

T = TypeVar("T")

# asyncio allocates a read buffer of SSLProtocol.max_size per TLS connection, most of an idle
# relay session's memory. What a relay sends us is short SMTP replies, so a small buffer costs
# nothing (a larger record is simply read in several calls); bench/README.md has the RSS per
# session. Set per worker process, where the loop lives. uvloop's TLS buffers are allocated
# zeroed and stay untouched, so they cost no resident memory.
TLS_READ_BUFFER = 4 * 1024

#: The standard library's private part this module relies on (tests/unit/test_private_api.py).
PRIVATE = (Private(asyncio.sslproto.SSLProtocol, "max_size", "lowered to TLS_READ_BUFFER"),)


def new_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """A new event loop of `kind` (MAILER_EVENT_LOOP): auto is uvloop if it is installed."""
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
    return asyncio.new_event_loop()


class LoopThread:
    def __init__(self, name: str = "mailer-loop", kind: str = "auto") -> None:
        self.pid = os.getpid()
        self.loop = new_loop(kind)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Runs `coro` on the loop and blocks the calling thread until it is done."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.run called from the loop thread itself")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()

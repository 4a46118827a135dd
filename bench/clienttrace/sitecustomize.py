"""Bench-only: the client side of bench/shaping.py's figures, loaded by the worker processes it
starts (this folder on their PYTHONPATH, `MAILER_BENCH_TRACE` naming a folder).

The sink stamps an event when its own loop gets to it; on a machine whose CPUs are busy that
is later than the client sent it, and events that waited together are stamped together. To
tell the fleet's pacing from that, each worker appends, per event, the wall-clock time at
which it wrote it to `<folder>/<pid>`:

    mail <t> [tx]  a MAIL command written (MAIL leaves with no await after this point); `tx`:
                 the local part of its first recipient when it starts with "tx" (the lanes
                 scenario's transactional messages)
    fetched <t> tx ... such a message handed by Celery to the stream (workers/strategy.py)
    dispatched <t> tx ... taken by the stream's dispatch thread
    engine <t> tx  ... such a message reached the worker's engine (broker and Celery behind it)
    arrive <t> tx  ... and got past the process's attempts gate (lanes ranked)
    chained <t>  ... of those, one written behind the previous message's body (hand-over)
    open <t>     a session starts connecting (after the session-open rate let it)
    grant <t> <n> <key>   the rate limiter granted n tokens of `key` (n may be 0: refused)
    late <t>     an attempt's token went by before it had a session: it takes another
    check <t> <s> <lead>  an attempt got its session s seconds after its token's time (< 0:
                 before it), the process letting attempts go `lead` seconds early

Nothing is recorded unless `MAILER_BENCH_TRACE` is set; never used outside bench/.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time
from types import ModuleType
from typing import Any

FOLDER = os.environ.get("MAILER_BENCH_TRACE", "")
TARGETS = (
    "workers.engine.session",
    "workers.state.ratelimit",
    "workers.engine.shaper",
    "workers.engine.runtime",
    "workers.strategy",
    "workers.broker",
)


class _Trace:
    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.pid = 0
        self.file: Any = None

    def __call__(self, kind: str, *extra: object) -> None:
        if self.pid != os.getpid():  # opened per process (a fork writes its own file)
            self.pid = os.getpid()
            self.file = open(os.path.join(self.folder, str(self.pid)), "a", buffering=1)  # noqa: SIM115
        tail = "".join(f" {x}" for x in extra)
        self.file.write(f"{kind} {time.time():.6f}{tail}\n")


def _patch(module: ModuleType, record: _Trace) -> None:
    if module.__name__ == "workers.state.ratelimit":
        _patch_limiter(module, record)
    elif module.__name__ == "workers.engine.shaper":
        _patch_shaper(module, record)
    elif module.__name__ == "workers.engine.runtime":
        _patch_runtime(module, record)
    elif module.__name__ == "workers.strategy":
        _patch_strategy(module, record)
    elif module.__name__ == "workers.broker":
        _patch_broker(module, record)
    else:
        _patch_session(module, record)


def _patch_limiter(module: ModuleType, record: _Trace) -> None:
    limiter = module.RateLimiter
    take = limiter.take

    async def traced_take(self: Any, *args: Any, **kwargs: Any) -> Any:
        grant = await take(self, *args, **kwargs)
        record("grant", grant.count, self.key)
        return grant

    limiter.take = traced_take


def _patch_shaper(module: ModuleType, record: _Trace) -> None:
    shaper = module.Shaper
    late = shaper.late

    def traced_late(self: Any, lane: str, slot: float | None) -> bool:
        now = time.monotonic()
        out: bool = late(self, lane, slot)
        if slot is not None:
            record("check", f"{now - slot:.4f}", f"{getattr(self, 'lead', 0.0):.4f}")
        if out and (slot is None or slot <= now):
            record("late")
        return out

    shaper.late = traced_late


def _tx(rcpt_to: Any) -> tuple[str, ...]:
    first = str(rcpt_to[0]) if rcpt_to else ""
    return (first.split("@", 1)[0],) if first.startswith("tx") else ()


def _patch_runtime(module: ModuleType, record: _Trace) -> None:
    runtime = module.Runtime
    admitted = runtime._admitted

    async def traced_admitted(self: Any, parts: Any, payload: Any, *args: Any, **kw: Any) -> Any:
        tx = _tx(payload.get("rcpt_to"))
        if tx:
            record("arrive", *tx)
        return await admitted(self, parts, payload, *args, **kw)

    runtime._admitted = traced_admitted
    for name in ("_streamed", "adeliver"):
        _trace_entry(runtime, name, record)


def _patch_broker(module: ModuleType, record: _Trace) -> None:
    channel = module.Channel
    deliver, take = channel._deliver_moved, channel._take_more
    start = channel._brpop_start

    def traced_deliver(self: Any, queue: str, item: bytes, queues: Any) -> None:
        record("moved", queue)
        deliver(self, queue, item, queues)

    def traced_take(self: Any, queues: Any) -> int:
        n: int = take(self, queues)
        if n:
            record("took", n, queues[0])
        return n

    def traced_start(self: Any, *args: Any, **kwargs: Any) -> None:
        start(self, *args, **kwargs)
        record("poll", int(bool(getattr(self, "_top_fetch", False))))

    channel._deliver_moved, channel._take_more = traced_deliver, traced_take
    channel._brpop_start = traced_start


def _patch_strategy(module: ModuleType, record: _Trace) -> None:
    stream = module.Stream
    put, start = stream.put, stream._start

    def traced_put(self: Any, job: Any) -> None:
        tx = _tx(job.payload.get("rcpt_to"))
        if tx:
            record("fetched", *tx)
        put(self, job)

    def traced_start(self: Any, jobs: Any) -> None:
        for job in jobs:
            tx = _tx(job.payload.get("rcpt_to"))
            if tx:
                record("dispatched", *tx)
        start(self, jobs)

    stream.put, stream._start = traced_put, traced_start


def _trace_entry(cls: Any, name: str, record: _Trace) -> None:
    inner = getattr(cls, name)

    async def traced(self: Any, payload: Any, *args: Any, **kw: Any) -> Any:
        tx = _tx(payload.get("rcpt_to"))
        if tx:
            record("engine", *tx)
        return await inner(self, payload, *args, **kw)

    setattr(cls, name, traced)


def _patch_session(module: ModuleType, record: _Trace) -> None:
    commands = module._commands

    def traced_commands(mail_from: Any, rcpt_to: Any, *args: Any, **kwargs: Any) -> Any:
        out = commands(mail_from, rcpt_to, *args, **kwargs)
        record("mail", *_tx(rcpt_to))
        return out

    module._commands = traced_commands  # type: ignore[attr-defined]
    session = module.Session
    open_ = session.open

    async def traced_open(self: Any) -> None:
        record("open")
        await open_(self)

    session.open = traced_open
    chain = session.commands

    def traced_chain(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = chain(self, *args, **kwargs)
        record("chained")
        return out

    session.commands = traced_chain


class _Finder(importlib.abc.MetaPathFinder):
    """Patches the session module once it is loaded, from whichever tree the worker runs."""

    def __init__(self, record: _Trace) -> None:
        self.record = record

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module
        record = self.record

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _patch(module, record)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


if FOLDER:
    sys.meta_path.insert(0, _Finder(_Trace(FOLDER)))

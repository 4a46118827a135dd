"""Bench-only: the client side of bench/shaping.py's figures, loaded by the worker processes it
starts (this folder on their PYTHONPATH, `MAILER_BENCH_TRACE` naming a folder).

The sink stamps an event when its own loop gets to it; on a machine whose CPUs are busy that
is later than the client sent it, and events that waited together are stamped together. To
tell the fleet's pacing from that, each worker appends, per event, the wall-clock time at
which it wrote it to `<folder>/<pid>`:

    mail <t>     a MAIL command written (MAIL leaves with no await after this point)
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
TARGETS = ("workers.engine.session", "workers.state.ratelimit", "workers.engine.shaper")


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


def _patch_session(module: ModuleType, record: _Trace) -> None:
    commands = module._commands

    def traced_commands(*args: Any, **kwargs: Any) -> Any:
        out = commands(*args, **kwargs)
        record("mail")
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

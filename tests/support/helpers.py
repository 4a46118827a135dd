"""Small helpers the end-to-end tests share."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from devkit.sink import SinkServer, TLSMaterial
from devkit.worker import WorkerProcess
from mailer.config import Secret, Settings
from workers.state.deadletters import DeadLetters
from workers.state.keys import LEDGER_PREFIX

T = TypeVar("T")


def run_async(redis_url: str, body: Callable[[aioredis.Redis], Coroutine[Any, Any, T]]) -> T:
    """`body` on a fresh event loop with an asyncio Redis client it does not have to close."""

    async def main() -> T:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def sink_settings(sink: SinkServer, tls: TLSMaterial, key: str, **extra: Any) -> Settings:
    """Settings for in-process sessions against `sink` (STARTTLS, AUTH with `key`); `extra`
    overrides or adds settings (timeouts default to 5 s)."""
    fields: dict[str, Any] = {"smtp_timeout": 5.0, "data_timeout": 5.0, **extra}
    return Settings(
        smtp_host="localhost",
        smtp_port=sink.port,
        smtp_tls="starttls",
        smtp_password=Secret(key),
        smtp_ca_file=str(tls.ca_file),
        **fields,
    )


def ids_at(sink: SinkServer) -> Counter[str]:
    """Our message ids as the server accepted them (the Message-ID's local part), with counts."""
    return Counter(mid.split("@", 1)[0] for mid in sink.message_ids().elements())


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, interval: float = 0.2) -> bool:
    """Polls without asserting on time: machines here are shared, so only the outcome counts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def fate(
    missing: Iterable[str],
    state_url: str,
    started: Iterable[WorkerProcess],
    broker_url: str | None = None,
) -> str:
    """What the ledger, the dead letters, the broker and the worker logs say about messages that
    never arrived: the assertion message of every "all arrived" check."""
    missing = sorted(missing)
    started = list(started)
    state = redis.Redis.from_url(state_url)
    broker = redis.Redis.from_url(broker_url or state_url)
    lines = [f"{len(missing)} missing"]
    try:
        queued = b"".join(broker.lrange("mailer", 0, -1)) + b"".join(broker.hvals("unacked"))
        for message_id in missing[:5]:
            letter = DeadLetters(state).get(message_id)
            lines.append(
                f"{message_id}: ledger {state.get(LEDGER_PREFIX + message_id)!r} "
                f"dead letter {letter.kind + ': ' + letter.text if letter else None} "
                f"in the broker {message_id.encode() in queued}"
            )
            for worker in started:
                lines += [f"  {worker.name}: {x[:400]}" for x in worker.lines if message_id in x]
    finally:
        state.close()
        broker.close()
    return "\n".join(lines)


def mailer_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m mailer ARGS` with the test's environment on top of ours, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "mailer", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )

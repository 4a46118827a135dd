"""The fleet-wide cap across real OS processes: six processes hammer one semaphore on a real
redis-server, and no more leases than the cap are ever held at once (each process's holds, and
a watcher sampling the holders set)."""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import random
import threading
import time
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from workers.state.semaphore import LeaseSemaphore, Limit

HOLDERS = "mailer:sem:smtp:holders"


def client(url: str) -> aioredis.Redis:
    return aioredis.from_url(url, socket_connect_timeout=1, socket_timeout=2)


def soon(seconds: float) -> float:
    return time.monotonic() + seconds


def _hammer(url: str, index: int, seconds: float, go: Any, results: Any) -> None:
    """One OS process: acquire -> hold 10-50 ms -> release, for `seconds`, recording each hold."""

    async def main() -> list[tuple[float, float]]:
        r = client(url)
        sem = LeaseSemaphore(r, [Limit("smtp", 4)], ttl=10, host=f"proc{index}")
        holds: list[tuple[float, float]] = []
        results.put(("ready", index))
        await asyncio.to_thread(go.wait, 60)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            lease = await sem.acquire(soon(5))
            assert lease is not None
            start = time.monotonic()  # after Redis granted it...
            await asyncio.sleep(random.uniform(0.01, 0.05))
            holds.append((start, time.monotonic()))  # ...and before Redis takes it back
            await sem.release(lease)
        await sem.close()
        await r.aclose()
        return holds

    results.put(("done", index, asyncio.run(main())))


def test_cap_holds_across_os_processes(redis_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_hammer, args=(redis_url, i, 2.0, go, results), daemon=True)
        for i in range(6)
    ]
    for p in procs:
        p.start()
    sampled: list[int] = []
    stop_watch = threading.Event()

    def watch() -> None:
        sync = redis.Redis.from_url(redis_url)
        while not stop_watch.is_set():
            sampled.append(int(sync.zcard(HOLDERS)))
            time.sleep(0.002)
        sync.close()

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        for _ in procs:
            assert results.get(timeout=30)[0] == "ready"
        watcher.start()
        go.set()
        holds: list[tuple[float, float]] = []
        for _ in procs:
            kind, _, got = results.get(timeout=20)
            assert kind == "done"
            holds += got
    except queue.Empty:
        pytest.fail("a semaphore process did not finish")
    finally:
        stop_watch.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    watcher.join(5)
    # CLOCK_MONOTONIC is system-wide on Linux, so holds from different processes compare.
    events = sorted(
        [(t, 1) for t, _ in holds] + [(t, -1) for _, t in holds], key=lambda e: (e[0], e[1])
    )
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    assert len(holds) > 60
    assert 2 <= peak <= 4
    assert sampled and max(sampled) <= 4
    assert all(p.exitcode == 0 for p in procs)

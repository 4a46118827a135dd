"""The fleet-wide connection cap, end to end: real worker processes (one per simulated host),
a real Redis, and the SMTP test server, which counts the TCP connections open at its end.

What each test shows, and why it is shaped so:
- the cap holds under a demand four times larger, and every message arrives exactly once;
- a `kill -9`ed holder's leases lapse within a TTL (plus one renewal) and are taken up by the
  others; its unacknowledged messages come back after the broker's visibility timeout;
- a frozen (SIGSTOPped) holder never writes on its old connections after it resumes; the
  relay still counts those sockets until it closes them, which is why a hard cap needs the
  relay's idle timeout to be shorter than the lease TTL (shown too);
- restarts of the leases' Redis (a Redis of its own here, MAILER_REDIS_URL, as the design
  recommends; the broker stays up), with AOF and without persistence, never push the count
  over the cap, and a restart that loses every lease grants nothing until the old ones lapsed;
- `mailer status --json` reports cap, holders per host and process, and the oldest lease.

Lease TTLs are short (6 s; renewed every 2 s) so that expiry-driven tests take seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import redis
import redis.asyncio as aioredis

import mailer
from devkit.redis_server import RedisServer
from devkit.sink import SinkServer, TLSMaterial
from devkit.worker import WorkerProcess
from mailer.client import default_mailer
from tests.support.helpers import fate, ids_at, wait_until
from tests.support.relay import relay_env
from workers.state import keys
from workers.state.deadletters import DeadLetters
from workers.state.keeper import LeaseKeeper
from workers.state.semaphore import Lease, LeaseSemaphore, Limit

HOLDERS = keys.lease_holders("smtp")
TTL = 6.0  # MAILER_LEASE_TTL in these tests
RENEW = min(TTL / 3, (TTL - max(1.0, 0.1 * TTL)) / 2)  # the keeper's period (semaphore.py)

StartWorker = Callable[..., WorkerProcess]


def messages(n: int, tag: str) -> list[dict[str, str]]:
    return [
        {"to": f"user{i}@example.com", "subject": f"{tag} {i}", "text": f"body {i}\n"}
        for i in range(n)
    ]


def start_workers(
    workers: StartWorker, envs: Sequence[tuple[str, dict[str, str]]]
) -> list[WorkerProcess]:
    """Starts (name, env) workers in parallel: each takes seconds to import Celery."""
    with ThreadPoolExecutor(len(envs)) as pool:
        return list(pool.map(lambda item: workers(item[1], name=item[0]), envs))


def held_by_pid(url: str) -> Counter[int]:
    """Unexpired leases per process id, read atomically with Redis' own clock."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        pipe = client.pipeline(transaction=True)
        pipe.time()
        pipe.zrange(HOLDERS, 0, -1, withscores=True)
        (sec, usec), members = pipe.execute()
    finally:
        client.close()
    now_ms = int(sec) * 1000 + int(usec) // 1000
    held: Counter[int] = Counter()
    for member, score in members:
        if score > now_ms:
            held[int(member.decode().rsplit(":", 2)[1])] += 1
    return held


def lease_ids_of(url: str, pid: int) -> set[str]:
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return {m.decode() for m in client.zrange(HOLDERS, 0, -1) if f":{pid}:" in m.decode()}
    finally:
        client.close()


def wait_quiet(sink: SinkServer, quiet: float, timeout: float) -> bool:
    """Waits until no message has arrived for `quiet` seconds (the workers ran out of work)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = len(sink.received)
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
        time.sleep(0.1)
    return False


class LeaseSampler:
    """Samples the held-lease count in the background (never above the cap, by construction of
    the Lua scripts; sampled to show the demand really kept the semaphore full)."""

    def __init__(self, url: str, every: float = 0.05) -> None:
        self.url = url
        self.every = every
        self.samples: list[int] = []
        self.spans: list[tuple[float, float]] = []  # time.monotonic() asked, answered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(redis.RedisError, OSError):  # Redis restarting
                asked = time.monotonic()
                held = sum(held_by_pid(self.url).values())
                self.samples.append(held)
                self.spans.append((asked, time.monotonic()))

    def held_between(self, start: float, end: float) -> list[int]:
        """Samples taken entirely inside [start, end]: on a loaded machine one query can take
        a while, and its count is from some instant between asking and the answer."""
        return [
            n for (a, b), n in zip(self.spans, self.samples, strict=True) if start <= a and b <= end
        ]

    @contextmanager
    def running(self) -> Iterator[LeaseSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(5)


def overlap_peak(intervals: Sequence[tuple[float, float]]) -> int:
    """Most intervals open at one instant (closing sorts before opening at equal times)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def intervals(sink: SinkServer, skip: frozenset[int] = frozenset()) -> list[tuple[float, float]]:
    """(opened, closed) of every session the server saw, still-open ones closing now."""
    now = time.time()
    return [
        (s.opened_at, s.closed_at if s.closed_at is not None else now)
        for s in sink.sessions
        if s.id not in skip
    ]


def ports_to(pid: int, port: int) -> set[int]:
    """Local ports of `pid`'s TCP connections to `port` (Linux /proc): which server-side
    sessions belong to which worker process."""
    inodes: set[str] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            next(rows)
            for row in rows:
                cols = row.split()
                if cols[9] in inodes and int(cols[2].rsplit(":", 1)[1], 16) == port:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def sessions_of(sink: SinkServer, ports: set[int]) -> set[int]:
    """Ids of the server's open sessions whose client port is in `ports`."""
    return {
        s.id
        for s in sink.sessions
        if s.closed_at is None and int(s.peer.rsplit(":", 1)[1]) in ports
    }


def env_for(
    redis_url: str,
    sink: SinkServer,
    tls_material: TLSMaterial,
    api_key: str,
    host: str,
    ttl: float = TTL,
    **extra: object,
) -> dict[str, str]:
    return relay_env(
        redis_url, sink, tls_material, api_key, MAILER_LEASE_TTL=ttl, MAILER_HOSTNAME=host, **extra
    )


# ---- 1. the cap holds under four times the demand -------------------------------------------


def test_cap_12_with_demand_48_never_exceeded_and_3000_arrive_exactly_once(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: StartWorker,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    cap, per_worker, n = 12, 8, 3000
    sink = make_sink(tls="starttls", auth=("apikey", api_key), record_data=False, mail_delay=0.01)
    envs = [
        (
            f"cap{i}",
            env_for(
                redis_url,
                sink,
                tls_material,
                api_key,
                f"host-{i}",
                MAILER_MAX_CONNECTIONS=cap,
                MAILER_WORKER_CONNECTIONS=per_worker,
            ),
        )
        for i in range(6)
    ]
    producer_env(envs[0][1])
    started = start_workers(workers, envs)

    with LeaseSampler(redis_url).running() as sampler:
        ids = mailer.send_many(messages(n, "cap"))
        assert sink.wait_for(n, timeout=240), f"{len(sink.received)} of {n}: {sink.summary()}"
        time.sleep(1.0)  # a duplicate would arrive now

    counts = ids_at(sink)
    print(
        f"{sink.summary()} total_connections={sink.total_connections} "
        f"lease samples max={max(sampler.samples)} n={len(sampler.samples)}"
    )
    assert sink.peak_connections <= cap, sink.summary()
    assert sink.peak_connections == cap, "the demand never filled the cap: the test shows nothing"
    assert max(sampler.samples) <= cap
    assert set(counts) == set(ids) and len(ids) == n
    assert max(counts.values()) == 1, "a message arrived twice"
    for worker in started:
        assert api_key not in worker.log


# ---- 2. kill -9 --------------------------------------------------------------------------------


def test_kill_9_leases_lapse_within_ttl_others_take_them_and_its_messages_come_back(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: StartWorker,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    cap, per_worker, n, visibility = 6, 4, 1500, 60
    sink = make_sink(tls="starttls", auth=("apikey", api_key), record_data=False, mail_delay=0.05)

    def env(host: str) -> dict[str, str]:
        return env_for(
            redis_url,
            sink,
            tls_material,
            api_key,
            host,
            MAILER_MAX_CONNECTIONS=cap,
            MAILER_WORKER_CONNECTIONS=per_worker,
            MAILER_VISIBILITY_TIMEOUT=visibility,
            # A killed sender may have written a DATA terminator without hearing the reply: send
            # again (at-least-once) rather than hold it, so "nothing lost" can be counted here.
            MAILER_UNCERTAIN_POLICY="retry",
        )

    producer_env(env("host-a"))
    victim = workers(env("host-a"), name="victim")
    ids = default_mailer().send_many(messages(n, "kill"), batch_size=25)
    assert wait_until(lambda: held_by_pid(redis_url)[victim.pid] == per_worker, timeout=30)
    others = start_workers(workers, [("k1", env("host-b")), ("k2", env("host-c"))])
    assert wait_until(lambda: len(sink.received) >= 200, timeout=60)
    held_at_kill = held_by_pid(redis_url)[victim.pid]
    assert held_at_kill > 0, "the victim holds no lease: nothing to reclaim"

    killed = time.monotonic()
    victim.kill()
    assert wait_until(
        lambda: victim.pid not in held_by_pid(redis_url), timeout=3 * TTL, interval=0.05
    )
    reclaimed = time.monotonic() - killed
    print(f"victim held {held_at_kill} leases; reclaimed {reclaimed:.2f}s after kill -9")
    assert reclaimed <= TTL + RENEW, f"leases outlived the TTL: {reclaimed:.2f}s"
    # The others (demand 8 > cap 6) fill the whole cap again, the victim's slots included.
    assert wait_until(lambda: sum(held_by_pid(redis_url).values()) == cap, timeout=20), (
        f"others did not take the freed leases up: {held_by_pid(redis_url)}"
    )

    # The victim's unacknowledged tasks sit in the broker's `unacked` set until a surviving
    # worker's sweep finds them older than the visibility timeout (kombu sweeps every
    # unacked_restore_interval x throttle = 10 s x 1 here, see mailer/publish.py).
    broker = redis.Redis.from_url(redis_url)
    assert wait_quiet(sink, quiet=2.0, timeout=120)
    left = len(set(ids) - set(ids_at(sink)))
    print(f"after the others drained: {left} undelivered, {broker.zcard('unacked_index')} unacked")
    assert left > 0, "the victim had nothing unacknowledged: the test shows nothing"
    assert wait_until(lambda: set(ids) <= set(ids_at(sink)), timeout=visibility + 60), (
        f"{len(set(ids) - set(ids_at(sink)))} never arrived; {sink.summary()}"
    )
    print(f"all back {time.monotonic() - killed:.0f}s after the kill")
    time.sleep(1.0)
    counts = ids_at(sink)
    duplicates = sum(c - 1 for c in counts.values())
    print(f"{sink.summary()}; duplicates={duplicates}")
    # At most one message per connection of the victim can have been in the ambiguous window.
    assert duplicates <= per_worker
    assert sink.peak_connections <= cap
    assert DeadLetters(broker).count() == 0
    for worker in others:
        assert api_key not in worker.log
    broker.close()


# ---- 3. SIGSTOP for longer than the TTL ------------------------------------------------------


class Freeze:
    """One holder owns the whole cap and is SIGSTOPped mid-run while another worker waits."""

    def __init__(
        self,
        redis_url: str,
        sink: SinkServer,
        tls_material: TLSMaterial,
        api_key: str,
        workers: StartWorker,
        producer_env: Callable[[dict[str, str]], None],
        *,
        cap: int,
        ttl: float,
        **extra: object,
    ) -> None:
        self.redis_url, self.sink, self.cap, self.ttl = redis_url, sink, cap, ttl

        def env(host: str) -> dict[str, str]:
            return env_for(
                redis_url,
                sink,
                tls_material,
                api_key,
                host,
                ttl,
                MAILER_MAX_CONNECTIONS=cap,
                MAILER_WORKER_CONNECTIONS=cap,
                # Longer than the freeze: a reply that arrived meanwhile is read, not timed out.
                MAILER_SMTP_TIMEOUT=30,
                MAILER_DATA_TIMEOUT=30,
                **extra,
            )

        producer_env(env("host-a"))
        self.frozen = workers(env("host-a"), name="frozen")
        self.ids = default_mailer().send_many(messages(800, "freeze"), batch_size=25)
        assert wait_until(lambda: held_by_pid(redis_url)[self.frozen.pid] == cap, timeout=30)
        self.other = workers(env("host-b"), name="other")  # waits: the cap is full
        self.old_leases = lease_ids_of(redis_url, self.frozen.pid)
        assert wait_until(lambda: len(self._open_sessions()) == cap, timeout=10)
        self.zombies = frozenset(self._open_sessions())

    def _open_sessions(self) -> set[int]:
        return sessions_of(self.sink, ports_to(self.frozen.pid, self.sink.port))

    def stop(self) -> None:
        self.frozen.signal(signal.SIGSTOP)
        self.stopped = time.monotonic()
        # The frozen holder's leases lapse; the waiting worker takes them.
        assert wait_until(lambda: self.other.pid in held_by_pid(self.redis_url), timeout=3 * TTL)
        self.taken_after = time.monotonic() - self.stopped
        time.sleep(max(0.0, self.stopped + self.ttl + 3 - time.monotonic()))

    def resume(self) -> None:
        self.frozen.signal(signal.SIGCONT)

    def mail_counts(self) -> dict[int, int]:
        return {s.id: s.mail_count for s in self.sink.sessions if s.id in self.zombies}

    def closed(self) -> bool:
        return all(s.closed_at is not None for s in self.sink.sessions if s.id in self.zombies)

    def check_recovery(self) -> None:
        """The frozen worker starts over under new leases; every message arrives exactly once."""
        assert wait_until(
            lambda: bool(lease_ids_of(self.redis_url, self.frozen.pid) - self.old_leases),
            timeout=60,
        ), "the resumed worker never took a new lease"
        n = len(self.ids)
        assert self.sink.wait_for(n, timeout=120), self.sink.summary()
        time.sleep(1.0)
        counts = ids_at(self.sink)
        assert set(counts) == set(self.ids)
        assert max(counts.values()) == 1, "a message arrived twice"


def test_sigstopped_holder_never_writes_on_its_old_connections_and_starts_over(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: StartWorker,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    cap = 4
    # The server keeps idle connections open (5 min): the frozen worker's sockets are still
    # there, with transactions in flight, when it wakes up.
    sink = make_sink(tls="starttls", auth=("apikey", api_key), record_data=False, mail_delay=0.05)
    freeze = Freeze(redis_url, sink, tls_material, api_key, workers, producer_env, cap=cap, ttl=TTL)
    freeze.stop()
    assert not freeze.closed(), "the server closed them: nothing left to prove"
    before = freeze.mail_counts()  # final: nothing the frozen process sent is still unread
    freeze.resume()
    assert wait_until(freeze.closed, timeout=10), "the old connections were not closed"
    assert freeze.mail_counts() == before, "MAIL on a connection whose lease had lapsed"
    assert "lease_lost" in freeze.frozen.log
    freeze.check_recovery()

    # The leased connections never exceeded the cap. The relay did count more while the frozen
    # process slept: its sockets stay open at the server until it closes them (or the relay's
    # idle timeout does; see the next test).
    live_peak = overlap_peak(intervals(sink, skip=freeze.zombies))
    print(
        f"{sink.summary()}; zombies={len(freeze.zombies)} live peak={live_peak} "
        f"leases taken over {freeze.taken_after:.1f}s into the freeze"
    )
    assert live_peak <= cap
    assert sink.peak_connections <= cap + len(freeze.zombies)


def test_relay_idle_timeout_below_the_ttl_keeps_a_frozen_fleet_under_the_cap(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: StartWorker,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    """A frozen holder's sockets are open at the relay until the relay's idle timeout. With that
    timeout shorter than the time its leases can still run after the freeze (TTL minus one
    renewal period), the relay drops them before anyone else can take their slots."""
    cap, ttl, relay_idle = 4, 10.0, 2.0
    # Plain TCP: over TLS, asyncio's server-side close waits up to 30 s for the frozen peer's
    # close_notify (ssl_shutdown_timeout), so the test server's idle timeout would not free the
    # socket in time; a real relay just drops it.
    sink = make_sink(
        tls="none",
        auth=("apikey", api_key),
        record_data=False,
        mail_delay=0.05,
        timeout=relay_idle,
    )
    freeze = Freeze(
        redis_url,
        sink,
        tls_material,
        api_key,
        workers,
        producer_env,
        cap=cap,
        ttl=ttl,
        MAILER_SESSION_IDLE_TIMEOUT=1,  # our own idle close comes before the relay's
    )
    freeze.stop()
    assert freeze.closed(), "the relay did not drop the frozen worker's idle connections"
    freeze.resume()
    freeze.check_recovery()
    print(f"{sink.summary()}; leases taken over {freeze.taken_after:.1f}s into the freeze")
    assert sink.peak_connections <= cap


# ---- 4. Redis restarts -----------------------------------------------------------------------


@contextmanager
def private_redis(appendonly: bool) -> Iterator[RedisServer]:
    server = RedisServer(appendonly=appendonly).start()
    try:
        yield server
    finally:
        server.close()


def restart_run(
    lease_redis: RedisServer,
    outages: Sequence[float],
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: StartWorker,
    producer_env: Callable[[dict[str, str]], None],
) -> tuple[list[int], list[float], LeaseSampler]:
    """Three workers (demand 12, cap 6) keep sending while the leases' Redis restarts once per
    outage (seconds down); returns once every message arrived exactly once, peak <= cap, with
    the fewest connections the relay saw open during each outage, when each restart began (the
    server starts after it), and the lease samples."""
    cap, per_worker, n = 6, 4, 1200
    sink = make_sink(tls="starttls", auth=("apikey", api_key), record_data=False, mail_delay=0.02)
    envs = [
        (
            f"r{i}",
            env_for(
                redis_url,
                sink,
                tls_material,
                api_key,
                f"host-{i}",
                MAILER_REDIS_URL=lease_redis.url,  # leases, ledger; the broker stays up
                MAILER_MAX_CONNECTIONS=cap,
                MAILER_WORKER_CONNECTIONS=per_worker,
            ),
        )
        for i in range(3)
    ]
    producer_env(envs[0][1])
    started = start_workers(workers, envs)
    lowest: list[int] = []
    back_at: list[float] = []
    with LeaseSampler(lease_redis.url).running() as sampler:
        ids = default_mailer().send_many(messages(n, "restart"), batch_size=25)
        for k, down_for in enumerate(outages, start=1):
            goal = k * n // 4
            assert wait_until(lambda g=goal: len(sink.received) >= g, timeout=60), sink.summary()
            lease_redis.stop()
            back = time.monotonic() + down_for
            low = sink.open_connections
            while time.monotonic() < back:
                low = min(low, sink.open_connections)
                time.sleep(0.02)
            lowest.append(low)
            # Before start(): the server (and so its uptime, which the restart grace counts
            # from) starts after this instant, however long start() takes to see it ready.
            back_at.append(time.monotonic())
            lease_redis.start()
        # Generous: a message whose ledger claim could not be released during the outage waits
        # for the claim to lapse, then for its retry's backoff.
        missing = lambda: set(ids) - set(ids_at(sink))  # noqa: E731
        assert sink.wait_for(n, timeout=240), fate(missing(), lease_redis.url, started, redis_url)
        time.sleep(1.0)
    counts = ids_at(sink)
    print(f"{sink.summary()}; lease samples max={max(sampler.samples)}; open during: {lowest}")
    assert set(counts) == set(ids)
    assert max(counts.values()) == 1, "a message arrived twice"
    assert sink.peak_connections <= cap
    assert max(sampler.samples) <= cap
    return lowest, back_at, sampler


def test_lease_redis_restarts_with_aof_never_exceed_the_cap_and_recover_by_themselves(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: StartWorker,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    """With AOF the leases survive a restart. A short outage: holders keep renewing once it is
    back and nobody can acquire meanwhile (fail closed). An outage longer than a lease's
    validity: every holder fences its connections on its own clock, and starts over."""
    with private_redis(appendonly=True) as lease_redis:
        lowest, _, _ = restart_run(
            lease_redis,
            [1.0, TTL + 2],
            redis_url,
            make_sink,
            tls_material,
            api_key,
            workers,
            producer_env,
        )
    # Down longer than a lease stays valid without renewal: no connection outlived its lease.
    assert lowest[1] == 0, f"connections outlived their unrenewable leases: {lowest}"


def test_lease_redis_restart_that_loses_everything_grants_nothing_for_a_ttl_and_recovers(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: StartWorker,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    """Without persistence a restart forgets every lease and the epoch, while their holders may
    still be connected until their next renewal finds the epoch gone. No lease is granted for
    a TTL after such a restart (the next test shows why), then everything carries on."""
    with private_redis(appendonly=False) as lease_redis:
        _, back_at, sampler = restart_run(
            lease_redis,
            [0.0],
            redis_url,
            make_sink,
            tls_material,
            api_key,
            workers,
            producer_env,
        )
    quiet = sampler.held_between(back_at[0], back_at[0] + TTL - 0.5)
    assert quiet and max(quiet) == 0, f"leases granted during the grace period: {quiet}"


def test_no_lease_is_granted_while_a_holder_from_before_an_empty_restart_still_trusts_its_own() -> (
    None
):
    """The race behind the grace period, without worker processes: holder A (renewing every
    TTL/3) and a rival B that asks for the slot again and again. A Redis without persistence
    restarts empty; B must not get the slot before A has learned its lease is gone and fenced."""
    ttl = 4.0

    async def body(server: RedisServer) -> tuple[float, float]:
        ra, rb = aioredis.from_url(server.url), aioredis.from_url(server.url)
        a = LeaseSemaphore(ra, [Limit("smtp", 1)], ttl, host="a", op_timeout=1)
        b = LeaseSemaphore(rb, [Limit("smtp", 1)], ttl, host="b", op_timeout=1)
        fenced: list[float] = []

        def on_lost(lease: Lease) -> None:
            fenced.append(time.monotonic())

        keeper = LeaseKeeper(a, on_lost)
        keeper.start()
        try:
            lease = await a.acquire(time.monotonic() + 2 * ttl)  # a fresh Redis: after its grace
            assert lease is not None
            keeper.add(lease)
            await asyncio.sleep(ttl / 2)
            server.restart()
            granted = await b.acquire(time.monotonic() + 3 * ttl)
            assert granted is not None
            assert fenced, "A never learned that its lease was gone"
            await b.release(granted)
            return fenced[0], time.monotonic()
        finally:
            await keeper.stop()
            await ra.aclose()
            await rb.aclose()

    with private_redis(appendonly=False) as server:
        lost_at, granted_by = asyncio.run(body(server))
    print(f"A fenced {granted_by - lost_at:.2f}s before B's lease arrived")
    assert lost_at < granted_by


# ---- 5. mailer status ------------------------------------------------------------------------


def test_status_json_shows_cap_holders_per_host_and_process_and_the_oldest_lease(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: StartWorker,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    """Two hosts, three processes, a per-host cap: after a burst every process keeps its sessions
    (idle, leased), so what `mailer status --json` reports can be checked exactly against the
    server's open connections and the processes' ids. Demand stays within both caps, so no one
    is waiting and nobody gives idle sessions back early."""
    cap, per_host = 10, 3
    sink = make_sink(tls="starttls", auth=("apikey", api_key), record_data=False, mail_delay=0.02)

    def env(host: str, connections: int) -> dict[str, str]:
        return env_for(
            redis_url,
            sink,
            tls_material,
            api_key,
            host,
            MAILER_MAX_CONNECTIONS=cap,
            MAILER_MAX_CONNECTIONS_PER_HOST=per_host,
            MAILER_WORKER_CONNECTIONS=connections,
        )

    producer_env(env("host-a", 1))
    # A warm fleet: slow start (docs/shaping.md) would pace a new one's first burst, and a paced
    # process needs fewer sessions than it may open.
    redis.Redis.from_url(redis_url).hset(keys.RATE, "sd", 1)
    a1, a2, b1 = start_workers(
        workers, [("a1", env("host-a", 1)), ("a2", env("host-a", 2)), ("b1", env("host-b", 3))]
    )
    first_sent = time.time()
    ids = default_mailer().send_many(messages(120, "status"), batch_size=4)
    assert sink.wait_for(len(ids), timeout=60), sink.summary()
    assert set(ids_at(sink)) == set(ids)
    expected = {a1.pid: 1, a2.pid: 2, b1.pid: 3}
    assert wait_until(lambda: dict(held_by_pid(redis_url)) == expected, timeout=10), (
        f"{held_by_pid(redis_url)} != {expected}"
    )

    out = subprocess.run(
        [sys.executable, "-m", "mailer", "status", "--json"],
        env={**os.environ, **env("host-a", 1)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    status = json.loads(out.stdout)
    now = time.time()
    leases = status["leases"]
    fleet = leases["limits"]["smtp"]
    assert fleet["cap"] == cap
    assert fleet["held"] == 6 == sink.open_connections
    assert fleet["hosts"] == {"host-a": 3, "host-b": 3}
    assert fleet["processes"] == {
        f"host-a:{a1.pid}": 1,
        f"host-a:{a2.pid}": 2,
        f"host-b:{b1.pid}": 3,
    }
    # The oldest lease was taken just before the oldest connection still open was made.
    oldest_open = min(s.opened_at for s in sink.sessions if s.closed_at is None)
    assert now - oldest_open - 0.5 <= fleet["oldest_age_s"] <= now - first_sent + 0.5
    # The per-host limit of the host `mailer status` runs as.
    assert leases["limits"]["host:host-a"] == {
        "cap": per_host,
        "held": 3,
        "hosts": {"host-a": 3},
        "processes": {f"host-a:{a1.pid}": 1, f"host-a:{a2.pid}": 2},
        "oldest_age_s": leases["limits"]["host:host-a"]["oldest_age_s"],
    }
    assert api_key not in out.stdout + out.stderr

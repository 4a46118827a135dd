"""Sentinel failover mid-run: a primary, a replica and three sentinels (real processes); two
workers and a producer that keeps sending (single messages and batches) through `sentinel://`
URLs; the primary is killed with SIGKILL while messages flow. What docs/redis.md promises:

- nothing lost: every message the producer was told is queued reaches the SMTP server;
- nothing sent twice (the ledger's `data` mark is on a replica before the DATA terminator);
- the cap holds at the SMTP server (a promoted replica grants no lease for a TTL);
- the producer waits through the switch instead of failing (MAILER_PUBLISH_RETRY_FOR).

The figures (waits, duplicates, peak connections) are printed for the report, never timed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis

import mailer
from devkit.redis_server import RedisServer, SentinelServer
from devkit.sink import FaultPlan, SinkServer, TLSMaterial
from devkit.worker import WorkerProcess
from mailer.errors import PublishError
from tests.support.helpers import fate, ids_at, wait_until
from tests.support.relay import relay_env

MASTER = "mailer"
CAP = 6
PACE = 0.006  # seconds between two calls of the producer


@dataclass
class Cluster:
    primary: RedisServer
    replica: RedisServer
    sentinels: list[SentinelServer]

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://{s.address}" for s in self.sentinels) + "/0"

    def master(self) -> tuple[str, int] | None:
        for s in self.sentinels:
            try:
                client = redis.Redis(port=s.port, decode_responses=True)
                host, port = client.sentinel_get_master_addr_by_name(MASTER)
                return str(host), int(port)
            except (redis.RedisError, TypeError):
                continue
        return None

    def ready(self) -> bool:
        """The replica is in sync, and every sentinel knows it and the two other sentinels
        (or there is no quorum to fail over)."""
        replication = redis.Redis(port=self.primary.port).info("replication")
        if replication.get("slave0", {}).get("state") != "online":
            return False
        for s in self.sentinels:
            client = redis.Redis(port=s.port, decode_responses=True)
            if len(client.sentinel_sentinels(MASTER)) < 2 or not client.sentinel_slaves(MASTER):
                return False
        return True


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    primary = RedisServer().start()
    replica = RedisServer(replicaof=primary).start()
    sentinels = [SentinelServer(primary, MASTER, down_after_ms=1000).start() for _ in range(3)]
    made = Cluster(primary, replica, sentinels)
    try:
        assert wait_until(made.ready, timeout=30), "the sentinels never found each other"
        yield made
    finally:
        for s in sentinels:
            s.close()
        replica.close()
        primary.close()


@dataclass
class Producer:
    """Sends in a thread until `stop`: singles and batches of 10, alternately."""

    queued: list[str] = field(default_factory=list)
    refused: int = 0
    waits: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)

    def run(self, total: int) -> None:
        n = 0
        while n < total and not self.stop.is_set():
            started = time.monotonic()
            try:
                if n % 20 < 10:
                    ids = [mailer.send(to=f"s{n}@example.com", subject=f"f {n}", text="b\n")]
                else:
                    ids = mailer.send_many(
                        [
                            mailer.Message(to=f"b{n + i}@example.com", subject="f", text="b\n")
                            for i in range(10)
                        ]
                    )
            except PublishError as exc:
                self.refused += 1
                self.errors.append(str(exc))
                ids = []
            self.waits.append(time.monotonic() - started)
            self.queued += ids
            n += 1 if n % 20 < 10 else 10
            time.sleep(PACE)  # an app's steady flow, so that sending spans the failover


def test_kill_the_primary_mid_run_nothing_lost_nothing_twice_cap_held(
    cluster: Cluster,
    tls_material: TLSMaterial,
    make_sink: Callable[..., SinkServer],
    api_key: str,
    producer_env: Callable[[dict[str, str]], None],
    workers: Callable[..., WorkerProcess],
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", api_key), faults=FaultPlan(delay=0.002))
    env = relay_env(
        cluster.url,
        sink,
        tls_material,
        api_key,
        MAILER_SENTINEL_MASTER=MASTER,
        MAILER_WAIT_REPLICAS=1,
        MAILER_MAX_CONNECTIONS=CAP,
        MAILER_WORKER_CONNECTIONS=4,
        MAILER_VISIBILITY_TIMEOUT=60,
        MAILER_PUBLISH_RETRY_FOR=30,
    )
    producer_env(env)
    started = [workers(env, name="fa"), workers(env, name="fb")]
    producer = Producer()
    total = 2400
    thread = threading.Thread(target=producer.run, args=(total,), daemon=True)
    thread.start()
    try:
        # Mid-run: a third queued, messages arriving, most of the sending still to come.
        assert wait_until(
            lambda: len(producer.queued) >= total // 3 and len(sink.received) >= 300, timeout=180
        ), sink.summary()
        old = cluster.master()
        killed_at = time.monotonic()
        cluster.primary.kill()
        assert wait_until(lambda: cluster.master() not in (None, old), timeout=60), "no failover"
        switched = time.monotonic() - killed_at
        # Its supervisor brings the old primary back; Sentinel makes it the new one's replica
        # (without a replica, MAILER_WAIT_REPLICAS=1 confirms nothing).
        cluster.primary.start()
        sent_before = len(producer.queued)
        thread.join(timeout=300)
        assert not thread.is_alive(), "the producer never finished"
    finally:
        producer.stop.set()
    queued = set(producer.queued)

    def all_arrived() -> bool:
        return queued <= set(ids_at(sink))

    state = cluster.master()
    state_url = f"redis://{state[0]}:{state[1]}/0" if state else ""
    assert wait_until(all_arrived, timeout=240, interval=1.0), fate(
        queued - set(ids_at(sink)), state_url, started
    )
    time.sleep(2)
    counts = ids_at(sink)
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    print(
        f"\nfailover: switch {switched:.1f} s; producer: {len(queued)} queued "
        f"({len(queued) - sent_before} after the switch), "
        f"{producer.refused} calls refused, longest wait {max(producer.waits):.2f} s, "
        f"waits > 0.5 s: {sum(w > 0.5 for w in producer.waits)}; sink: {len(counts)} distinct, "
        f"{duplicates} duplicates, peak connections {sink.peak_connections} (cap {CAP})"
    )
    assert producer.refused == 0, producer.errors[:3]
    assert duplicates == 0, [m for m, n in counts.items() if n > 1][:5]
    assert sink.peak_connections <= CAP, sink.summary()

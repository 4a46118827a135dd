"""Traffic shaping (issue 18) end to end: real worker processes, a real Redis, and the sink
playing a relay that shapes its clients (throttling replies, a spent quota, a revoked key).

Assertions are on outcomes, never on how fast anything went: every message delivered once,
nothing dead-lettered, failed logins per process, the key nowhere in the logs, transactional
mail ahead of a bulk backlog. Two tests bound a rate from below (a fleet limited to R/s cannot
deliver N messages in less than (N - burst)/R seconds): a slow machine only makes those runs
longer, so they cannot fail for being slow. The figures (settling time, p99, Redis cost) are
in bench/shaping.py.

These need the shaping features (MAILER_RATE_LIMIT, MAILER_CONNECT_RATE, MAILER_LANES, the
quota state, one failed AUTH per process); `pytest -m shaping` runs just them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

import mailer
from devkit.worker import WorkerProcess
from tests.support.helpers import fate, ids_at, wait_until
from tests.support.relay import Relay
from workers.state.deadletters import DeadLetters
from workers.state.ratelimit import RATE_KEY, peek_ceiling

pytestmark = pytest.mark.shaping

StartWorker = Callable[..., WorkerProcess]
MakeRelay = Callable[..., Relay]
OTHER_KEY = "SG." + "o" * 22 + "." + "t" * 43  # the key the relay accepts after a revocation


def send_many(n: int, tag: str, **fields: object) -> set[str]:
    return set(
        mailer.send_many(
            [
                {"to": f"{tag}{i}@example.com", "subject": f"{tag} {i}", "text": "x\n", **fields}
                for i in range(n)
            ]
        )
    )


def start(workers: StartWorker, env: dict[str, str], n: int) -> list[WorkerProcess]:
    """`n` worker processes started at once (each imports Celery for seconds)."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: workers(env, name=f"shape{i}"), range(n)))


def dead_letters(relay: Relay) -> int:
    client = redis.Redis.from_url(relay.env["MAILER_BROKER_URL"])
    try:
        return DeadLetters(client).count()
    finally:
        client.close()


def assert_all_once(relay: Relay, ids: set[str], started: Sequence[WorkerProcess]) -> None:
    url = relay.env["MAILER_BROKER_URL"]
    arrived = wait_until(lambda: ids <= set(ids_at(relay.sink)), timeout=240)
    assert arrived, fate(ids - set(ids_at(relay.sink)), url, started)
    counts = ids_at(relay.sink)
    assert {i: n for i, n in counts.items() if i in ids and n > 1} == {}, "duplicates"


def wait_quiet(count: Callable[[], int], quiet: float = 3.0, timeout: float = 60.0) -> None:
    """Until `count()` has not changed for `quiet` seconds (the fleet stopped trying)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.1)


def key_in_logs(started: Sequence[WorkerProcess], *keys: str) -> list[str]:
    return [line for w in started for line in w.lines if any(k in line for k in keys)]


# ---- throttling replies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        "421 4.7.0 Too many messages, throttled (try again later)",
        "451 4.7.1 Message rate exceeded, throttled",
    ],
    ids=["421-closes", "451-keeps-session"],
)
def test_throttling_replies_lose_nothing_and_deliver_once(
    relay: MakeRelay, workers: StartWorker, reply: str
) -> None:
    """A relay answering "throttled" above 20 MAILs a second: the fleet backs off instead of
    spending retries, so nothing is dead-lettered and every message arrives once."""
    r = relay(sink={"throttle_rate": 20, "throttle_reply": reply, "record_data": False})
    started = start(workers, r.env, 2)
    ids = send_many(400, "throttled")
    assert_all_once(r, ids, started)
    assert r.sink.timestamps("refused"), "the throttle was never hit: the test proves nothing"
    assert dead_letters(r) == 0


def test_slow_start_paces_a_new_fleet_until_its_relay_first_throttles_it(
    relay: MakeRelay, workers: StartWorker
) -> None:
    """No MAILER_RATE_LIMIT and a relay nobody has measured: the fleet starts paced by slow
    start, the relay's first throttling reply ends it for good (Redis keeps that, for the
    whole fleet), and nothing is lost or sent twice."""
    reply = "451 4.7.1 Message rate exceeded, throttled"
    r = relay(sink={"throttle_rate": 30, "throttle_reply": reply, "record_data": False})
    started = start(workers, r.env, 2)
    ids = send_many(400, "slow")
    assert_all_once(r, ids, started)
    assert r.sink.timestamps("refused"), "the throttle was never hit: the test proves nothing"
    assert any('"slow_start"' in line for w in started for line in w.lines), "no slow start"
    client = redis.Redis.from_url(r.env["MAILER_BROKER_URL"])
    try:
        assert client.hget(RATE_KEY, "sd") == b"1", "slow start is not over for good"
        assert client.hget(RATE_KEY, "ss") is None
        assert "451 4.7.1" in peek_ceiling(client).reason  # the relay's reply, not "slow start"
    finally:
        client.close()
    assert dead_letters(r) == 0


def test_a_spent_budget_is_probed_and_the_fleet_comes_back_at_the_budgets_rate(
    relay: MakeRelay, workers: StartWorker
) -> None:
    """A relay counting a budget in a fixed window, as Postfix's anvil does (60 MAILs per 6 s
    here, then every MAIL refused until the window ends): the fleet does not climb back into
    the spent window second after second; a trickle of probes finds the window's end, the
    first one delivered brings the whole fleet back (`probe_passed`), and nothing is lost,
    sent twice or dead-lettered."""
    reply = "450 4.7.1 Error: too much mail from 127.0.0.1"
    r = relay(
        sink={
            "throttle_rate": 60,
            "throttle_window": 6.0,
            "throttle_reply": reply,
            "record_data": False,
        }
    )
    started = start(workers, r.env, 2)
    ids = send_many(240, "budget")
    assert_all_once(r, ids, started)
    refused = len(r.sink.timestamps("refused"))
    assert refused, "the budget was never spent: the test proves nothing"
    # Four windows' worth: the fleet came back after each spent window (a probe delivered).
    passed = [line for w in started for line in w.lines if '"probe_passed"' in line]
    assert passed, "no probe brought the fleet back"
    # Probes, not a fleet pressing on a spent window (each refusal is one MAIL it counts).
    assert refused < len(ids) // 2, f"{refused} MAILs refused for {len(ids)} messages"
    assert dead_letters(r) == 0


# ---- fleet-wide limits -------------------------------------------------------------------------


def test_rate_limit_holds_fleet_wide_and_waiting_costs_no_attempt(
    relay: MakeRelay, workers: StartWorker
) -> None:
    """MAILER_RATE_LIMIT=20/s over three processes: 160 messages cannot take less than
    (160 - 20 burst) / 20 = 7 s at the sink (checked with a 30% margin below), and waiting for
    a token is not a retry."""
    r = relay(sink={"record_data": False}, MAILER_RATE_LIMIT="20/s")
    started = start(workers, r.env, 3)
    ids = send_many(160, "rate")
    assert_all_once(r, ids, started)
    times = r.sink.timestamps("accepted")
    assert times[-1] - times[0] >= 0.7 * (160 - 20) / 20, "faster than the fleet-wide limit"
    assert not [line for w in started for line in w.lines if '"retried"' in line]
    assert dead_letters(r) == 0


def test_connect_rate_spreads_a_cold_start(relay: MakeRelay, workers: StartWorker) -> None:
    """Three processes starting on a backlog want 3 x 8 sessions; MAILER_CONNECT_RATE=4 spreads
    their opening over at least (sessions - 4) / 4 seconds (30% margin), whatever the speed."""
    r = relay(
        sink={"record_data": False, "mail_delay": 0.05},
        MAILER_CONNECT_RATE=4,
        MAILER_WORKER_CONNECTIONS=8,
    )
    ids = send_many(600, "cold")
    started = start(workers, r.env, 3)
    assert_all_once(r, ids, started)
    opened = r.sink.timestamps("sessions")
    assert len(opened) > 8, "too few sessions to show a rate"
    assert opened[-1] - opened[0] >= 0.7 * (len(opened) - 4) / 4


# ---- failed logins and the quota -------------------------------------------------------------


def test_wrong_key_is_at_most_one_failed_auth_per_process(
    relay: MakeRelay, workers: StartWorker, api_key: str
) -> None:
    """A revoked key: the first 535 stops every session of the fleet; no process tries the key
    twice within the probe interval (an hour here), never with a second mechanism, and QUITs."""
    r = relay(sink={"peer_pids": True}, MAILER_CIRCUIT_PROBE_INTERVAL=3600)
    r.sink.auth = ("apikey", OTHER_KEY)  # revoked before the fleet starts
    started = start(workers, r.env, 3)
    send_many(60, "wrongkey")
    assert wait_until(lambda: r.sink.auth_failures(), timeout=60), "no AUTH was ever tried"
    wait_quiet(lambda: len(r.sink.auth_attempts))
    per_process = r.sink.auth_failures_per_pid()
    assert None not in per_process, "a session could not be traced to its process"
    assert set(per_process) <= {w.pid for w in started}
    assert max(per_process.values()) == 1, per_process
    sessions = r.sink.sessions
    assert all(s.auth_attempts <= 1 for s in sessions), "fell back to another mechanism"
    failed = {a.session_id for a in r.sink.auth_failures()}
    assert r.sink.wait_idle(timeout=30)
    assert all(s.quit for s in r.sink.sessions if s.id in failed), "closed without QUIT"
    assert r.sink.received == []
    assert key_in_logs(started, api_key, OTHER_KEY) == []
    assert dead_letters(r) == 0


def test_quota_waits_without_dead_letters_and_resumes(
    relay: MakeRelay, workers: StartWorker, api_key: str
) -> None:
    """ "451 Authentication failed: Maximum credits exceeded" at AUTH: the fleet stops and
    probes; nothing is dead-lettered, and once the quota ends every message arrives once."""
    r = relay(
        sink={"record_data": False},
        MAILER_QUOTA_PROBE_INTERVAL=2,
        MAILER_CIRCUIT_PROBE_INTERVAL=2,
    )
    r.sink.start_quota()
    started = start(workers, r.env, 2)
    ids = send_many(50, "quota")
    assert wait_until(lambda: len(r.sink.auth_failures()) >= 2, timeout=60), "no probe came"
    assert r.sink.received == []
    assert dead_letters(r) == 0
    r.sink.end_quota()
    assert_all_once(r, ids, started)
    assert dead_letters(r) == 0
    assert {a.code for a in r.sink.auth_failures()} == {451}
    assert key_in_logs(started, api_key) == []


# ---- priority lanes ----------------------------------------------------------------------------


def test_lane_queues_are_named_after_the_lane(relay: MakeRelay) -> None:
    """`mailer.<lane>` per lane; the lane named `default` keeps the queue `mailer`."""
    r = relay(MAILER_LANES="transactional,default", MAILER_DEFAULT_LANE="default")
    mailer.send(to="a@example.com", subject="reset", text="x", lane="transactional")
    mailer.send(to="b@example.com", subject="news", text="x")
    client = redis.Redis.from_url(r.env["MAILER_BROKER_URL"])
    try:
        assert (client.llen("mailer.transactional"), client.llen("mailer")) == (1, 1)
    finally:
        client.close()


def test_transactional_lane_overtakes_a_bulk_backlog(
    relay: MakeRelay, workers: StartWorker
) -> None:
    """A bulk backlog saturating the fleet (think time at the relay keeps it long), then
    transactional mail: all of it arrives while bulk is still queued, and nothing is lost."""
    r = relay(
        sink={"record_data": False, "mail_delay": 0.05},
        MAILER_LANES="transactional:20%,bulk",
        MAILER_DEFAULT_LANE="bulk",
        MAILER_WORKER_CONNECTIONS=4,
    )
    started = start(workers, r.env, 2)
    bulk = send_many(3000, "bulk")
    assert wait_until(lambda: len(r.sink.received) >= 50, timeout=120), "bulk never started"
    transactional = {
        mailer.send(to=f"tx{i}@example.com", subject=f"tx {i}", text="x", lane="transactional")
        for i in range(30)
    }
    arrived = wait_until(lambda: transactional <= set(ids_at(r.sink)), timeout=240)
    assert arrived, fate(transactional - set(ids_at(r.sink)), r.env["MAILER_BROKER_URL"], started)
    bulk_done = Counter(i for i in ids_at(r.sink) if i in bulk)
    assert len(bulk_done) < len(bulk), "the bulk backlog drained first: nothing was overtaken"
    assert_all_once(r, bulk | transactional, started)
    assert dead_letters(r) == 0

"""SendGrid's Event Webhook end to end: a real `mailer webhook` process (uvicorn) receives
POSTs signed with a key the test made, shaped like SendGrid's documented batches, and each
message's status, the suppression lists and the uncertain holds follow; forged, altered, stale
and replayed requests change nothing. The last test sends through a real worker to the sink."""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

import mailer
from devkit.sink import FaultPlan
from devkit.worker import WorkerProcess
from mailer.lifecycle import read
from tests.support.helpers import ids_at, wait_until
from tests.support.relay import Relay
from tests.support.webhook import Signer, WebhookServer, event, post, post_events
from workers.state import keys, lifecycle
from workers.state.deadletters import DeadLetter, DeadLetters
from workers.state.suppressions import FRESH, Suppressions

TTL = 3600


@pytest.fixture
def signer() -> Signer:
    return Signer()


@pytest.fixture
def webhook(redis_url: str, signer: Signer) -> Iterator[Callable[..., WebhookServer]]:
    started: list[WebhookServer] = []

    def start(**env: object) -> WebhookServer:
        settings = {
            "MAILER_BROKER_URL": redis_url,
            "MAILER_SENDGRID_WEBHOOK_KEY": signer.public,
            "MAILER_LEDGER_TTL": str(TTL),
            **{k: str(v) for k, v in env.items()},
        }
        server = WebhookServer(settings).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def _drained(client: redis.Redis) -> bool:
    return client.llen(keys.EVENT_INBOX) == 0 and client.llen(keys.EVENT_PROCESSING) == 0


def _applied(client: redis.Redis, n: int) -> Callable[[], bool]:
    """Done when `n` distinct events have been applied (their seen markers exist)."""
    return lambda: _drained(client) and len(list(client.scan_iter("mailer:events:seen:*"))) >= n


def _snapshot(client: redis.Redis) -> dict[bytes, bytes | None]:
    """Every key of ours but the seen markers, dumped: what "changes nothing" compares."""
    return {
        k: client.dump(k)
        for k in sorted(client.scan_iter("mailer:*"))
        if not k.startswith(b"mailer:events:seen:")
    }


def _sent(client: redis.Redis, recipients: int = 1) -> tuple[str, str]:
    """A message the worker recorded as sent: (message id, the relay's queue id)."""
    mid, queue_id = uuid.uuid4().hex, secrets.token_urlsafe(16)[:22]
    lifecycle.note(client, mid, "sent", TTL, reply=f"250 Ok: queued as {queue_id}")
    return mid, queue_id


def test_status_and_suppressions_follow_the_events(
    redis_url: str, signer: Signer, webhook: Callable[..., WebhookServer]
) -> None:
    server = webhook()
    client = _client(redis_url)
    delivered, bounced, spam, unsub, grouped, dropped, later = (_sent(client) for _ in range(7))
    batch = [
        event("processed", "a@example.com", mailer_id=delivered[0]),
        event("deferred", "a@example.com", mailer_id=delivered[0]),
        event("delivered", "a@example.com", mailer_id=delivered[0]),
        # An asynchronous bounce: no unique args, only sg_message_id (queue id + suffix).
        event("bounce", "B@Example.com", sg_message_id=f"{bounced[1]}.filter0001-1-2-3.0"),
        event("spamreport", "c@example.com", mailer_id=spam[0]),
        event("unsubscribe", "d@example.com", mailer_id=unsub[0]),
        event("group_unsubscribe", "e@example.com", mailer_id=grouped[0], asm_group_id=7),
        event("dropped", "f@example.com", mailer_id=dropped[0]),
        event("deferred", "g@example.com", mailer_id=later[0]),
        event("bounce", "h@example.com", mailer_id=later[0], type="blocked"),
        event("open", "i@example.com"),  # no message of ours: counted only
    ]
    assert post_events(server.url, signer, batch) == 200
    assert wait_until(_applied(client, len(batch)), timeout=30)

    expect = {
        delivered[0]: "delivered",
        bounced[0]: "bounced",
        spam[0]: "spamreport",
        unsub[0]: "unsubscribed",
        grouped[0]: "unsubscribed",
        dropped[0]: "dropped",
        later[0]: "blocked",
    }
    assert {mid: read(client, mid).state for mid in expect} == expect
    st = read(client, delivered[0])
    assert [t.state for t in st.transitions] == ["sent", "deferred", "delivered"]
    assert st.replies == (f"250 Ok: queued as {delivered[1]}",)
    assert st.recipients == {"a@example.com": "delivered"}
    assert [e["event"] for e in st.events] == ["processed", "deferred", "delivered"]
    assert read(client, bounced[0]).recipients == {"b@example.com": "bounced"}

    lists = Suppressions(client)
    reasons = {s.address: s.reason for s in lists.list()}
    assert reasons == {
        "b@example.com": "bounce",
        "c@example.com": "spamreport",
        "d@example.com": "unsubscribe",
        "h@example.com": "blocked",
    }
    assert [(s.address, s.reason) for s in lists.list(7)] == [
        ("e@example.com", "group_unsubscribe")
    ]
    assert lists.count() == 5

    # A group resubscribe takes the address off that group's list only.
    assert (
        post_events(
            server.url, signer, [event("group_resubscribe", "e@example.com", asm_group_id=7)]
        )
        == 200
    )
    assert wait_until(lambda: lists.get("e@example.com", 7) is None, timeout=30)
    metrics = server.metrics()
    assert 'mailer_events_total{type="delivered"} 1.0' in metrics
    assert 'mailer_events_total{type="bounce"} 2.0' in metrics


def test_forged_altered_stale_and_replayed_requests_change_nothing(
    redis_url: str, signer: Signer, webhook: Callable[..., WebhookServer]
) -> None:
    server = webhook(MAILER_WEBHOOK_TOLERANCE=300)
    client = _client(redis_url)
    mid, _ = _sent(client)
    batch = [
        event("delivered", "a@example.com", mailer_id=mid),
        event("bounce", "b@example.com", mailer_id=mid),
    ]
    body = json.dumps(batch).encode()
    assert post(server.url, body, signer.headers(body)) == 200
    assert wait_until(_applied(client, 2), timeout=30)
    before = _snapshot(client)

    other = Signer()
    altered = body.replace(b"b@example.com", b"x@example.com")
    refused = {
        "signed by another key": post(server.url, body, other.headers(body)),
        "body modified after signing": post(server.url, altered, signer.headers(body)),
        "stale timestamp": post(server.url, body, signer.headers(body, int(time.time()) - 3600)),
        "no signature": post(server.url, body, {"Content-Type": "application/json"}),
    }
    assert refused == dict.fromkeys(refused, 403)
    assert client.llen(keys.EVENT_INBOX) == 0  # nothing stored, not even for later
    assert _snapshot(client) == before

    # SendGrid's retry of the same batch (fresh signature, same events): applied once only.
    assert post(server.url, body, signer.headers(body)) == 200
    assert wait_until(lambda: _drained(client), timeout=30)
    assert wait_until(lambda: "mailer_events_duplicate_total 2.0" in server.metrics(), timeout=30)
    assert _snapshot(client) == before


def _held(client: redis.Redis, rcpt: str) -> str:
    """A message held as uncertain, as a worker leaves one: ledger `uncertain`, dead letter
    `uncertain` with its payload (the test's broker is the same Redis)."""
    mid = uuid.uuid4().hex
    record = {"state": "uncertain", "owner": "x", "at": time.time(), "reply": "", "until": 0}
    client.set(keys.ledger(mid), json.dumps(record), ex=TTL)
    payload = {
        "v": 1,
        "id": mid,
        "mail_from": "s@example.com",
        "rcpt_to": [rcpt],
        "data": f"Message-ID: <{mid}@example.com>\r\nSubject: held\r\n\r\nbody\r\n",
        "meta": {
            "subject": "held",
            "to": [rcpt],
            "idempotency_key": None,
            "created_at": time.time(),
        },
    }
    now = time.time()
    letter = DeadLetter(
        mid,
        "uncertain",
        None,
        "no reply after the DATA terminator",
        1,
        now,
        now,
        "held",
        [rcpt],
        {},
        payload,
    )
    DeadLetters(client).add(letter)
    return mid


def test_uncertain_holds_end_by_the_relays_events_or_by_the_policy(
    redis_url: str, signer: Signer, webhook: Callable[..., WebhookServer]
) -> None:
    client = _client(redis_url)
    proven = {
        kind: _held(client, f"{kind}@example.com")
        for kind in ("processed", "delivered", "deferred", "bounce")
    }
    silent = _held(client, "silent@example.com")
    server = webhook(
        MAILER_UNCERTAIN_RESOLVE_AFTER=2,
        MAILER_UNCERTAIN_RESOLVE_POLICY="retry",
        MAILER_UNCERTAIN_SWEEP_INTERVAL=0.5,
    )
    batch = [event(kind, f"{kind}@example.com", mailer_id=mid) for kind, mid in proven.items()]
    assert post_events(server.url, signer, batch) == 200
    dead = DeadLetters(client)
    assert wait_until(lambda: all(dead.get(m) is None for m in proven.values()), timeout=30)
    for kind, mid in proven.items():
        ledger = json.loads(client.get(keys.ledger(mid)) or b"{}")
        assert ledger["state"] == "sent", kind
        st = read(client, mid)
        assert "held" in [t.state for t in st.transitions]
        assert any("resolved by the relay" in r for r in st.replies)

    # No event for the silent one: after MAILER_UNCERTAIN_RESOLVE_AFTER it is sent again once.
    assert wait_until(lambda: dead.get(silent) is None, timeout=30)
    queued = client.lrange("mailer", 0, -1)
    assert sum(silent.encode() in m for m in queued) == 1
    assert client.get(keys.ledger(silent)) is None
    assert read(client, silent).state == "queued"


def test_every_event_goes_to_postgresql_once(
    redis_url: str, signer: Signer, webhook: Callable[..., WebhookServer], postgres_dsn: str
) -> None:
    import psycopg

    server = webhook(MAILER_EVENTS_DSN=postgres_dsn)
    client = _client(redis_url)
    mid, queue_id = _sent(client)
    batch = [
        event("processed", "a@example.com", mailer_id=mid),
        event("delivered", "a@example.com", mailer_id=mid),
        event("bounce", "b@example.com", sg_message_id=f"{queue_id}.filter-1"),
        event("click", "c@example.com", url="https://example.com/"),
    ]
    body = json.dumps(batch).encode()
    for _ in range(2):  # the second is SendGrid's retry
        assert post(server.url, body, signer.headers(body)) == 200

    def rows() -> list[tuple[str, str | None, str]]:
        with psycopg.connect(postgres_dsn) as conn:
            found = conn.execute(
                "SELECT sg_event_id, message_id, event FROM mailer_events ORDER BY occurred_at"
            ).fetchall()
            return [(str(a), b, str(c)) for a, b, c in found]

    assert wait_until(lambda: _drained(client) and len(rows()) == 4, timeout=30)
    got = rows()
    assert sorted(r[0] for r in got) == sorted(e["sg_event_id"] for e in batch)
    assert {r[2]: r[1] for r in got} == {
        "processed": mid,
        "delivered": mid,
        "bounce": mid,
        "click": None,
    }


def test_sent_then_delivered_and_bounced_then_suppressed_end_to_end(
    redis_url: str,
    signer: Signer,
    relay: Callable[..., Relay],
    workers: Callable[..., WorkerProcess],
    webhook: Callable[..., WebhookServer],
) -> None:
    sink, env = relay(MAILER_WORKER_CONNECTIONS=4)
    workers(env)
    server = webhook()
    client = _client(redis_url)

    ok = mailer.send(to="alice@example.com", subject="hello", text="hi\n")
    bad = mailer.send(to="Bob@Example.com", subject="hello", text="hi\n", idempotency_key="k-1")
    assert wait_until(lambda: all(mailer.status(m).state == "sent" for m in (ok, bad)), 60)
    by_id = {(r.message_id or "").split("@")[0]: r for r in sink.received}
    status = mailer.status(idempotency_key="k-1")
    assert status.message_id == bad
    assert status.relay_id == by_id[bad].queue_id
    assert status.replies == (f"250 2.0.0 OK queued as {by_id[bad].queue_id}",)

    assert (
        post_events(
            server.url,
            signer,
            [
                event("processed", "alice@example.com", mailer_id=ok),
                event("delivered", "alice@example.com", mailer_id=ok),
                # SendGrid's asynchronous bounce: matched through the 250's queue id.
                event("bounce", "bob@example.com", sg_message_id=f"{by_id[bad].queue_id}.filter-9"),
            ],
        )
        == 200
    )
    assert wait_until(lambda: mailer.status(ok).state == "delivered", timeout=30)
    assert wait_until(lambda: mailer.status(bad).state == "bounced", timeout=30)
    assert Suppressions(client).get("bob@example.com") is not None
    # The first suppression created the list: a worker notices a new list within FRESH seconds
    # (workers/state/suppressions.py); from then on every message is checked against it.
    time.sleep(FRESH + 0.5)

    before = len(sink.received)
    again = mailer.send(to="bob@example.com", subject="again", text="hi\n")
    both = mailer.send(to=["bob@example.com", "carol@example.com"], subject="two", text="hi\n")
    must = mailer.send(to="bob@example.com", subject="legal", text="hi\n", ignore_suppressions=True)
    assert wait_until(lambda: mailer.status(again).state == "suppressed", timeout=60)
    assert "bob@example.com: bounce" in mailer.status(again).reason
    assert wait_until(lambda: mailer.status(both).state == "sent", timeout=60)
    assert mailer.status(both).recipients == {"bob@example.com": "suppressed"}
    assert wait_until(lambda: mailer.status(must).state == "sent", timeout=60)
    time.sleep(0.5)  # anything extra would arrive now
    new = sink.received[before:]
    envelopes = {(r.message_id or "").split("@")[0]: r.rcpt_tos for r in new}
    assert envelopes == {both: ("carol@example.com",), must: ("bob@example.com",)}


@pytest.mark.slow
def test_kill_9_then_the_relays_events_end_exactly_the_holds_it_received(
    redis_url: str,
    signer: Signer,
    relay: Callable[..., Relay],
    workers: Callable[..., WorkerProcess],
    webhook: Callable[..., WebhookServer],
) -> None:
    """A worker killed with SIGKILL inside DATA: `processed` events for the held messages the
    relay did receive end exactly those holds as `sent`; the rest are sent again once after
    MAILER_UNCERTAIN_RESOLVE_AFTER; every message reaches the relay exactly once.

    The sink waits a second before each MAIL, RCPT and end-of-data reply, and messages are
    published a quarter second apart, so transactions sit at the end of DATA at staggered
    moments. Redis writes are then paused: a transaction already past its terminator is
    recorded by the sink, which answers 250, but its worker cannot record `sent`; one still
    waiting for the sink's reply is dropped unrecorded when its connection dies. The worker is
    killed once the sink has recorded some of them and not all."""
    sink, env = relay(
        {"faults": FaultPlan(delay=1.0)},
        MAILER_WORKER_CONNECTIONS=16,
        MAILER_VISIBILITY_TIMEOUT=60,
    )
    client = _client(redis_url)
    doomed = workers(env, name="doomed")

    def in_data() -> set[str]:
        states = {
            key.decode().removeprefix(keys.LEDGER_PREFIX): json.loads(raw)["state"]
            for key in client.scan_iter(keys.LEDGER_PREFIX + "*")
            if (raw := client.get(key)) is not None
        }
        return {mid for mid, state in states.items() if state == "data"}

    ids: list[str] = []
    while len(ids) < 8 or len(in_data()) < 3:
        assert len(ids) < 200, "no transaction ever reached the end of DATA"
        ids.append(mailer.send(to=f"user{len(ids)}@example.com", subject="k", text="b\n"))
        time.sleep(0.25)
    client.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
    try:
        at_terminator = in_data()  # final: no ledger write gets through now
        assert wait_until(
            lambda: bool(at_terminator & set(ids_at(sink))), timeout=10, interval=0.01
        )
        doomed.kill()  # SIGKILL, with the sink still holding the rest of them
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
    time.sleep(2.0)  # a connection's end reaches the sink: what it held is dropped, unrecorded
    received = at_terminator & set(ids_at(sink))
    lost = at_terminator - received
    print(f"\nat the terminator: {len(at_terminator)}, of which the sink has {len(received)}")
    assert received and lost, (received, lost)

    sink.faults = None
    workers(env, name="survivor")
    server = webhook(
        MAILER_UNCERTAIN_RESOLVE_AFTER=10,
        MAILER_UNCERTAIN_RESOLVE_POLICY="retry",
        MAILER_UNCERTAIN_SWEEP_INTERVAL=0.5,
    )
    dead = DeadLetters(client)

    def held() -> set[str]:
        return {d.id for d in dead.list(limit=1000) if d.kind == "uncertain"}

    # The killed worker's messages come back after the visibility timeout; the survivor finds
    # those at the terminator past their window and holds them, sends the rest once.
    assert wait_until(lambda: held() == at_terminator, timeout=150, interval=0.5), held()
    assert (
        post_events(
            server.url,
            signer,
            [event("processed", f"user{ids.index(m)}@example.com", mailer_id=m) for m in received],
        )
        == 200
    )
    assert wait_until(lambda: not (held() & received), timeout=30)
    for mid in received:
        ledger = json.loads(client.get(keys.ledger(mid)) or b"{}")
        assert (ledger["state"], ledger["owner"]) == ("sent", "relay-event")
        st = read(client, mid)
        assert st.state == "sent" and "held" in [t.state for t in st.transitions]
        assert "resolved by the relay's processed event" in st.replies

    assert wait_until(lambda: not held() and set(ids) <= set(ids_at(sink)), timeout=60)
    time.sleep(1.0)  # anything extra would arrive now
    counts = ids_at(sink)
    assert {mid: counts[mid] for mid in ids} == dict.fromkeys(ids, 1)
    for mid in lost:
        st = read(client, mid)
        assert "sent again (policy retry)" in st.reason
        assert not any("resolved by the relay" in r for r in st.replies)
    metrics = server.metrics()
    assert f'mailer_uncertain_resolved_total{{by="event"}} {float(len(received))}' in metrics
    assert f'mailer_uncertain_resolved_total{{by="retry"}} {float(len(lost))}' in metrics

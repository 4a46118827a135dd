"""The foundation, end to end: `mailer.send` → Redis → a real worker process → TLS + AUTH → the
SMTP test server. Every part is real; the server records what actually arrived."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

import mailer
from devkit.sink import SinkServer, TLSMaterial
from devkit.worker import WorkerProcess
from tests.support.helpers import ids_at, wait_until
from tests.support.relay import Relay, relay_env
from workers.state import keys
from workers.state.deadletters import DeadLetters


def _send(n: int, tag: str) -> dict[str, bytes]:
    """Enqueues n messages; returns id -> the exact rendered bytes the producer published."""
    from mailer.client import default_mailer

    sent: dict[str, bytes] = {}
    client = default_mailer()
    for i in range(n):
        message = mailer.Message(
            to=f"user{i}@example.com", subject=f"{tag} {i}", text=f"body {i}\n"
        )
        rendered = client.render(message)
        client.publisher.send(rendered.to_payload())
        sent[rendered.id] = rendered.data
    return sent


def test_thousand_messages_arrive_exactly_once_with_bytes_intact(
    api_key: str,
    relay: Callable[..., Relay],
    workers: Callable[..., WorkerProcess],
) -> None:
    sink, env = relay(MAILER_WORKER_CONNECTIONS=8)
    worker = workers(env)

    ids = [
        mailer.send(to=f"user{i}@example.com", subject=f"hello {i}", text=f"body {i}\n")
        for i in range(500)
    ]
    sent = _send(500, "again")
    assert sink.wait_for(1000, timeout=120), f"only {len(sink.received)} arrived"
    time.sleep(0.5)  # anything extra (a duplicate) would arrive now

    counts = ids_at(sink)
    all_ids = set(ids) | set(sent)
    assert len(all_ids) == 1000
    assert set(counts) == all_ids
    assert max(counts.values()) == 1, "a message arrived twice"
    by_id = {(r.message_id or "").split("@")[0]: r for r in sink.received}
    for message_id, data in sent.items():
        received = by_id[message_id].data
        assert received.rstrip(b"\r\n") == data.rstrip(b"\r\n"), "rendered bytes were altered"
    # TLS before AUTH, AUTH as apikey, on every session; nothing sent unauthenticated.
    for session in sink.sessions:
        if session.mail_count:
            assert session.tls_at_auth and session.authenticated_as == "apikey"
    assert api_key not in worker.log


def test_sessions_rotate_before_the_limit_and_are_reused_across_tasks(
    relay: Callable[..., Relay],
    workers: Callable[..., WorkerProcess],
) -> None:
    pool_size = 8
    sink, env = relay(
        {"record_data": False},
        MAILER_MAX_MESSAGES_PER_CONNECTION=100,
        MAILER_WORKER_CONNECTIONS=pool_size,
    )
    workers(env)
    _send(1000, "rotate")
    assert sink.wait_for(1000, timeout=120)

    sessions = [s for s in sink.sessions if s.mail_count]
    print(
        f"sessions used: {len(sessions)}, most MAIL on one: {max(s.mail_count for s in sessions)}"
    )
    assert max(s.mail_count for s in sessions) <= 100
    # Reused across tasks: about 1000/100 rotations plus the pool's own size, never one per task.
    assert len(sessions) <= 1000 // 100 + 2 * pool_size
    rotated = [s for s in sessions if s.mail_count == 100]
    assert rotated, "no session reached the rotation point"
    # The session of the last message rotates right after that message's 250: its QUIT may
    # still be on the way when the 1,000th message is counted.
    ids = {s.id for s in rotated}

    def all_quit() -> bool:
        return all(s.quit for s in sink.sessions if s.id in ids)

    assert wait_until(all_quit, 30), "a rotated session was not closed with QUIT"


def test_port_465_implicit_tls(
    relay: Callable[..., Relay],
    workers: Callable[..., WorkerProcess],
) -> None:
    sink, env = relay({"tls": "tls"})
    workers(env)
    ids = {mailer.send(to="a@example.com", subject=f"tls {i}", text="x") for i in range(20)}
    assert sink.wait_for(20, timeout=60)
    assert set(ids_at(sink)) == ids
    assert all(s.tls and s.authenticated_as == "apikey" for s in sink.sessions if s.mail_count)


def _wait_dead_letters_or_retries(worker: WorkerProcess, needle: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in worker.log:
            return True
        time.sleep(0.2)
    return False


def test_server_without_starttls_gets_no_auth_and_no_message_and_nothing_is_lost(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: Callable[..., WorkerProcess],
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    plain = make_sink(tls="starttls", offer_starttls=False, auth=("apikey", api_key))
    env = relay_env(redis_url, plain, tls_material, api_key)
    producer_env(env)
    worker = workers(env)
    ids = {mailer.send(to="a@example.com", subject=f"no tls {i}", text="x") for i in range(5)}
    assert _wait_dead_letters_or_retries(worker, "STARTTLS", timeout=30), worker.log[-3000:]
    time.sleep(1)
    assert all(s.auth_attempts == 0 and s.authenticated_as is None for s in plain.sessions)
    assert plain.received == []
    assert api_key not in worker.log
    worker.stop()

    # Not lost: the same queue, drained by a worker pointed at a relay that does TLS.
    good = make_sink(tls="starttls", auth=("apikey", api_key))
    env = relay_env(redis_url, good, tls_material, api_key, MAILER_CIRCUIT_PROBE_INTERVAL=1)
    workers(env)
    assert good.wait_for(5, timeout=90), f"{len(good.received)} of 5 arrived"
    assert set(ids_at(good)) == ids


def test_wrong_key_names_535_without_the_key_and_loses_nothing(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: Callable[..., WorkerProcess],
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", api_key))
    wrong = "SG." + "w" * 22 + "." + "x" * 43
    env = relay_env(redis_url, sink, tls_material, wrong)
    producer_env(env)
    worker = workers(env)
    ids = {mailer.send(to="a@example.com", subject=f"key {i}", text="x") for i in range(10)}
    # Not "535" anywhere in the log: a hex id in any line may contain those digits.
    client = redis.Redis.from_url(redis_url)
    assert wait_until(lambda: client.get(keys.CIRCUIT) is not None, 30), worker.log[-3000:]
    assert _wait_dead_letters_or_retries(worker, "535", timeout=30), worker.log[-3000:]
    assert wrong not in worker.log and api_key not in worker.log
    state = client.get(keys.CIRCUIT)
    assert state is not None and b"535" in state and wrong.encode() not in state
    assert sink.received == []
    worker.stop()

    env = relay_env(redis_url, sink, tls_material, api_key)
    workers(env)
    assert sink.wait_for(10, timeout=90), f"{len(sink.received)} of 10 arrived"
    assert set(ids_at(sink)) == ids
    assert DeadLetters(redis.Redis.from_url(redis_url)).count() == 0


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"to": "not an address", "subject": "s", "text": "x"}, "to"),
        ({"to": "a@example.com", "subject": "bad\r\nBcc: x@evil.com", "text": "x"}, "subject"),
        (
            {"to": "a@example.com", "subject": "s", "text": "x", "headers": {"X-Tag": "a\nb"}},
            "headers",
        ),
    ],
)
def test_bad_input_is_refused_at_enqueue_naming_the_field_with_nothing_published(
    redis_url: str,
    producer_env: Callable[[dict[str, str]], None],
    fields: dict[str, object],
    field: str,
) -> None:
    producer_env({"MAILER_BROKER_URL": redis_url, "MAILER_DEFAULT_FROM": "s@example.com"})
    with pytest.raises(mailer.InvalidMessage) as info:
        mailer.send(**fields)  # type: ignore[arg-type]
    assert info.value.field.startswith(field)
    assert redis.Redis.from_url(redis_url).llen("mailer") == 0


def test_no_from_at_all_is_refused(
    redis_url: str, producer_env: Callable[[dict[str, str]], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAILER_DEFAULT_FROM", raising=False)
    producer_env({"MAILER_BROKER_URL": redis_url})
    with pytest.raises(mailer.InvalidMessage) as info:
        mailer.send(to="a@example.com", subject="s", text="x")
    assert info.value.field == "from_addr"
    assert redis.Redis.from_url(redis_url).llen("mailer") == 0

"""The producer's Redis fast path (`RedisPublisher`) against Celery's own `send_task`, on a real
Redis: the same broker messages and task-sent events, read back by a real kombu consumer, one
MULTI/EXEC per call, and the same retry and error contract when the broker is down."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Queue

from devkit.redis_server import RedisServer, free_port
from devkit.sink import TLSMaterial
from mailer.config import Settings
from mailer.errors import PublishError
from mailer.publish import PUBLISH_RETRY_POLICY, QUEUE, Publisher, celery_config
from tests.support.helpers import wait_until

BODY = "Subject: hi\r\n\r\nthe body, which no repr may show\r\n"
EMBED = ("callbacks", "errbacks", "chain", "chord")


def payload(n: int = 0) -> dict[str, Any]:
    return {
        "v": 1,
        "id": f"{n:032x}",
        "mail_from": "sender@example.com",
        "rcpt_to": [f"user{n}@example.com"],
        "data": BODY,
        "meta": {"subject": f"hello {n}", "to": [f"user{n}@example.com"], "created_at": 1.5},
    }


def publisher_for(url: str, retry_for: float = 10.0) -> Publisher:
    settings = dataclasses.replace(Settings(), broker_url=url, publish_retry_for=retry_for)
    return Publisher(settings)


def normalized(raw: bytes | str) -> str:
    """A broker message or event with its body decoded and the values that differ between any
    two publishes (ids, delivery tags, timestamps, the Lamport clock) replaced by their names;
    key order is kept, so equal results mean the same bytes apart from those values."""
    message = json.loads(raw)
    body = json.loads(base64.b64decode(message["body"]))
    message["body"] = body
    message["properties"]["delivery_tag"] = "<tag>"
    if "task" in message["headers"]:
        task_id = message["headers"]["id"]
        assert message["headers"]["root_id"] == message["properties"]["correlation_id"] == task_id
        message["headers"].update(id="<id>", root_id="<id>")
        message["properties"]["correlation_id"] = "<id>"
    else:
        assert body["root_id"] == body["uuid"]
        body.update(uuid="<id>", root_id="<id>", timestamp="<time>", clock="<clock>")
    return json.dumps(message)


class Captured:
    """Everything a publish leaves in Redis: the queue's list and what the event channel saw."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe("*")
        assert self.pubsub.get_message(timeout=10)["type"] == "psubscribe"
        self.events: list[tuple[bytes, bytes]] = []

    def messages(self) -> list[Any]:
        """Oldest first (LPUSH puts the newest at the head)."""
        return self.client.lrange(QUEUE, 0, -1)[::-1]

    def wait_events(self, n: int) -> list[tuple[bytes, bytes]]:
        def arrived() -> bool:
            message = self.pubsub.get_message(timeout=0.5)
            if message and message["type"] == "pmessage":
                self.events.append((message["channel"], message["data"]))
            return len(self.events) >= n

        assert wait_until(arrived, timeout=30, interval=0), f"{len(self.events)} of {n} events"
        return self.events[:n]

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


@pytest.fixture
def captured(redis_url: str) -> Iterator[Captured]:
    capture = Captured(redis_url)
    yield capture
    capture.close()


def publish_both_ways(publisher: Publisher, send: Any) -> None:
    """`send(publisher)` through the fast path, then the same through Celery's send_task (the
    same app, thread and process: hostnames, pid and reply_to are equal)."""
    fast = publisher.fast
    assert fast is not None
    send(publisher)
    publisher.fast = None
    try:
        send(publisher)
    finally:
        publisher.fast = fast


def test_send_writes_what_celery_writes(redis_url: str, captured: Captured) -> None:
    publisher = publisher_for(redis_url)
    publish_both_ways(publisher, lambda p: p.send(payload()))
    publisher.close()

    fast, celery = captured.messages()
    assert normalized(fast) == normalized(celery)
    headers = json.loads(fast)["headers"]
    assert headers["task"] == "mailer.send" and headers["eta"] is None
    assert json.loads(base64.b64decode(json.loads(fast)["body"]))[0] == [payload()]
    assert BODY not in headers["argsrepr"]

    (fast_topic, fast_event), (celery_topic, celery_event) = captured.wait_events(2)
    assert fast_topic == celery_topic == b"/0.celeryev/task.sent"
    assert normalized(fast_event) == normalized(celery_event)
    event = json.loads(base64.b64decode(json.loads(fast_event)["body"]))
    assert event["uuid"] == headers["id"] and event["type"] == "task-sent"
    assert BODY.encode() not in fast_event
    # One Lamport clock for both paths, as one Celery app has.
    celery_body = json.loads(base64.b64decode(json.loads(celery_event)["body"]))
    assert celery_body["clock"] == event["clock"] + 1


def test_send_batches_writes_what_celery_writes(redis_url: str, captured: Captured) -> None:
    batches = [[payload(1), payload(2)], [payload(3)], [payload(n) for n in range(4, 10)]]
    publisher = publisher_for(redis_url)
    publish_both_ways(publisher, lambda p: p.send_batches(batches))
    publisher.close()

    messages = captured.messages()
    assert [normalized(m) for m in messages[:3]] == [normalized(m) for m in messages[3:]]
    assert json.loads(messages[2])["headers"]["argsrepr"] == (
        f"{{'batch': 6, 'ids': {[payload(n)['id'] for n in range(4, 7)]!r} ...}}"
    )
    events = [normalized(data) for _, data in captured.wait_events(6)]
    assert events[:3] == events[3:]


def test_a_call_is_one_transaction_and_nothing_else(redis_url: str) -> None:
    publisher = publisher_for(redis_url)
    publisher.send(payload())  # connects and declares the queue (as Celery's first publish)
    monitor = redis.Redis.from_url(redis_url).monitor()
    with monitor:
        publisher.send_batches([[payload(1)], [payload(2)], [payload(3)]])
        commands: list[str] = []
        while not commands or commands[-1] != "EXEC":
            commands.append(monitor.next_command()["command"].split(" ", 1)[0])
    publisher.close()
    assert commands == ["MULTI", *["LPUSH", "PUBLISH"] * 3, "EXEC"]


def test_a_kombu_consumer_reads_it(redis_url: str) -> None:
    """Read back through the workers' own transport (workers/broker.py, its BLMOVE fetch)."""
    publisher = publisher_for(redis_url)
    publisher.send(payload(7))
    publisher.close()
    received: list[Any] = []
    options = celery_config(publisher.settings)["broker_transport_options"]
    transport = "workers.broker:Transport"
    with Connection(redis_url, transport=transport, transport_options=options) as conn:
        consumer = Consumer(conn, [Queue(QUEUE)], callbacks=[lambda body, m: received.append(m)])
        with consumer:
            conn.drain_events(timeout=10)
        message = received[0]
        assert message.content_type == "application/json"
        assert message.headers["task"] == "mailer.send"
        assert message.decode() == [[payload(7)], {}, dict.fromkeys(EMBED)]
        assert message.delivery_info["routing_key"] == QUEUE
        message.ack()
    assert redis.Redis.from_url(redis_url).llen(QUEUE) == 0


def test_a_countdown_waits_in_the_durable_schedule_not_as_an_eta(redis_url: str) -> None:
    from mailer.wire import SCHEDULE_DUE, SCHEDULE_ITEMS

    publisher = publisher_for(redis_url)
    sent = payload()
    publisher.send(sent, countdown=60)
    publisher.close()
    client = redis.Redis.from_url(redis_url)
    assert client.llen(QUEUE) == 0
    due = client.zscore(SCHEDULE_DUE, sent["id"])
    assert due is not None and 50 < due - time.time() <= 60
    queue, message = client.hget(SCHEDULE_ITEMS, sent["id"]).decode().split("\n", 1)
    assert queue == QUEUE and json.loads(message)["headers"]["eta"] is None


def test_threads_share_one_publisher(redis_url: str) -> None:
    """More threads than kombu's 10 pooled connections: they wait for one, none fails."""
    publisher = publisher_for(redis_url)
    errors: list[BaseException] = []

    def send(t: int) -> None:
        try:
            for i in range(20):
                publisher.send(payload(t * 100 + i))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    publisher.close()
    assert errors == []
    queued = redis.Redis.from_url(redis_url).lrange(QUEUE, 0, -1)
    ids = {json.loads(base64.b64decode(json.loads(m)["body"]))[0][0]["id"] for m in queued}
    assert len(queued) == len(ids) == 16 * 20


def test_close_releases_the_connections(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    before = len(client.client_list())
    publisher = publisher_for(redis_url)
    publisher.send(payload())
    assert len(client.client_list()) > before
    publisher.close()
    assert wait_until(lambda: len(client.client_list()) == before, timeout=10)


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same five retries, a few milliseconds apart rather than ~6 s in all: these tests are
    about the error once they are spent, not the backoff (`test_retries_until_the_broker_is_back`
    keeps the real one)."""
    for key, seconds in (("interval_start", 0.01), ("interval_step", 0.01), ("interval_max", 0.02)):
        monkeypatch.setitem(PUBLISH_RETRY_POLICY, key, seconds)


@pytest.mark.usefixtures("quick_retries")
def test_broker_down_raises_publish_error_without_the_password(own_server: RedisServer) -> None:
    password = "hunter2-" + "x" * 12
    redis.Redis(port=own_server.port).config_set("requirepass", password)
    url = f"redis://:{password}@127.0.0.1:{own_server.port}/0"
    publisher = publisher_for(url, retry_for=1.0)  # the same retries, a second in all
    publisher.send(payload(1))
    own_server.stop()
    with pytest.raises(PublishError) as info:
        publisher.send_batches([[payload(2)], [payload(3)]])
    text = str(info.value)
    assert password not in text and info.value.__cause__ is None
    assert f"redis://:***@127.0.0.1:{own_server.port}/0" in text
    assert "mailer.send_batch" in text and "within 1 s" in text
    own_server.start()  # no password now: the config was not saved
    queued = redis.Redis(port=own_server.port).lrange(QUEUE, 0, -1)
    assert [json.loads(m)["headers"]["task"] for m in queued] == ["mailer.send"]
    publisher.close()


@pytest.mark.usefixtures("quick_retries")
def test_never_connected_broker_raises_publish_error() -> None:
    url = f"redis://:s3cret-pass@127.0.0.1:{free_port()}/0"
    publisher = publisher_for(url, retry_for=1.0)
    with pytest.raises(PublishError, match=r"redis://:\*\*\*@127\.0\.0\.1") as info:
        publisher.send(payload())
    assert "s3cret-pass" not in str(info.value)
    publisher.close()


def test_retries_until_the_broker_is_back(own_server: RedisServer) -> None:
    publisher = publisher_for(own_server.url)
    publisher.send(payload(1))
    own_server.stop()
    # Back well inside the ~6 s the retry policy waits in all.
    restart = threading.Timer(0.5, own_server.start)
    restart.start()
    publisher.send(payload(2))
    restart.join()
    publisher.close()
    assert redis.Redis.from_url(own_server.url).llen(QUEUE) == 2


# ---- rediss:// (TLS, verified against the test CA) -----------------------------------------


@pytest.fixture
def tls_redis_url(tls_material: TLSMaterial) -> Iterator[str]:
    """A private redis-server that only speaks TLS and wants a password; the URL selects db 2."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed"
    port, workdir = free_port(), Path(tempfile.mkdtemp(prefix="mailer-redis-tls-"))
    args = [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
    args += ["--tls-cert-file", str(tls_material.cert_file)]
    args += ["--tls-key-file", str(tls_material.key_file)]
    args += ["--tls-ca-cert-file", str(tls_material.ca_file), "--tls-auth-clients", "no"]
    args += ["--requirepass", "tls-pass", "--save", "", "--dir", str(workdir)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = (
        f"rediss://:tls-pass@localhost:{port}/2"
        f"?ssl_cert_reqs=required&ssl_ca_certs={tls_material.ca_file}"
    )

    def up() -> bool:
        try:
            return bool(redis.Redis.from_url(url).ping())
        except redis.ConnectionError:
            return False

    try:
        assert wait_until(up, timeout=10, interval=0.05), "TLS redis-server did not start"
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def test_rediss_writes_what_celery_writes(tls_redis_url: str) -> None:
    publisher = publisher_for(tls_redis_url)
    publish_both_ways(publisher, lambda p: p.send(payload()))
    publisher.close()
    client = redis.Redis.from_url(tls_redis_url)
    assert client.connection_pool.connection_kwargs["db"] == 2
    celery, fast = client.lrange(QUEUE, 0, -1)
    assert normalized(fast) == normalized(celery)


def test_a_refused_transaction_raises_publish_error_and_the_pool_stays_usable(
    own_server: RedisServer,
) -> None:
    """Redis refusing the commands (here: the queue's key holds a string) is not a connection
    error: no retry, a PublishError naming Redis' reply, nothing queued, and the connection
    that carried it (replies possibly unread) never serves the next call half-read."""
    client = redis.Redis(port=own_server.port)
    publisher = publisher_for(own_server.url)
    publisher.send(payload(1))
    client.delete(QUEUE)
    client.set(QUEUE, "not a list")
    with pytest.raises(PublishError, match=r"refused mailer\.send_batch: WRONGTYPE") as info:
        publisher.send_batches([[payload(2)], [payload(3)]])
    assert "not queued" in str(info.value) and info.value.__cause__ is None
    assert client.get(QUEUE) == b"not a list"
    client.delete(QUEUE)
    # Out of memory: refused while queueing, so EXEC aborts and replies are left unread.
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    with pytest.raises(PublishError, match=r"refused mailer\.send: .*maxmemory"):
        publisher.send(payload(3))
    client.config_set("maxmemory", 0)
    for n in range(4, 8):
        publisher.send(payload(n))
    queued = client.lrange(QUEUE, 0, -1)
    ids = [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0]["id"] for m in queued]
    assert sorted(ids) == [f"{n:032x}" for n in range(4, 8)]
    publisher.close()


def test_a_forked_child_publishes_on_connections_of_its_own(redis_url: str) -> None:
    """The publisher keeps its idle connections itself (not in redis-py's pool, which checks
    the pid): a child forked after a send (gunicorn --preload, a prefork pool) must not write
    on the parent's socket, nor close it."""
    import os

    def local_ports() -> set[int]:
        assert publisher.fast is not None
        return {conn._sock.getsockname()[1] for conn in publisher.fast._idle if conn._sock}

    client = redis.Redis.from_url(redis_url)
    publisher = publisher_for(redis_url)
    publisher.send(payload(1))
    ours = local_ports()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: publish, then leave without running the parent's cleanup
        code = 0
        try:
            publisher.send(payload(2))
            os.write(write, json.dumps(sorted(local_ports())).encode())
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    childs = set(json.loads(os.read(read, 1000)))
    assert childs and not childs & ours  # its own connection, not the parent's socket
    publisher.send(payload(3))  # the parent's connection still works: the child left it alone
    assert local_ports() == ours
    queued = client.lrange(QUEUE, 0, -1)
    ids = sorted(json.loads(base64.b64decode(json.loads(m)["body"]))[0][0]["id"] for m in queued)
    assert ids == [f"{n:032x}" for n in (1, 2, 3)]
    publisher.close()

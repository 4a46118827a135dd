"""Redis over TLS, end to end: a real redis-server that only speaks TLS (test CA), a producer,
a worker and `mailer status` that verify its certificate and host name; a certificate they
cannot verify stops them with one line naming the URL; and the producer's first bytes on the
wire are a TLS ClientHello, never a command with the password in it."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import trustme

import mailer
from devkit.redis_server import RedisServer, ServerTLS
from devkit.sink import SinkServer, TLSMaterial
from devkit.worker import WorkerProcess
from mailer.errors import PublishError
from tests.support.helpers import ids_at, mailer_cli
from tests.support.relay import relay_env
from workers.state import keys

PASSWORD = "tls-redis-secret-pw"


@pytest.fixture(scope="module")
def tls_redis(tls_material: TLSMaterial) -> Iterator[RedisServer]:
    """TLS only (no plain port), a password, the sink's test CA signed its certificate."""
    tls = ServerTLS(tls_material.cert_file, tls_material.key_file, tls_material.ca_file)
    server = RedisServer(tls=tls, extra=["--requirepass", PASSWORD]).start()
    yield server
    server.close()


@pytest.fixture
def tls_url(tls_redis: RedisServer) -> str:
    client = redis.Redis(**tls_redis.client_kwargs(), password=PASSWORD)  # type: ignore[arg-type]
    client.flushall()
    client.close()
    return f"rediss://:{PASSWORD}@localhost:{tls_redis.port}/0"


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that signed nothing the server holds."""
    path = tmp_path_factory.mktemp("other-ca") / "ca.pem"
    trustme.CA(organization_name="some other CA").cert_pem.write_to_path(str(path))
    return path


def test_producer_worker_and_status_over_verified_tls(
    tls_url: str,
    tls_material: TLSMaterial,
    make_sink: Callable[..., SinkServer],
    api_key: str,
    producer_env: Callable[[dict[str, str]], None],
    workers: Callable[..., WorkerProcess],
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", api_key))
    env = relay_env(tls_url, sink, tls_material, api_key, MAILER_REDIS_CA_FILE=tls_material.ca_file)
    producer_env(env)
    worker = workers(env)
    ids = [mailer.send(to=f"u{i}@example.com", subject=f"tls {i}", text="b\n") for i in range(30)]
    ids += mailer.send_many(
        [mailer.Message(to=f"b{i}@example.com", subject="batch", text="b\n") for i in range(20)]
    )
    assert sink.wait_for(50, timeout=120), f"only {len(sink.received)} of 50 arrived"
    counts = ids_at(sink)
    assert set(counts) == set(ids) and max(counts.values()) == 1
    # The worker consumed with the loss-free fetch (its consumer heartbeats in Redis), not
    # kombu's stock transport: workers/broker.py over TLS.
    state = redis.Redis.from_url(tls_url, ssl_ca_certs=str(tls_material.ca_file))
    assert state.zcard(keys.FETCH_CONSUMERS) >= 1
    assert PASSWORD not in worker.log
    status = mailer_cli(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["broker"] == tls_url.replace(PASSWORD, "***")
    assert data["queue"]["waiting"] == 0 and data["dead_letters"] == 0
    assert PASSWORD not in status.stdout + status.stderr


@pytest.fixture(scope="module")
def misnamed_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, Path]]:
    """A TLS redis-server whose certificate (from a CA we trust) names another host."""
    directory = tmp_path_factory.mktemp("misnamed")
    ca = trustme.CA(organization_name="trusted CA")
    cert = ca.issue_cert("redis.elsewhere.example")
    paths = {name: directory / name for name in ("ca.pem", "server.pem", "server.key")}
    ca.cert_pem.write_to_path(str(paths["ca.pem"]))
    paths["server.pem"].write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(paths["server.key"]))
    tls = ServerTLS(paths["server.pem"], paths["server.key"], paths["ca.pem"])
    server = RedisServer(tls=tls, extra=["--requirepass", PASSWORD])
    server.start_unchecked()
    yield server, paths["ca.pem"]
    server.close()


@pytest.mark.parametrize("problem", ["another CA", "another host name"])
def test_a_certificate_that_fails_verification_stops_start_up_with_one_line(
    problem: str,
    tls_url: str,
    misnamed_redis: tuple[RedisServer, Path],
    tls_material: TLSMaterial,
    other_ca: Path,
    make_sink: Callable[..., SinkServer],
    api_key: str,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", api_key))
    if problem == "another CA":
        url, ca = tls_url, other_ca
    else:  # a CA we trust, but the certificate names another host than localhost
        server, ca = misnamed_redis
        url = f"rediss://:{PASSWORD}@localhost:{server.port}/0"
    env = relay_env(url, sink, tls_material, api_key, MAILER_REDIS_CA_FILE=ca)
    masked = url.replace(PASSWORD, "***")
    for command in (("worker",), ("status",), ("failures", "list")):
        done = mailer_cli(env, *command)
        # 2 for a configuration error (worker), 1 for Redis refusing an operator command
        assert done.returncode in (1, 2), (command, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, (command, done.stderr)
        assert "TLS certificate verification failed for" in lines[0] and masked in lines[0]
        assert PASSWORD not in done.stderr + done.stdout
    producer_env({**env, "MAILER_PUBLISH_RETRY_FOR": "30"})
    with pytest.raises(PublishError, match="TLS certificate verification failed") as info:
        mailer.send(to="x@example.com", subject="never", text="b\n")  # at once, not in 30 s
    assert masked in str(info.value) and PASSWORD not in str(info.value)


def test_the_producers_first_bytes_are_a_tls_client_hello(
    tls_material: TLSMaterial,
    make_sink: Callable[..., SinkServer],
    api_key: str,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    """A listener that is not Redis records what each connection sends first, then hangs up:
    every connection must open with a TLS handshake record carrying a ClientHello."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    captured: list[bytes] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    captured.append(conn.recv(4096))
                except OSError:
                    captured.append(b"")

    threading.Thread(target=accept, daemon=True).start()
    sink = make_sink(tls="starttls", auth=("apikey", api_key))
    url = f"rediss://mailer:{PASSWORD}@localhost:{port}/0"
    env = relay_env(url, sink, tls_material, api_key, MAILER_REDIS_CA_FILE=tls_material.ca_file)
    producer_env({**env, "MAILER_PUBLISH_RETRY_FOR": "1"})
    try:
        with pytest.raises(PublishError):
            mailer.send(to="x@example.com", subject="never", text="b\n")
    finally:
        listener.close()
    assert captured, "the producer never connected"
    for first in captured:
        # TLS record: content type 22 (handshake), version 3.x; handshake type 1 (ClientHello).
        assert first[:1] == b"\x16" and first[1:2] == b"\x03" and first[5:6] == b"\x01", first[:40]
        assert PASSWORD.encode() not in first
        assert b"HELLO" not in first and b"AUTH" not in first

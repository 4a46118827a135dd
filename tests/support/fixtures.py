"""Fixtures every test folder shares (loaded by tests/conftest.py as a plugin): a private
redis-server, the TLS SMTP sink, the relay environment and worker processes."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from devkit.redis_server import RedisServer
from devkit.sink import SinkServer, TLSMaterial, make_tls_material
from devkit.worker import WorkerProcess
from tests.support.relay import Relay, relay_env


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the session; tests use distinct db numbers or flush it."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A clean database on the private server (flushing is safe: the tests started it)."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    return make_tls_material(Path(tmp_path_factory.mktemp("tls")))


@pytest.fixture
def api_key() -> str:
    """A fresh, realistic-looking key per test, so a leak check can search for it."""
    return "SG." + secrets.token_urlsafe(16)[:22] + "." + secrets.token_urlsafe(32)[:43]


@pytest.fixture
def make_sink(tls_material: TLSMaterial) -> Iterator[Callable[..., SinkServer]]:
    started: list[SinkServer] = []

    def make(**kwargs: object) -> SinkServer:
        kwargs.setdefault("tls_material", tls_material)
        server = SinkServer(**kwargs).start()  # type: ignore[arg-type]
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def relay(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    producer_env: Callable[[dict[str, str]], None],
) -> Callable[..., Relay]:
    """The set-up every end-to-end test starts with: a sink (STARTTLS and AUTH with the test's
    key unless `sink` says otherwise), the env for it (`env` extras), applied to the producer."""

    def make(sink: Mapping[str, object] | None = None, **env: object) -> Relay:
        server = make_sink(**{"tls": "starttls", "auth": ("apikey", api_key), **(sink or {})})
        settings = relay_env(redis_url, server, tls_material, api_key, **env)
        producer_env(settings)
        return Relay(server, settings)

    return make


@pytest.fixture
def workers() -> Iterator[Callable[..., WorkerProcess]]:
    """Starts `python -m mailer worker` processes; stops (or kills) them at the end."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str], name: str = "w1", args: tuple[str, ...] = ()) -> WorkerProcess:
        worker = WorkerProcess(env, name=f"{name}-{len(started)}", args=args).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=20)


@pytest.fixture
def producer_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, str]], None]:
    """Points the in-test producer (`mailer.send`) at the test's broker."""
    import mailer

    def apply(env: dict[str, str]) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        mailer.reset_default_mailer()

    yield apply  # type: ignore[misc]
    mailer.reset_default_mailer()


#: The PostgreSQL server tests use (the machine's own; each test makes a database of its own).
POSTGRES_ADMIN = os.environ.get(
    "MAILER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    """A fresh database on the local PostgreSQL, dropped afterwards."""
    import psycopg

    name = "mailer_test_" + secrets.token_hex(6)
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base, _, _ = POSTGRES_ADMIN.rpartition("/")
    yield f"{base}/{name}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

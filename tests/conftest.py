from __future__ import annotations

from collections.abc import Iterator

import pytest

from workers.devredis import RedisServer


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


# ---- SMTP test server, relay environment, worker processes ---------------------------------

import secrets  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

from workers.devworker import WorkerProcess  # noqa: E402
from workers.sink import SinkServer, TLSMaterial, make_tls_material  # noqa: E402

API_KEY = "SG." + "k" * 22 + "." + "s" * 43


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


def relay_env(
    redis_url: str, sink: SinkServer, tls_material: TLSMaterial, key: str, **extra: object
) -> dict[str, str]:
    """The environment a worker and a producer get in a test: everything real, nothing default."""
    env = {
        "MAILER_BROKER_URL": redis_url,
        "MAILER_SMTP_HOST": "localhost",
        "MAILER_SMTP_PORT": str(sink.port),
        "MAILER_SMTP_TLS": sink.tls,
        "MAILER_SMTP_CA_FILE": str(tls_material.ca_file),
        "MAILER_SMTP_PASSWORD": key,
        "MAILER_DEFAULT_FROM": "Sender <sender@example.com>",
        "MAILER_SMTP_TIMEOUT": "10",
        "MAILER_DATA_TIMEOUT": "10",
        "MAILER_LEASE_TTL": "10",
    }
    if sink.tls == "none":
        env["MAILER_SMTP_ALLOW_INSECURE"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Relay(NamedTuple):
    """A test's relay: the recording SMTP server and the env its workers and producer use."""

    sink: SinkServer
    env: dict[str, str]


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

"""An ACL user with exactly the rule README "Production Redis" documents (its lines applied
verbatim, over TLS): the end-to-end path works (producer, worker, a dead letter, `mailer status`
and `mailer failures`); a user missing one of the commands fails with an error naming it."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

import mailer
from devkit.redis_server import RedisServer, ServerTLS, User
from devkit.sink import FaultPlan, SinkServer, TLSMaterial
from devkit.worker import WorkerProcess
from mailer.errors import PublishError
from tests.support.helpers import ids_at, mailer_cli, wait_until
from tests.support.relay import relay_env

README = Path(__file__).resolve().parents[2] / "README.md"
PASSWORD = "acl-user-secret-pw"


def documented_rule() -> list[str]:
    """The `ACL SETUSER mailer ...` lines of README's ACL block, as written."""
    text = README.read_text()
    block = text.split("<!-- acl-rule:", 1)[1].split("```", 2)[1]
    lines = [line.strip() for line in block.strip().splitlines() if line.strip()]
    assert lines and all(line.startswith("ACL SETUSER mailer ") for line in lines), lines
    return lines


def apply(admin: redis.Redis, lines: list[str], drop: str | None = None) -> None:
    for line in lines:
        words = line.replace(">CHANGE-ME", f">{PASSWORD}").split()
        if drop is not None:
            words = [w for w in words if w != drop]
        admin.execute_command(*words)


@pytest.fixture(scope="module")
def acl_redis(tls_material: TLSMaterial) -> Iterator[RedisServer]:
    tls = ServerTLS(tls_material.cert_file, tls_material.key_file, tls_material.ca_file)
    server = RedisServer(tls=tls, users=[User("mailer", PASSWORD, "")]).start()
    yield server
    server.close()


@pytest.fixture
def admin(acl_redis: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(**acl_redis.client_kwargs())  # type: ignore[arg-type]
    client.flushall()
    yield client
    client.close()


def test_the_documented_rule_runs_the_end_to_end_path(
    acl_redis: RedisServer,
    admin: redis.Redis,
    tls_material: TLSMaterial,
    make_sink: Callable[..., SinkServer],
    api_key: str,
    producer_env: Callable[[dict[str, str]], None],
    workers: Callable[..., WorkerProcess],
) -> None:
    apply(admin, documented_rule())
    sink = make_sink(
        tls="starttls",
        auth=("apikey", api_key),
        faults=FaultPlan(reject_rcpt={"refused@example.com"}),
    )
    url = f"rediss://mailer:{PASSWORD}@localhost:{acl_redis.port}/0"
    env = relay_env(url, sink, tls_material, api_key, MAILER_REDIS_CA_FILE=tls_material.ca_file)
    producer_env(env)
    worker = workers(env)
    ids = [mailer.send(to=f"u{i}@example.com", subject=f"acl {i}", text="b\n") for i in range(20)]
    ids += mailer.send_many(
        [mailer.Message(to=f"b{i}@example.com", subject="batch", text="b\n") for i in range(10)]
    )
    refused = mailer.send(to="refused@example.com", subject="refused", text="b\n")
    # The durable schedule: one released when due (by the workers, as this user), one cancelled.
    ids.append(
        mailer.send(to="later@example.com", subject="later", text="b\n", send_at=time.time() + 2)
    )
    dropped = mailer.send(
        to="never@example.com", subject="never", text="b\n", send_at=time.time() + 3600
    )
    cancelled = mailer_cli(env, "cancel", dropped)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert sink.wait_for(31, timeout=120), f"only {len(sink.received)} of 31 arrived"
    counts = ids_at(sink)
    assert set(counts) == set(ids) and max(counts.values()) == 1
    assert wait_until(lambda: admin.zcard("mailer:dead:index") == 1, timeout=60), worker.log[-3000:]

    status = mailer_cli(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["dead_letters"] == 1
    listed = mailer_cli(env, "failures", "list")
    assert listed.returncode == 0 and refused in listed.stdout, listed.stderr
    shown = mailer_cli(env, "failures", "show", refused)
    assert shown.returncode == 0, shown.stderr
    assert "NOPERM" not in worker.log and "no permissions" not in worker.log
    assert PASSWORD not in worker.log + status.stdout + listed.stdout


@pytest.mark.parametrize(
    ("command", "who"), [("+lpush", "producer"), ("+blmove", "worker"), ("+info", "status")]
)
def test_a_user_without_one_command_fails_with_an_error_naming_it(
    command: str,
    who: str,
    acl_redis: RedisServer,
    admin: redis.Redis,
    tls_material: TLSMaterial,
    make_sink: Callable[..., SinkServer],
    api_key: str,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    apply(admin, documented_rule(), drop=command)
    sink = make_sink(tls="starttls", auth=("apikey", api_key))
    url = f"rediss://mailer:{PASSWORD}@localhost:{acl_redis.port}/0"
    env = relay_env(url, sink, tls_material, api_key, MAILER_REDIS_CA_FILE=tls_material.ca_file)
    name = command[1:]
    said = re.compile(rf"no permissions to run the '{name}' command", re.I)
    if who == "producer":
        producer_env(env)
        with pytest.raises(PublishError) as info:
            mailer.send(to="x@example.com", subject="never", text="b\n")
        assert said.search(str(info.value)), info.value
        assert admin.llen("mailer") == 0
        return
    done = mailer_cli(env, *(["worker"] if who == "worker" else ["status"]))
    assert done.returncode in (1, 2), done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and said.search(lines[0]), done.stderr[-2000:]
    assert "(README, Production Redis: the ACL rule)" in lines[0]
    assert PASSWORD not in done.stderr

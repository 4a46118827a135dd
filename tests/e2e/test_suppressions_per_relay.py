"""Suppressions per relay end to end: two tenants (named relays, each on its own sink with its
own key, applied with `mailer relays apply`), a real `mailer webhook` process and a real worker.
A bounce posted to tenant A's webhook URL (signed with A's own subuser key) suppresses the
address for A only: A's next message to it is not sent, B's and the default relay's are."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

import mailer
from devkit.sink import SinkServer, TLSMaterial
from devkit.worker import WorkerProcess
from tests.support.helpers import fate, ids_at, mailer_cli, wait_until
from tests.support.relay import relay_env
from tests.support.webhook import Signer, WebhookServer, event, post
from workers.state import keys
from workers.state.suppressions import FRESH, Suppressions


def key(tag: str) -> str:
    return "SG." + (tag * 22)[:22] + "." + (tag * 43)[:43]


def relay_table(name: str, sink: SinkServer, tls: TLSMaterial) -> str:
    return (
        f"[relays.{name}]\n"
        'host = "localhost"\n'
        f"port = {sink.port}\n"
        f'ca_file = "{tls.ca_file}"\n'
        f'password_env = "{name.upper().replace("-", "_")}_KEY"\n'
    )


@pytest.fixture
def servers() -> Iterator[list[WebhookServer]]:
    started: list[WebhookServer] = []
    yield started
    for server in started:
        server.stop()


def test_a_bounce_for_tenant_a_suppresses_for_a_only(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    workers: Callable[..., WorkerProcess],
    producer_env: Callable[[dict[str, str]], None],
    servers: list[WebhookServer],
    tmp_path: Path,
) -> None:
    sinks = {
        name: make_sink(tls="starttls", auth=("apikey", key(tag)))
        for name, tag in (("default", "d"), ("tenant-a", "a"), ("tenant-b", "b"))
    }
    env = relay_env(redis_url, sinks["default"], tls_material, key("d"))
    env.update({"TENANT_A_KEY": key("a"), "TENANT_B_KEY": key("b")})
    producer_env(env)
    (tmp_path / "relays.toml").write_text(
        relay_table("tenant-a", sinks["tenant-a"], tls_material)
        + relay_table("tenant-b", sinks["tenant-b"], tls_material)
    )
    applied = mailer_cli(env, "relays", "apply", str(tmp_path / "relays.toml"))
    assert applied.returncode == 0, applied.stderr
    started = [workers(env)]

    fleet, tenant_a = Signer(), Signer()  # tenant A's subuser signs with a key of its own
    keys_dir = tmp_path / "webhook-keys"
    keys_dir.mkdir()
    (keys_dir / "tenant-a").write_text(tenant_a.public + "\n")
    server = WebhookServer(
        {
            "MAILER_BROKER_URL": redis_url,
            "MAILER_SENDGRID_WEBHOOK_KEY": fleet.public,
            "MAILER_SENDGRID_WEBHOOK_KEYS_DIR": str(keys_dir),
        }
    ).start()
    servers.append(server)

    first = mailer.send(to="bob@example.com", subject="a1", text="hi\n", relay="tenant-a")
    assert sinks["tenant-a"].wait_for(1, timeout=60), fate({first}, redis_url, started)

    bounce = [event("bounce", "Bob@Example.com", mailer_id=first)]
    body = json.dumps(bounce).encode()
    # Refused, nothing stored: a name that cannot be a relay's, and A's URL with the fleet key.
    assert post(server.url + "/Tenant_A", body, tenant_a.headers(body)) == 400
    assert post(server.url + "/tenant-a", body, fleet.headers(body)) == 403
    client = redis.Redis.from_url(redis_url)
    assert client.llen(keys.EVENT_INBOX) == 0
    assert post(server.url + "/tenant-a", body, tenant_a.headers(body)) == 200
    assert wait_until(lambda: mailer.status(first).state == "bounced", timeout=30)
    assert Suppressions(client, "tenant-a").get("bob@example.com") is not None
    assert Suppressions(client, "tenant-b").get("bob@example.com") is None
    assert Suppressions(client).get("bob@example.com") is None
    # A worker notices a list that did not exist within FRESH seconds.
    time.sleep(FRESH + 0.5)

    again = mailer.send(to="bob@example.com", subject="a2", text="hi\n", relay="tenant-a")
    other = mailer.send(to="bob@example.com", subject="b1", text="hi\n", relay="tenant-b")
    fleetwide = mailer.send(to="bob@example.com", subject="d1", text="hi\n")
    assert wait_until(lambda: mailer.status(again).state == "suppressed", timeout=60)
    assert "bob@example.com: bounce" in mailer.status(again).reason
    assert sinks["tenant-b"].wait_for(1, timeout=60), fate({other}, redis_url, started)
    assert sinks["default"].wait_for(1, timeout=60), fate({fleetwide}, redis_url, started)
    assert ids_at(sinks["tenant-b"]) == {other: 1}
    assert ids_at(sinks["default"]) == {fleetwide: 1}
    assert ids_at(sinks["tenant-a"]) == {first: 1}
    assert [r.rcpt_tos for r in sinks["tenant-b"].received] == [("bob@example.com",)]

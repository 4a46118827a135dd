"""Several relays through real worker processes (issue 20): each relay on its own sink with its
own key, applied with `mailer relays apply`; a revoked key stops that relay alone; failover to a
fallback while the primary refuses connections, and back; a thousand tenants configured, a few
active, cost only the active ones."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

import mailer
from devkit.sink import SinkServer, TLSMaterial
from devkit.worker import WorkerProcess
from tests.support.helpers import fate, ids_at, mailer_cli, wait_until
from tests.support.relay import relay_env
from workers.state import keys
from workers.state.deadletters import DeadLetters

pytestmark = pytest.mark.slow


def key(tag: str) -> str:
    """A key that looks like SendGrid's, distinct per relay."""
    return "SG." + (tag * 22)[:22] + "." + (tag * 43)[:43]


def relay_table(name: str, sink: SinkServer, tls: TLSMaterial, **extra: object) -> str:
    lines = [
        f"[relays.{name}]",
        'host = "localhost"',
        f"port = {sink.port}",
        f'ca_file = "{tls.ca_file}"',
        f'password_env = "{name.upper().replace("-", "_")}_KEY"',
    ]
    for field, value in extra.items():
        lines.append(f"{field} = {value!r}".replace("'", '"'))
    return "\n".join(lines) + "\n"


def apply(env: dict[str, str], path: Path, text: str) -> None:
    path.write_text(text)
    done = mailer_cli(env, "relays", "apply", str(path))
    assert done.returncode == 0, done.stderr


def send(relay: str, n: int, tag: str, lane: str | None = None) -> list[str]:
    extra = {"lane": lane} if lane else {}
    return [
        mailer.send(to=f"r{i}@example.com", subject=f"{tag} {i}", text="x", relay=relay, **extra)
        for i in range(n)
    ]


def test_a_revoked_key_stops_its_relay_alone_and_nothing_is_lost_or_doubled(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    workers: Callable[..., WorkerProcess],
    producer_env: Callable[[dict[str, str]], None],
    tmp_path: Path,
) -> None:
    sinks = {
        name: make_sink(tls="starttls", auth=("apikey", key(name[-1])))
        for name in ("t1", "t2", "t3")
    }
    env = relay_env(redis_url, sinks["t1"], tls_material, key("1"))
    env.update({f"{name.upper()}_KEY": key(name[-1]) for name in sinks})
    env["MAILER_CIRCUIT_PROBE_INTERVAL"] = "2"
    producer_env(env)
    apply(
        env,
        tmp_path / "relays.toml",
        "".join(relay_table(n, s, tls_material) for n, s in sinks.items()),
    )
    started = [workers(env, name="a"), workers(env, name="b")]

    first = {name: send(name, 20, "first") for name in sinks}
    for name, sink in sinks.items():
        assert sink.wait_for(20, timeout=90), fate(
            set(first[name]) - set(ids_at(sink)), redis_url, started
        )

    # Revoke t2's key: new logins fail; the sessions it had are cut (nothing is in flight).
    sinks["t2"].auth = ("apikey", key("x"))
    sinks["t2"].refuse_connections()
    sinks["t2"].accept_connections()
    second = {name: send(name, 40, "second") for name in sinks}
    for name in ("t1", "t3"):
        arrived = lambda name=name: set(second[name]) <= set(ids_at(sinks[name]))  # noqa: E731
        assert wait_until(arrived, 90), fate(
            set(second[name]) - set(ids_at(sinks[name])), redis_url, started
        )
    client = redis.Redis.from_url(redis_url)
    assert wait_until(lambda: client.get(keys.for_relay("t2", keys.CIRCUIT)) is not None, 30)
    assert client.get(keys.CIRCUIT) is None
    assert client.get(keys.for_relay("t1", keys.CIRCUIT)) is None
    assert client.get(keys.for_relay("t3", keys.CIRCUIT)) is None
    assert not set(second["t2"]) & set(ids_at(sinks["t2"]))
    # At most one failed login per worker process and probe interval, measured at the relay.
    assert DeadLetters(client).count() == 0

    sinks["t2"].auth = ("apikey", key("2"))  # restored: the next probe closes t2's circuit
    assert wait_until(lambda: set(second["t2"]) <= set(ids_at(sinks["t2"])), 120), fate(
        set(second["t2"]) - set(ids_at(sinks["t2"])), redis_url, started
    )
    for name, sink in sinks.items():
        counts = ids_at(sink)
        assert all(counts[i] == 1 for i in first[name] + second[name]), name
        others = [ids_at(s) for n, s in sinks.items() if n != name]
        assert not any(i in other for other in others for i in first[name] + second[name])
    assert DeadLetters(client).count() == 0
    assert wait_until(lambda: client.get(keys.for_relay("t2", keys.CIRCUIT)) is None, 30)


def test_failover_to_the_fallback_while_the_primary_is_down_and_back(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    workers: Callable[..., WorkerProcess],
    producer_env: Callable[[dict[str, str]], None],
    tmp_path: Path,
) -> None:
    primary = make_sink(tls="starttls", auth=("apikey", key("p")))
    backup = make_sink(tls="starttls", auth=("apikey", key("b")))
    env = relay_env(redis_url, primary, tls_material, key("p"))
    env.update(
        {
            "PRIMARY_KEY": key("p"),
            "BACKUP_KEY": key("b"),
            "MAILER_LANES": "transactional:20%,bulk",
            "MAILER_CIRCUIT_PROBE_INTERVAL": "2",
        }
    )
    producer_env(env)
    text = relay_table(
        "primary",
        primary,
        tls_material,
        fallback="backup",
        fallback_lanes=["transactional"],
        failover_after=2,
    ) + relay_table("backup", backup, tls_material)
    apply(env, tmp_path / "relays.toml", text)
    started = [workers(env, name="a"), workers(env, name="b")]

    before = send("primary", 20, "before", "transactional")
    assert wait_until(lambda: set(before) <= set(ids_at(primary)), 90)

    primary.refuse_connections()
    down: list[str] = []
    bulk = send("primary", 10, "bulk", "bulk")  # not a fallback lane: waits for the primary
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(set(down) & set(ids_at(backup))) < 20:
        down += send("primary", 5, "down", "transactional")
        time.sleep(0.5)
    assert len(set(down) & set(ids_at(backup))) >= 20, fate(
        set(down) - set(ids_at(backup)), redis_url, started
    )
    assert not set(bulk) & set(ids_at(backup))

    primary.accept_connections()
    back: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(set(back) & set(ids_at(primary))) < 10:
        back += send("primary", 5, "back", "transactional")
        time.sleep(0.5)
    assert len(set(back) & set(ids_at(primary))) >= 10, "traffic did not return to the primary"

    everything = before + down + bulk + back
    client = redis.Redis.from_url(redis_url)
    held = {
        letter.id for letter in DeadLetters(client).list(limit=1000) if letter.kind == "uncertain"
    }

    def settled() -> bool:
        seen = ids_at(primary) + ids_at(backup)
        return all(seen[i] == 1 or i in held for i in everything)

    assert wait_until(settled, 120), fate(
        [i for i in everything if i not in ids_at(primary) + ids_at(backup)], redis_url, started
    )
    together = ids_at(primary) + ids_at(backup)
    assert all(together[i] <= 1 for i in everything), "a message went through both relays"
    assert set(bulk) <= set(ids_at(primary))


def test_a_thousand_tenants_configured_cost_only_the_active_ones(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    workers: Callable[..., WorkerProcess],
    producer_env: Callable[[dict[str, str]], None],
    tmp_path: Path,
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", key("t")))
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    lines = [
        "[defaults]",
        'host = "localhost"',
        f"port = {sink.port}",
        f'ca_file = "{tls_material.ca_file}"',
        "max_connections = 4",
    ]
    for n in range(1000):
        (secrets / f"tenant-{n}").write_text(key("t"))
        lines.append(f"[relays.tenant-{n}]")
    env = relay_env(redis_url, sink, tls_material, key("t"))
    env["MAILER_RELAY_SECRETS_DIR"] = str(secrets)
    producer_env(env)
    apply(env, tmp_path / "relays.toml", "\n".join(lines) + "\n")
    started = [workers(env, name="a"), workers(env, name="b")]

    active = [f"tenant-{n}" for n in range(0, 1000, 100)]
    ids = [i for name in active for i in send(name, 10, name)]
    assert wait_until(lambda: set(ids) <= set(ids_at(sink)), 120), fate(
        set(ids) - set(ids_at(sink)), redis_url, started
    )
    assert all(count == 1 for count in Counter(ids_at(sink)).values())

    client = redis.Redis.from_url(redis_url)
    scoped = {k.decode().split(":")[2] for k in client.scan_iter(f"{keys.RELAY_PREFIX}*")}
    leased = {
        k.decode().split(":")[3] for k in client.scan_iter(f"{keys.LEASE_PREFIX}relay:*:holders")
    }
    assert scoped <= set(active) and leased <= set(active), (scoped, leased)
    assert leased, "no relay lease at all: the check above would prove nothing"

    shown = mailer_cli(env, "status")
    assert shown.returncode == 0, shown.stderr
    assert len(shown.stdout.splitlines()) < 80
    assert "relays        1001 known" in shown.stdout, shown.stdout
    everything = mailer_cli(env, "status", "--relays", "all")
    assert all(f"tenant-{n}" in everything.stdout for n in (1, 999))


def test_a_relay_of_another_profile_gets_its_own_headers_not_x_smtpapi(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    workers: Callable[..., WorkerProcess],
    producer_env: Callable[[dict[str, str]], None],
    tmp_path: Path,
) -> None:
    """An SES-profile relay: categories and unique args become X-SES-MESSAGE-TAGS, the
    configuration set its header, X-SMTPAPI is gone; the status record says what changed.
    A message only SendGrid can send is refused at enqueue for it."""
    ses = make_sink(tls="starttls", auth=("apikey", key("s")))
    env = relay_env(redis_url, ses, tls_material, key("s"))
    env["SES_KEY"] = key("s")
    producer_env(env)
    text = relay_table("ses", ses, tls_material, profile="ses", configuration_set="mail")
    apply(env, tmp_path / "relays.toml", text)
    started = [workers(env)]
    mid = mailer.send(
        to="a@example.com",
        subject="invoice",
        text="x",
        relay="ses",
        smtpapi={"category": ["invoices"], "unique_args": {"order": "42"}},
    )
    with pytest.raises(mailer.InvalidMessage) as info:
        mailer.send(
            to="a@example.com",
            subject="-n-",
            text="-n-",
            relay="ses",
            smtpapi={"sub": {"-n-": ["x"]}},
        )
    assert info.value.field == "relay" and "profile ses" in str(info.value)
    assert wait_until(lambda: mid in ids_at(ses), 60), fate([mid], redis_url, started)
    [received] = [r for r in ses.received if r.message_id and r.message_id.startswith(mid)]
    head = received.data.split(b"\r\n\r\n", 1)[0].decode()
    assert "X-SMTPAPI" not in head
    assert "X-SES-CONFIGURATION-SET: mail" in head
    assert "category=invoices" in head and "order=42" in head
    assert wait_until(lambda: mailer.status(mid).state == "sent", 30)
    assert "ses" in mailer.status(mid).reason, mailer.status(mid)  # the profile's note

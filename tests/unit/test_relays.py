"""Named relays (mailer/relays.py): the TOML file and each of its errors, the secret-less spec
in Redis, the registry's apply/replace/remove on a real Redis, the producer's refusal of an
unknown relay (real publishes), and the worker's table: reloads, secrets, rotations."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from devkit.redis_server import free_port
from mailer.client import Mailer
from mailer.config import Lane, Secret, Settings
from mailer.errors import ConfigError, InvalidMessage, PublishError
from mailer.relays import (
    RelayDirectory,
    RelayError,
    RelaySpec,
    RelayStore,
    RelayTable,
    check_fallback,
    default_relay,
    load_file,
)
from mailer.wire import RELAYS, RELAYS_VERSION
from workers.state import keys

FLEET = ["transactional", "default", "bulk"]

EXAMPLE = """
[defaults]
max_connections = 20
rate_limit = "100/s"

[relays.tenant-42]
host = "smtp.sendgrid.net"
password_env = "TENANT_42_KEY"

[relays.ses]
host = "email-smtp.eu-west-1.amazonaws.com"
port = 465
username = "AKIAEXAMPLE"
password_file = "/run/secrets/ses"
profile = "ses"
configuration_set = "transactional"
lanes = "transactional:30%"
rate_limit = ["14/s", "50000/d"]

[relays.backup]
host = "smtp.postmarkapp.com"
port = 2525
fallback = "ses"
fallback_lanes = ["transactional"]
failover_after = 10
max_connections = 5
"""


def write(tmp_path: Path, text: str, name: str = "relays.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def one(fields: dict[str, Any], name: str = "t1", fleet: list[str] | None = FLEET) -> RelaySpec:
    return RelaySpec.from_mapping(name, {"host": "smtp.example.com", **fields}, fleet)


def everything(url: str) -> bytes:
    """Every key and value of the Redis database, for a leak check."""
    client = redis.Redis.from_url(url)
    found = []
    for key in client.keys("*"):
        kind = client.type(key)
        if kind == b"hash":
            found += [k + b"=" + v for k, v in client.hgetall(key).items()]
        else:
            assert kind == b"string", kind
            found.append(client.get(key) or b"")
        found.append(key)
    client.close()
    return b"\n".join(found)


def store_for(url: str) -> RelayStore:
    return RelayStore(redis.Redis.from_url(url))


# -- the file --------------------------------------------------------------------------------


def test_a_file_with_defaults_and_three_relays(tmp_path: Path) -> None:
    specs = {s.name: s for s in load_file(write(tmp_path, EXAMPLE), FLEET)}
    assert list(specs) == ["tenant-42", "ses", "backup"]
    tenant = specs["tenant-42"]
    # [defaults] applies to every relay; a relay's own table wins.
    assert (tenant.max_connections, tenant.rate_limit) == (20, "100/s")
    assert (specs["backup"].max_connections, specs["ses"].rate_limit) == (5, "14/s,50000/d")
    # TLS by port, the profile by host, the username defaults to SendGrid's.
    assert (tenant.port, tenant.tls, tenant.profile, tenant.username) == (
        587,
        "starttls",
        "sendgrid",
        "apikey",
    )
    assert (specs["ses"].tls, specs["ses"].profile) == ("tls", "ses")
    assert (specs["backup"].tls, specs["backup"].profile) == ("starttls", "smtp")
    assert specs["backup"].fallback_lanes == ("transactional",)
    assert specs["backup"].failover_after == 10.0
    for spec in specs.values():
        assert RelaySpec.from_json(spec.name, spec.to_json()) == spec  # what Redis stores


BAD_RELAYS = [
    ({"password": "SG.the-key-itself"}, "password", "password_env"),
    ({"api_key": "SG.the-key-itself"}, "api_key", "password_file"),
    ({"hots": "x"}, "hots", "unknown key"),
    ({"host": None}, "host", "missing"),
    ({"host": "smtp example.com"}, "host", "not a host name"),
    ({"port": 70000}, "port", "between 1 and 65535"),
    ({"port": "587"}, "port", "whole number"),
    ({"tls": "ssl"}, "tls", "starttls, tls or none"),
    ({"port": 465, "tls": "starttls"}, "tls", "implicit TLS"),
    ({"tls": "none"}, "tls", "allow_insecure"),
    ({"auth": False}, "auth", "allow_insecure"),
    ({"auth": "no"}, "auth", "true or false"),
    ({"password_env": "SG.abc"}, "password_env", "environment variable"),
    ({"password_file": "secrets/key"}, "password_file", "absolute path"),
    ({"password_env": "K", "password_file": "/k"}, "password_file", "not both"),
    ({"username": ""}, "username", "non-empty"),
    ({"max_connections": 0}, "max_connections", "between 1"),
    ({"max_messages_per_connection": 1.5}, "max_messages_per_connection", "whole number"),
    ({"rate_limit": "fast"}, "rate_limit", "not a rate"),
    ({"rate_limit": 5}, "rate_limit", "expected a string"),
    ({"lanes": "Transactional!"}, "lanes", "not a lane"),
    ({"lanes": "urgent:10%"}, "lanes", "not one of the fleet's lanes"),
    ({"lanes": "transactional:60%,bulk:50%"}, "lanes", "less than 100%"),
    ({"fallback": "t1", "fallback_lanes": ["bulk"]}, "fallback", "its own fallback"),
    ({"fallback": "Other", "fallback_lanes": ["bulk"]}, "fallback", "not a relay name"),
    ({"fallback": "other"}, "fallback_lanes", "name the lanes"),
    ({"fallback_lanes": ["bulk"]}, "fallback_lanes", "needs a fallback"),
    ({"fallback": "o", "fallback_lanes": ["urgent"]}, "fallback_lanes", "fleet's lanes"),
    ({"fallback": "o", "fallback_lanes": "bulk", "failover_after": 0}, "failover_after", "between"),
    ({"profile": "mailgun"}, "profile", "not one of"),
    ({"configuration_set": "cs"}, "configuration_set", "only for profile 'ses'"),
]


@pytest.mark.parametrize(("fields", "field", "problem"), BAD_RELAYS)
def test_each_error_names_the_relay_and_the_field(
    tmp_path: Path, fields: dict[str, Any], field: str, problem: str
) -> None:
    table = {"host": "smtp.example.com", **fields}
    lines = [f"{key} = {json.dumps(value)}" for key, value in table.items() if value is not None]
    path = write(tmp_path, "[relays.t1]\n" + "\n".join(lines) + "\n")
    with pytest.raises(RelayError) as info:
        load_file(path, FLEET)
    assert (info.value.relay, info.value.field) == ("t1", field)
    assert str(info.value).startswith(f"[relays.t1] {field}: ")
    assert problem in str(info.value)
    assert "the-key-itself" not in str(info.value)  # a refused key is never echoed
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[defaults]\npassword = "SG.k"\n[relays.a]\nhost = "h"\n', "[defaults] password: "),
        ('[defaults]\nhots = "h"\n', "[defaults] hots: unknown key"),
        ('[relays.default]\nhost = "h"\n', "[relays.default]: 'default' is the workers'"),
        ('[relays.Tenant]\nhost = "h"\n', "[relays.Tenant]: not a relay name"),
        ('[relay.a]\nhost = "h"\n', "unknown table [relay]"),
        ('relays = "a"\n', "relays are tables"),
        ('[relays.a]\nhost = "h\n', "not TOML"),
    ],
)
def test_file_level_errors(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(write(tmp_path, text), FLEET)
    assert expected in str(info.value)


def test_lanes_are_checked_against_the_fleet_only_when_it_is_known() -> None:
    spec = RelaySpec.from_mapping("t1", {"host": "h", "lanes": "urgent:10%"})
    assert spec.lanes == "urgent:10%"  # Redis's entry: the worker checks it against its lanes


# -- the registry in Redis -------------------------------------------------------------------


def test_the_key_names_live_in_the_wire_and_keys_reexports_them() -> None:
    assert (keys.RELAYS, keys.RELAYS_VERSION) == (RELAYS, RELAYS_VERSION)


def test_apply_replace_and_remove(redis_url: str, tmp_path: Path) -> None:
    store = store_for(redis_url)
    specs = load_file(write(tmp_path, EXAMPLE), FLEET)
    first = store.apply(specs)
    assert (first.added, first.changed, first.removed, first.version) == (
        ["backup", "ses", "tenant-42"],
        {},
        [],
        1,
    )
    assert store.names() == ["backup", "ses", "tenant-42"]
    assert store.specs() == {s.name: s for s in specs}
    # The same file again writes nothing, and the version does not move.
    again = store.apply(specs)
    assert (again.unchanged, again.version, store.version()) == (sorted(first.added), 1, 1)
    # One field changed: named.
    moved = dataclasses.replace(specs[0], port=2525, max_connections=3)
    change = store.apply([moved])
    assert change.changed == {"tenant-42": ["max_connections", "port"]}
    assert change.version == 2 and store.get("tenant-42") == moved
    # --replace removes what the file does not name.
    solo = RelaySpec.from_mapping("solo", {"host": "smtp.example.com"})
    replaced = store.apply([solo], replace=True)
    assert (replaced.added, replaced.removed) == (["solo"], ["backup", "ses", "tenant-42"])
    assert store.names() == ["solo"] and store.version() == 3
    assert store.remove("solo") is True and store.remove("solo") is False
    assert store.names() == [] and store.version() == 4


def test_a_fallback_must_resolve_in_the_resulting_set(redis_url: str) -> None:
    store = store_for(redis_url)
    orphan = one({"fallback": "backup", "fallback_lanes": ["transactional"]}, name="primary")
    with pytest.raises(RelayError, match=r"\[relays.primary\] fallback: 'backup' is not"):
        store.apply([orphan])
    assert store.names() == [] and store.version() == 0  # nothing written
    backup = one({}, name="backup")
    store.apply([orphan, backup])
    to_default = one({"fallback": "default", "fallback_lanes": ["default"]}, name="other")
    store.apply([to_default])
    # Replacing with a set that drops the fallback is refused, as is removing it.
    with pytest.raises(RelayError, match="primary"):
        store.apply([orphan], replace=True)
    with pytest.raises(RelayError, match=r"\[relays.primary\] fallback: falls back to 'backup'"):
        store.remove("backup")
    assert store.names() == ["backup", "other", "primary"]


def test_check_fallback_at_a_workers_start(redis_url: str) -> None:
    store = store_for(redis_url)
    settings = Settings.from_env({"MAILER_FALLBACK": "backup", "MAILER_FALLBACK_LANES": "default"})
    with pytest.raises(ConfigError, match="MAILER_FALLBACK: 'backup' is not a configured"):
        check_fallback(settings, store)
    store.apply([one({}, name="backup")])
    check_fallback(settings, store)


def test_secrets_never_reach_redis_a_repr_or_an_error(
    redis_url: str, tmp_path: Path, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENANT_42_KEY", api_key)
    store = store_for(redis_url)
    store.apply(load_file(write(tmp_path, EXAMPLE), FLEET))
    settings = dataclasses.replace(Settings(), redis_url=redis_url)

    async def relay() -> Any:
        table = RelayTable(settings, aioredis.Redis.from_url(redis_url))
        await table.refresh()
        found = await table.get("tenant-42")
        await table.client.aclose()
        return found

    found = asyncio.run(relay())
    assert found.password.reveal() == api_key
    assert api_key not in repr(found) and api_key not in str(found.settings(settings))
    dump = everything(redis_url)
    assert api_key.encode() not in dump and b"TENANT_42_KEY" in dump
    # A file with the key written in it is refused without echoing it, and nothing is stored.
    leaked = write(tmp_path, f'[relays.leak]\nhost = "h"\npassword = "{api_key}"\n', "leak.toml")
    with pytest.raises(RelayError) as info:
        load_file(leaked)
    assert api_key not in str(info.value) and api_key not in repr(info.value)
    assert store.get("leak") is None


# -- the producer ----------------------------------------------------------------------------


def queued(url: str) -> list[dict[str, Any]]:
    """Every payload in the default queue, oldest first, with the task's argsrepr."""
    client = redis.Redis.from_url(url)
    found = []
    for raw in reversed(client.lrange("mailer", 0, -1)):
        envelope = json.loads(raw)
        args = json.loads(base64.b64decode(envelope["body"]))[0]
        payloads = args[0] if envelope["headers"]["task"] == "mailer.send_batch" else [args[0]]
        for payload in payloads:
            found.append({**payload, "argsrepr": envelope["headers"]["argsrepr"]})
    client.close()
    return found


def mailer_for(url: str, state: str | None = None) -> Mailer:
    settings = dataclasses.replace(
        Settings(),
        broker_url=url,
        redis_url=state or url,
        default_from="shop@example.com",
        publish_retry_for=0.5,
    )
    return Mailer(settings)


def test_an_unknown_relay_is_refused_and_accepted_right_after_it_is_applied(
    redis_url: str,
) -> None:
    client = mailer_for(redis_url)
    message = {"to": "a@example.com", "subject": "hi", "text": "x"}
    with pytest.raises(InvalidMessage) as info:
        client.send(**message, relay="tenant-42")
    assert info.value.field == "relay" and "not a configured relay" in str(info.value)
    assert queued(redis_url) == []
    # Added a moment ago (the directory cached the set without it under a second ago): the
    # miss re-reads the registry before refusing.
    store_for(redis_url).apply([one({}, name="tenant-42")])
    mid = client.send(**message, relay="tenant-42")
    plain = client.send(**message)
    [sent, default] = queued(redis_url)
    assert (sent["id"], sent["meta"]["relay"]) == (mid, "tenant-42")
    assert "'relay': 'tenant-42'" in sent["argsrepr"]  # Flower shows it
    assert default["id"] == plain and "relay" not in default["meta"]
    assert "relay" not in default["argsrepr"]
    client.close()


def test_send_many_and_asend_name_relays(redis_url: str) -> None:
    store_for(redis_url).apply([one({}, name="a"), one({}, name="b")])
    client = mailer_for(redis_url)
    base = {"subject": "hi", "text": "x"}
    ids = client.send_many(
        [{**base, "to": "1@example.com", "relay": "b"}, {**base, "to": "2@example.com"}],
        relay="a",
    )
    with pytest.raises(InvalidMessage) as info:
        client.send_many([{**base, "to": "3@example.com"}, {**base, "to": "4@x.com", "relay": "c"}])
    assert info.value.field == "messages[1].relay"
    one_id = asyncio.run(client.asend(**base, to="5@example.com", relay="b"))
    many = asyncio.run(client.asend_many([{**base, "to": "6@example.com"}], relay="a"))
    with pytest.raises(InvalidMessage, match="relay: 'Bad Name' is not a relay name"):
        asyncio.run(client.asend(**base, to="7@example.com", relay="Bad Name"))
    relays = {p["id"]: p["meta"].get("relay") for p in queued(redis_url)}
    assert relays == {ids[0]: "b", ids[1]: "a", one_id: "b", many[0]: "a"}
    client.close()


def test_the_default_relay_costs_no_redis_call(redis_url: str) -> None:
    """The state Redis is unreachable: `default` is still sent, a named relay cannot be
    checked and is refused with a PublishError (nothing queued)."""
    client = mailer_for(redis_url, state=f"redis://127.0.0.1:{free_port()}/0")
    message = {"to": "a@example.com", "subject": "hi", "text": "x"}
    client.send(**message)
    client.send(**message, relay="default")
    with pytest.raises(PublishError, match="could not check relay 'tenant-42'"):
        client.send(**message, relay="tenant-42")
    assert len(queued(redis_url)) == 2
    client.close()


def test_the_directory_reads_the_version_once_per_interval(redis_url: str) -> None:
    counted = redis.Redis.from_url(redis_url)
    calls: list[str] = []
    real_get = counted.get

    def get(name: Any) -> Any:
        calls.append(name)
        return real_get(name)

    counted.get = get  # type: ignore[method-assign]
    store_for(redis_url).apply([one({}, name="t1")])
    directory = RelayDirectory(Settings(), client=counted)
    directory.RECHECK = 3600.0  # this test's "second"
    for _ in range(100):
        assert directory.check("t1") == "t1"
        assert directory.check("default") == "default"
    assert calls == [RELAYS_VERSION]
    # A miss re-reads the version once before refusing.
    with pytest.raises(InvalidMessage):
        directory.check("t2")
    assert calls == [RELAYS_VERSION, RELAYS_VERSION]


# -- the worker's table ----------------------------------------------------------------------


def table_run(redis_url: str, settings: Settings, steps: Any) -> Any:
    async def run() -> Any:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await steps(RelayTable(settings, client))
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_the_table_reloads_when_the_version_moves(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_for(redis_url)
    settings = Settings.from_env({"MAILER_LANES": "transactional:10%,bulk"})
    monkeypatch.setenv("K1", "key-one")

    async def steps(table: RelayTable) -> None:
        await table.refresh()
        assert table.version == 0 and table.names() == ["default"]
        assert await table.get("default") is table.default
        assert await table.get("t1") is None and table.unusable("t1") is None
        # Added after the last refresh: `get` re-reads the registry by itself.
        store.apply([one({"password_env": "K1", "lanes": "bulk:40%"}, name="t1")])
        relay = await table.get("t1")
        assert relay is not None and table.version == 1
        assert (relay.host, relay.password.reveal()) == ("smtp.example.com", "key-one")
        # The relay's shares, completed to the fleet's lanes in the fleet's order.
        assert relay.lanes == (Lane("transactional", 0.0), Lane("bulk", 0.4))
        assert relay.settings(settings).smtp_host == "smtp.example.com"
        # Changed in Redis: the next refresh rebuilds it.
        store.apply([one({"password_env": "K1", "host": "smtp2.example.com"}, name="t1")])
        assert (await table.get("t1")) is relay  # not refreshed yet: the old one
        await table.refresh()
        changed = await table.get("t1")
        assert changed is not None and changed.host == "smtp2.example.com"
        assert changed.lanes is None
        store.remove("t1")
        await table.refresh()
        assert await table.get("t1") is None and table.names() == ["default"]

    table_run(redis_url, settings, steps)


def test_secrets_from_env_file_and_the_secrets_dir_and_why_not(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "from-dir").write_text("dir-key\n")
    key_file = tmp_path / "file-key"
    key_file.write_text("  file-key  \n")
    monkeypatch.setenv("ENV_KEY", "env-key")
    store_for(redis_url).apply(
        [
            one({"password_env": "ENV_KEY"}, name="from-env"),
            one({"password_file": str(key_file)}, name="from-file"),
            one({}, name="from-dir"),
            one({"password_env": "UNSET_KEY"}, name="env-unset"),
            one({"password_file": str(tmp_path / "nope")}, name="file-missing"),
            one({}, name="dir-missing"),
            one({"lanes": "urgent:10%", "password_env": "ENV_KEY"}, "lane-missing", fleet=None),
            one({"auth": False, "allow_insecure": True}, name="no-auth"),
        ]
    )
    settings = dataclasses.replace(Settings(), relay_secrets_dir=str(secrets_dir))

    async def steps(table: RelayTable) -> dict[str, Any]:
        await table.refresh()
        found = {}
        for name in table.names()[1:]:
            relay = await table.get(name)
            found[name] = relay.password.reveal() if relay else table.unusable(name)
        return found

    found = table_run(redis_url, settings, steps)
    assert found["from-env"] == "env-key"
    assert found["from-file"] == "file-key"
    assert found["from-dir"] == "dir-key"
    assert found["no-auth"] == ""
    assert (
        found["env-unset"] == "[relays.env-unset] password_env: UNSET_KEY is not set on this worker"
    )
    assert found["file-missing"].startswith("[relays.file-missing] password_file: cannot read")
    assert found["dir-missing"].startswith("[relays.dir-missing] secret: cannot read")
    assert found["lane-missing"].startswith("[relays.lane-missing] lanes: 'urgent' is not one")
    # Without a secrets directory, a relay naming no secret says where one may come from.
    without = table_run(redis_url, Settings(), steps)
    assert "MAILER_RELAY_SECRETS_DIR" in without["from-dir"]


def test_a_rotated_or_late_secret_file_is_read_again(redis_url: str, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("old-key")
    store_for(redis_url).apply(
        [one({"password_file": str(key_file)}, name="rotated"), one({}, name="late")]
    )
    settings = dataclasses.replace(Settings(), relay_secrets_dir=str(tmp_path))

    async def steps(table: RelayTable) -> list[Any]:
        await table.refresh()
        seen = [(await table.get("rotated")).password.reveal(), await table.get("late")]  # type: ignore[union-attr]
        key_file.write_text("new-key")
        stat = key_file.stat()
        os.utime(key_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        (tmp_path / "late").write_text("late-key")
        await table.refresh()  # the version did not move: the files did
        seen += [(await table.get("rotated")).password.reveal()]  # type: ignore[union-attr]
        seen += [(await table.get("late")).password.reveal()]  # type: ignore[union-attr]
        return seen

    assert table_run(redis_url, settings, steps) == ["old-key", None, "new-key", "late-key"]


def test_an_unreadable_registry_entry_is_unusable_not_fatal(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.hset(RELAYS, "hand-edited", json.dumps({"host": "h", "password": "x"}))
    client.set(RELAYS_VERSION, 7)

    async def steps(table: RelayTable) -> tuple[Any, Any, int]:
        await table.refresh()
        return await table.get("hand-edited"), table.unusable("hand-edited"), table.version

    relay, reason, version = table_run(redis_url, Settings(), steps)
    assert relay is None and version == 7
    assert reason.startswith("[relays.hand-edited] password: a key is never written")


# -- the default relay from the environment --------------------------------------------------


def test_the_default_relay_from_the_environment() -> None:
    env = {
        "MAILER_SMTP_HOST": "email-smtp.us-east-1.amazonaws.com",
        "MAILER_SMTP_PASSWORD": "k",
        "MAILER_LANES": "transactional,bulk",
        "MAILER_FALLBACK": "Backup",
        "MAILER_FALLBACK_LANES": "transactional",
        "MAILER_FAILOVER_AFTER": "12.5",
        "MAILER_RELAY_PROFILE": "ses",
        "MAILER_SES_CONFIGURATION_SET": "tx",
    }
    relay = default_relay(Settings.from_env(env))
    assert (relay.name, relay.fallback, relay.fallback_lanes) == (
        "default",
        "backup",
        ("transactional",),
    )
    assert (relay.failover_after, relay.profile, relay.configuration_set) == (12.5, "ses", "tx")
    assert relay.password == Secret("k")
    assert default_relay(Settings()).profile == "sendgrid"
    # The default relay sends the bytes it always sent, whatever its host, unless told.
    assert Settings.from_env({"MAILER_SMTP_HOST": "smtp.example.com"}).relay_profile == "sendgrid"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MAILER_FALLBACK": "default", "MAILER_FALLBACK_LANES": "default"}, "MAILER_FALLBACK"),
        ({"MAILER_FALLBACK": "b"}, "MAILER_FALLBACK_LANES"),
        ({"MAILER_FALLBACK_LANES": "default"}, "MAILER_FALLBACK_LANES"),
        ({"MAILER_FALLBACK": "b", "MAILER_FALLBACK_LANES": "bulk"}, "MAILER_FALLBACK_LANES"),
        ({"MAILER_FAILOVER_AFTER": "0"}, "MAILER_FAILOVER_AFTER"),
        ({"MAILER_RELAY_PROFILE": "mailgun"}, "MAILER_RELAY_PROFILE"),
        ({"MAILER_SES_CONFIGURATION_SET": "tx"}, "MAILER_SES_CONFIGURATION_SET"),
    ],
)
def test_the_default_relays_failover_settings_are_checked(
    env: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert info.value.variable == variable


def test_a_message_only_sendgrid_can_send_is_refused_for_another_profile(redis_url: str) -> None:
    """Substitutions through a relay that cannot read X-SMTPAPI would go out as placeholders:
    refused at enqueue, naming the relay, its profile and what stands in the way."""
    store_for(redis_url).apply(
        [one({"profile": "ses"}, name="ses"), one({"host": "smtp.sendgrid.net"}, name="sg")]
    )
    client = mailer_for(redis_url)
    base = {"to": "a@example.com", "subject": "hi -name-", "text": "Hello -name-"}
    templated = {**base, "smtpapi": {"sub": {"-name-": ["Ann"]}}}
    tagged = {**base, "smtpapi": {"category": ["invoices"]}}
    with pytest.raises(InvalidMessage) as info:
        client.send(**templated, relay="ses")
    assert info.value.field == "relay"
    assert "'ses' (profile ses)" in str(info.value) and "sub" in str(info.value)
    with pytest.raises(InvalidMessage) as info:
        client.send_many([tagged, templated], relay="ses")
    assert info.value.field == "messages[1].relay"
    assert queued(redis_url) == []
    sent = [client.send(**templated, relay="sg"), client.send(**tagged, relay="ses")]
    assert [p["id"] for p in queued(redis_url)] == sent
    client.close()

"""Suppressions per relay (a SendGrid subuser per tenant keeps its own): the worker's check reads
the message's own relay's lists, the webhook's apply writes the lists of the relay a batch was
posted for, the operator's commands take `--relay`; each against a real Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from events.drain import Drainer
from events.handler import Webhook
from events.ingest import Ingestor, from_inbox, inbox_entry
from events.signature import RelayVerifiers, Verifier
from mailer.config import Settings, WebhookSettings
from mailer.errors import ConfigError
from tests.support.helpers import mailer_cli
from tests.support.webhook import Signer, event
from workers.state import keys, suppressions
from workers.state.suppressions import SuppressionCheck, Suppressions


def test_keys_of_the_default_relay_stay_and_a_named_relay_gets_its_own() -> None:
    assert keys.suppress_global() == "mailer:suppress:global"
    assert keys.suppress_group(7) == "mailer:suppress:group:7"
    assert keys.suppress_global("tenant-a") == "mailer:relay:tenant-a:suppress:global"
    assert keys.suppress_group(7, "tenant-a") == "mailer:relay:tenant-a:suppress:group:7"


def _check(redis_url: str, *calls: tuple[list[str], int | None, str]) -> list[dict[str, str]]:
    async def run() -> list[dict[str, str]]:
        client = aioredis.Redis.from_url(redis_url)
        checker = SuppressionCheck(client)
        try:
            return list(await asyncio.gather(*(checker.suppressed(*c) for c in calls)))
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_the_check_reads_the_messages_own_relays_lists(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    Suppressions(client, "tenant-a").add("Gone@Example.com", "bounce")
    Suppressions(client, "tenant-a").add("left@example.com", "group_unsubscribe", group=3)
    Suppressions(client).add("fleet@example.com", "spamreport")
    both = ["gone@example.com", "left@example.com", "fleet@example.com"]
    assert _check(
        redis_url,
        (both, None, "tenant-a"),
        (both, 3, "tenant-a"),
        (both, 3, "tenant-b"),
        (both, 3, "default"),
    ) == [
        {"gone@example.com": "bounce"},
        {"gone@example.com": "bounce", "left@example.com": "group_unsubscribe:3"},
        {},
        {"fleet@example.com": "spamreport"},
    ]


def test_what_the_check_remembers_about_lists_stays_bounded(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,000 tenants with a group each: the remembered answers stay within KNOWN_LISTS, and a
    list read again after it was forgotten still answers right."""
    monkeypatch.setattr(suppressions, "KNOWN_LISTS", 64)
    client = redis.Redis.from_url(redis_url)
    Suppressions(client, "t-7").add("x@example.com", "bounce")

    async def run() -> tuple[int, dict[str, str]]:
        aclient = aioredis.Redis.from_url(redis_url)
        checker = SuppressionCheck(aclient)
        try:
            for n in range(1000):
                await checker.suppressed(["x@example.com"], 1, f"t-{n}")
            return len(checker._exists), await checker.suppressed(["x@example.com"], None, "t-7")
        finally:
            await aclient.aclose()

    known, found = asyncio.run(run())
    assert known <= 64
    assert found == {"x@example.com": "bounce"}


def test_the_apply_writes_the_lists_of_the_relay_posted_for(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    batch = [
        event("bounce", "A@example.com"),
        event("group_unsubscribe", "g@example.com", asm_group_id=5),
        event("spamreport", "s@example.com"),
        event("unsubscribe", "u@example.com"),
    ]
    done = Ingestor(client, 60).apply(batch, ["tenant-a", "tenant-a", "tenant-b", "default"])
    assert done.applied == 4
    a, b, fleet = (Suppressions(client, r) for r in ("tenant-a", "tenant-b", "default"))
    assert [(s.address, s.reason) for s in a.list()] == [("a@example.com", "bounce")]
    assert [s.address for s in a.list(5)] == ["g@example.com"]
    assert a.groups() == [5] and b.groups() == [] and fleet.groups() == []
    assert [(s.address, s.reason) for s in b.list()] == [("s@example.com", "spamreport")]
    assert [(s.address, s.reason) for s in fleet.list()] == [("u@example.com", "unsubscribe")]
    # The same events again, for another relay: seen once, so nothing changes (SendGrid's
    # event ids are unique across subusers).
    assert Ingestor(client, 60).apply(batch, ["tenant-b"] * 4).duplicates == 4
    assert b.count() == 1


def test_the_inbox_keeps_the_relay_and_the_drain_applies_it(redis_url: str) -> None:
    """A body posted for a named relay is stored with its relay; one for the default relay (or
    left by a webhook process of before relays) is the bare body. One drain applies both."""
    body = json.dumps([event("bounce", "x@example.com")]).encode()
    assert from_inbox(inbox_entry("tenant-a", body)) == ("tenant-a", body)
    assert inbox_entry("default", body) == body and from_inbox(body) == ("default", body)

    client = redis.Redis.from_url(redis_url)
    other = json.dumps([event("bounce", "y@example.com")]).encode()
    client.lpush(keys.EVENT_INBOX, inbox_entry("tenant-a", body), other)
    drainer = Drainer(client, Ingestor(client, 60))
    assert drainer.drain_once() == 2
    assert [s.address for s in Suppressions(client, "tenant-a").list()] == ["x@example.com"]
    assert [s.address for s in Suppressions(client).list()] == ["y@example.com"]
    assert client.llen(keys.EVENT_PROCESSING) == 0


def test_the_handler_refuses_a_bad_relay_name_and_accepts_an_unconfigured_one(
    redis_url: str,
) -> None:
    signer = Signer()
    settings = Settings.from_env({"MAILER_BROKER_URL": redis_url})
    webhook = Webhook(settings, WebhookSettings(public_key=signer.public), drain=False)
    client = redis.Redis.from_url(redis_url)
    body = json.dumps([event("bounce", "x@example.com")]).encode()
    try:
        status, text = webhook.handle(signer.headers(body), body, "Tenant A")
        assert status == 400 and b"bad relay name" in text and b"Tenant A" in text
        assert client.llen(keys.EVENT_INBOX) == 0
        # Not configured anywhere (a relay removed a moment ago): its events are kept.
        assert webhook.handle(signer.headers(body), body, "gone-tenant") == (200, b"")
        assert from_inbox(client.rpop(keys.EVENT_INBOX) or b"")[0] == "gone-tenant"
    finally:
        webhook.close()


def test_a_relay_with_its_own_key_is_verified_with_it(tmp_path: Path) -> None:
    fleet, own = Signer(), Signer()
    (tmp_path / "tenant-a").write_text(own.public + "\n")
    (tmp_path / "README").write_text("not a relay name: ignored\n")
    verifiers = RelayVerifiers(Verifier(fleet.public), str(tmp_path))
    body = b"[]"
    verifiers.for_relay("tenant-a").verify(own.headers(body), body)
    verifiers.for_relay("tenant-b").verify(fleet.headers(body), body)  # no file: the fleet's
    with pytest.raises(Exception, match="bad signature"):
        verifiers.for_relay("tenant-a").verify(fleet.headers(body), body)


def test_a_bad_key_file_stops_the_start_naming_it(tmp_path: Path) -> None:
    (tmp_path / "tenant-a").write_text("not a key\n")
    with pytest.raises(ConfigError, match="MAILER_SENDGRID_WEBHOOK_KEYS_DIR/tenant-a"):
        RelayVerifiers(Verifier(Signer().public), str(tmp_path))
    with pytest.raises(ConfigError, match="MAILER_SENDGRID_WEBHOOK_KEYS_DIR"):
        WebhookSettings.from_env({"MAILER_SENDGRID_WEBHOOK_KEYS_DIR": str(tmp_path / "none")})


def test_the_cli_manages_one_relays_lists(redis_url: str) -> None:
    env = {"MAILER_BROKER_URL": redis_url}
    added = mailer_cli(env, "suppressions", "add", "a@example.com", "--relay", "tenant-a")
    assert added.returncode == 0, added.stderr
    client = redis.Redis.from_url(redis_url)
    assert Suppressions(client, "tenant-a").get("a@example.com") is not None
    assert Suppressions(client).get("a@example.com") is None
    listed = mailer_cli(env, "suppressions", "list", "--json", "--relay", "tenant-a")
    assert [s["address"] for s in json.loads(listed.stdout)] == ["a@example.com"]
    assert json.loads(mailer_cli(env, "suppressions", "list", "--json").stdout) == []
    gone = mailer_cli(env, "suppressions", "remove", "a@example.com", "--relay", "tenant-b")
    assert gone.returncode == 1 and "not suppressed" in gone.stderr
    removed = mailer_cli(env, "suppressions", "remove", "a@example.com", "--relay", "tenant-a")
    assert removed.returncode == 0, removed.stderr
    assert Suppressions(client, "tenant-a").get("a@example.com") is None
    bad = mailer_cli(env, "suppressions", "list", "--relay", "Tenant A")
    assert bad.returncode == 2 and "bad relay name" in bad.stderr

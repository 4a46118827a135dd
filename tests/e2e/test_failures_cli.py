"""Dead letters end to end: a real worker puts expired (too many attempts, too old), permanent
(550) and uncertain (no reply after the terminator) messages there, and the real `mailer
failures list | show | retry | purge` command, run as an operator runs it, works on them."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis

import mailer
from devkit.sink import FaultPlan
from devkit.worker import WorkerProcess
from mailer.client import default_mailer
from tests.support.helpers import ids_at, mailer_cli, wait_until
from tests.support.relay import Relay
from workers.state.deadletters import DeadLetters


def enqueue(to: str, subject: str, *, age: float = 0.0) -> str:
    client = default_mailer()
    rendered = client.render(mailer.Message(to=to, subject=subject, text="the body text\n"))
    payload: dict[str, Any] = rendered.to_payload()
    payload["meta"]["created_at"] -= age
    client.publisher.send(payload)
    return rendered.id


def test_dead_letters_and_the_failures_command(
    redis_url: str,
    api_key: str,
    relay: Callable[..., Relay],
    workers: Callable[..., WorkerProcess],
) -> None:
    sink, env = relay(
        {"faults": FaultPlan(p_451_data=1.0, reject_rcpt={"nobody@example.com"})},
        MAILER_MAX_RETRIES=1,
        MAILER_MAX_MESSAGE_AGE=60,
        MAILER_VISIBILITY_TIMEOUT=60,
    )
    store = DeadLetters(redis.Redis.from_url(redis_url))
    workers(env)

    retried_out = enqueue("ann@example.com", "out of attempts")
    too_old = enqueue("bob@example.com", "too old", age=600)
    refused = enqueue("nobody@example.com", "refused")
    assert wait_until(lambda: store.count() == 3, timeout=60), [d.id for d in store.list()]
    sink.faults = FaultPlan(p_drop_after_data=1.0, max_faults=1)
    ambiguous = enqueue("cy@example.com", "ambiguous")
    assert wait_until(lambda: store.count() == 4, timeout=30)

    letters = {d.id: d for d in store.list()}
    assert (letters[retried_out].kind, letters[retried_out].code) == ("expired", 451)
    assert letters[retried_out].attempts == 2  # MAILER_MAX_RETRIES=1: the first and one retry
    assert (letters[too_old].kind, letters[too_old].code, letters[too_old].attempts) == (
        "expired",
        451,
        1,
    )
    assert (letters[refused].kind, letters[refused].code) == ("permanent", 550)
    assert "550" in letters[refused].text and letters[refused].refused
    assert letters[ambiguous].kind == "uncertain"
    assert ids_at(sink) == Counter({ambiguous: 1})  # the server has it; it was not resent

    listed = mailer_cli(env, "failures", "list")
    assert listed.returncode == 0, listed.stderr
    assert "4 dead letters" in listed.stdout
    assert all(i in listed.stdout for i in letters)
    as_json = json.loads(mailer_cli(env, "failures", "list", "--json").stdout)
    assert {d["id"]: d["kind"] for d in as_json} == {i: d.kind for i, d in letters.items()}
    only = json.loads(mailer_cli(env, "failures", "list", "--json", "--kind", "uncertain").stdout)
    assert [d["id"] for d in only] == [ambiguous]
    shown = mailer_cli(env, "failures", "show", refused)
    assert shown.returncode == 0
    detail = json.loads(shown.stdout)
    assert detail["code"] == 550 and detail["kind"] == "permanent" and detail["attempts"] == 1
    for out in (listed.stdout, shown.stdout, json.dumps(as_json)):
        assert "the body text" not in out and api_key not in out  # no body, no key

    # Replays: a fresh age budget and attempt count; the held one is deliberately sent again.
    sink.faults = None
    replay = mailer_cli(env, "failures", "retry", retried_out, too_old, ambiguous)
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.count("re-queued") == 3
    assert wait_until(
        lambda: ids_at(sink) == Counter({retried_out: 1, too_old: 1, ambiguous: 2}), timeout=60
    ), ids_at(sink)
    assert {d.id for d in store.list()} == {refused}
    missing = mailer_cli(env, "failures", "retry", "0" * 32)
    assert missing.returncode == 1 and "no such dead letter" in missing.stderr

    purged = mailer_cli(env, "failures", "purge")
    assert purged.returncode == 0 and "purged 1" in purged.stdout
    assert store.count() == 0
    assert "0 dead letters" in mailer_cli(env, "failures", "list").stdout

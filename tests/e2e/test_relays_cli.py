"""`mailer relays` and `mailer send --relay` as an operator runs them, against the test Redis:
a bad file writes nothing, apply prints what changed, a relay is usable by the next `send`,
no secret is ever printed or stored."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import redis

from tests.support.helpers import mailer_cli

FILE = """
[defaults]
max_connections = 10

[relays.tenant-42]
host = "smtp.sendgrid.net"
password_env = "TENANT_42_KEY"
rate_limit = "100/s"

[relays.backup]
host = "smtp.postmarkapp.com"
password_file = "/run/secrets/backup"
fallback = "tenant-42"
fallback_lanes = ["default"]
"""


def queued_relays(url: str) -> list[str | None]:
    client = redis.Redis.from_url(url)
    relays = []
    for raw in reversed(client.lrange("mailer", 0, -1)):
        first = json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
        for payload in first if isinstance(first, list) else [first]:  # a batch, or one
            relays.append(payload["meta"].get("relay"))
    client.close()
    return relays


def test_apply_list_show_send_remove(redis_url: str, tmp_path: Path, api_key: str) -> None:
    env = {
        "MAILER_BROKER_URL": redis_url,
        "MAILER_DEFAULT_FROM": "shop@example.com",
        "TENANT_42_KEY": api_key,  # on the operator's host too: it must not leak from there
    }
    send = ("send", "--to", "a@example.com", "--subject", "hi", "--text", "x")
    refused = mailer_cli(env, *send, "--relay", "tenant-42")
    assert refused.returncode == 2
    assert "relay: 'tenant-42' is not a configured relay" in refused.stderr

    # A literal key anywhere refuses the whole file: nothing is written, the key is not echoed.
    bad = tmp_path / "bad.toml"
    bad.write_text(FILE + f'\n[relays.leaky]\nhost = "h"\npassword = "{api_key}"\n')
    done = mailer_cli(env, "relays", "apply", str(bad))
    assert done.returncode == 2
    assert "[relays.leaky] password: a key is never written in the file" in done.stderr
    assert api_key not in done.stdout + done.stderr
    assert mailer_cli(env, "relays", "list").stdout.count("\n") == 1  # the header line only

    good = tmp_path / "relays.toml"
    good.write_text(FILE)
    done = mailer_cli(env, "relays", "apply", str(good))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["added", "backup", "added", "tenant-42"]
    assert "registry version 1" in done.stderr

    # Usable by the very next send, with and without the flag; a file's column wins.
    assert mailer_cli(env, *send, "--relay", "tenant-42").returncode == 0
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"to": "b@example.com", "subject": "s", "text": "x", "relay": "backup"}\n'
        '{"to": "c@example.com", "subject": "s", "text": "x"}\n'
    )
    assert mailer_cli(env, "send", "--jsonl", str(rows), "--relay", "tenant-42").returncode == 0
    assert queued_relays(redis_url) == ["tenant-42", "backup", "tenant-42"]

    listed = mailer_cli(env, "relays", "list")
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "HOST", "PORT", "PROFILE", "CAP", "RATE", "FALLBACK"]
    assert lines[1].split() == [
        "backup",
        "smtp.postmarkapp.com",
        "587",
        "smtp",
        "10",
        "-",
        "tenant-42",
        "(default)",
    ]
    assert lines[2].split() == [
        "tenant-42",
        "smtp.sendgrid.net",
        "587",
        "sendgrid",
        "10",
        "100/s",
        "-",
    ]
    shown = json.loads(mailer_cli(env, "relays", "show", "tenant-42").stdout)
    assert shown["password_env"] == "TENANT_42_KEY" and shown["profile"] == "sendgrid"
    for output in (listed, mailer_cli(env, "relays", "list", "--json")):
        assert api_key not in output.stdout + output.stderr

    # A changed file says which fields changed; --replace removes what it no longer names.
    good.write_text(FILE.replace('rate_limit = "100/s"', 'rate_limit = "50/s"'))
    done = mailer_cli(env, "relays", "apply", str(good))
    assert done.stdout.strip() == "changed  tenant-42 (rate_limit)"
    refused = mailer_cli(env, "relays", "remove", "tenant-42")  # backup falls back to it
    assert refused.returncode == 2 and "[relays.backup] fallback" in refused.stderr
    only = tmp_path / "only.toml"
    only.write_text('[relays.tenant-42]\nhost = "smtp.sendgrid.net"\npassword_env = "K"\n')
    done = mailer_cli(env, "relays", "apply", str(only), "--replace")
    assert done.stdout.splitlines() == [
        "changed  tenant-42 (max_connections, password_env, rate_limit)",
        "removed  backup",
    ]
    assert mailer_cli(env, "relays", "remove", "tenant-42").stdout.strip() == "removed  tenant-42"
    assert mailer_cli(env, "relays", "remove", "tenant-42").returncode == 1
    assert mailer_cli(env, *send, "--relay", "tenant-42").returncode == 2

    state = redis.Redis.from_url(redis_url)
    stored = b"".join(state.lrange("mailer", 0, -1)) + b"".join(
        state.get(k) or b"" for k in state.keys("mailer:relays*") if state.type(k) == b"string"
    )
    assert api_key.encode() not in stored
    state.close()


def test_a_worker_does_not_start_with_a_fallback_that_is_not_configured(
    redis_url: str, api_key: str
) -> None:
    env = {
        "MAILER_BROKER_URL": redis_url,
        "MAILER_SMTP_PASSWORD": api_key,
        "MAILER_FALLBACK": "backup",
        "MAILER_FALLBACK_LANES": "default",
    }
    done = mailer_cli(env, "worker")
    assert done.returncode == 2
    assert "MAILER_FALLBACK: 'backup' is not a configured relay" in done.stderr
    assert api_key not in done.stdout + done.stderr

"""Safe defaults (issue 16): no password in a repr or a URL we print, a loud warning (or a
refusal for SendGrid) for AUTH in clear text, Flower on loopback with no shipped password, and
one clear line from the operator commands when Redis is down."""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailer.cli import main
from mailer.config import Settings, redact_url, url_secrets
from mailer.errors import ConfigError
from workers.observe.logs import secrets_of

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("url", "shown", "secret"),
    [
        ("redis://user:pw1@host:6379/0", "redis://user:***@host:6379/0", "pw1"),
        ("redis://:pw2@host/0", "redis://:***@host/0", "pw2"),
        ("redis://host/0?password=pw3", "redis://host/0?password=***", "pw3"),
        (
            "rediss://host/0?db=1&Password=pw4&ssl_cert_reqs=none",
            "rediss://host/0?db=1&Password=***&ssl_cert_reqs=none",
            "pw4",
        ),
        (
            "unix:///run/redis.sock?password=pw5&db=2",
            "unix:///run/redis.sock?password=***&db=2",
            "pw5",
        ),
    ],
)
def test_urls_are_masked_everywhere(url: str, shown: str, secret: str) -> None:
    assert redact_url(url) == shown
    assert secret in url_secrets(url)
    assert secret in secrets_of("", urls=[url])  # the log redactor masks it too
    settings = Settings.from_env({"MAILER_BROKER_URL": url})
    assert secret not in repr(settings) and secret not in str(settings)


def test_settings_repr_hides_the_api_key() -> None:
    settings = Settings.from_env({"SENDGRID_API_KEY": "SG." + "k" * 22 + "." + "s" * 43})
    assert "kkkk" not in repr(settings)


def _insecure(host: str) -> Settings:
    return Settings.from_env(
        {
            "MAILER_SMTP_HOST": host,
            "MAILER_SMTP_TLS": "none",
            "MAILER_SMTP_ALLOW_INSECURE": "1",
            "MAILER_SMTP_PASSWORD": "secret",
        }
    )


def test_cleartext_auth_to_sendgrid_is_refused() -> None:
    with pytest.raises(ConfigError) as exc:
        _insecure("smtp.sendgrid.net").require_relay()
    assert exc.value.variable == "MAILER_SMTP_TLS"


def test_cleartext_auth_elsewhere_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mailer.config"):
        _insecure("sink.local").require_relay()
    assert any(
        "INSECURE" in r.getMessage() and "clear text" in r.getMessage() for r in caplog.records
    )
    assert all("secret" not in r.getMessage() for r in caplog.records)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", [["status"], ["failures", "list"]])
def test_operator_commands_print_one_line_when_redis_is_down(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0?password=hunter2"
    monkeypatch.setenv("MAILER_BROKER_URL", url)
    assert main(command) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "hunter2" not in err
    assert "unreachable" in err


def test_operator_commands_name_refused_credentials(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.config_set("requirepass", "right")
    try:
        wrong = redis_url.replace("redis://", "redis://:wrong@")
        monkeypatch.setenv("MAILER_BROKER_URL", wrong)
        assert main(["failures", "list"]) == 1
        err = capsys.readouterr().err.strip()
        assert "refused the credentials" in err and "wrong" not in err and "\n" not in err
    finally:
        redis.Redis.from_url(redis_url.replace("redis://", "redis://:right@")).config_set(
            "requirepass", ""
        )


# ---------------------------------------------------------------------------------------------
# docker compose: Flower


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (an error is a ValueError)."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        current = env.get(name, "")
        if op == ":?" and not current:
            raise ValueError(arg)
        if op == ":-" and not current:
            return arg
        return current

    return re.sub(r"\$\{([A-Z_]+)(?:(:\?|:-)([^}]*))?\}", one, value)


def _example_env() -> dict[str, str]:
    env = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


@pytest.fixture(scope="module")
def flower() -> dict[str, Any]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return dict(compose["services"]["flower"])


def test_compose_refuses_flower_with_the_example_env(flower: dict[str, Any]) -> None:
    env = _example_env()
    assert "FLOWER_BASIC_AUTH" in env and not env["FLOWER_BASIC_AUTH"]
    with pytest.raises(ValueError, match="FLOWER_BASIC_AUTH"):
        _interpolate(flower["environment"]["FLOWER_BASIC_AUTH"], env)


def test_flower_listens_on_loopback_unless_told(flower: dict[str, Any]) -> None:
    (port,) = flower["ports"]
    assert _interpolate(port, {}) == "127.0.0.1:5555:5555"
    assert _interpolate(port, {"FLOWER_BIND": "10.0.0.5"}) == "10.0.0.5:5555:5555"


# ---------------------------------------------------------------------------------------------
# mailer send --csv: a broker that refuses mid-file


def _queued_ids(client: Any) -> list[str]:
    import base64
    import json

    ids = []
    for raw in reversed(client.lrange("mailer", 0, -1)):  # LPUSH: oldest last
        args = json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
        ids += [payload["id"] for payload in args[0]]
    return ids


def test_a_broker_failure_mid_file_reports_what_was_queued(
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import redis

    import mailer

    rows = 40
    path = tmp_path / "rows.csv"
    body = "x " * 20_000
    path.write_text(
        "to,subject,text,from_addr\n"
        + "".join(f"u{i}@example.com,Hello {i},{body},a@example.com\n" for i in range(rows))
    )
    monkeypatch.setenv("MAILER_BROKER_URL", redis_url)
    mailer.reset_default_mailer()
    client = redis.Redis.from_url(redis_url)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used + 1_000_000)  # room for some rows (~70 KB each), not all
    try:
        assert main(["send", "--csv", str(path), "--chunk-size", "1", "-q"]) == 1
    finally:
        client.config_set("maxmemory", 0)
        mailer.reset_default_mailer()
    err = capsys.readouterr().err.strip()
    queued = _queued_ids(client)
    assert 0 < len(queued) < rows, (err, client.keys())
    assert f"{len(queued)} of {rows} rows were queued" in err and "\n" not in err
    # The rerun gives every row the same message id as before: the ledger sends each once.
    assert main(["send", "--csv", str(path), "--chunk-size", "1", "-q"]) == 0
    mailer.reset_default_mailer()
    again = _queued_ids(client)[len(queued) :]
    assert len(again) == rows and again[: len(queued)] == queued


# ---------------------------------------------------------------------------------------------
# A relay that answers AUTH with neither 235 nor an error


async def _relay_answering_auth_250(reader: Any, writer: Any) -> None:
    """Postfix's smtp-sink does this: AUTH gets "250 2.0.0 Ok"."""
    writer.write(b"220 sink ESMTP\r\n")
    while line := await reader.readline():
        verb = line[:4].upper()
        if verb == b"EHLO":
            writer.write(b"250-sink\r\n250 AUTH PLAIN LOGIN\r\n")
        elif verb == b"AUTH":
            writer.write(b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 bye\r\n")
            await writer.drain()
            break
        else:
            writer.write(b"250 ok\r\n")
        await writer.drain()
    writer.close()


def test_an_auth_answered_with_250_names_itself() -> None:
    import asyncio

    from workers.engine.session import Session

    async def run() -> str:
        server = await asyncio.start_server(_relay_answering_auth_250, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        settings = Settings.from_env(
            {
                "MAILER_SMTP_HOST": "127.0.0.1",
                "MAILER_SMTP_PORT": str(port),
                "MAILER_SMTP_TLS": "none",
                "MAILER_SMTP_ALLOW_INSECURE": "1",
                "MAILER_SMTP_PASSWORD": "secret-key",
            }
        )
        try:
            await Session(settings).open()
        except Exception as exc:  # the engine's Failure: what the operator reads
            return str(exc)
        finally:
            server.close()
        return "opened"

    text = asyncio.run(run())
    assert "relay answered AUTH with 250, not 235" in text
    assert "secret-key" not in text

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

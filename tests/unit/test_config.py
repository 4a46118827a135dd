"""Configuration is read in one place and refuses bad values at start-up, naming the variable
and never echoing the key."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from mailer.config import Secret, Settings
from mailer.errors import ConfigError
from workers.engine.loop import new_loop

KEY = "SG." + "a" * 22 + "." + "b" * 43


def settings(**env: str) -> Settings:
    return Settings.from_env(env)


def test_defaults_follow_the_design() -> None:
    s = settings()
    assert (s.broker_url, s.redis_url) == ("redis://localhost:6379/0", "redis://localhost:6379/0")
    assert (s.smtp_host, s.smtp_port, s.smtp_tls) == ("smtp.sendgrid.net", 587, "starttls")
    assert s.smtp_username == "apikey"
    assert s.max_messages_per_connection == 5000 and s.max_connections == 10000
    assert s.retry_countdown_max < s.visibility_timeout


def test_tls_mode_follows_the_port() -> None:
    assert settings(MAILER_SMTP_PORT="465").smtp_tls == "tls"
    for port in ("25", "587", "2525"):
        assert settings(MAILER_SMTP_PORT=port).smtp_tls == "starttls"


def test_event_loop_is_uvloop_when_installed_unless_asyncio_is_asked_for() -> None:
    assert settings().event_loop == "auto"
    assert settings(MAILER_EVENT_LOOP=" AsyncIO ").event_loop == "asyncio"
    for kind, module in (("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")):
        loop = new_loop(kind)
        try:
            assert type(loop).__module__.split(".")[0] == module
        finally:
            loop.close()


def test_redis_url_defaults_to_the_broker() -> None:
    s = settings(MAILER_BROKER_URL="redis://broker:6380/2")
    assert s.redis_url == "redis://broker:6380/2"


def test_password_falls_back_to_sendgrid_api_key_and_is_stripped() -> None:
    s = settings(SENDGRID_API_KEY=f"  {KEY}\n")
    assert s.smtp_password.reveal() == KEY
    assert (
        settings(MAILER_SMTP_PASSWORD=KEY, SENDGRID_API_KEY="other").smtp_password.reveal() == KEY
    )


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MAILER_SMTP_TLS": "ssl"}, "MAILER_SMTP_TLS"),
        ({"MAILER_SMTP_PORT": "smtp"}, "MAILER_SMTP_PORT"),
        ({"MAILER_SMTP_PORT": "70000"}, "MAILER_SMTP_PORT"),
        ({"MAILER_SMTP_PORT": "0"}, "MAILER_SMTP_PORT"),
        ({"MAILER_SMTP_TLS": "none"}, "MAILER_SMTP_TLS"),
        ({"MAILER_SMTP_NO_AUTH": "1"}, "MAILER_SMTP_NO_AUTH"),
        ({"MAILER_BROKER_URL": "amqp://guest@localhost//"}, "MAILER_BROKER_URL"),
        ({"MAILER_MAX_CONNECTIONS": "-5"}, "MAILER_MAX_CONNECTIONS"),
        ({"MAILER_MAX_MESSAGES_PER_CONNECTION": "lots"}, "MAILER_MAX_MESSAGES_PER_CONNECTION"),
        ({"MAILER_SMTP_CA_FILE": "/nonexistent/ca.pem"}, "MAILER_SMTP_CA_FILE"),
        ({"MAILER_UNCERTAIN_POLICY": "guess"}, "MAILER_UNCERTAIN_POLICY"),
        ({"MAILER_SMTP_ALLOW_INSECURE": "maybe"}, "MAILER_SMTP_ALLOW_INSECURE"),
        ({"MAILER_CELERY_TASK_LOGS": "verbose"}, "MAILER_CELERY_TASK_LOGS"),
        ({"MAILER_EVENT_LOOP": "trio"}, "MAILER_EVENT_LOOP"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(**env)
    assert info.value.variable == variable
    assert variable in str(info.value)


def test_insecure_mode_needs_the_explicit_flag() -> None:
    s = settings(MAILER_SMTP_TLS="none", MAILER_SMTP_ALLOW_INSECURE="1")
    assert s.smtp_tls == "none" and s.allow_insecure


@pytest.mark.parametrize("inner", [" ", "\n", "\r\n", "\t", "\x00"])
def test_whitespace_inside_the_key_is_an_error_that_does_not_show_the_key(inner: str) -> None:
    bad = KEY[:30] + inner + KEY[30:]
    with pytest.raises(ConfigError) as info:
        settings(MAILER_SMTP_PASSWORD=bad)
    assert info.value.variable == "MAILER_SMTP_PASSWORD"
    assert KEY[:30] not in str(info.value) and KEY[30:] not in str(info.value)


def test_worker_start_needs_a_key() -> None:
    with pytest.raises(ConfigError) as info:
        settings().require_relay()
    assert info.value.variable == "MAILER_SMTP_PASSWORD"
    assert settings(MAILER_SMTP_PASSWORD=KEY).require_relay().smtp_password


def test_starttls_on_465_is_refused_at_worker_start() -> None:
    with pytest.raises(ConfigError) as info:
        settings(
            MAILER_SMTP_PORT="465", MAILER_SMTP_TLS="starttls", MAILER_SMTP_PASSWORD=KEY
        ).require_relay()
    assert info.value.variable == "MAILER_SMTP_TLS"


def test_the_key_never_shows_in_repr_str_or_pickle() -> None:
    s = settings(MAILER_SMTP_PASSWORD=KEY)
    assert KEY not in repr(s) and KEY not in str(s) and KEY not in repr(s.smtp_password)
    assert KEY not in f"{s.smtp_password}"
    with pytest.raises(TypeError):
        pickle.dumps(Secret(KEY))


def test_a_worker_with_bad_configuration_fails_at_start_up_naming_it() -> None:
    env = {"PATH": "/usr/bin:/bin", "MAILER_SMTP_TLS": "bogus", "MAILER_SMTP_PASSWORD": KEY}
    proc = subprocess.run(
        [sys.executable, "-m", "mailer", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "MAILER_SMTP_TLS" in proc.stderr
    assert KEY not in proc.stderr + proc.stdout


def test_a_ready_worker_has_frozen_its_start_up_heap() -> None:
    """Full GC passes skip what start-up built (workers.app `freeze_heap`): the signal Celery
    sends once the worker is ready freezes it, in the worker's own interpreter."""
    code = (
        "import gc\n"
        "from celery import signals\n"
        "import workers.app\n"
        "before = gc.get_freeze_count()\n"
        "signals.worker_ready.send(sender=None)\n"
        "print(before, gc.get_freeze_count())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    before, after = map(int, proc.stdout.split())
    assert before == 0
    assert after > 10_000  # Celery, kombu and our modules

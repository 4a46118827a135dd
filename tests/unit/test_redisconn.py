"""mailer/redisconn.py: URLs taken apart and checked at start-up, TLS verified unless turned
off explicitly (and then logged), secrets never shown."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest

from mailer import redisconn
from mailer.config import Settings
from mailer.errors import ConfigError
from workers.observe.logs import secrets_of


def settings(**env: str) -> Settings:
    return Settings.from_env(env)


def test_rediss_verifies_certificate_and_host_name_by_default(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    s = settings(
        MAILER_BROKER_URL="rediss://app:pw@redis.internal:6380/3", MAILER_REDIS_CA_FILE=str(ca)
    )
    target = redisconn.parse(s.broker_url)
    assert (target.host, target.port, target.db, target.username, target.tls) == (
        "redis.internal",
        6380,
        3,
        "app",
        True,
    )
    kwargs = redisconn.connection_kwargs(target, s)
    assert kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED and kwargs["ssl_check_hostname"]
    assert kwargs["ssl_ca_certs"] == str(ca)
    assert redisconn.kombu_ssl(s.broker_url, s) == {
        k: v for k, v in kwargs.items() if k.startswith("ssl_")
    }
    assert redisconn.kombu_ssl("redis://h:1/0", s) is None


def test_verification_off_is_explicit_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    redisconn._warned.clear()
    s = settings(MAILER_BROKER_URL="rediss://h:1/0", MAILER_REDIS_TLS_VERIFY="0")
    with caplog.at_level(logging.WARNING, logger="mailer.redis"):
        options = redisconn.ssl_options(s, redisconn.parse(s.broker_url))
    assert options["ssl_cert_reqs"] == ssl.CERT_NONE and not options["ssl_check_hostname"]
    assert "NOT verified" in caplog.text
    with pytest.raises(ConfigError, match="MAILER_REDIS_TLS_VERIFY"):
        settings(MAILER_REDIS_TLS_VERIFY="maybe")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MAILER_BROKER_URL": "http://h/0"}, "MAILER_BROKER_URL"),
        ({"MAILER_BROKER_URL": "rediss://h:1/0?verify=no"}, "MAILER_BROKER_URL"),
        ({"MAILER_REDIS_URL": "redis://h:1/x"}, "MAILER_REDIS_URL"),
        ({"MAILER_BROKER_URL": "sentinel://a:1;sentinel://b:2/0"}, "MAILER_SENTINEL_MASTER"),
        ({"MAILER_REDIS_CA_FILE": "/nonexistent/ca.pem"}, "MAILER_REDIS_CA_FILE"),
        ({"MAILER_REDIS_CERT_FILE": __file__}, "MAILER_REDIS_CERT_FILE"),
    ],
)
def test_bad_redis_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(**env)
    assert info.value.variable == variable


def test_sentinel_urls_and_secrets() -> None:
    url = "sentinel://app:s3cret@a:26379;sentinel://b;sentinel://c:26380/2"
    s = settings(MAILER_BROKER_URL=url, MAILER_SENTINEL_MASTER="mailer")
    target = redisconn.parse(s.broker_url)
    assert target.sentinels == (("a", 26379), ("b", 26379), ("c", 26380)) and target.db == 2
    assert (target.username, target.password) == ("app", "s3cret")
    assert "s3cret" not in repr(target) and "s3cret" not in target.masked
    assert redisconn.kombu_transport_options(url, s)["master_name"] == "mailer"
    assert "s3cret" in secrets_of("", urls=[url])
    with pytest.raises(ConfigError) as info:
        settings(MAILER_BROKER_URL="redis://u:s3cret@h:1/0?bogus=1")
    assert "s3cret" not in str(info.value)

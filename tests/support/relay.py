"""The relay a test sends through: the environment its workers and producer get."""

from __future__ import annotations

from typing import NamedTuple

from devkit.sink import SinkServer, TLSMaterial

API_KEY = "SG." + "k" * 22 + "." + "s" * 43


def relay_env(
    redis_url: str, sink: SinkServer, tls_material: TLSMaterial, key: str, **extra: object
) -> dict[str, str]:
    """The environment a worker and a producer get in a test: everything real, nothing default."""
    env = {
        "MAILER_BROKER_URL": redis_url,
        "MAILER_SMTP_HOST": "localhost",
        "MAILER_SMTP_PORT": str(sink.port),
        "MAILER_SMTP_TLS": sink.tls,
        "MAILER_SMTP_CA_FILE": str(tls_material.ca_file),
        "MAILER_SMTP_PASSWORD": key,
        "MAILER_DEFAULT_FROM": "Sender <sender@example.com>",
        "MAILER_SMTP_TIMEOUT": "10",
        "MAILER_DATA_TIMEOUT": "10",
        "MAILER_LEASE_TTL": "10",
    }
    if sink.tls == "none":
        env["MAILER_SMTP_ALLOW_INSECURE"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Relay(NamedTuple):
    """A test's relay: the recording SMTP server and the env its workers and producer use."""

    sink: SinkServer
    env: dict[str, str]

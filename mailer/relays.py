"""Named relays: each with its own host, key, caps, rates, lanes, circuit and fallback.

The single-relay environment (MAILER_SMTP_*, MAILER_RATE_LIMIT, ...) is the relay named
`default`, on every worker, as before. Other relays live in the state Redis (`mailer relays
apply relays.toml` writes them; docs/relays.md): workers and producers re-read them when their
version changes, so adding or removing a tenant needs neither a code change nor a restart.
A relay's secret never travels: Redis holds only where to find it (`password_env`,
`password_file`, or MAILER_RELAY_SECRETS_DIR/<name>), and each worker resolves it itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from mailer.config import Lane, RateWindow, Secret, Settings, TLSMode
from mailer.wire import DEFAULT_RELAY, RELAY_NAME

__all__ = ["DEFAULT_RELAY", "PROFILES", "RELAY_NAME", "Profile", "Relay", "default_relay"]


#: Which header extensions a relay understands (mailer/profiles.py translates between them).
Profile = Literal["sendgrid", "ses", "postmark", "smtp"]
PROFILES: tuple[Profile, ...] = ("sendgrid", "ses", "postmark", "smtp")


@dataclass(frozen=True)
class Relay:
    """One relay as a worker uses it. `settings(base)` is the worker's Settings seen through
    this relay (host, key, caps, rates, lanes replaced), which is all the engine reads."""

    name: str
    host: str
    port: int
    tls: TLSMode
    username: str
    password: Secret
    auth: bool = True
    ca_file: str | None = None
    allow_insecure: bool = False
    #: This relay's own cap inside the fleet-wide one (None: only the fleet's holds).
    max_connections: int | None = None
    max_messages_per_connection: int = 5000
    rate_limits: tuple[RateWindow, ...] = ()
    #: Reserved shares of this relay's cap and rate per lane (None: MAILER_LANES' shares).
    lanes: tuple[Lane, ...] | None = None
    #: Where messages of `fallback_lanes` go while this relay is down (see failover).
    fallback: str | None = None
    fallback_lanes: tuple[str, ...] = ()
    #: A run of transient failures (4xx, refused connections) this long also fails over.
    failover_after: float = 30.0
    profile: Profile = "sendgrid"
    #: SES's configuration set (profile `ses`): sent as X-SES-CONFIGURATION-SET.
    configuration_set: str | None = None

    def settings(self, base: Settings) -> Settings:
        """`base` with this relay's connection, caps, rates and lanes in place."""
        changes: dict[str, object] = {
            "smtp_host": self.host,
            "smtp_port": self.port,
            "smtp_tls": self.tls,
            "smtp_username": self.username,
            "smtp_password": self.password,
            "smtp_auth": self.auth,
            "smtp_ca_file": self.ca_file,
            "allow_insecure": self.allow_insecure,
            "max_messages_per_connection": self.max_messages_per_connection,
            "rate_limits": self.rate_limits,
        }
        if self.lanes is not None:
            changes["lanes"] = self.lanes
        return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def default_relay(settings: Settings) -> Relay:
    """The relay the single-relay environment describes (MAILER_SMTP_*, MAILER_RATE_LIMIT)."""
    return Relay(
        name=DEFAULT_RELAY,
        host=settings.smtp_host,
        port=settings.smtp_port,
        tls=settings.smtp_tls,
        username=settings.smtp_username,
        password=settings.smtp_password,
        auth=settings.smtp_auth,
        ca_file=settings.smtp_ca_file,
        allow_insecure=settings.allow_insecure,
        max_messages_per_connection=settings.max_messages_per_connection,
        rate_limits=settings.rate_limits,
    )

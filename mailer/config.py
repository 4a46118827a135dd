"""Every setting comes from the environment, read and validated here and nowhere else.

Producers only need the broker and the default From; workers also need the relay settings,
which `Settings.require_relay()` checks at start-up so a bad key fails the worker, not a task.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mailer import redisconn
from mailer.errors import ConfigError
from mailer.redisconn import redact_url as redact_url  # re-exported: the CLI and callers
from mailer.redisconn import url_secrets as url_secrets
from mailer.wire import DEFAULT_RELAY, RELAY_NAME

log = logging.getLogger("mailer.config")

TLSMode = Literal["starttls", "tls", "none"]
TLS_MODES: tuple[TLSMode, ...] = ("starttls", "tls", "none")
STARTTLS_PORTS = (25, 587, 2525)
IMPLICIT_TLS_PORTS = (465,)
SENDGRID_KEY = re.compile(r"^SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}$")
UNCERTAIN_POLICIES = ("retry", "hold")
#: Which header extensions a relay understands (mailer/relays.py; the failover translates).
Profile = Literal["sendgrid", "ses", "postmark", "smtp"]
PROFILES: tuple[Profile, ...] = ("sendgrid", "ses", "postmark", "smtp")


#: Rate window units (MAILER_RATE_LIMIT): seconds per unit.
RATE_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*/\s*([a-z]+)(?:\s*:\s*(\d+))?$")
_LANE = re.compile(r"^([a-z][a-z0-9_]{0,31})(?:\s*:\s*(\d+(?:\.\d+)?)\s*%)?$")


@dataclass(frozen=True)
class RateWindow:
    """`limit` messages per `period` seconds, with bursts of at most `burst` beyond the pace
    (GCRA: in any interval of length L at most burst + L * limit / period go out)."""

    limit: float
    period: float
    burst: int
    spec: str  # as written, normalised: names the window's state in Redis

    @property
    def spacing(self) -> float:
        return self.period / self.limit

    @property
    def tolerance(self) -> float:
        return self.burst * self.spacing

    @property
    def per_second(self) -> float:
        return self.limit / self.period

    def scaled(self, share: float, lane: str) -> RateWindow:
        """This window for one lane, which may use `share` of it."""
        limit = max(self.limit * share, 1e-6)
        burst = max(1, int(self.burst * share))
        return RateWindow(limit, self.period, burst, f"{lane}:{limit:g}/{self.period:g}s:{burst}")


def parse_rates(name: str, raw: str) -> tuple[RateWindow, ...]:
    """`500/s,100000/h,2000000/d` (an optional `:burst` after each window)."""
    windows = []
    for part in filter(None, (p.strip() for p in raw.lower().split(","))):
        match = _RATE.match(part)
        if match is None or match.group(2) not in RATE_UNITS:
            raise ConfigError(
                name, f"{part!r} is not a rate such as 500/s, 3000/min, 100000/h or 2000000/d"
            )
        limit, period = float(match.group(1)), RATE_UNITS[match.group(2)]
        if limit <= 0:
            raise ConfigError(name, f"{part!r}: the limit must be above 0")
        # Default burst: a tenth of a second's worth at the window's pace, at least one.
        burst = int(match.group(3)) if match.group(3) else max(1, int(limit / period / 10))
        windows.append(RateWindow(limit, period, burst, f"{limit:g}/{period:g}s:{burst}"))
    return tuple(windows)


@dataclass(frozen=True)
class Lane:
    """A priority lane: its own broker queue; `share` of the connection cap and of the rate is
    kept for it (other lanes may use at most the rest), 0 for none."""

    name: str
    share: float = 0.0


def parse_lanes(raw: str) -> tuple[Lane, ...]:
    """`transactional:20%,bulk`: highest priority first."""
    lanes: list[Lane] = []
    for part in filter(None, (p.strip() for p in raw.lower().split(","))):
        match = _LANE.match(part)
        if match is None:
            raise ConfigError(
                "MAILER_LANES",
                f"{part!r} is not a lane such as transactional:20% or bulk "
                "(a lowercase name, an optional reserved share)",
            )
        if any(lane.name == match.group(1) for lane in lanes):
            raise ConfigError("MAILER_LANES", f"lane {match.group(1)!r} is named twice")
        lanes.append(Lane(match.group(1), float(match.group(2) or 0) / 100))
    if sum(lane.share for lane in lanes) >= 1.0:
        raise ConfigError("MAILER_LANES", "the reserved shares must add up to less than 100%")
    return tuple(lanes) or (Lane("default"),)


# A password in a URL's query string (redis-py reads `?password=`), whatever its case.
class Secret:
    """A string that never shows itself in a repr, str, log line or exception."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret is not serialised; read it from the environment where needed")


def _int(env: Mapping[str, str], name: str, default: int | None, low: int, high: int) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(name, f"must be between {low} and {high}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"must be a number of seconds, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(name, f"must be between {low} and {high}, got {value}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(name, f"must be 1 or 0, got {raw!r}")


def _event_loop(env: Mapping[str, str]) -> str:
    raw = env.get("MAILER_EVENT_LOOP", "").strip().lower() or "auto"
    if raw not in ("auto", "uvloop", "asyncio"):
        raise ConfigError("MAILER_EVENT_LOOP", f"must be auto, uvloop or asyncio, got {raw!r}")
    if raw == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError("MAILER_EVENT_LOOP", "uvloop is not installed (pip install uvloop)")
    return raw


def _password(env: Mapping[str, str]) -> Secret:
    name = "MAILER_SMTP_PASSWORD" if "MAILER_SMTP_PASSWORD" in env else "SENDGRID_API_KEY"
    return api_key(name, env.get(name, ""))


def api_key(name: str, value: str) -> Secret:
    """`value` stripped, as a Secret; a ConfigError naming `name` when SMTP AUTH could not use
    it (whitespace inside). Never echoes the value: names the kind of character instead."""
    value = value.strip()
    for ch in value:
        if ch.isspace() or ord(ch) < 32 or ord(ch) == 127:
            kind = "a line feed" if ch in "\r\n" else "whitespace or a control character"
            raise ConfigError(
                name,
                f"the API key contains {kind} inside it; SMTP AUTH would fail "
                "(surrounding whitespace is stripped, inner whitespace is not)",
            )
    return Secret(value)


def _redis_tls(env: Mapping[str, str], broker: str, redis_url: str) -> dict[str, Any]:
    """The URLs checked, and how TLS and Sentinel reach them (mailer/redisconn.py)."""
    targets = [
        redisconn.parse(broker, "MAILER_BROKER_URL"),
        redisconn.parse(redis_url, "MAILER_REDIS_URL"),
    ]
    files: dict[str, str | None] = {}
    for name in ("CA", "CERT", "KEY"):
        variable = f"MAILER_REDIS_{name}_FILE"
        path = env.get(variable, "").strip() or None
        if path and not os.path.isfile(path):
            raise ConfigError(variable, f"no such file: {path}")
        files[name] = path
    if bool(files["CERT"]) != bool(files["KEY"]):
        raise ConfigError(
            "MAILER_REDIS_CERT_FILE",
            "a client certificate needs both MAILER_REDIS_CERT_FILE and MAILER_REDIS_KEY_FILE",
        )
    # Verification is on unless explicitly turned off (redisconn logs that it is off).
    verify = not env.get("MAILER_REDIS_TLS_VERIFY", "").strip() or _flag(
        env, "MAILER_REDIS_TLS_VERIFY"
    )
    master = env.get("MAILER_SENTINEL_MASTER", "").strip() or None
    if any(t.kind == "sentinel" for t in targets) and not master:
        raise ConfigError(
            "MAILER_SENTINEL_MASTER", "a sentinel:// URL needs the name of the master to follow"
        )
    return {
        "redis_ca_file": files["CA"],
        "redis_cert_file": files["CERT"],
        "redis_key_file": files["KEY"],
        "redis_tls_verify": verify,
        "sentinel_master": master,
        "sentinel_tls": _flag(env, "MAILER_SENTINEL_TLS"),
    }


def default_profile(host: str) -> Profile:
    """SendGrid's extensions for SendGrid's hosts, none for anything else."""
    return "sendgrid" if host.lower().rstrip(".").endswith("sendgrid.net") else "smtp"


def _failover(env: Mapping[str, str], host: str, lanes: list[str]) -> dict[str, Any]:
    """The `default` relay's fallback, the lanes that fail over, its profile: `sendgrid` unless
    set, whatever the host, so a single-relay deployment sends the bytes it always sent (the
    X-SMTPAPI header is harmless to a relay that ignores it)."""
    fallback = env.get("MAILER_FALLBACK", "").strip().lower() or None
    if fallback is not None and (fallback == DEFAULT_RELAY or not RELAY_NAME.match(fallback)):
        raise ConfigError(
            "MAILER_FALLBACK", f"{fallback!r} is not the name of another relay (docs/relays.md)"
        )
    chosen = tuple(
        filter(None, (x.strip().lower() for x in env.get("MAILER_FALLBACK_LANES", "").split(",")))
    )
    for lane in chosen:
        if lane not in lanes:
            raise ConfigError("MAILER_FALLBACK_LANES", f"{lane!r} is not one of {lanes}")
    if fallback and not chosen:
        raise ConfigError(
            "MAILER_FALLBACK_LANES", "MAILER_FALLBACK needs the lanes that fail over to it"
        )
    if chosen and not fallback:
        raise ConfigError("MAILER_FALLBACK_LANES", "needs MAILER_FALLBACK (the relay to use)")
    profile = env.get("MAILER_RELAY_PROFILE", "").strip().lower() or "sendgrid"
    if profile not in PROFILES:
        raise ConfigError("MAILER_RELAY_PROFILE", f"{profile!r} is not one of {list(PROFILES)}")
    configuration_set = env.get("MAILER_SES_CONFIGURATION_SET", "").strip() or None
    if configuration_set and profile != "ses":
        raise ConfigError("MAILER_SES_CONFIGURATION_SET", "needs MAILER_RELAY_PROFILE=ses")
    return {
        "fallback": fallback,
        "fallback_lanes": chosen,
        "relay_profile": profile,
        "ses_configuration_set": configuration_set,
    }


@dataclass(frozen=True)
class Settings:
    broker_url: str = "redis://localhost:6379/0"
    redis_url: str = "redis://localhost:6379/0"
    redis_ca_file: str | None = None  # TLS to Redis (mailer/redisconn.py): a private CA
    redis_cert_file: str | None = None  # client certificate, with redis_key_file
    redis_key_file: str | None = None
    redis_tls_verify: bool = True
    sentinel_master: str | None = None  # with sentinel:// URLs
    sentinel_tls: bool = False
    publish_retry_for: float = 10.0  # how long `mailer.send` retries an unreachable broker
    wait_replicas: int = 0  # replicas that must confirm a publish and the ledger's `data` mark
    smtp_host: str = "smtp.sendgrid.net"
    smtp_port: int = 587
    smtp_tls: TLSMode = "starttls"
    smtp_username: str = "apikey"
    smtp_password: Secret = field(default_factory=lambda: Secret(""))
    smtp_ca_file: str | None = None
    allow_insecure: bool = False
    smtp_auth: bool = True
    default_from: str | None = None
    max_messages_per_connection: int = 5000
    max_connections: int = 10000
    worker_connections: int = 32
    max_connections_per_host: int | None = None
    visibility_timeout: int = 3600
    metrics_port: int | None = None
    metrics_addr: str = "0.0.0.0"
    smtp_timeout: float = 60.0
    data_timeout: float = 600.0
    session_max_age: float = 1800.0
    session_idle_timeout: float = 45.0
    lease_ttl: float = 60.0
    lease_wait: float = 30.0
    max_retries: int = 8
    max_message_age: float = 86400.0
    ledger_ttl: int = 7 * 86400
    uncertain_policy: str = "hold"
    circuit_probe_interval: float = 10.0
    hostname: str = field(default_factory=socket.gethostname)
    celery_task_logs: bool = False  # Celery's own per-task INFO lines (ours are the audit trail)
    event_loop: str = "auto"  # the worker's SMTP loop: uvloop when installed, else asyncio
    rate_limits: tuple[RateWindow, ...] = ()  # MAILER_RATE_LIMIT; () = none configured
    rate_unit: str = "messages"  # or "recipients": what a token counts
    connect_rate: float | None = None  # new SMTP sessions per second, fleet-wide
    quota_probe_interval: float = 60.0
    lanes: tuple[Lane, ...] = (Lane("default"),)
    default_lane: str = "default"
    # The `default` relay's failover and profile (mailer/relays.py, docs/relays.md).
    fallback: str | None = None
    fallback_lanes: tuple[str, ...] = ()
    failover_after: float = 30.0
    relay_profile: Profile = "sendgrid"
    ses_configuration_set: str | None = None
    #: Where a named relay's key is read when it names no password_env / password_file.
    relay_secrets_dir: str | None = None

    def __repr__(self) -> str:
        """Every field, the URLs with their passwords masked (Django debug pages, error
        trackers and logs print settings objects)."""
        shown = []
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name in ("broker_url", "redis_url"):
                value = redact_url(value)
            shown.append(f"{name}={value!r}")
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__

    def lane(self, name: str) -> Lane:
        for lane in self.lanes:
            if lane.name == name:
                return lane
        raise KeyError(name)

    def lane_share(self, name: str) -> float:
        """The part of the cap and rate lane `name` may use: all but the others' reserves."""
        return 1.0 - sum(lane.share for lane in self.lanes if lane.name != name)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        broker = env.get("MAILER_BROKER_URL", "").strip() or cls.broker_url
        redis_url = env.get("MAILER_REDIS_URL", "").strip() or broker
        redis_tls = _redis_tls(env, broker, redis_url)

        port = _int(env, "MAILER_SMTP_PORT", 587, 1, 65535)
        assert port is not None
        tls_raw = env.get("MAILER_SMTP_TLS", "").strip().lower()
        if not tls_raw:
            tls: TLSMode = "tls" if port in IMPLICIT_TLS_PORTS else "starttls"
        elif tls_raw in TLS_MODES:
            tls = tls_raw
        else:
            raise ConfigError(
                "MAILER_SMTP_TLS", f"unknown TLS mode {tls_raw!r}; use starttls, tls or none"
            )
        insecure = _flag(env, "MAILER_SMTP_ALLOW_INSECURE")
        if tls == "none" and not insecure:
            raise ConfigError(
                "MAILER_SMTP_TLS",
                "'none' sends the API key in clear text; it needs MAILER_SMTP_ALLOW_INSECURE=1 "
                "(only for a local sink)",
            )
        # No AUTH at all: only for a local sink that cannot authenticate (Postfix's smtp-sink
        # answers AUTH with 250, which every client reads as a failed login): bench only.
        no_auth = _flag(env, "MAILER_SMTP_NO_AUTH")
        if no_auth and not insecure:
            raise ConfigError(
                "MAILER_SMTP_NO_AUTH", "needs MAILER_SMTP_ALLOW_INSECURE=1 (only for a local sink)"
            )
        ca_file = env.get("MAILER_SMTP_CA_FILE", "").strip() or None
        if ca_file and not os.path.isfile(ca_file):
            raise ConfigError("MAILER_SMTP_CA_FILE", f"no such file: {ca_file}")
        host = env.get("MAILER_SMTP_HOST", "").strip() or cls.smtp_host
        if any(ch.isspace() for ch in host):
            raise ConfigError("MAILER_SMTP_HOST", f"not a host name: {host!r}")
        default_from = env.get("MAILER_DEFAULT_FROM", "").strip() or None
        policy = env.get("MAILER_UNCERTAIN_POLICY", "").strip().lower() or cls.uncertain_policy
        if policy not in UNCERTAIN_POLICIES:
            raise ConfigError("MAILER_UNCERTAIN_POLICY", "must be 'hold' or 'retry'")

        lanes = parse_lanes(env.get("MAILER_LANES", ""))
        names = [lane.name for lane in lanes]
        default_lane = env.get("MAILER_DEFAULT_LANE", "").strip().lower() or (
            "default" if "default" in names else names[-1]
        )
        if default_lane not in names:
            raise ConfigError("MAILER_DEFAULT_LANE", f"{default_lane!r} is not one of {names}")
        rate_unit = env.get("MAILER_RATE_UNIT", "").strip().lower() or "messages"
        if rate_unit not in ("messages", "recipients"):
            raise ConfigError("MAILER_RATE_UNIT", "must be 'messages' or 'recipients'")
        connect_rate = _float(env, "MAILER_CONNECT_RATE", 0.0, 0.0, 1_000_000.0) or None
        failover = _failover(env, host, names)
        max_per_conn = _int(env, "MAILER_MAX_MESSAGES_PER_CONNECTION", 5000, 1, 1_000_000)
        max_conns = _int(env, "MAILER_MAX_CONNECTIONS", 10000, 1, 1_000_000)
        worker_conns = _int(env, "MAILER_WORKER_CONNECTIONS", 32, 1, 10_000)
        visibility = _int(env, "MAILER_VISIBILITY_TIMEOUT", 3600, 60, 7 * 86400)
        lease_ttl = _float(env, "MAILER_LEASE_TTL", 60.0, 3.0, 3600.0)
        assert max_per_conn and max_conns and worker_conns and visibility
        settings = cls(
            broker_url=broker,
            redis_url=redis_url,
            **redis_tls,
            publish_retry_for=_float(env, "MAILER_PUBLISH_RETRY_FOR", 10.0, 0.0, 600.0),
            wait_replicas=_int(env, "MAILER_WAIT_REPLICAS", 0, 0, 16) or 0,
            smtp_host=host,
            smtp_port=port,
            smtp_tls=tls,
            smtp_username=env.get("MAILER_SMTP_USERNAME", "").strip() or "apikey",
            smtp_password=_password(env),
            smtp_ca_file=ca_file,
            allow_insecure=insecure,
            smtp_auth=not no_auth,
            default_from=default_from,
            max_messages_per_connection=max_per_conn,
            max_connections=max_conns,
            worker_connections=worker_conns,
            max_connections_per_host=_int(
                env, "MAILER_MAX_CONNECTIONS_PER_HOST", None, 1, 1_000_000
            ),
            visibility_timeout=visibility,
            metrics_port=_int(env, "MAILER_METRICS_PORT", None, 1, 65535),
            metrics_addr=env.get("MAILER_METRICS_ADDR", "").strip() or "0.0.0.0",
            smtp_timeout=_float(env, "MAILER_SMTP_TIMEOUT", 60.0, 0.1, 3600.0),
            data_timeout=_float(env, "MAILER_DATA_TIMEOUT", 600.0, 0.1, 3600.0),
            session_max_age=_float(env, "MAILER_SESSION_MAX_AGE", 1800.0, 1.0, 86400.0),
            session_idle_timeout=_float(env, "MAILER_SESSION_IDLE_TIMEOUT", 45.0, 0.1, 3600.0),
            lease_ttl=lease_ttl,
            lease_wait=_float(env, "MAILER_LEASE_WAIT", 30.0, 0.0, 3600.0),
            max_retries=_int(env, "MAILER_MAX_RETRIES", 8, 0, 1000) or 0,
            max_message_age=_float(env, "MAILER_MAX_MESSAGE_AGE", 86400.0, 1.0, 30 * 86400.0),
            ledger_ttl=_int(env, "MAILER_LEDGER_TTL", 7 * 86400, 60, 365 * 86400) or 0,
            uncertain_policy=policy,
            circuit_probe_interval=_float(env, "MAILER_CIRCUIT_PROBE_INTERVAL", 10.0, 0.1, 3600.0),
            hostname=env.get("MAILER_HOSTNAME", "").strip() or socket.gethostname(),
            celery_task_logs=_flag(env, "MAILER_CELERY_TASK_LOGS"),
            event_loop=_event_loop(env),
            rate_limits=parse_rates("MAILER_RATE_LIMIT", env.get("MAILER_RATE_LIMIT", "")),
            rate_unit=rate_unit,
            connect_rate=connect_rate,
            quota_probe_interval=_float(env, "MAILER_QUOTA_PROBE_INTERVAL", 60.0, 1.0, 86400.0),
            lanes=lanes,
            default_lane=default_lane,
            failover_after=_float(env, "MAILER_FAILOVER_AFTER", 30.0, 0.1, 86400.0),
            relay_secrets_dir=env.get("MAILER_RELAY_SECRETS_DIR", "").strip() or None,
            **failover,
        )
        return settings

    def require_relay(self) -> Settings:
        """Checks what a worker needs before it opens a single connection."""
        if not self.smtp_password and self.smtp_auth:
            raise ConfigError(
                "MAILER_SMTP_PASSWORD",
                "no API key: set MAILER_SMTP_PASSWORD or SENDGRID_API_KEY",
            )
        if self.smtp_tls == "none" and self.smtp_auth:
            if self.smtp_host.lower().rstrip(".") == "smtp.sendgrid.net":
                raise ConfigError(
                    "MAILER_SMTP_TLS",
                    "'none' would send the SendGrid API key in clear text to smtp.sendgrid.net; "
                    "use starttls or tls (MAILER_SMTP_ALLOW_INSECURE is for local sinks only)",
                )
            log.warning(
                "INSECURE: MAILER_SMTP_TLS=none with AUTH: the password for %s goes over the "
                "network in clear text (AUTH without TLS). Only for a local sink; set "
                "MAILER_SMTP_NO_AUTH=1 or MAILER_SMTP_TLS=starttls otherwise.",
                self.smtp_host,
            )
        if self.smtp_tls == "tls" and self.smtp_port in STARTTLS_PORTS:
            log.warning("implicit TLS on port %d, which relays use for STARTTLS", self.smtp_port)
        if self.smtp_tls == "starttls" and self.smtp_port in IMPLICIT_TLS_PORTS:
            raise ConfigError(
                "MAILER_SMTP_TLS", "port 465 takes implicit TLS ('tls'), not STARTTLS"
            )
        if self.smtp_host.endswith("sendgrid.net") and not SENDGRID_KEY.match(
            self.smtp_password.reveal()
        ):
            log.warning(
                "the API key does not look like a SendGrid key (69 characters, 'SG.' prefix)"
            )
        if self.lease_ttl < 3 * 1.0:
            raise ConfigError("MAILER_LEASE_TTL", "must be at least 3 seconds")
        return self

    @property
    def retry_countdown_max(self) -> int:
        """Countdowns stay well below the visibility timeout, or Redis redelivers them early."""
        return max(1, min(600, self.visibility_timeout // 4))


RESOLVE_POLICIES = ("retry", "hold")


@dataclass(frozen=True)
class WebhookSettings:
    """The Event Webhook's settings (`events/`), read apart from `Settings` because only the
    webhook process needs them; `from_env` checks them at start-up."""

    #: SendGrid's verification key as the console shows it (base64 DER SubjectPublicKeyInfo).
    public_key: str = ""
    #: A directory of per-relay keys: a file named after a relay holds its SendGrid subuser's
    #: verification key ("" = the fleet key for every relay).
    keys_dir: str = ""
    #: A signed timestamp older (or newer) than this is refused (a replayed capture).
    tolerance: float = 300.0
    #: A message held as uncertain with no relay event after this long follows `resolve_policy`.
    resolve_after: float = 900.0
    resolve_policy: str = "hold"
    #: PostgreSQL for every event (history); "" = off.
    events_dsn: Secret = field(default_factory=lambda: Secret(""))
    #: How often the sweep looks for uncertain holds to resolve by time.
    sweep_interval: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WebhookSettings:
        env = os.environ if env is None else env
        policy = env.get("MAILER_UNCERTAIN_RESOLVE_POLICY", "").strip().lower() or "hold"
        if policy not in RESOLVE_POLICIES:
            raise ConfigError(
                "MAILER_UNCERTAIN_RESOLVE_POLICY", f"must be retry or hold, got {policy!r}"
            )
        keys_dir = env.get("MAILER_SENDGRID_WEBHOOK_KEYS_DIR", "").strip()
        if keys_dir and not os.path.isdir(keys_dir):
            raise ConfigError("MAILER_SENDGRID_WEBHOOK_KEYS_DIR", f"not a directory: {keys_dir}")
        return cls(
            public_key="".join(env.get("MAILER_SENDGRID_WEBHOOK_KEY", "").split()),
            keys_dir=keys_dir,
            tolerance=_float(env, "MAILER_WEBHOOK_TOLERANCE", 300.0, 1.0, 86400.0),
            resolve_after=_float(env, "MAILER_UNCERTAIN_RESOLVE_AFTER", 900.0, 1.0, 30 * 86400.0),
            resolve_policy=policy,
            events_dsn=Secret(env.get("MAILER_EVENTS_DSN", "").strip()),
            sweep_interval=_float(env, "MAILER_UNCERTAIN_SWEEP_INTERVAL", 30.0, 0.1, 3600.0),
        )

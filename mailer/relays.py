"""Named relays: each with its own host, key, caps, rates, lanes, circuit and fallback.

The single-relay environment (MAILER_SMTP_*, MAILER_RATE_LIMIT, ...) is the relay named
`default`, on every worker, as before. Other relays live in the state Redis (`mailer relays
apply relays.toml` writes them; docs/relays.md): workers and producers re-read them when their
version changes, so adding or removing a tenant needs neither a code change nor a restart.
A relay's secret never travels: Redis holds only where to find it (`password_env`,
`password_file`, or MAILER_RELAY_SECRETS_DIR/<name>), and each worker resolves it itself.

Here: the `Relay` a worker sends through, the secret-less `RelaySpec` a file or Redis
describes (`load_file`, `RelaySpec.from_mapping`), the registry in Redis (`RelayStore`), the
producer's check at enqueue (`RelayDirectory`) and the worker's table (`RelayTable`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from mailer import redisconn
from mailer.config import (
    IMPLICIT_TLS_PORTS,
    PROFILES,
    TLS_MODES,
    Lane,
    Profile,
    RateWindow,
    Secret,
    Settings,
    TLSMode,
    api_key,
    default_profile,
    parse_lanes,
    parse_rates,
    redact_url,
)
from mailer.errors import ConfigError, InvalidMessage, PublishError
from mailer.wire import DEFAULT_RELAY, RELAY_NAME, RELAYS, RELAYS_VERSION

__all__ = [
    "DEFAULT_RELAY",
    "PROFILES",
    "RELAY_NAME",
    "Changes",
    "Profile",
    "Relay",
    "RelayDirectory",
    "RelayError",
    "RelaySpec",
    "RelayStore",
    "RelayTable",
    "check_fallback",
    "default_relay",
    "load_file",
]


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
    """The relay the single-relay environment describes (MAILER_SMTP_*, MAILER_RATE_LIMIT,
    MAILER_FALLBACK, MAILER_RELAY_PROFILE...)."""
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
        fallback=settings.fallback,
        fallback_lanes=settings.fallback_lanes,
        failover_after=settings.failover_after,
        profile=settings.relay_profile,
        configuration_set=settings.ses_configuration_set,
    )


# -- The file format and the spec Redis stores --------------------------------------------------


class RelayError(ConfigError):
    """A relay's configuration is refused: names the relay (or `[defaults]`) and the field,
    never a secret's value."""

    def __init__(self, relay: str, field: str, problem: str) -> None:
        self.relay = relay
        self.field = field
        table = "[defaults]" if relay == "" else f"[relays.{relay}]"
        super().__init__(f"{table} {field}" if field else table, problem)


#: Every key a relay's table may hold (a `password` is refused with its own message).
FIELDS = (
    "host",
    "port",
    "tls",
    "username",
    "password_env",
    "password_file",
    "ca_file",
    "auth",
    "allow_insecure",
    "max_connections",
    "max_messages_per_connection",
    "rate_limit",
    "lanes",
    "fallback",
    "fallback_lanes",
    "failover_after",
    "profile",
    "configuration_set",
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class RelaySpec:
    """A named relay as a file and the registry describe it: where its key is, never the key.
    `to_json` is what Redis stores; `from_mapping` checks a file's table and Redis's JSON
    alike, so a hand-edited registry entry is held to the same rules."""

    name: str
    host: str
    port: int = 587
    tls: TLSMode = "starttls"
    username: str = "apikey"
    password_env: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    auth: bool = True
    allow_insecure: bool = False
    max_connections: int | None = None
    max_messages_per_connection: int = 5000
    rate_limit: str = ""  # MAILER_RATE_LIMIT's syntax; "" = none of its own
    lanes: str = ""  # MAILER_LANES' syntax: this relay's reserved shares; "" = the fleet's
    fallback: str | None = None
    fallback_lanes: tuple[str, ...] = ()
    failover_after: float = 30.0
    profile: Profile = "smtp"
    configuration_set: str | None = None

    @classmethod
    def from_mapping(
        cls, name: str, fields: Mapping[str, Any], fleet_lanes: Sequence[str] | None = None
    ) -> RelaySpec:
        """The spec `fields` describe, or a RelayError naming the relay and the field.
        `fleet_lanes` (MAILER_LANES' names), when given: every lane named must be one."""
        if not isinstance(name, str) or not RELAY_NAME.match(name):
            raise RelayError(
                str(name)[:64], "", "not a relay name (lowercase letters, digits, '.', '_', '-')"
            )
        if name == DEFAULT_RELAY:
            raise RelayError(
                name, "", "'default' is the workers' environment (MAILER_SMTP_*), not the file's"
            )
        return cls(name=name, **_Fields(name, fields, fleet_lanes).checked())

    @classmethod
    def from_json(cls, name: str, raw: str | bytes) -> RelaySpec:
        try:
            fields = json.loads(raw)
        except ValueError:
            raise RelayError(name, "", "the registry's entry is not JSON") from None
        if not isinstance(fields, dict):
            raise RelayError(name, "", "the registry's entry is not a JSON object")
        return cls.from_mapping(name, fields)

    def to_dict(self) -> dict[str, Any]:
        """Every field but the name, JSON types (what `mailer relays show` prints)."""
        fields = dataclasses.asdict(self)
        del fields["name"]
        fields["fallback_lanes"] = list(self.fallback_lanes)
        return fields

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def rate_limits(self) -> tuple[RateWindow, ...]:
        return parse_rates(f"[relays.{self.name}] rate_limit", self.rate_limit)

    def relay(self, password: Secret, fleet: Sequence[Lane]) -> Relay:
        """The `Relay` a worker sends through: `password` resolved on the worker, `lanes`
        completed to the fleet's (each fleet lane in its order, this relay's share or 0).
        RelayError when it cannot be used on this worker (a lane or CA file it lacks)."""
        lanes = None
        if self.lanes:
            shares = {lane.name: lane.share for lane in _lanes(self.name, self.lanes)}
            names = [lane.name for lane in fleet]
            for lane in shares:
                if lane not in names:
                    raise RelayError(
                        self.name, "lanes", f"{lane!r} is not one of this worker's lanes {names}"
                    )
            lanes = tuple(Lane(lane.name, shares.get(lane.name, 0.0)) for lane in fleet)
        if self.ca_file and not os.path.isfile(self.ca_file):
            raise RelayError(self.name, "ca_file", f"no such file on this worker: {self.ca_file}")
        return Relay(
            name=self.name,
            host=self.host,
            port=self.port,
            tls=self.tls,
            username=self.username,
            password=password,
            auth=self.auth,
            ca_file=self.ca_file,
            allow_insecure=self.allow_insecure,
            max_connections=self.max_connections,
            max_messages_per_connection=self.max_messages_per_connection,
            rate_limits=self.rate_limits,
            lanes=lanes,
            fallback=self.fallback,
            fallback_lanes=self.fallback_lanes,
            failover_after=self.failover_after,
            profile=self.profile,
            configuration_set=self.configuration_set,
        )


def _lanes(relay: str, raw: str) -> tuple[Lane, ...]:
    try:
        return parse_lanes(raw)
    except ConfigError as exc:
        raise RelayError(relay, "lanes", exc.problem) from None


class _Fields:
    """Checks one relay's table, field by field; each error names the relay and the field."""

    def __init__(
        self, relay: str, fields: Mapping[str, Any], fleet_lanes: Sequence[str] | None
    ) -> None:
        self.relay = relay
        self.fields = fields
        self.fleet_lanes = fleet_lanes
        refuse_unknown(relay, fields)

    def error(self, field: str, problem: str) -> RelayError:
        return RelayError(self.relay, field, problem)

    def checked(self) -> dict[str, Any]:
        host = self.text("host", required=True)
        assert host is not None
        if any(ch.isspace() for ch in host):
            raise self.error("host", f"not a host name: {host!r}")
        port = self.number("port", 587, 1, 65535, whole=True)
        tls = self.fields.get("tls", "tls" if port in IMPLICIT_TLS_PORTS else "starttls")
        if tls not in TLS_MODES:
            raise self.error("tls", f"{tls!r}: use starttls, tls or none")
        if tls == "starttls" and port in IMPLICIT_TLS_PORTS:
            raise self.error("tls", "port 465 takes implicit TLS ('tls'), not STARTTLS")
        auth = self.flag("auth", True)
        insecure = self.flag("allow_insecure", False)
        if (tls == "none" or not auth) and not insecure:
            field = "tls" if tls == "none" else "auth"
            raise self.error(field, "only for a local sink: needs allow_insecure = true")
        if tls == "none" and auth and host.lower().rstrip(".").endswith("sendgrid.net"):
            raise self.error("tls", "'none' would send the API key in clear text to SendGrid")
        password_env = self.text("password_env")
        if password_env is not None and not _ENV_NAME.match(password_env):
            raise self.error("password_env", "the name of an environment variable, not a key")
        password_file = self.text("password_file")
        if password_file is not None and not os.path.isabs(password_file):
            raise self.error("password_file", "an absolute path (on the worker hosts)")
        if password_env and password_file:
            raise self.error("password_file", "name password_env or password_file, not both")
        ca_file = self.text("ca_file")
        rate_limit = self.syntax("rate_limit")
        try:
            parse_rates("rate_limit", rate_limit)
        except ConfigError as exc:
            raise self.error("rate_limit", exc.problem) from None
        lanes = self.syntax("lanes")
        if lanes:
            self.lane_names("lanes", [lane.name for lane in _lanes(self.relay, lanes)])
        fallback = self.text("fallback")
        if fallback is not None and not RELAY_NAME.match(fallback):
            raise self.error("fallback", f"{fallback!r} is not a relay name")
        if fallback == self.relay:
            raise self.error("fallback", "a relay cannot be its own fallback")
        fallback_lanes = self.names("fallback_lanes")
        self.lane_names("fallback_lanes", fallback_lanes)
        if fallback and not fallback_lanes:
            raise self.error(
                "fallback_lanes", 'name the lanes that fail over, e.g. ["transactional"]'
            )
        if fallback_lanes and not fallback:
            raise self.error("fallback_lanes", "needs a fallback (the relay they go to)")
        profile = self.fields.get("profile", default_profile(host))
        if profile not in PROFILES:
            raise self.error("profile", f"{profile!r} is not one of {list(PROFILES)}")
        configuration_set = self.text("configuration_set")
        if configuration_set is not None and profile != "ses":
            raise self.error("configuration_set", "only for profile 'ses'")
        return {
            "host": host,
            "port": port,
            "tls": tls,
            "username": self.text("username") or "apikey",
            "password_env": password_env,
            "password_file": password_file,
            "ca_file": ca_file,
            "auth": auth,
            "allow_insecure": insecure,
            "max_connections": self.number("max_connections", None, 1, 1_000_000, whole=True),
            "max_messages_per_connection": self.number(
                "max_messages_per_connection", 5000, 1, 1_000_000, whole=True
            ),
            "rate_limit": rate_limit,
            "lanes": lanes,
            "fallback": fallback,
            "fallback_lanes": tuple(fallback_lanes),
            "failover_after": float(self.number("failover_after", 30.0, 0.1, 86400.0)),
            "profile": profile,
            "configuration_set": configuration_set,
        }

    def text(self, field: str, required: bool = False) -> str | None:
        value = self.fields.get(field)
        if value is None:
            if required:
                raise self.error(field, "missing")
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.error(field, "expected a non-empty string")
        return value.strip()

    def number(self, field: str, default: Any, low: float, high: float, whole: bool = False) -> Any:
        value = self.fields.get(field)
        if value is None:
            return default
        kinds = int if whole else int | float
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise self.error(field, f"expected a {'whole ' if whole else ''}number, got {value!r}")
        if not low <= value <= high:
            raise self.error(field, f"must be between {low:g} and {high:g}, got {value}")
        return value

    def flag(self, field: str, default: bool) -> bool:
        value = self.fields.get(field, default)
        if not isinstance(value, bool):
            raise self.error(field, "expected true or false")
        return value

    def syntax(self, field: str) -> str:
        """A string in an environment variable's syntax, or a list of its parts."""
        value = self.fields.get(field, "")
        if isinstance(value, list) and all(isinstance(part, str) for part in value):
            value = ",".join(value)
        if not isinstance(value, str):
            raise self.error(field, "expected a string such as in the environment variable")
        return "".join(value.lower().split())

    def names(self, field: str) -> list[str]:
        value = self.fields.get(field, [])
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list) or not all(isinstance(part, str) for part in value):
            raise self.error(field, "expected a list of lane names")
        return [part.strip().lower() for part in value if part.strip()]

    def lane_names(self, field: str, names: Iterable[str]) -> None:
        if self.fleet_lanes is None:
            return
        for name in names:
            if name not in self.fleet_lanes:
                raise self.error(
                    field,
                    f"{name!r} is not one of the fleet's lanes {list(self.fleet_lanes)} "
                    "(MAILER_LANES: lanes are the fleet's queues)",
                )


def refuse_unknown(relay: str, fields: Mapping[str, Any]) -> None:
    """A literal password is refused (it would be stored in Redis), and any key we do not know
    (a typo would otherwise be silently ignored)."""
    for key in fields:
        if key in ("password", "api_key"):
            raise RelayError(
                relay,
                key,
                "a key is never written in the file (it would be stored in Redis): name an "
                "environment variable (password_env) or a file (password_file) on the workers, "
                "or put it in MAILER_RELAY_SECRETS_DIR/<name>",
            )
        if key not in FIELDS:
            raise RelayError(relay, str(key), f"unknown key; the keys are {', '.join(FIELDS)}")


def load_file(path: str | Path, fleet_lanes: Sequence[str] | None = None) -> list[RelaySpec]:
    """Every relay of a TOML file (`[defaults]`, then `[relays.<name>]` tables), all checked:
    the first problem raises, naming the relay and the field."""
    where = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, f"not TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(where, f"cannot read it ({type(exc).__name__})") from None
    for key in data:
        if key not in ("defaults", "relays"):
            raise ConfigError(
                where, f"unknown table [{key}]; the tables are [defaults], [relays.*]"
            )
    defaults = data.get("defaults", {})
    relays = data.get("relays", {})
    if not isinstance(defaults, dict):
        raise ConfigError(where, "[defaults] must be a table")
    if not isinstance(relays, dict) or not all(isinstance(t, dict) for t in relays.values()):
        raise ConfigError(where, "relays are tables: [relays.<name>]")
    refuse_unknown("", defaults)
    return [
        RelaySpec.from_mapping(name, {**defaults, **table}, fleet_lanes)
        for name, table in relays.items()
    ]


# -- The registry in the state Redis -------------------------------------------------------------


@dataclass(frozen=True)
class Changes:
    """What `RelayStore.apply` did: names added, changed (-> the fields that changed), removed."""

    added: list[str]
    changed: dict[str, list[str]]
    removed: list[str]
    unchanged: list[str]
    version: int


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fallbacks_resolve(relays: Mapping[str, RelaySpec | None]) -> None:
    """Every fallback names `default` or a relay of `relays` (None: an entry not readable)."""
    for name, spec in sorted(relays.items()):
        if spec is not None and spec.fallback not in (None, DEFAULT_RELAY, *relays):
            raise RelayError(
                name, "fallback", f"{spec.fallback!r} is not a configured relay (nor 'default')"
            )


class RelayStore:
    """The registry (`mailer relays`): a hash of name -> `RelaySpec` JSON and a version that
    every change bumps in the same transaction, which is what producers and workers poll.
    Plain GET/SET/HSET/HDEL under WATCH/MULTI: the README's ACL rule covers it."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def version(self) -> int:
        return int(self.client.get(RELAYS_VERSION) or 0)

    def names(self) -> list[str]:
        return sorted(_text(name) for name in self.client.hkeys(RELAYS))

    def get(self, name: str) -> RelaySpec | None:
        raw = self.client.hget(RELAYS, name)
        return None if raw is None else RelaySpec.from_json(name, raw)

    def specs(self) -> dict[str, RelaySpec]:
        raw = self.client.hgetall(RELAYS)
        return {
            _text(name): RelaySpec.from_json(_text(name), value)
            for name, value in sorted(raw.items())
        }

    def apply(self, specs: Sequence[RelaySpec], replace: bool = False) -> Changes:
        """Writes `specs` (and with `replace`, removes every relay they do not name) in one
        transaction, or nothing: a fallback must resolve inside the resulting set."""
        new = {spec.name: spec for spec in specs}
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(RELAYS, RELAYS_VERSION)
                    current = {_text(k): _text(v) for k, v in pipe.hgetall(RELAYS).items()}
                    version = int(pipe.get(RELAYS_VERSION) or 0)
                    kept = {} if replace else {n: _readable(n, v) for n, v in current.items()}
                    _fallbacks_resolve({**kept, **new})
                    added = sorted(set(new) - set(current))
                    removed = sorted(set(current) - set(new)) if replace else []
                    changed = {
                        name: _differences(current[name], spec)
                        for name, spec in sorted(new.items())
                        if name in current and current[name] != spec.to_json()
                    }
                    unchanged = sorted(set(new) - set(added) - set(changed))
                    if added or removed or changed:
                        version += 1
                        pipe.multi()
                        for name in [*added, *changed]:
                            pipe.hset(RELAYS, name, new[name].to_json())
                        if removed:
                            pipe.hdel(RELAYS, *removed)
                        pipe.set(RELAYS_VERSION, version)
                        pipe.execute()
                    else:
                        pipe.unwatch()
                    return Changes(added, changed, removed, unchanged, version)
                except redis.WatchError:
                    continue

    def remove(self, name: str) -> bool:
        """False when `name` is not configured; a RelayError when another relay falls back
        to it (change that one first)."""
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(RELAYS, RELAYS_VERSION)
                    current = {_text(k): _text(v) for k, v in pipe.hgetall(RELAYS).items()}
                    if name not in current:
                        pipe.unwatch()
                        return False
                    del current[name]
                    for other, raw in sorted(current.items()):
                        spec = _readable(other, raw)
                        if spec is not None and spec.fallback == name:
                            raise RelayError(
                                other, "fallback", f"falls back to {name!r}: change it first"
                            )
                    version = int(pipe.get(RELAYS_VERSION) or 0) + 1
                    pipe.multi()
                    pipe.hdel(RELAYS, name)
                    pipe.set(RELAYS_VERSION, version)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue


def _readable(name: str, raw: str) -> RelaySpec | None:
    try:
        return RelaySpec.from_json(name, raw)
    except ConfigError:
        return None


def _differences(raw: str, spec: RelaySpec) -> list[str]:
    try:
        old = json.loads(raw)
    except ValueError:
        return ["(unreadable entry)"]
    new = spec.to_dict()
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


def check_fallback(settings: Settings, store: RelayStore) -> None:
    """At a worker's start: MAILER_FALLBACK must name a relay of the registry."""
    if settings.fallback and store.get(settings.fallback) is None:
        raise ConfigError(
            "MAILER_FALLBACK",
            f"{settings.fallback!r} is not a configured relay (`mailer relays list`)",
        )


# -- The producer's view ---------------------------------------------------------------------


def _profile_of(raw: bytes | str) -> str:
    """A registry entry's profile, without checking the rest (the workers do that)."""
    try:
        fields = json.loads(raw)
    except ValueError:
        return "smtp"
    profile = fields.get("profile") if isinstance(fields, dict) else None
    return profile if isinstance(profile, str) else "smtp"


class RelayDirectory:
    """Which relays a producer may name, checked at enqueue. `default` needs no Redis at all;
    other names are read from the registry and cached, with at most one GET of its version
    per second (the names are re-read only when it moved); a name not in the cache forces one
    immediate re-read before it is refused, so a relay added a moment ago is accepted."""

    RECHECK = 1.0

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self._client = client
        self._lock = threading.Lock()
        self._names: frozenset[str] = frozenset()
        self._profiles: dict[str, str] = {}
        self._version = -1
        self._next_check = 0.0

    def check(self, name: object, field: str = "relay") -> str:
        """`name` when it is `default` or a configured relay; InvalidMessage naming `field`
        otherwise; PublishError when the registry cannot be read."""
        if name is None or name == DEFAULT_RELAY:
            return DEFAULT_RELAY
        if not isinstance(name, str) or not RELAY_NAME.match(name):
            raise InvalidMessage(
                field, f"{name!r} is not a relay name (lowercase letters, digits, '.', '_', '-')"
            )
        with self._lock:
            try:
                synced = time.monotonic() >= self._next_check
                if synced:
                    self._sync()
                if name not in self._names and not synced:
                    self._sync()  # a relay added a moment ago
            except (redis.RedisError, OSError) as exc:
                raise PublishError(
                    f"could not check relay {name!r}: Redis at "
                    f"{redact_url(self.settings.redis_url)} unavailable ({type(exc).__name__}); "
                    "the message was not queued"
                ) from None
            if name in self._names:
                return name
        raise InvalidMessage(
            field,
            f"{name!r} is not a configured relay; `mailer relays list` shows them, "
            "`mailer relays apply FILE` adds them (docs/relays.md)",
        )

    def _sync(self) -> None:
        client = self._client
        if client is None:
            client = self._client = redisconn.client(
                self.settings.redis_url, self.settings, socket_timeout=10, max_connections=4
            )
        self._next_check = time.monotonic() + self.RECHECK
        if int(client.get(RELAYS_VERSION) or 0) == self._version:
            return
        with client.pipeline(transaction=True) as pipe:
            pipe.get(RELAYS_VERSION)
            pipe.hgetall(RELAYS)
            version, specs = pipe.execute()
        self._version = int(version or 0)
        self._profiles = {_text(n): _profile_of(raw) for n, raw in specs.items()}
        self._names = frozenset(self._profiles)

    def profile(self, name: str) -> str:
        """The profile of a relay `check` accepted (as of the cached registry)."""
        with self._lock:
            return self._profiles.get(name, "smtp")

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


# -- The worker's view -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """A relay built on this worker: usable (`relay`) or not (`reason`), and the secret file
    it was read from with that file's mtime then (None: missing), to notice a rotation."""

    relay: Relay | None
    reason: str | None
    secret_file: str | None = None
    stamp: tuple[int, int, int] | None = None


def _stamp(path: str) -> tuple[int, int, int] | None:
    """What changes when a secret file is rewritten or replaced (a Kubernetes secret volume
    swaps a symlink: another inode), or None while it is missing."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_mtime_ns, found.st_ino, found.st_size


class RelayTable:
    """The relays a worker sends through: the registry's specs, their secrets resolved here.

    The engine codes against this:

    - `RelayTable(settings, async_redis)`: `async_redis` is a client of the state Redis;
    - `await table.refresh()`: call it every ~2 s; one GET while the version has not moved
      (then HGETALL), and a stat of each built relay's secret file (a rotated key is re-read);
      a Redis error propagates and the table keeps what it had;
    - `await table.get(name) -> Relay | None`: `default` is the environment's relay
      (`table.default`); a name not known yet forces one refresh (a relay added a moment ago);
      None: not configured, or configured but unusable on this worker;
    - `table.unusable(name) -> str | None`: why a configured relay is unusable here (its secret
      cannot be read, a lane or CA file this worker lacks), naming the field, never the key;
      None when it is usable or not configured;
    - `table.version -> int`: the registry version last read (-1 before the first refresh);
    - `table.names() -> list[str]`: the configured names, `default` first.

    Secrets come from the worker's own environment (`password_env`), a file (`password_file`)
    or MAILER_RELAY_SECRETS_DIR/<name>; none of them is ever written to Redis.
    """

    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.default = default_relay(settings)
        self.version = -1
        self._specs: dict[str, RelaySpec | RelayError] = {}
        self._built: dict[str, _Entry] = {}

    async def refresh(self) -> None:
        version = int(await self.client.get(RELAYS_VERSION) or 0)
        if version != self.version:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.get(RELAYS_VERSION)
                pipe.hgetall(RELAYS)
                raw_version, raw = await pipe.execute()
            self._load(int(raw_version or 0), raw)
        for name, entry in list(self._built.items()):
            if entry.secret_file is not None and _stamp(entry.secret_file) != entry.stamp:
                del self._built[name]  # rebuilt, with the file's new content, when next asked

    def _load(self, version: int, raw: Mapping[bytes | str, bytes | str]) -> None:
        specs: dict[str, RelaySpec | RelayError] = {}
        for key, value in raw.items():
            name = _text(key)
            try:
                specs[name] = RelaySpec.from_json(name, value)
            except RelayError as exc:
                specs[name] = exc
        for name in list(self._built):
            if name not in specs or specs[name] != self._specs.get(name):
                del self._built[name]
        self._specs = specs
        self.version = version

    async def get(self, name: str) -> Relay | None:
        if name == DEFAULT_RELAY:
            return self.default
        if name not in self._specs:
            await self.refresh()
            if name not in self._specs:
                return None
        return self._entry(name).relay

    def unusable(self, name: str) -> str | None:
        if name == DEFAULT_RELAY or name not in self._specs:
            return None
        return self._entry(name).reason

    def names(self) -> list[str]:
        return [DEFAULT_RELAY, *sorted(self._specs)]

    def _entry(self, name: str) -> _Entry:
        entry = self._built.get(name)
        if entry is None:
            entry = self._built[name] = self._build(self._specs[name])
        return entry

    def _build(self, spec: RelaySpec | RelayError) -> _Entry:
        if isinstance(spec, RelayError):
            return _Entry(None, str(spec))
        path, field = spec.password_file, "password_file"
        if spec.auth and not spec.password_env and path is None and self.settings.relay_secrets_dir:
            path, field = os.path.join(self.settings.relay_secrets_dir, spec.name), "secret"
        stamp = None if path is None else _stamp(path)
        try:
            password = self._secret(spec, path, field)
            return _Entry(spec.relay(password, self.settings.lanes), None, path, stamp)
        except RelayError as exc:
            return _Entry(None, str(exc), path, stamp)

    def _secret(self, spec: RelaySpec, path: str | None, field: str) -> Secret:
        if not spec.auth:
            return Secret("")
        if spec.password_env:
            value = os.environ.get(spec.password_env, "")
            field = "password_env"
            if not value.strip():
                raise RelayError(spec.name, field, f"{spec.password_env} is not set on this worker")
        elif path is None:
            raise RelayError(
                spec.name,
                "password_env",
                "no key: name password_env or password_file, or set MAILER_RELAY_SECRETS_DIR "
                "on the workers (its file <name> holds the key)",
            )
        else:
            try:
                value = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise RelayError(
                    spec.name, field, f"cannot read {path} on this worker ({type(exc).__name__})"
                ) from None
            if not value.strip():
                raise RelayError(spec.name, field, f"{path} is empty")
        try:
            return api_key(field, value)
        except ConfigError as exc:
            raise RelayError(spec.name, field, exc.problem) from None

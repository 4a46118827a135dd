"""Every Redis connection the project opens is built here, from a URL and the settings.

Three kinds of URL, for the broker (MAILER_BROKER_URL) and the state (MAILER_REDIS_URL):

- `redis://[user:password@]host:port/db` and `unix://[user:password@]/path?db=N`: plain;
- `rediss://[user:password@]host:port/db`: TLS. The server certificate and its host name are
  verified (against the system CAs, or MAILER_REDIS_CA_FILE for a private CA), with an optional
  client certificate (MAILER_REDIS_CERT_FILE, MAILER_REDIS_KEY_FILE). MAILER_REDIS_TLS_VERIFY=0
  turns verification off: explicit, and logged each time a process builds a connection;
- `sentinel://host:26379;sentinel://host2:26379/db` with MAILER_SENTINEL_MASTER: the primary
  of that name, asked of the sentinels; credentials in the first URL are the data node's (an ACL
  user), MAILER_SENTINEL_TLS=1 reaches the sentinels and the data nodes over TLS (same CA and
  client certificate settings).

redis-py, kombu (the workers' consumer, Flower) and the producer's hand-packed connection all
get their parameters from here, so TLS, ACL users and Sentinel mean the same thing everywhere.
`check` opens one connection at start-up: a certificate that fails verification stops the
process with one line naming the URL (password masked), not a retry loop.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as asentinel
import redis.sentinel as ssentinel

from mailer.errors import ConfigError


class Settings(Protocol):
    """What this module reads of `mailer.config.Settings` (which parses these from the
    environment and calls `parse` to check the URLs)."""

    @property
    def redis_ca_file(self) -> str | None: ...
    @property
    def redis_cert_file(self) -> str | None: ...
    @property
    def redis_key_file(self) -> str | None: ...
    @property
    def redis_tls_verify(self) -> bool: ...
    @property
    def sentinel_master(self) -> str | None: ...
    @property
    def sentinel_tls(self) -> bool: ...


log = logging.getLogger("mailer.redis")

SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://")
SENTINEL_PORT = 26379
#: TLS options a rediss:// URL may carry in its query, as redis-py and kombu name them.
URL_TLS_OPTIONS = (
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_check_hostname",
)
_warned: list[bool] = []  # verification off: said once per process


_QUERY_SECRET = re.compile(r"(?i)(^|[&;])((?:password|passwd|pass|secret|token)=)[^&;#]*")


def redact_url(url: str) -> str:
    """The URL with its password masked, in the user-info part and in the query string:
    redis://user:secret@host:6379/0 -> redis://user:***@host:6379/0,
    redis://host/0?password=secret -> redis://host/0?password=***; every URL of a
    `sentinel://...;sentinel://...` list."""
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL we can read: show nothing of it
        return "<unreadable URL>"
    if password is not None:
        user_info, _, host = parts.netloc.rpartition("@")
        url = url.replace(parts.netloc, f"{user_info.partition(':')[0]}:***@{host}", 1)
    head, sep, tail = url.partition("?")
    return head + sep + _QUERY_SECRET.sub(r"\1\2***", tail)


def url_secrets(url: str) -> list[str]:
    """The passwords a URL carries (user-info and query string), for the log redactor."""
    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
    except ValueError:
        return []
    for match in _QUERY_SECRET.finditer(parts.query):
        value = parts.query[match.end(2) : match.end()]
        if value:
            found.append(value)
    return found


@dataclass(frozen=True)
class Target:
    """A Redis URL taken apart: where, who, which database, whether over TLS."""

    url: str
    kind: str  # "tcp", "unix" or "sentinel"
    tls: bool
    host: str = ""
    port: int = 6379
    path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    #: TLS settings given in the URL's query (`?ssl_ca_certs=...`), over the environment's.
    tls_query: tuple[tuple[str, str], ...] = ()

    @property
    def masked(self) -> str:
        return redact_url(self.url)

    def __repr__(self) -> str:  # the URL and password fields hold the secret
        return f"Target({self.masked!r})"


def parse(url: str, variable: str = "MAILER_REDIS_URL") -> Target:
    """The URL's parts; a URL we cannot use is a ConfigError naming `variable`."""
    if not url.startswith(SCHEMES):
        raise ConfigError(
            variable,
            f"must be a redis://, rediss://, unix:// or sentinel:// URL, got {redact_url(url)!r}",
        )
    if url.startswith("sentinel://"):
        nodes = []
        first = urlsplit(url.split(";")[0])
        for part in url.split(";"):
            split = urlsplit(part.strip())
            if split.scheme != "sentinel" or not split.hostname:
                raise ConfigError(variable, f"not a sentinel://host:port URL: {redact_url(part)!r}")
            nodes.append((split.hostname, split.port or SENTINEL_PORT))
        last = urlsplit(url.split(";")[-1])
        return Target(
            url=url,
            kind="sentinel",
            tls=False,
            db=_db(last.path, variable),
            username=unquote(first.username) if first.username else None,
            password=unquote(first.password) if first.password else None,
            sentinels=tuple(nodes),
        )
    split = urlsplit(url)
    username = unquote(split.username) if split.username else None
    password = unquote(split.password) if split.password is not None else None
    if split.scheme == "unix":
        query = parse_qs(split.query)
        return Target(
            url=url,
            kind="unix",
            tls=False,
            path=split.path,
            db=_db(query.get("db", ["0"])[0], variable),
            username=username,
            password=password,
        )
    if not split.hostname:
        raise ConfigError(variable, f"no host in {redact_url(url)!r}")
    given = {k: v[-1] for k, v in parse_qs(split.query).items()}
    # redis-py's own URL form for credentials (`?password=`, `?username=`) is accepted too.
    db_text = split.path
    for key in [k for k in given if k.lower() in ("password", "username", "db")]:
        if key.lower() == "password":
            password = given.pop(key)
        elif key.lower() == "username":
            username = given.pop(key)
        else:
            db_text = given.pop(key)
    unknown = sorted(set(given) - set(URL_TLS_OPTIONS))
    if unknown:
        raise ConfigError(
            variable,
            f"unknown URL option {unknown[0]!r} (TLS options: {', '.join(URL_TLS_OPTIONS)}; or "
            "MAILER_REDIS_CA_FILE, MAILER_REDIS_CERT_FILE, MAILER_REDIS_KEY_FILE)",
        )
    try:
        port = split.port or 6379
    except ValueError:
        raise ConfigError(variable, f"bad port in {redact_url(url)!r}") from None
    return Target(
        url=url,
        kind="tcp",
        tls=split.scheme == "rediss",
        host=split.hostname,
        port=port,
        db=_db(db_text, variable),
        username=username,
        password=password,
        tls_query=tuple(sorted(given.items())),
    )


def _db(text: str, variable: str) -> int:
    text = text.strip("/") or "0"
    if not text.isdigit():
        raise ConfigError(variable, f"the database must be a number, got {text!r}")
    return int(text)


def ssl_options(settings: Settings, target: Target | None = None) -> dict[str, Any]:
    """redis-py's TLS keyword arguments (kombu passes the same dict through `broker_use_ssl`):
    the environment's, with what the URL's query says instead where it says something."""
    query = dict(target.tls_query) if target is not None else {}
    verify = settings.redis_tls_verify
    if "ssl_cert_reqs" in query:
        verify = query["ssl_cert_reqs"].lower() not in ("none", "cert_none", "optional")
    if not verify and not _warned:
        _warned.append(True)
        log.warning(
            "Redis TLS verification is off (MAILER_REDIS_TLS_VERIFY=0 or ssl_cert_reqs=none): "
            "the server's certificate and host name are NOT "
            "verified; anyone on the path can read the queue and the credentials"
        )
    check_hostname = verify
    if "ssl_check_hostname" in query:
        check_hostname = verify and query["ssl_check_hostname"].lower() in ("1", "true", "yes")
    return {
        "ssl_cert_reqs": ssl.CERT_REQUIRED if verify else ssl.CERT_NONE,
        "ssl_check_hostname": check_hostname,
        "ssl_ca_certs": query.get("ssl_ca_certs", settings.redis_ca_file),
        "ssl_certfile": query.get("ssl_certfile", settings.redis_cert_file),
        "ssl_keyfile": query.get("ssl_keyfile", settings.redis_key_file),
    }


def connection_kwargs(target: Target, settings: Settings, **options: Any) -> dict[str, Any]:
    """Keyword arguments of a redis-py connection (pool) to a tcp or unix target."""
    kwargs: dict[str, Any] = {
        "db": target.db,
        "username": target.username,
        "password": target.password,
        **options,
    }
    if target.kind == "unix":
        for name in ("socket_connect_timeout", "socket_keepalive", "socket_keepalive_options"):
            kwargs.pop(name, None)
        return {"path": target.path, **kwargs}
    if target.kind == "tcp":
        kwargs.update(host=target.host, port=target.port)
    if target.tls or (target.kind == "sentinel" and settings.sentinel_tls):
        kwargs.update(ssl_options(settings, target))
    return kwargs


def _connection_class(target: Target, settings: Settings, asynchronous: bool) -> type[Any]:
    tls = target.tls or (target.kind == "sentinel" and settings.sentinel_tls)
    if target.kind == "unix":
        return (
            aioredis.UnixDomainSocketConnection
            if asynchronous
            else redis.UnixDomainSocketConnection
        )
    if target.kind == "sentinel":
        module: Any = asentinel if asynchronous else ssentinel
        managed: type[Any] = (
            module.SentinelManagedSSLConnection if tls else module.SentinelManagedConnection
        )
        return managed
    if asynchronous:
        return aioredis.SSLConnection if tls else aioredis.Connection
    return redis.SSLConnection if tls else redis.Connection


def _sentinel_kwargs(
    target: Target, settings: Settings, options: Mapping[str, Any]
) -> dict[str, Any]:
    """How to reach the sentinels themselves: their own timeouts, TLS as the data nodes."""
    kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
    kwargs.setdefault("socket_timeout", 2.0)
    kwargs.setdefault("socket_connect_timeout", 2.0)
    if settings.sentinel_tls:
        kwargs.update(ssl=True, **ssl_options(settings))
    return kwargs


class _AsyncBlockingSentinelPool(asentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The primary's connections, found through the sentinels; a caller waits for a free one
    (as with BlockingConnectionPool) instead of failing past `max_connections`."""


class _BlockingSentinelPool(ssentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sync counterpart of `_AsyncBlockingSentinelPool`."""


def pool(url: str, settings: Settings, **options: Any) -> redis.ConnectionPool:
    """A blocking sync pool (`max_connections`, `timeout` as redis-py's BlockingConnectionPool)."""
    target = parse(url)
    if target.kind == "sentinel":
        primary: redis.ConnectionPool = _sentinel(
            target, settings, options, asynchronous=False
        ).connection_pool
        return primary
    kwargs = connection_kwargs(target, settings, **options)
    kwargs["connection_class"] = _connection_class(target, settings, asynchronous=False)
    return redis.BlockingConnectionPool(**kwargs)


def client(url: str, settings: Settings, **options: Any) -> redis.Redis:
    """A sync client (thread-safe: each command checks a connection out of its pool)."""
    options.setdefault("max_connections", 64)
    options.setdefault("timeout", 20)
    return redis.Redis(connection_pool=pool(url, settings, **options))


def async_client(url: str, settings: Settings, **options: Any) -> aioredis.Redis:
    """An asyncio client over a blocking pool (`max_connections`, `timeout`)."""
    target = parse(url)
    options.setdefault("max_connections", 64)
    options.setdefault("timeout", 20)
    if target.kind == "sentinel":
        found = _sentinel(target, settings, options, asynchronous=True)
        return aioredis.Redis(connection_pool=found.connection_pool)
    kwargs = connection_kwargs(target, settings, **options)
    kwargs["connection_class"] = _connection_class(target, settings, asynchronous=True)
    return aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool(**kwargs))


def _sentinel(
    target: Target, settings: Settings, options: dict[str, Any], *, asynchronous: bool
) -> Any:
    if not settings.sentinel_master:
        raise ConfigError("MAILER_SENTINEL_MASTER", "a sentinel:// URL needs the master's name")
    kwargs = connection_kwargs(target, settings, **options)
    kwargs["connection_class"] = _connection_class(target, settings, asynchronous)
    module: Any = asentinel if asynchronous else ssentinel
    pool_class = _AsyncBlockingSentinelPool if asynchronous else _BlockingSentinelPool
    sentinel = module.Sentinel(
        list(target.sentinels), sentinel_kwargs=_sentinel_kwargs(target, settings, options)
    )
    return sentinel.master_for(settings.sentinel_master, connection_pool_class=pool_class, **kwargs)


# -- Celery and kombu ------------------------------------------------------------------------


def kombu_ssl(url: str, settings: Settings) -> dict[str, Any] | None:
    """`broker_use_ssl` / `redis_backend_use_ssl` for a URL: the same TLS settings, or None."""
    target = parse(url)
    if target.tls or (target.kind == "sentinel" and settings.sentinel_tls):
        return ssl_options(settings, target)
    return None


def kombu_transport_options(url: str, settings: Settings) -> dict[str, Any]:
    """What kombu's sentinel transport needs beyond the URL (nothing for a plain URL)."""
    target = parse(url)
    if target.kind != "sentinel":
        return {}
    if not settings.sentinel_master:
        raise ConfigError("MAILER_SENTINEL_MASTER", "a sentinel:// URL needs the master's name")
    return {
        "master_name": settings.sentinel_master,
        "sentinel_kwargs": _sentinel_kwargs(target, settings, {}),
    }


# -- Start-up check --------------------------------------------------------------------------


class RedisUnusable(ConfigError):
    """Redis was reached but cannot be used as configured (a certificate that fails
    verification, credentials refused): retrying would not help."""


def explain(exc: BaseException, url: str, variable: str) -> RedisUnusable | None:
    """One clear error for what no retry fixes (a refused certificate or login), else None."""
    masked = redact_url(url)
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or cause.reason or str(cause)
            return RedisUnusable(
                variable,
                f"TLS certificate verification failed for {masked}: {reason} "
                "(MAILER_REDIS_CA_FILE names a private CA)",
            )
        if isinstance(cause, ssl.SSLError):
            return RedisUnusable(variable, f"TLS handshake with {masked} failed: {cause.reason}")
        if isinstance(
            cause, redis.AuthenticationError | redis.AuthenticationWrongNumberOfArgsError
        ):
            return RedisUnusable(variable, f"Redis at {masked} refused the credentials: {cause}")
        if isinstance(cause, redis.exceptions.NoPermissionError):
            return RedisUnusable(
                variable,
                f"the Redis user of {masked} lacks a permission: {cause} "
                "(README, Production Redis: the ACL rule)",
            )
        cause = cause.__cause__ or cause.__context__
    if "certificate verify failed" in str(exc):  # redis-py wraps SSL errors in ConnectionError
        return RedisUnusable(variable, f"TLS certificate verification failed for {masked}: {exc}")
    return None


def _probes(role: str, db: int) -> list[tuple[str, ...]]:
    """Commands (with keys and channels of the kinds the project uses) a process of `role`
    sends: queued in a MULTI that is then discarded, so nothing runs, but Redis checks each
    against the user's ACL as it queues it. README "Production Redis" has the rule."""
    key, mailer_key, kombu, unacked = "mailer:probe", "mailer", "_kombu.binding.mailer", "unacked"
    reads: list[tuple[str, ...]] = [
        ("PING",),
        ("TIME",),
        ("INFO", "memory"),
        ("GET", key),
        ("PTTL", key),
        ("LLEN", mailer_key),
        ("LRANGE", mailer_key, "0", "0"),
        ("HGET", key, "f"),
        ("HLEN", unacked),
        ("HMGET", key, "f"),
        ("HGETALL", key),
        ("HEXISTS", key, "f"),
        ("SMEMBERS", kombu),
        ("ZCARD", key),
        ("ZSCORE", key, "m"),
        ("ZRANGE", key, "0", "0"),
        ("ZRANGEBYSCORE", key, "0", "1"),
        ("ZREVRANGE", key, "0", "0"),
        ("EVALSHA", "0" * 40, "1", key),
        ("EVAL", "return 1", "1", key),
        ("SCRIPT", "LOAD", "return 1"),
        ("SCRIPT", "EXISTS", "0" * 40),
    ]
    if role == "status":
        return reads
    return [
        *reads,
        ("WAIT", "0", "0"),
        ("WATCH", key),
        ("SET", key, "1"),
        ("DEL", key),
        ("EXPIRE", key, "1"),
        ("LPUSH", mailer_key, "x"),
        ("RPUSH", mailer_key, "x"),
        ("RPOP", mailer_key),
        ("BLMOVE", mailer_key, "mailer:fetch:inflight:probe", "RIGHT", "LEFT", "0"),
        ("LREM", "mailer:fetch:inflight:probe", "1", "x"),
        ("LMOVE", mailer_key, "mailer.probe", "RIGHT", "LEFT"),
        ("HKEYS", "mailer:rate"),
        ("HSET", unacked, "f", "v"),
        ("HDEL", unacked, "f"),
        ("HINCRBY", key, "f", "1"),
        ("SADD", kombu, "x"),
        ("SREM", kombu, "x"),
        ("ZADD", "unacked_index", "1", "m"),
        ("ZREM", key, "m"),
        ("ZREMRANGEBYSCORE", key, "0", "1"),
        ("LLEN", "probe@host.celery.pidbox"),
        ("PUBLISH", "mailer:sem:released", "x"),
        ("PUBLISH", f"/{db}.celeryev/task.sent", "x"),
        ("SUBSCRIBE", "mailer:sem:released"),
        ("UNSUBSCRIBE", "mailer:sem:released"),
        ("PSUBSCRIBE", f"/{db}.celery.pidbox"),
        ("PUNSUBSCRIBE", f"/{db}.celery.pidbox"),
    ]


def check(url: str, settings: Settings, variable: str, role: str | None = None) -> None:
    """Connects once: raises `RedisUnusable` for a certificate or login that no retry fixes,
    and, with `role` ("worker" or "status"), for a command or key the ACL user may not use;
    an unreachable server is left to the callers' retries."""
    probe = client(url, settings, socket_timeout=5, socket_connect_timeout=5, max_connections=1)
    try:
        probe.ping()
        if role is not None:
            _check_permissions(probe, _probes(role, parse(url).db))
    except (redis.RedisError, OSError) as exc:
        error = explain(exc, url, variable)
        if error is not None:
            raise error from None
    finally:
        probe.close()


def _check_permissions(probe: redis.Redis, commands: list[tuple[str, ...]]) -> None:
    conn = probe.connection_pool.get_connection()
    try:
        conn.send_command("MULTI")
        conn.read_response()
        try:
            for command in commands:
                conn.send_command(*command)
                try:
                    conn.read_response()  # QUEUED, or why not
                except redis.exceptions.NoPermissionError:
                    raise
                except redis.ResponseError:
                    pass  # allowed, but not in a transaction (SUBSCRIBE...): fine here
        finally:
            conn.send_command("DISCARD")
            conn.read_response()
    finally:
        probe.connection_pool.release(conn)

"""Structured worker logs: one JSON line per event, and a redacting backstop for every line.

Events are what operators grep and ship: `sent`, `retried`, `dead_lettered`, `rotated`,
`lease_acquired`, `lease_lost`... each a JSON object on one line with the message id where
there is one. Celery's own lines keep Celery's readable text format; both go through the same
handlers, so ordering and `--logfile` are unchanged. Listeners (metrics, throughput) hear every
event whatever the log level, so turning logs down never changes what is counted.

The event vocabulary (fields besides `ts`, `level`, `event`). Every event of a message's
attempt, and every event of a relay's sessions, leases and rate, has `relay` too (`default`
for the single-relay environment):

    sent            message_id, attempts            the relay answered 250
    duplicate       message_id, attempts            redelivered, the ledger says sent: not resent
    held            message_id, attempts            redelivered after an ambiguous attempt (hold)
    failed          message_id, attempts            redelivered, the ledger says it failed before
    retried         message_id, kind, code, attempts, countdown, reason
    dead_lettered   message_id, kind, code, attempts, reason   (kind: permanent | expired |
                                                                 uncertain | recipients)
    circuit_opened, quota_exhausted   reason       a relay's breaker opened (WARNING)
    relay_unavailable  reason                       a message's relay is not configured or
                                                    unusable here (WARNING, once per interval)
    relay_parts_closed reason                       a relay's sessions and leases were let go
                                                    (idle, reconfigured, removed)
    rotated         transactions                    a session was QUIT at its limit or age
    lease_acquired  lease, waited_s
    lease_released  lease
    lease_lost      lease                           its connection is aborted (fenced)
    throttled, rate_recovered   rate, configured, reason    the relay's adaptive ceiling
    shutdown        open_sessions, leases           the worker is closing its sessions
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any

from mailer.config import url_secrets

EVENTS = logging.getLogger("mailer.events")
REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 6  # shorter "secrets" would garble ordinary text and hide nothing

Listener = Callable[[str, Mapping[str, Any]], None]
_listeners: list[Listener] = []
_lock = threading.Lock()


def subscribe(listener: Listener) -> None:
    """Calls `listener(event, fields)` on every event, from whichever thread emits it."""
    with _lock:
        if listener not in _listeners:
            _listeners.append(listener)


def unsubscribe(listener: Listener) -> None:
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)


def log_event(event: str, /, *, level: int = logging.INFO, **fields: Any) -> None:
    """One structured line for `event`; never raises into the caller's delivery path."""
    for listener in list(_listeners):
        try:
            listener(event, fields)
        except Exception:  # a broken listener must not fail a delivery
            EVENTS.debug("event listener %r failed", listener, exc_info=True)
    if EVENTS.isEnabledFor(level):
        # Not EVENTS.log: it walks the stack for the caller's file and line (findCaller) on
        # every call, a fifth of a line's cost, and an event is found by its name, not its line.
        extra = {"event_name": event, "event_fields": fields}
        EVENTS.handle(EVENTS.makeRecord(EVENTS.name, level, "", 0, event, (), None, None, extra))


def outcome_of(event: str, fields: Mapping[str, Any]) -> str | None:
    """The message outcome an event stands for, counted once per message and attempt:
    sent | duplicate | retried | failed (dead-lettered permanent or expired) | held
    (dead-lettered uncertain). Other events are not outcomes."""
    if event in ("sent", "duplicate", "retried"):
        return event
    if event == "dead_lettered":
        kind = str(fields.get("kind"))
        if kind in ("permanent", "expired"):
            return "failed"
        if kind == "uncertain":
            return "held"
    return None


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return round(value, 6)
    return str(value)


class Redactor:
    """Replaces every occurrence of the configured secrets (and their AUTH encodings)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        unique = {s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}
        self.secrets = sorted(unique, key=len, reverse=True)  # longest first: no partial leaks

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def __bool__(self) -> bool:
        return bool(self.secrets)


def secrets_of(password: str, username: str = "apikey", urls: Iterable[str] = ()) -> list[str]:
    """The API key, its base64 forms on the wire (AUTH PLAIN and LOGIN), and URL passwords."""
    out: list[str] = []
    if password:
        raw = password.encode()
        out += [
            password,
            base64.b64encode(raw).decode(),
            base64.b64encode(b"\0" + username.encode() + b"\0" + raw).decode(),
            base64.b64encode(username.encode() + b"\0" + username.encode() + b"\0" + raw).decode(),
        ]
    for url in urls:
        for part in url.split(";"):  # sentinel:// URLs come as a list
            out += url_secrets(part)  # user-info and ?password= alike
    return out


class RedactingFilter(logging.Filter):
    """Handler filter: rewrites a record so no formatter downstream can print a secret."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__("redact")
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.redact:
            return True
        fields = getattr(record, "event_name", None) and getattr(record, "event_fields", None)
        plain = not (record.args or record.exc_info or record.stack_info)
        if plain and isinstance(fields, Mapping):
            # One of our events (a line per message): its name is ours and its values are all
            # it carries, so they are all there is to clean.
            record.event_fields = {
                k: self.redact(v) if isinstance(v, str) else v for k, v in fields.items()
            }
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: show the raw template, never the args
            message = str(record.msg)
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        fields = getattr(record, "event_fields", None)
        if isinstance(fields, Mapping):
            record.event_fields = {
                k: self.redact(v) if isinstance(v, str) else v for k, v in fields.items()
            }
        for key, value in list(vars(record).items()):
            if isinstance(value, str) and key not in ("msg", "exc_text", "stack_info"):
                clean = self.redact(value)
                if clean is not value:
                    setattr(record, key, clean)
        return True


@lru_cache(maxsize=4)
def _second(created: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))


class EventFormatter(logging.Formatter):
    """JSON for event records, the wrapped formatter for everything else; both redacted."""

    def __init__(self, fallback: logging.Formatter | None, redact: Redactor) -> None:
        super().__init__()
        self.fallback = fallback or logging.Formatter()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        name = getattr(record, "event_name", None)
        if name is None:
            return self.redact(self.fallback.format(record))
        fields = getattr(record, "event_fields", {}) or {}
        line: dict[str, Any] = {
            "ts": f"{_second(int(record.created))}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": name,
        }
        for key, value in fields.items():
            line.setdefault(str(key), _jsonable(value))
        return self.redact(json.dumps(line, separators=(",", ":"), ensure_ascii=False))


def configure(logger: logging.Logger, secrets: Iterable[str]) -> None:
    """Installs the redacting filter and the event formatter on every handler of `logger`
    (Celery's root and task loggers). Idempotent."""
    redact = Redactor(secrets)
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter(redact))
        if not isinstance(handler.formatter, EventFormatter):
            handler.setFormatter(EventFormatter(handler.formatter, redact))


def parse_events(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The event objects among log lines (for tests and tooling)."""
    out: list[dict[str, Any]] = []
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and "event" in data:
            out.append(data)
    return out


def failure_fields(failure: Any) -> dict[str, Any]:
    """`kind`, `code`, `reason` of a classified Failure (duck-typed: no worker imports here)."""
    kind = getattr(failure, "kind", None)
    return {
        "kind": getattr(kind, "value", kind) or type(failure).__name__,
        "code": getattr(failure, "code", None),
        "reason": getattr(failure, "reason", None) or str(failure),
    }


def log_retried(
    message_id: Any, failure: Any, attempts: int, countdown: float, relay: str = "default"
) -> None:
    """The `retried` event: the message goes back to the queue with a countdown."""
    fields = failure_fields(failure)
    log_event(
        "retried",
        message_id=message_id,
        attempts=attempts,
        countdown=countdown,
        relay=relay,
        **fields,
    )

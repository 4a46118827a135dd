"""The webhook for any framework: `handle(headers, body) -> (status, body)`.

Verifies the request (403 and nothing stored when it is not SendGrid's, or stale), puts the
raw batch on the inbox (one LPUSH) and answers 200; the process's drain thread, started on
first use, applies it (`events/drain.py`). `events.app` (ASGI) and `events.django` use the same
pieces.

A batch is posted for a relay (each SendGrid subuser posts its events to its own URL): its
suppressions go to that relay's lists. The relay need not be configured here: a relay removed a
moment ago (or not yet applied) still has its events kept, SendGrid's signature is what says
they are genuine.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

import redis

from events import metrics
from events.drain import Drainer
from events.ingest import Ingestor, inbox_entry
from events.signature import Refused, RelayVerifiers, Verifier
from events.store import EventStore
from events.sweep import Sweep
from mailer import redisconn
from mailer.config import Settings, WebhookSettings
from mailer.errors import ConfigError
from mailer.wire import DEFAULT_RELAY, RELAY_NAME
from workers.state import keys

log = logging.getLogger("mailer.events")

#: Largest body accepted (SendGrid posts batches of events, far below this).
MAX_BODY = 16 * 1024 * 1024


def bad_relay(relay: str) -> tuple[int, bytes] | None:
    """The 400 to answer for a relay name that cannot be one, or None."""
    if RELAY_NAME.match(relay):
        return None
    metrics.REQUESTS.labels("bad").inc()
    shown = relay[:80].encode("ascii", "replace")
    return 400, b"bad relay name %r: lower-case letters, digits, '_', '.', '-', 1-64 long\n" % (
        shown
    )


def drainer(
    client: redis.Redis, settings: Settings, webhook: WebhookSettings, *, sweep: bool = True
) -> Drainer:
    """The drain thread's parts, wired from the settings (not started)."""
    dsn = webhook.events_dsn.reveal()
    store = EventStore(dsn).start() if dsn else None
    return Drainer(
        client,
        Ingestor(client, settings.ledger_ttl, keep_rows=store is not None),
        store=store,
        sweep=Sweep(client, settings, webhook) if sweep else None,
        sweep_interval=webhook.sweep_interval,
    )


class Webhook:
    """Verifier, Redis client and drain thread of one process."""

    def __init__(
        self,
        settings: Settings | None = None,
        webhook: WebhookSettings | None = None,
        *,
        drain: bool = True,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.webhook = webhook or WebhookSettings.from_env()
        self.verifier = Verifier(self.webhook.public_key, self.webhook.tolerance)
        self.verifiers = RelayVerifiers(
            self.verifier, self.webhook.keys_dir, self.webhook.tolerance
        )
        # TLS, ACL users and Sentinel as everywhere else (mailer/redisconn.py).
        self.redis = redisconn.client(self.settings.redis_url, self.settings, socket_timeout=10)
        self.drainer = drainer(self.redis, self.settings, self.webhook) if drain else None

    def check(
        self, headers: Mapping[str, str], body: bytes, relay: str = DEFAULT_RELAY
    ) -> tuple[int, bytes] | None:
        """The refusal to answer, or None when the request is SendGrid's (signed with the key
        of `relay`, a valid relay name)."""
        if len(body) > MAX_BODY:
            metrics.REQUESTS.labels("bad").inc()
            return 413, b"body too large\n"
        try:
            verifier = self.verifiers.for_relay(relay)
        except ConfigError as exc:  # its key file went bad after start-up: SendGrid retries
            metrics.REQUESTS.labels("bad").inc()
            log.error("webhook request for relay %s not verified: %s", relay, exc)
            return 503, b"this relay's verification key is unusable\n"
        try:
            verifier.verify(headers, body)
        except Refused as exc:
            metrics.REQUESTS.labels("refused").inc()
            log.warning("webhook request refused: %s", exc)
            return 403, f"forbidden: {exc}\n".encode()
        return None

    def handle(
        self, headers: Mapping[str, str], body: bytes, relay: str = DEFAULT_RELAY
    ) -> tuple[int, bytes]:
        refused = bad_relay(relay) or self.check(headers, body, relay)
        if refused is not None:
            return refused
        self.redis.lpush(keys.EVENT_INBOX, inbox_entry(relay, body))
        metrics.REQUESTS.labels("accepted").inc()
        if self.drainer is not None:
            self.drainer.start()
        return 200, b""

    def close(self) -> None:
        if self.drainer is not None:
            self.drainer.stop()
        self.redis.close()


_default: Webhook | None = None
_lock = threading.Lock()


def default_webhook() -> Webhook:
    """The process's webhook, configured from the environment on first use."""
    global _default
    with _lock:
        if _default is None:
            _default = Webhook()
        return _default


def handle(
    headers: Mapping[str, str], body: bytes, relay: str = DEFAULT_RELAY
) -> tuple[int, bytes]:
    """(HTTP status, response body) for one POST of SendGrid's Event Webhook for `relay`."""
    return default_webhook().handle(headers, body, relay)

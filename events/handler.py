"""The webhook for any framework: `handle(headers, body) -> (status, body)`.

Verifies the request (403 and nothing stored when it is not SendGrid's, or stale), puts the
raw batch on the inbox (one LPUSH) and answers 200; the process's drain thread, started on
first use, applies it (`events/drain.py`). `events.app` (ASGI) and `events.django` use the same
pieces.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

import redis

from events import metrics
from events.drain import Drainer
from events.ingest import Ingestor
from events.signature import Refused, Verifier
from events.store import EventStore
from events.sweep import Sweep
from mailer import redisconn
from mailer.config import Settings, WebhookSettings
from workers.state import keys

log = logging.getLogger("mailer.events")

#: Largest body accepted (SendGrid posts batches of events, far below this).
MAX_BODY = 16 * 1024 * 1024


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
        # TLS, ACL users and Sentinel as everywhere else (mailer/redisconn.py).
        self.redis = redisconn.client(self.settings.redis_url, self.settings, socket_timeout=10)
        self.drainer = drainer(self.redis, self.settings, self.webhook) if drain else None

    def check(self, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes] | None:
        """The refusal to answer, or None when the request is SendGrid's."""
        if len(body) > MAX_BODY:
            metrics.REQUESTS.labels("bad").inc()
            return 413, b"body too large\n"
        try:
            self.verifier.verify(headers, body)
        except Refused as exc:
            metrics.REQUESTS.labels("refused").inc()
            log.warning("webhook request refused: %s", exc)
            return 403, f"forbidden: {exc}\n".encode()
        return None

    def handle(self, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes]:
        refused = self.check(headers, body)
        if refused is not None:
            return refused
        self.redis.lpush(keys.EVENT_INBOX, body)
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


def handle(headers: Mapping[str, str], body: bytes) -> tuple[int, bytes]:
    """(HTTP status, response body) for one POST of SendGrid's Event Webhook."""
    return default_webhook().handle(headers, body)

"""The webhook as an ASGI app (plain ASGI, no framework): `POST /webhooks/sendgrid` (the
`default` relay's events) and `POST /webhooks/sendgrid/<relay>` (a named relay's: one SendGrid
subuser's), plus `GET /metrics` (Prometheus) and `GET /healthz`. `mailer webhook --host --port`
runs it under uvicorn; `uvicorn events.app:app` works too. The drain thread starts with the app
(lifespan) and applies what the requests put on the inbox (`events/drain.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from events import metrics
from events.handler import MAX_BODY, Webhook, bad_relay
from events.ingest import inbox_entry
from mailer import redisconn
from mailer.config import Settings, WebhookSettings
from mailer.wire import DEFAULT_RELAY
from workers.state import keys

log = logging.getLogger("mailer.events")

PATH = "/webhooks/sendgrid"
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class WebhookApp:
    def __init__(
        self, settings: Settings | None = None, webhook: WebhookSettings | None = None
    ) -> None:
        self._settings = settings
        self._webhook_settings = webhook
        self.webhook: Webhook | None = None
        self.redis: aioredis.Redis | None = None

    def _start(self) -> Webhook:
        if self.webhook is None:
            self.webhook = Webhook(self._settings, self._webhook_settings)
            settings = self.webhook.settings
            self.redis = redisconn.async_client(settings.redis_url, settings)
            assert self.webhook.drainer is not None
            self.webhook.drainer.start()
        return self.webhook

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await asyncio.to_thread(self._start)
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.webhook is not None:
                    await asyncio.to_thread(self.webhook.close)
                if self.redis is not None:
                    await self.redis.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path == "/healthz" and method == "GET":
            return await _reply(send, 200, b"ok\n")
        if path == "/metrics" and method == "GET":
            return await _reply(send, 200, generate_latest(), CONTENT_TYPE_LATEST)
        relay = _relay(path)
        if relay is None:
            return await _reply(send, 404, b"not found\n")
        if method != "POST":
            return await _reply(send, 405, b"POST only\n")
        webhook = self._start() if self.webhook is None else self.webhook
        body = await _body(receive)
        if body is None:
            metrics.REQUESTS.labels("bad").inc()
            return await _reply(send, 413, b"body too large\n")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refused = bad_relay(relay) or webhook.check(headers, body, relay)
        if refused is not None:
            return await _reply(send, *refused)
        assert self.redis is not None
        await self.redis.lpush(keys.EVENT_INBOX, inbox_entry(relay, body))
        metrics.REQUESTS.labels("accepted").inc()
        await _reply(send, 200, b"")


def _relay(path: str) -> str | None:
    """The relay a webhook path is for (checked later: a bad name is a 400), None: not ours."""
    if path == PATH:
        return DEFAULT_RELAY
    if path.startswith(PATH + "/"):
        return path[len(PATH) + 1 :]
    return None


async def _body(receive: Receive) -> bytes | None:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


async def _reply(
    send: Send, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8"
) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(
    settings: Settings | None = None, webhook: WebhookSettings | None = None
) -> WebhookApp:
    return WebhookApp(settings, webhook)


#: `uvicorn events.app:app`: configured from the environment at start-up.
app = create_app()


def serve(host: str = "127.0.0.1", port: int = 8025, log_level: str = "info") -> None:
    """Runs the app under uvicorn (one process; run more behind a load balancer to scale)."""
    import uvicorn

    WebhookSettings.from_env()  # a bad setting fails here, before the server binds
    uvicorn.run(app, host=host, port=port, log_level=log_level, lifespan="on", access_log=False)

"""The webhook as a Django view: `path("webhooks/sendgrid", sendgrid_webhook)` and, for named
relays (one SendGrid subuser each), `path("webhooks/sendgrid/<str:relay>", sendgrid_webhook)`
in urls.py.

Configured from the environment like the rest (MAILER_SENDGRID_WEBHOOK_KEY, MAILER_REDIS_URL);
the drain thread starts in the Django process on the first request (`events/drain.py`).
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from events.handler import handle
from mailer.wire import DEFAULT_RELAY


@csrf_exempt
@require_POST
def sendgrid_webhook(request: HttpRequest, relay: str = DEFAULT_RELAY) -> HttpResponse:
    status, body = handle(dict(request.headers), request.body, relay)
    return HttpResponse(body, status=status, content_type="text/plain")

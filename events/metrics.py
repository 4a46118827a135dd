"""Prometheus series of the webhook process (served at `/metrics` by `events.app`):

mailer_events_total{type}          events applied, by SendGrid type (duplicates excluded)
mailer_events_duplicate_total      events seen before (SendGrid's retries and duplicates)
mailer_events_unmatched_total      applied events that name no message of ours
mailer_uncertain_resolved_total{by}  holds ended: `event` (proof from the relay) or `retry`
mailer_webhook_requests_total{outcome}  accepted | refused | bad
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter

EVENTS = Counter("mailer_events", "SendGrid events applied, by type", ["type"])
DUPLICATES = Counter("mailer_events_duplicate", "SendGrid events seen before")
UNMATCHED = Counter("mailer_events_unmatched", "Applied events naming no message of ours")
RESOLVED = Counter("mailer_uncertain_resolved", "Uncertain holds ended", ["by"])
REQUESTS = Counter("mailer_webhook_requests", "Webhook requests by outcome", ["outcome"])


def record(by_type: Mapping[str, int], duplicates: int, unmatched: int, resolved: int) -> None:
    for kind, n in by_type.items():
        EVENTS.labels(kind).inc(n)
    DUPLICATES.inc(duplicates)
    UNMATCHED.inc(unmatched)
    RESOLVED.labels("event").inc(resolved)

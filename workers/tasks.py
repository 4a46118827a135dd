"""Two tasks: `mailer.send` (one message), `mailer.send_batch` (many, each with its own fate).

Retries go through Celery's own `retry`, so Flower shows RETRY, the count and the SMTP reason;
reprs are passed again on every retry (Celery drops them otherwise, celery#6086). Our own
`attempts` counts SMTP attempts only: waiting for a lease or for the circuit breaker to close
does not spend a message's retries.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from typing import Any

from celery import Task
from celery.exceptions import Retry

from mailer.publish import QUEUE, describe
from workers import deadletters
from workers.app import app, settings
from workers.classify import Failure, Kind, Phase
from workers.runtime import Result, runtime

log = logging.getLogger("mailer.worker")

WAIT_KINDS = (Kind.AUTH, Kind.TLS, Kind.NO_LEASE)


class PermanentFailure(Exception):
    """Raised after dead-lettering so Flower shows FAILURE with the relay's reply."""


def backoff(attempts: int) -> float:
    """Exponential with full jitter, capped well below the visibility timeout."""
    cap = settings.retry_countdown_max
    return random.uniform(0.5, min(cap, 5.0 * 2 ** max(0, attempts - 1)))


def _countdown(failure: Failure, attempts: int) -> float:
    if failure.kind is Kind.RECONNECT:
        return random.uniform(0.1, 1.0)
    if failure.kind is Kind.NO_LEASE:
        return random.uniform(1.0, 5.0)
    if failure.kind in (Kind.AUTH, Kind.TLS):
        return random.uniform(0.5, 1.5) * 10.0
    return backoff(attempts)


def _dead(
    payload: Mapping[str, Any],
    kind: str,
    failure: Failure | None,
    attempts: int,
    result: Result | None = None,
) -> None:
    letter = deadletters.record(
        payload,
        kind=kind,
        code=failure.code if failure else None,
        text=failure.reason if failure else (result.reply if result else ""),
        attempts=attempts,
        refused=failure.refused if failure else (result.refused if result else None),
    )
    runtime().dead.add(letter)
    log.warning(
        "message dead-lettered", extra={"message_id": letter.id, "kind": kind, "code": letter.code}
    )


def _expired(payload: Mapping[str, Any], attempts: int) -> bool:
    created = float(payload.get("meta", {}).get("created_at", time.time()))
    return attempts > settings.max_retries or time.time() - created > settings.max_message_age


def decide(payload: Mapping[str, Any], attempts: int, failure: Failure) -> tuple[str, int, float]:
    """('retry', attempts, countdown) or ('dead', attempts, 0); trips the breaker when needed."""
    rt = runtime()
    if failure.kind in (Kind.AUTH, Kind.TLS):
        rt.circuit.trip(failure.reason)
        return "retry", attempts, _countdown(failure, attempts)
    if failure.kind is Kind.NO_LEASE:
        return "retry", attempts, _countdown(failure, attempts)
    if failure.kind is Kind.PERMANENT:
        return "dead", attempts + 1, 0.0
    if failure.kind is Kind.UNCERTAIN and settings.uncertain_policy == "hold":
        return "held", attempts + 1, 0.0
    attempts += 1
    if _expired(payload, attempts):
        return "expired", attempts, 0.0
    return "retry", attempts, _countdown(failure, attempts)


def _circuit_wait(task: Task) -> float | None:
    """Countdown to wait while the breaker is open, or None to go ahead (possibly as the probe)."""
    state = runtime().circuit.state()
    if not state.open or runtime().circuit.try_probe():
        return None
    return random.uniform(0.5, 1.5) * runtime().circuit.probe_interval


def _finish(payload: Mapping[str, Any], result: Result, attempts: int) -> dict[str, Any]:
    if runtime().circuit.state().open and result.status == "sent":
        runtime().circuit.reset()  # a probe authenticated: close the breaker for the fleet
    if result.refused:
        _dead(payload, "recipients", None, attempts + 1, result)
    if result.status == "held":
        _dead(payload, "uncertain", None, attempts + 1, result)
    log.info("message %s", result.status, extra={"message_id": payload.get("id")})
    return {"id": payload.get("id"), "status": result.status}


@app.task(name="mailer.send", bind=True, max_retries=None, acks_late=True, ignore_result=True)
def send(self: Task, payload: dict[str, Any], attempts: int = 0) -> dict[str, Any]:
    def retry(countdown: float, attempts: int, exc: BaseException) -> Retry:
        return self.retry(
            args=(payload,),
            kwargs={"attempts": attempts},
            countdown=countdown,
            exc=exc,
            queue=QUEUE,
            argsrepr=describe(payload),
            kwargsrepr=repr({"attempts": attempts}),
        )

    wait = _circuit_wait(self)
    if wait is not None:
        raise retry(
            wait,
            attempts,
            Failure(
                Kind.AUTH, None, "circuit open: " + runtime().circuit.state().reason, Phase.CONNECT
            ),
        )
    try:
        result = runtime().deliver(payload)
    except Failure as failure:
        verdict, attempts, countdown = decide(payload, attempts, failure)
        if verdict == "retry":
            log.info("message retry: %s", failure.reason, extra={"message_id": payload.get("id")})
            raise retry(countdown, attempts, failure) from None
        if verdict == "held":
            _dead(payload, "uncertain", failure, attempts)
            return {"id": payload.get("id"), "status": "held"}
        _dead(payload, "permanent" if verdict == "dead" else "expired", failure, attempts)
        raise PermanentFailure(failure.reason) from None
    return _finish(payload, result, attempts)


@app.task(name="mailer.send_batch", bind=True, max_retries=None, acks_late=True, ignore_result=True)
def send_batch(self: Task, payloads: list[dict[str, Any]]) -> dict[str, int]:
    """Sends a batch concurrently; any message that needs a retry becomes its own `mailer.send`
    task, so a transient failure of one never resends the others."""
    counts: dict[str, int] = {}
    if _circuit_wait(self) is not None:
        outcomes: list[Result | Failure] = [
            Failure(Kind.AUTH, None, "circuit open", Phase.CONNECT) for _ in payloads
        ]
    else:
        outcomes = runtime().deliver_many(payloads)
    for payload, outcome in zip(payloads, outcomes, strict=True):
        if isinstance(outcome, Result):
            status = _finish(payload, outcome, 0)["status"]
        else:
            verdict, attempts, countdown = decide(payload, 0, outcome)
            status = verdict
            if verdict == "retry":
                send.apply_async(
                    args=(payload,),
                    kwargs={"attempts": attempts},
                    countdown=countdown,
                    queue=QUEUE,
                    argsrepr=describe(payload),
                    kwargsrepr=repr({"attempts": attempts}),
                )
            elif verdict == "held":
                _dead(payload, "uncertain", outcome, attempts)
            else:
                _dead(payload, "permanent" if verdict == "dead" else "expired", outcome, attempts)
        counts[status] = counts.get(status, 0) + 1
    return counts

"""Two tasks: `mailer.send` (one message), `mailer.send_batch` (many, each with its own fate).

Retries go through Celery's own `retry`, so Flower shows RETRY, the count and the SMTP reason;
reprs are passed again on every retry (Celery drops them otherwise, celery#6086). Our own
`attempts` counts SMTP attempts only: waiting for a lease, for the ledger's Redis, for another
copy of the same message or for the circuit breaker to close does not spend a message's retries
(see the table in workers/engine/classify.py).

No path acknowledges a message that was neither delivered, dead-lettered nor handed back to the
broker: an unexpected error becomes a retry, and a retry that cannot be published (the broker is
down past the publish retry policy) requeues the message instead of letting Celery drop it
(`Task.retry` raises `Reject(requeue=False)` then, docs/fetch.md). Every countdown stays below a
quarter of the visibility timeout, so Redis never redelivers a message that is merely waiting
for its ETA; longer waits are chains of retries.

Outcomes as Flower shows them: SUCCESS (sent, or a duplicate acknowledged without sending),
RETRY (with the SMTP code and text), FAILURE `PermanentFailure` (dead-lettered: permanent or
expired) and FAILURE `HeldForReview` (dead-lettered as "uncertain" under the `hold` policy;
`mailer failures retry <id>` sends it again deliberately).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from datetime import datetime
from typing import Any, NoReturn

import redis
from celery import Task
from celery.exceptions import Reject
from celery.worker.request import Request

from mailer import wire
from mailer.publish import Publisher, Retry, describe, describe_batch
from mailer.wire import queue_for
from workers.app import app, settings
from workers.engine.classify import Failure
from workers.engine.runtime import Result, runtime
from workers.observe.logs import log_retried
from workers.settle import (
    REQUEUE_PAUSE,
    HeldForReview,
    PermanentFailure,
    close_circuit,
    countdown_for,
    dead_letter,
    decide,
    finish,
    refuse,
    relay_for,
    retry_kwargs,
    settle_one,
    unexpected,
    wait_for_circuit,
)
from workers.strategy import DrainStream

log = logging.getLogger("mailer.worker")

app.steps["consumer"].add(DrainStream)


class DurableCountdowns(Task):
    """A task whose countdowns wait in the durable schedule (workers/state/schedule.py), not in
    a worker's memory: Celery's ETA tasks on Redis are held by the worker that fetched them and
    redelivered when they outlive the visibility timeout, so every retry with a countdown (ours
    and `Task.retry`'s) is published to the schedule instead and released when due."""

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: Any = None,
        **options: Any,
    ) -> Any:
        countdown, eta = options.get("countdown"), options.get("eta")
        fast = _fast_publisher()
        if not (countdown or eta) or fast is None or link or link_error:
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        due = eta.timestamp() if isinstance(eta, datetime) else time.time() + float(countdown or 0)
        task_id = task_id or str(uuid.uuid4())
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        payload = args[0] if args and isinstance(args[0], dict) else {}
        # A message has at most one retry pending: file it under the message's id.
        item = str(payload.get("id") or task_id)
        retry = Retry(
            task_id,
            int(options.get("retries") or 0),
            kwargs,
            options.get("kwargsrepr") or repr(kwargs),
            options.get("root_id"),
            options.get("parent_id"),
        )
        queue = options.get("queue") or queue_for(wire.lane_of(payload))
        argsrepr = options.get("argsrepr") or repr(args)
        fast.publish([(self.name, args, argsrepr, str(queue))], due=[(item, due)], retry=retry)
        return self.AsyncResult(task_id)


_publishers: dict[int, Any] = {}


def _fast_publisher() -> Any:
    """This process's publisher to the schedule (None when the broker is not Redis)."""
    pid = os.getpid()
    if pid not in _publishers:
        _publishers[pid] = Publisher(settings).fast
    return _publishers[pid]


def _republish(
    task: Task, countdown: float, exc: BaseException, *, lane: str, **options: Any
) -> NoReturn:
    """Celery's retry (to the lane's queue) with our reprs; if it cannot publish, requeue
    instead of being dropped."""
    try:
        raise task.retry(countdown=countdown, exc=exc, queue=queue_for(lane), **options)
    except Reject as reject:
        log.error("retry could not be published (%s); requeueing the message", reject.reason)
        time.sleep(REQUEUE_PAUSE)
        raise Reject(reject.reason, requeue=True) from None


@app.task(
    name="mailer.send",
    base=DurableCountdowns,
    bind=True,
    max_retries=None,
    acks_late=True,
    ignore_result=True,
    throws=(PermanentFailure, HeldForReview),
    Strategy="workers.strategy:strategy",  # first attempts skip Celery's per-task machinery
)
def send(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """`(payload, attempts=0, released="")`, read through the wire contract (a task it refuses
    is dead-lettered as `invalid`, never sent). `released`: the ledger owners of this task's
    earlier attempts, which left nothing at the relay (see `Ledger.claim`); internal, so it is
    not in the repr Flower shows."""
    try:
        payload, attempts, released = wire.send_args(args, kwargs)
    except wire.InvalidPayload as exc:
        refuse(args[0] if len(args) == 1 else list(args), self.request.id, str(exc))
        raise PermanentFailure(f"invalid payload: {exc}") from None

    def retry(countdown: float, attempts: int, exc: Failure) -> NoReturn:
        log_retried(payload.get("id"), exc, attempts, countdown, relay_for(payload, exc))
        _republish(
            self,
            countdown,
            exc,
            lane=wire.lane_of(payload),
            args=(payload,),
            kwargs=retry_kwargs(attempts, released, exc.attempt),
            argsrepr=describe(payload),
            kwargsrepr=repr({"attempts": attempts}),
        )

    waited = False
    try:
        waiting = wait_for_circuit(wire.relay_of(payload), lane=wire.lane_of(payload))
        if waiting is not None:
            waited = True
            raise waiting
        result = runtime().deliver(payload, released, attempts)
        finished = finish(payload, result, attempts)
    except Failure as failure:
        outcome: Failure = failure
    except Exception as exc:  # never let an error acknowledge a message that went nowhere
        log.exception("unexpected error delivering %s", payload.get("id"))
        outcome = unexpected(exc)
    else:
        if finished["status"] == "held":  # a redelivered copy found it ambiguous: dead-lettered
            raise HeldForReview(result.reply)
        return finished
    verdict, attempts, countdown = decide(payload, attempts, outcome, trip=not waited)
    if verdict == "retry":
        retry(countdown, attempts, outcome)
    kind = {"held": "uncertain", "dead": "permanent"}.get(verdict, "expired")
    try:
        dead_letter(payload, kind, outcome, attempts)
    except (redis.RedisError, OSError) as exc:
        # Not recorded anywhere yet: give the message back; its ledger record (failed, or
        # data/uncertain) makes the next copy dead-letter it without sending again.
        log.error("dead letter not written (%s); requeueing the message", type(exc).__name__)
        time.sleep(REQUEUE_PAUSE)
        raise Reject(f"dead letter not written: {type(exc).__name__}", requeue=True) from None
    if verdict == "held":
        raise HeldForReview(outcome.reason)
    raise PermanentFailure(outcome.reason)


class DecodedRequest(Request):
    """Hands the pool the body kombu already decoded (Celery's strategy reads it to tell the
    message protocols apart), not the JSON again: a batch's is large, decoded once not twice."""

    def __init__(self, message: Any, *, body: Any = None, decoded: bool = False, **kw: Any):
        if not decoded:
            body, decoded = message.payload, True
        super().__init__(message, body=body, decoded=decoded, **kw)


@app.task(
    name="mailer.send_batch",
    base=DurableCountdowns,
    bind=True,
    max_retries=None,
    acks_late=True,
    ignore_result=True,
    Request=DecodedRequest,
)
def send_batch(self: Task, *args: Any, **kwargs: Any) -> dict[str, int]:
    """Sends a batch concurrently; any message that needs a retry becomes its own `mailer.send`
    task, so a transient failure of one never resends the others. If a follow-up cannot be
    published the whole batch is requeued: the ledger acknowledges the ones already sent.
    A payload the wire contract refuses is dead-lettered as `invalid` alone."""
    try:
        received = wire.batch_args(args, kwargs)
    except wire.InvalidPayload as exc:
        refuse(args[0] if len(args) == 1 else list(args), self.request.id, str(exc))
        raise PermanentFailure(f"invalid payload: {exc}") from None
    payloads: list[dict[str, Any]] = []
    refused = 0
    for index, item in enumerate(received):
        try:
            wire.from_payload(item)
        except wire.InvalidPayload as exc:
            refuse(item, f"{self.request.id}.{index}", str(exc))
            refused += 1
        else:
            payloads.append(item)
    if not payloads:
        return {"invalid": refused}
    # Each relay's breaker for its own messages: those of a relay whose breaker is open wait
    # (each its own retry, no attempt spent) while the others go.
    by_relay: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for payload in payloads:
        by_relay.setdefault((wire.relay_of(payload), wire.lane_of(payload)), []).append(payload)
    hold = None if len(by_relay) == 1 else 0.0
    waits: list[tuple[dict[str, Any], Failure]] = []
    for (relay, lane), group in by_relay.items():
        waiting = wait_for_circuit(relay, hold, lane=lane)
        if waiting is not None:
            waits += [(payload, waiting) for payload in group]
    if waits and len(waits) == len(payloads) and len(by_relay) == 1:
        waiting = waits[0][1]  # one relay, waiting: the batch goes back whole, as it came
        _republish(
            self,
            countdown_for(waiting, 0),
            waiting,
            lane=wire.lane_of(payloads[0]),
            args=(payloads,),
            kwargs={},
            argsrepr=describe_batch(payloads),
            kwargsrepr="{}",
        )
    waiting_ids = {id(payload) for payload, _ in waits}
    ready = [payload for payload in payloads if id(payload) not in waiting_ids]
    try:
        outcomes: list[Result | Failure] = runtime().deliver_many(ready) if ready else []
    except Exception as exc:
        log.exception("unexpected error delivering a batch")
        outcomes = [unexpected(exc) for _ in ready]
    counts: dict[str, int] = {}
    sent_through: set[str] = set()
    try:
        for payload, outcome in zip(ready, outcomes, strict=True):
            status = settle_one(payload, outcome)
            counts[status] = counts.get(status, 0) + 1
            if status == "sent":
                sent_through.add(relay_for(payload, outcome))
        for payload, waiting in waits:
            status = settle_one(payload, waiting, trip=False)
            counts[status] = counts.get(status, 0) + 1
    except Exception as exc:
        log.error("batch follow-up failed (%s); requeueing the batch", type(exc).__name__)
        time.sleep(REQUEUE_PAUSE)
        raise Reject(f"batch follow-up failed: {type(exc).__name__}", requeue=True) from None
    for relay in sent_through:
        close_circuit(relay)
    if refused:
        counts["invalid"] = refused
    return counts

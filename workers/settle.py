"""How an attempt ends: sent, dead-lettered, or retried, and what a wait costs.

The one settle policy, shared by the task bodies (`workers/tasks.py`) and the streamed first
attempts (`workers/strategy.py`). Our own `attempts` counts SMTP attempts only: waiting for a
lease, for the ledger's Redis, for another copy of the same message or for the circuit breaker
to close does not spend a message's retries (docs/failures.md). Every countdown stays below a
quarter of the visibility timeout, so Redis never redelivers a message that is merely waiting
for its ETA; longer waits are chains of retries.

Each relay has its own breaker: the relay an outcome names (`Failure.relay`, `Result.relay`:
the one the attempt went through), else the one its message names (`relay_for`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis
from celery import signals
from celery.exceptions import Reject

from mailer.publish import describe
from mailer.wire import DEFAULT_RELAY, SEND_TASK, lane_of, message_id_of, queue_for, relay_of
from workers.app import app, settings
from workers.engine.classify import CIRCUIT_KINDS, WAIT_KINDS, Failure, Kind, Phase
from workers.engine.runtime import Result, runtime
from workers.observe.logs import log_event, log_retried
from workers.state import deadletters

log = logging.getLogger("mailer.worker")

#: A task whose message must wait for the circuit breaker holds its thread this long (bounded
#: well below the visibility timeout) before handing the message back with a retry: while every
#: thread waits the worker fetches nothing, so queued messages stay queued instead of churning.
#: Only for the default relay while it is the only relay in use: another relay's message is
#: handed back at once, or one tenant's open breaker would hold the threads of all the others.
CIRCUIT_HOLD = min(30.0, settings.retry_countdown_max)
#: Before requeueing a message whose retry could not be published: no hot loop on a sick broker.
REQUEUE_PAUSE = 1.0

_shutting_down = threading.Event()


@signals.worker_shutting_down.connect
def _on_shutting_down(**_: object) -> None:
    """Tasks holding for the circuit breaker hand their messages back at once."""
    _shutting_down.set()


class PermanentFailure(Exception):
    """Raised after dead-lettering so Flower shows FAILURE with the relay's reply."""


class HeldForReview(Exception):
    """The relay may have the message (no reply after the DATA terminator); policy `hold`
    dead-lettered it as "uncertain" rather than risk a duplicate."""


def backoff(attempts: int) -> float:
    """Exponential with full jitter, capped well below the visibility timeout."""
    cap = settings.retry_countdown_max
    return random.uniform(0.5, min(cap, 5.0 * 2 ** max(0, attempts - 1)))


def countdown_for(failure: Failure, attempts: int) -> float:
    """Seconds before the retry runs; always below `retry_countdown_max` (< visibility / 4)."""
    cap = float(settings.retry_countdown_max)
    if failure.kind is Kind.RECONNECT:
        seconds = random.uniform(0.1, 1.0)
    elif failure.kind in (Kind.NO_LEASE, Kind.UNAVAILABLE, Kind.THROTTLED):
        seconds = random.uniform(1.0, 5.0)
    elif failure.kind is Kind.IN_FLIGHT:
        seconds = random.uniform(2.0, 10.0)
    elif failure.kind is Kind.QUOTA:
        seconds = random.uniform(0.5, 1.5) * settings.quota_probe_interval
    elif failure.kind in CIRCUIT_KINDS or failure.kind is Kind.NO_RELAY:
        seconds = random.uniform(0.5, 1.5) * settings.circuit_probe_interval
    else:
        seconds = backoff(attempts)
    return min(cap, seconds)


def relay_for(payload: Mapping[str, Any], outcome: Result | Failure | None = None) -> str:
    """The relay an outcome is about: the one its attempt went through, else the message's."""
    return (outcome.relay if outcome is not None else "") or relay_of(payload)


def dead_letter(
    payload: Mapping[str, Any],
    kind: str,
    failure: Failure | None,
    attempts: int,
    result: Result | None = None,
) -> None:
    relay = relay_for(payload, failure or result)
    letter = deadletters.record(
        payload,
        kind=kind,
        code=failure.code if failure else None,
        text=failure.reason if failure else (result.reply if result else ""),
        attempts=attempts,
        refused=failure.refused if failure else (result.refused if result else None),
        relay=relay,
    )
    runtime().dead.add(letter)
    log_event(
        "dead_lettered",
        message_id=letter.id,
        kind=kind,
        code=letter.code,
        attempts=attempts,
        reason=letter.text,
        relay=relay,
        level=logging.WARNING,
    )


def refuse(value: object, task_id: str, reason: str) -> str:
    """Dead-letters, as `invalid`, a task the wire contract refused (nothing is sent); returns
    the id it is filed under. If Redis cannot take it, the task goes back to the queue."""
    letter = deadletters.invalid(value, message_id_of(value, task_id), reason)
    try:
        runtime().dead.add(letter)
    except (redis.RedisError, OSError) as exc:
        log.error("dead letter not written (%s); requeueing the task", type(exc).__name__)
        time.sleep(REQUEUE_PAUSE)
        raise Reject(f"dead letter not written: {type(exc).__name__}", requeue=True) from None
    log_event(
        "dead_lettered",
        message_id=letter.id,
        kind="invalid",
        code=None,
        attempts=0,
        reason=reason,
        level=logging.WARNING,
    )
    return letter.id


def _too_old(payload: Mapping[str, Any]) -> bool:
    created = float(payload.get("meta", {}).get("created_at", time.time()))
    return time.time() - created > settings.max_message_age


def _expired(payload: Mapping[str, Any], attempts: int) -> bool:
    return attempts > settings.max_retries or _too_old(payload)


def decide(
    payload: Mapping[str, Any], attempts: int, failure: Failure, *, trip: bool = True
) -> tuple[str, int, float]:
    """(verdict, attempts, countdown): verdict is retry | dead | held | expired.

    Waits (circuit, lease, ledger, in flight, a relay not configured) keep `attempts` but not
    past the maximum age; a circuit failure from the relay trips that relay's breaker,
    fleet-wide (`trip=False` for a message that only waited for it: re-opening a breaker a
    probe just closed would stall the relay)."""
    if failure.kind in WAIT_KINDS:
        if failure.kind in CIRCUIT_KINDS and trip:
            relay = relay_for(payload, failure)
            try:
                kind = failure.kind.value
                if runtime().circuits.get(relay).trip(failure.reason, kind):
                    log_event(
                        "quota_exhausted" if failure.kind is Kind.QUOTA else "circuit_opened",
                        reason=failure.reason,
                        relay=relay,
                        level=logging.WARNING,
                    )
            except (redis.RedisError, OSError):
                log.warning("could not open the circuit breaker (Redis unavailable)")
        if _too_old(payload):
            return "expired", attempts, 0.0
        return "retry", attempts, countdown_for(failure, attempts)
    if failure.kind is Kind.PERMANENT:
        return "dead", attempts + 1, 0.0
    if failure.kind is Kind.UNCERTAIN and settings.uncertain_policy == "hold":
        return "held", attempts + 1, 0.0
    attempts += 1
    if _expired(payload, attempts):
        return "expired", attempts, 0.0
    return "retry", attempts, countdown_for(failure, attempts)


def wait_for_circuit(
    relay: str = DEFAULT_RELAY, hold: float | None = None, lane: str | None = None
) -> Failure | None:
    """None when sending through `relay` may go ahead: its breaker is closed, messages of
    `lane` fail over to its fallback (the router decides, workers/engine/failover.py), or this
    task won the fleet's one probe of the interval. Otherwise holds the thread up to `hold`
    seconds (default: CIRCUIT_HOLD for the default relay while it is the only one in use, else
    none) and returns why the message must wait. A Redis error counts as closed: the ledger
    then fails fast (UNAVAILABLE)."""
    rt = runtime()
    circuit = rt.circuits.get(relay)
    deadline: float | None = None
    while True:
        try:
            state = circuit.state()
            if not state.open:
                return None
            if lane is not None and rt.fails_over(relay, lane):
                return None
            if circuit.try_probe():
                return None
        except (redis.RedisError, OSError):
            return None
        if deadline is None:
            if hold is None:
                hold = CIRCUIT_HOLD if rt.holds_for_circuit(relay) else 0.0
            deadline = time.monotonic() + hold
        remaining = deadline - time.monotonic()
        if remaining <= 0 or _shutting_down.is_set():
            kind = Kind.QUOTA if state.kind == "quota" else Kind.AUTH
            what = "circuit open" if relay == DEFAULT_RELAY else f"circuit of relay {relay} open"
            return Failure(kind, None, f"{what}: {state.reason}", Phase.CONNECT, relay=relay)
        _shutting_down.wait(min(0.5, remaining))


def close_circuit(relay: str = DEFAULT_RELAY) -> None:
    """A message went through `relay`: if its breaker is open, a probe authenticated, so close
    it for the fleet."""
    circuit = runtime().circuits.get(relay)
    try:
        if circuit.state().open:
            circuit.reset()
    except (redis.RedisError, OSError):
        pass


def finish(
    payload: Mapping[str, Any], result: Result, attempts: int, *, circuit: bool = True
) -> dict[str, Any]:
    """`circuit=False`: the caller (a batch) checks the breakers once for all its messages."""
    rt = runtime()
    relay = relay_for(payload, result)
    if result.status == "sent" and circuit:
        close_circuit(relay)
    if result.refused:
        dead_letter(payload, "recipients", None, attempts + 1, result)
    if result.status == "held":
        dead_letter(payload, "uncertain", None, attempts + 1, result)
    if result.status == "failed" and rt.dead.get(str(payload["id"])) is None:
        # Redelivered after a permanent failure whose dead letter was never written.
        dead_letter(payload, "permanent", None, attempts + 1, result)
    if result.status != "sent":  # `sent` was logged at the relay's 250 (workers/engine/runtime.py)
        log_event(result.status, message_id=payload.get("id"), attempts=attempts, relay=relay)
    return {"id": payload.get("id"), "status": result.status}


RELEASED_KEPT = 32  # earlier attempts a retry remembers; far more than one outage produces


def retry_kwargs(attempts: int, released: str, attempt: str = "") -> dict[str, Any]:
    """`released` (space-separated ledger owners) plus this attempt's owner when it ended
    certain the relay does not have the message but could not clear its record."""
    owners = [*released.split(), *([attempt] if attempt else [])][-RELEASED_KEPT:]
    if not owners:
        return {"attempts": attempts}
    return {"attempts": attempts, "released": " ".join(owners)}


def unexpected(exc: Exception) -> Failure:
    kind = Kind.UNAVAILABLE if isinstance(exc, redis.RedisError | OSError) else Kind.RECONNECT
    return Failure(kind, None, f"unexpected {type(exc).__name__}", Phase.CONNECT)


def settle_one(
    payload: dict[str, Any],
    outcome: Result | Failure,
    *,
    task_id: str | None = None,
    trip: bool = True,
) -> str:
    """One first attempt (of a batch, or of `workers/strategy.py`): finish the message,
    dead-letter it or publish its retry as a `mailer.send` task. `task_id`: the retry keeps
    that task's id (Flower shows one task going to RETRY); `trip` as in `decide`."""
    if isinstance(outcome, Result):
        return str(finish(payload, outcome, 0, circuit=False)["status"])
    verdict, attempts, countdown = decide(payload, 0, outcome, trip=trip)
    if verdict == "retry":
        log_retried(payload.get("id"), outcome, attempts, countdown, relay_for(payload, outcome))
        app.tasks[SEND_TASK].apply_async(
            args=(payload,),
            kwargs=retry_kwargs(attempts, "", outcome.attempt),
            countdown=countdown,
            queue=queue_for(lane_of(payload)),
            task_id=task_id,
            retries=1 if task_id else 0,
            argsrepr=describe(payload),
            kwargsrepr=repr({"attempts": attempts}),
        )
    elif verdict == "held":
        dead_letter(payload, "uncertain", outcome, attempts)
    else:
        dead_letter(payload, "permanent" if verdict == "dead" else "expired", outcome, attempts)
    return verdict

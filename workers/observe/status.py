"""`mailer status`: what the fleet is doing, read from Redis alone (no worker is asked).

`mailer status --json` prints one object; its keys are a stable interface (new keys may be
added, existing ones keep their names, types and meaning):

    version         1
    broker          the broker URL, password masked
    queue           {name, waiting, unacked}: messages waiting in the queue, and delivered to a
                    worker but not yet acknowledged (running, prefetched or held for a countdown);
                    `name`/`waiting` are the default lane's
    lanes           [{name, queue, share, waiting}]: every lane, highest priority first
    rate            {configured: [window...], unit, effective_per_s, reason, since, connect_per_s}:
                    the fleet's message rate; `effective_per_s` is the adaptive ceiling the
                    relay's throttling set (null when none is in force)
    leases          {epoch, ttl_s, limits: {name: {cap, held, hosts: {host: n},
                    processes: {"host:pid": n}, oldest_age_s}}}; `smtp` is the fleet-wide cap
    circuit         {open, reason, since, kind}: `kind` quota is the quota state (the
                    account's sending quota is spent; one probe per MAILER_QUOTA_PROBE_INTERVAL)
    dead_letters    how many messages are dead-lettered
    memory          [{role, used_bytes, maxmemory_bytes, policy, used_ratio, warning}]: the
                    broker's and (when another server) the state Redis' memory against
                    `maxmemory` (0: no limit; `used_ratio` then null); `warning` above 80%
                    (with `noeviction` a full Redis refuses writes: producers fail)

    events          {window_minutes, counts: {type: n}, rates: {delivered, bounce, dropped,
                    spamreport: share of the hour's processed (or, without any, of its
                    delivered + bounce + dropped)}}: SendGrid's events of the last hour, by
                    their own time (docs/lifecycle.md)
    suppressions    suppressed addresses, global and per unsubscribe group together
    throughput      {window_minutes, total, last_minute, per_minute}: message outcomes (sent,
                    duplicate, retried, failed, held) over the window, in the last complete
                    minute, and per minute (oldest first; the last entry is the current,
                    incomplete minute, `start` in Unix seconds)
    relays          {known, shown: [relay...], quiet, all}: the relays (the `default` one and
                    every configured one); `shown` lists those with activity or trouble, trouble
                    first then the busiest, at most RELAYS_SHOWN of them (`quiet`: how many
                    more are known), or every one with `mailer status --relays all` (`all`
                    true). A relay: {name, circuit: {open, reason, since, kind}, leases: {held,
                    cap}, rate: {effective_per_s, reason}, throughput: {outcome: n} (over the
                    window), active, trouble}. `circuit`, `rate` and `leases.limits.smtp` above
                    stay the default relay's and the fleet's.

Throughput comes from per-minute counters that workers add to (batched: one pipeline every few
seconds per worker), kept for two hours; each outcome is counted for the fleet and for its relay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import redis

from mailer import redisconn
from mailer.config import Settings, redact_url
from mailer.wire import DEFAULT_RELAY, queue_for
from workers.observe.logs import outcome_of
from workers.state import keys
from workers.state.circuit import Circuit, read_circuits
from workers.state.deadletters import DeadLetters
from workers.state.lifecycle import event_counts
from workers.state.ratelimit import peek_ceiling, peek_ceilings
from workers.state.semaphore import GLOBAL_LIMIT, RELAY_LIMIT_PREFIX, LeaseSemaphore, Limit
from workers.state.suppressions import Suppressions

log = logging.getLogger("mailer.status")

VERSION = 1
OUTCOMES = ("sent", "duplicate", "retried", "failed", "held")
BUCKET_TTL = 2 * 3600
WINDOW_MINUTES = 15
#: `mailer status` lists at most this many relays unless asked for all of them.
RELAYS_SHOWN = 20
#: A throughput bucket's field for a relay's outcome: + "<relay>:<outcome>".
RELAY_FIELD = "relay:"
# kombu's Redis transport keeps priority levels in sibling lists: "mailer", "mailer\x06\x163"...
PRIORITY_STEPS = (3, 6, 9)


class Throughput:
    """Counts message outcomes per minute in Redis for `mailer status`.

    Counted in memory and flushed every `interval` seconds (one pipeline per flush, however
    many messages), so the delivery path never waits for it; flushed once more at shutdown.
    """

    def __init__(self, client: redis.Redis, interval: float = 5.0) -> None:
        self.redis = client
        self.interval = interval
        self._counts: Counter[tuple[int, str]] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on_event(self, event: str, fields: Mapping[str, Any]) -> None:
        outcome = outcome_of(event, fields)
        if outcome is not None:
            self.add(outcome, relay=str(fields.get("relay") or DEFAULT_RELAY))

    def add(
        self, outcome: str, n: int = 1, at: float | None = None, relay: str | None = None
    ) -> None:
        """Counts `outcome` for the fleet and, with `relay`, for that relay."""
        minute = int((time.time() if at is None else at) // 60)
        with self._lock:
            self._counts[(minute, outcome)] += n
            if relay is not None:
                self._counts[(minute, f"{RELAY_FIELD}{relay}:{outcome}")] += n

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, Counter()
        if not counts:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for (minute, outcome), n in counts.items():
                pipe.hincrby(keys.throughput(minute), outcome, n)
            for minute in {m for m, _ in counts}:
                pipe.expire(keys.throughput(minute), BUCKET_TTL)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.debug("throughput flush failed (%s); kept for the next one", type(exc).__name__)
            with self._lock:
                self._counts.update(counts)

    def start(self) -> Throughput:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mailer-throughput", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 5)
            self._thread = None
        self.flush()


def read_throughput(
    client: redis.Redis, minutes: int = WINDOW_MINUTES, now: float | None = None
) -> dict[str, Any]:
    current = int((time.time() if now is None else now) // 60)
    span = range(current - minutes + 1, current + 1)
    pipe = client.pipeline(transaction=False)
    for minute in span:
        pipe.hgetall(keys.throughput(minute))
    raw = pipe.execute()
    per_minute: list[dict[str, int]] = []
    for minute, bucket in zip(span, raw, strict=True):
        counts = {k.decode() if isinstance(k, bytes) else str(k): int(v) for k, v in bucket.items()}
        per_minute.append({"start": minute * 60, **{o: counts.get(o, 0) for o in OUTCOMES}})
    total = {o: sum(m[o] for m in per_minute) for o in OUTCOMES}
    last = per_minute[-2] if len(per_minute) > 1 else {"start": current * 60}
    return {
        "window_minutes": minutes,
        "total": total,
        "last_minute": {o: int(last.get(o, 0)) for o in OUTCOMES},
        "per_minute": per_minute,
    }


def read_relay_throughput(
    client: redis.Redis, minutes: int = WINDOW_MINUTES, now: float | None = None
) -> dict[str, dict[str, int]]:
    """Each relay's outcomes over the last `minutes` (relays without any are absent)."""
    current = int((time.time() if now is None else now) // 60)
    pipe = client.pipeline(transaction=False)
    for minute in range(current - minutes + 1, current + 1):
        pipe.hgetall(keys.throughput(minute))
    out: dict[str, dict[str, int]] = {}
    for bucket in pipe.execute():
        for raw, value in bucket.items():
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            if not name.startswith(RELAY_FIELD):
                continue
            relay, _, outcome = name[len(RELAY_FIELD) :].rpartition(":")
            if relay and outcome in OUTCOMES:
                counts = out.setdefault(relay, dict.fromkeys(OUTCOMES, 0))
                counts[outcome] += int(value)
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _spec_cap(raw: Any) -> int | None:
    """A configured relay's own connection cap, from its stored spec (mailer/relays.py)."""
    try:
        spec = json.loads(raw)
    except (TypeError, ValueError):
        return None
    cap = spec.get("max_connections") if isinstance(spec, dict) else None
    return cap if isinstance(cap, int) and not isinstance(cap, bool) else None


def _relays(settings: Settings, state: redis.Redis, everything: bool) -> dict[str, Any]:
    """The per-relay summary (see the module docstring): a few round trips however many
    relays are configured (each step is one pipeline or one command for all of them)."""
    specs = {_text(k): v for k, v in state.hgetall(keys.RELAYS).items()}
    activity = read_relay_throughput(state)
    names = sorted({DEFAULT_RELAY, *specs, *activity})
    caps = {n: _spec_cap(specs.get(n)) or settings.max_connections for n in names}
    caps[DEFAULT_RELAY] = settings.max_connections
    circuits = read_circuits(state, names)
    ceilings = peek_ceilings(state, [keys.for_relay(n, keys.RATE) for n in names])
    sec, usec = state.time()
    now_ms = int(sec) * 1000 + int(usec) // 1000
    # ZRANGEBYSCORE, not ZCOUNT: the documented ACL rule (README) has the one, not the other.
    pipe = state.pipeline(transaction=False)
    pipe.zrangebyscore(keys.lease_holders(GLOBAL_LIMIT), f"({now_ms}", "+inf")
    for name in names:
        pipe.zrangebyscore(keys.lease_holders(f"{RELAY_LIMIT_PREFIX}{name}"), f"({now_ms}", "+inf")
    fleet, *held = (len(members) for members in pipe.execute())
    # The default relay has no limit of its own (a single-relay worker's keys): its leases are
    # the fleet's less every named relay's.
    named = sum(h for n, h in zip(names, held, strict=True) if n != DEFAULT_RELAY)
    rows: list[dict[str, Any]] = []
    for name, circuit, ceiling, leases in zip(names, circuits, ceilings, held, strict=True):
        if name == DEFAULT_RELAY:
            leases = max(leases, fleet - named)
        counts = activity.get(name, dict.fromkeys(OUTCOMES, 0))
        # A ceiling the relay's throttling set is trouble; slow start's (a new fleet) is not.
        throttled = ceiling.rate is not None and ceiling.reason != "slow start"
        trouble = circuit.open or throttled
        rows.append(
            {
                "name": name,
                "circuit": {
                    "open": circuit.open,
                    "reason": circuit.reason,
                    "since": circuit.since,
                    "kind": circuit.kind,
                },
                "leases": {"held": leases, "cap": caps[name]},
                "rate": {
                    "effective_per_s": ceiling.rate,
                    "reason": ceiling.reason if ceiling.rate is not None else "",
                },
                "throughput": counts,
                "active": bool(leases or any(counts.values())),
                "trouble": trouble,
            }
        )
    rows.sort(
        key=lambda r: (
            not r["trouble"],
            -sum(r["throughput"].values()),
            -r["leases"]["held"],
            r["name"],
        )
    )
    shown = rows if everything else [r for r in rows if r["active"] or r["trouble"]]
    if not everything:
        shown = shown[:RELAYS_SHOWN]
    return {"known": len(rows), "shown": shown, "quiet": len(rows) - len(shown), "all": everything}


async def _leases(settings: Settings) -> dict[str, Any]:
    client = redisconn.async_client(settings.redis_url, settings, max_connections=4)
    try:
        limits = [Limit("smtp", settings.max_connections)]
        if settings.max_connections_per_host:
            limits.append(Limit(f"host:{settings.hostname}", settings.max_connections_per_host))
        semaphore = LeaseSemaphore(client, limits, settings.lease_ttl, host=settings.hostname)
        try:
            return await semaphore.snapshot()
        finally:
            await semaphore.close()
    finally:
        await client.aclose()


def _leases_or_why(settings: Settings) -> dict[str, Any]:
    """The lease snapshot; a Redis past its maxmemory refuses the snapshot's transaction, and
    status must still show the rest (the memory line says why)."""
    try:
        return asyncio.run(_leases(settings))
    except redis.OutOfMemoryError as exc:
        return {"error": f"Redis refused the snapshot: {exc}"}


def _waiting(client: redis.Redis, queue: str) -> int:
    pipe = client.pipeline(transaction=False)
    pipe.llen(queue)
    for step in PRIORITY_STEPS:
        pipe.llen(f"{queue}{keys.KOMBU_PRIORITY_SEP}{step}")
    return sum(int(n) for n in pipe.execute())


def _rate(settings: Settings, state: redis.Redis) -> dict[str, Any]:
    ceiling = peek_ceiling(state)
    return {
        "configured": [w.spec for w in settings.rate_limits],
        "unit": settings.rate_unit,
        "effective_per_s": ceiling.rate,
        "reason": ceiling.reason if ceiling.rate is not None else "",
        "since": ceiling.since,
        "connect_per_s": settings.connect_rate,
    }


#: `mailer status` warns when Redis uses more than this share of its `maxmemory`.
MEMORY_WARNING = 0.8


def _memory(role: str, client: redis.Redis) -> dict[str, Any]:
    info = client.info("memory")
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    ratio = used / limit if limit else None
    warning = ""
    if ratio is not None and ratio > MEMORY_WARNING:
        warning = (
            f"the {role} Redis uses {ratio:.0%} of its maxmemory; with "
            f"{info.get('maxmemory_policy', '?')} a full Redis refuses writes (producers fail)"
        )
    return {
        "role": role,
        "used_bytes": used,
        "maxmemory_bytes": limit,
        "policy": str(info.get("maxmemory_policy", "")),
        "used_ratio": ratio,
        "warning": warning,
    }


EVENT_RATES = ("delivered", "bounce", "dropped", "spamreport")


def _events(state: redis.Redis) -> dict[str, Any]:
    counts = event_counts(state, 60)
    base = counts["processed"] or (counts["delivered"] + counts["bounce"] + counts["dropped"])
    rates = {kind: (counts[kind] / base if base else None) for kind in EVENT_RATES}
    return {"window_minutes": 60, "counts": dict(counts), "rates": rates}


def collect(settings: Settings, relays: str = "active") -> dict[str, Any]:
    """`relays`: "active" (those with activity or trouble, at most RELAYS_SHOWN) or "all"."""
    redisconn.check(settings.broker_url, settings, "MAILER_BROKER_URL", role="status")
    redisconn.check(settings.redis_url, settings, "MAILER_REDIS_URL", role="status")
    broker = redisconn.client(settings.broker_url, settings, max_connections=2)
    state = redisconn.client(settings.redis_url, settings, max_connections=2)
    try:
        circuit = Circuit(state).state(max_age=0)
        lanes = [
            {
                "name": lane.name,
                "queue": queue_for(lane.name),
                "share": lane.share,
                "waiting": _waiting(broker, queue_for(lane.name)),
            }
            for lane in settings.lanes
        ]
        default = queue_for(settings.default_lane)
        return {
            "version": VERSION,
            "broker": redact_url(settings.broker_url),
            "queue": {
                "name": default,
                "waiting": next(x["waiting"] for x in lanes if x["queue"] == default),
                "unacked": int(broker.hlen(keys.KOMBU_UNACKED)),
            },
            "lanes": lanes,
            "rate": _rate(settings, state),
            "leases": _leases_or_why(settings),
            "circuit": {
                "open": circuit.open,
                "reason": circuit.reason,
                "since": circuit.since,
                "kind": circuit.kind,
            },
            "dead_letters": DeadLetters(state).count(),
            "events": _events(state),
            "suppressions": Suppressions(state).count(),
            "throughput": read_throughput(state),
            "relays": _relays(settings, state, relays == "all"),
            "memory": [_memory("broker", broker)]
            + ([] if settings.redis_url == settings.broker_url else [_memory("state", state)]),
        }
    finally:
        broker.close()
        state.close()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _outcomes(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{counts.get(o, 0)} {o}" for o in OUTCOMES)


def render(data: dict[str, Any]) -> str:
    lines = [f"broker        {data['broker']}"]
    q = data["queue"]
    lines.append(
        f"queue         {q['name']}: {q['waiting']} waiting, {q['unacked']} delivered unacked"
    )
    if len(data.get("lanes", [])) > 1:
        for lane in data["lanes"]:
            share = f", {lane['share']:.0%} reserved" if lane["share"] else ""
            lines.append(
                f"lane {lane['name']:<8} {lane['queue']}: {lane['waiting']} waiting{share}"
            )
    rate = data.get("rate") or {}
    configured = ", ".join(rate.get("configured") or []) or "none configured"
    if rate.get("effective_per_s") is not None:
        lines.append(
            f"rate          THROTTLED to {rate['effective_per_s']:.1f}/s by the relay "
            f"(configured: {configured}): {rate['reason']}"
        )
    else:
        lines.append(f"rate          {configured} ({rate.get('unit', 'messages')})")
    circuit = data["circuit"]
    if circuit["open"] and circuit.get("kind") == "quota":
        lines.append(f"circuit       QUOTA SPENT, sending stopped: {circuit['reason']}")
    else:
        opened = f"OPEN: {circuit['reason']}" if circuit["open"] else "closed"
        lines.append("circuit       " + opened)
    lines.append(f"dead letters  {data['dead_letters']}")
    for memory in data.get("memory", []):
        limit = memory["maxmemory_bytes"]
        of = f"of {_mib(limit)} ({memory['used_ratio']:.0%})" if limit else "(no maxmemory)"
        lines.append(
            f"memory {memory['role']:<7}{_mib(memory['used_bytes'])} {of}, {memory['policy']}"
        )
        if memory["warning"]:
            lines.append(f"WARNING       {memory['warning']}")

    events = data.get("events") or {}
    counts = events.get("counts") or {}
    shown = ", ".join(
        f"{counts.get(kind, 0)} {kind}"
        + (f" ({rate:.1%})" if (rate := events["rates"].get(kind)) is not None else "")
        for kind in EVENT_RATES
    )
    lines.append(f"events (1 h)  {shown}")
    lines.append(f"suppressed    {data.get('suppressions', 0)} addresses")
    tp = data.get("throughput")
    if tp:
        sent = tp["total"]["sent"]
        lines.append(f"last minute   {_outcomes(tp['last_minute'])}")
        lines.append(
            f"last {tp['window_minutes']} min   {_outcomes(tp['total'])} "
            f"({sent / tp['window_minutes']:.1f} sent/min)"
        )
    lines += _render_relays(data.get("relays"))
    if data["leases"].get("error"):
        lines.append(f"leases        unknown: {data['leases']['error']}")
    for name, limit in sorted(data["leases"].get("limits", {}).items()):
        lines.append(
            f"leases {name:<7} {limit.get('held', 0)}/{limit.get('cap', '?')} held, "
            f"oldest {limit.get('oldest_age_s') or 0:.1f}s"
        )
        for host, n in sorted(limit.get("hosts", {}).items()):
            lines.append(f"  host {host:<30} {n}")
        for proc, n in sorted(limit.get("processes", {}).items()):
            lines.append(f"  process {proc:<27} {n}")
    return "\n".join(lines)


def _render_relays(relays: Mapping[str, Any] | None) -> list[str]:
    if not relays:
        return []
    shown, quiet = relays["shown"], relays["quiet"]
    head = f"relays        {relays['known']} known"
    if relays.get("all"):
        lines = [head + ":"]
    else:
        rest = f", {quiet} quiet (--relays all lists every one)" if quiet else ""
        lines = [f"{head}: {len(shown)} with activity or trouble{rest}"]
    for relay in shown:
        circuit = relay["circuit"]
        if circuit["open"]:
            what = "QUOTA SPENT" if circuit["kind"] == "quota" else "CIRCUIT OPEN"
            state = f"{what}: {circuit['reason']}"
        else:
            state = "circuit closed"
        rate = relay["rate"]
        throttled = (
            f", THROTTLED to {rate['effective_per_s']:.1f}/s"
            if rate["effective_per_s"] is not None
            else ""
        )
        held = f"{relay['leases']['held']}/{relay['leases']['cap']}"
        lines.append(
            f"relay {relay['name']:<20} {state}{throttled}; leases {held}; "
            f"last {WINDOW_MINUTES} min: {_outcomes(relay['throughput'])}"
        )
    return lines

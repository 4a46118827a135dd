"""A circuit breaker per relay for failures that no retry can fix: a bad or revoked API key,
a relay that will not do TLS, the account's quota spent. While a relay's breaker is open every
worker leaves that relay's queued messages waiting (without spending their retries); one probe
per interval tries the relay, and a probe that goes through closes it for everyone. The quota
state probes rarely (MAILER_QUOTA_PROBE_INTERVAL): the relay will not take anything before the
quota is back. Each relay has its own keys (`keys.for_relay`): tenant A's revoked key stops
tenant A alone; the `default` relay keeps the historical `mailer:circuit`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import redis

from mailer.wire import DEFAULT_RELAY
from workers.state import keys


@dataclass(frozen=True)
class CircuitState:
    open: bool
    reason: str = ""
    since: float = 0.0
    kind: str = "auth"  # auth | tls | quota: what opened it


def parse_state(raw: bytes | str | None) -> CircuitState:
    """A breaker's record as stored (None: closed)."""
    if raw is None:
        return CircuitState(False)
    data = json.loads(raw)
    return CircuitState(
        True,
        str(data.get("reason", "")),
        float(data.get("since", 0)),
        str(data.get("kind", "auth")),
    )


def read_circuits(client: redis.Redis, relays: list[str]) -> list[CircuitState]:
    """The breakers of `relays`, in one round trip (a pipeline of GETs: the documented ACL
    rule has GET, not MGET)."""
    pipe = client.pipeline(transaction=False)
    for relay in relays:
        pipe.get(keys.for_relay(relay, keys.CIRCUIT))
    return [parse_state(raw) for raw in pipe.execute()]


class Circuit:
    def __init__(
        self,
        client: redis.Redis,
        probe_interval: float = 10.0,
        quota_interval: float = 60.0,
        *,
        key: str = keys.CIRCUIT,
        probe_key: str = keys.CIRCUIT_PROBE,
    ) -> None:
        self.redis = client
        self.probe_interval = probe_interval
        self.quota_interval = quota_interval
        self.key = key
        self.probe_key = probe_key
        self._cached: tuple[float, CircuitState] = (0.0, CircuitState(False))

    @classmethod
    def for_relay(
        cls,
        client: redis.Redis,
        relay: str,
        probe_interval: float = 10.0,
        quota_interval: float = 60.0,
    ) -> Circuit:
        return cls(
            client,
            probe_interval,
            quota_interval,
            key=keys.for_relay(relay, keys.CIRCUIT),
            probe_key=keys.for_relay(relay, keys.CIRCUIT_PROBE),
        )

    def interval(self, kind: str) -> float:
        return self.quota_interval if kind == "quota" else self.probe_interval

    def state(self, max_age: float = 0.5) -> CircuitState:
        """Cached for half a second: one GET per process, not one per message."""
        now = time.monotonic()
        at, state = self._cached
        if now - at < max_age:
            return state
        state = parse_state(self.redis.get(self.key))
        self._cached = (now, state)
        return state

    def trip(self, reason: str, kind: str = "auth") -> bool:
        """Opens the breaker; True when this call opened it (the caller logs it once)."""
        record = json.dumps({"reason": reason, "since": time.time(), "kind": kind})
        opened = bool(self.redis.set(self.key, record, nx=True))
        if opened:
            # The tripping attempt was itself a probe: the next one waits a full interval.
            self.redis.set(self.probe_key, "1", px=int(self.interval(kind) * 1000))
        self._cached = (time.monotonic(), CircuitState(True, reason, time.time(), kind))
        return opened

    def try_probe(self) -> bool:
        """True for one caller in the fleet per probe interval."""
        interval = self.interval(self.state().kind)
        return bool(self.redis.set(self.probe_key, "1", nx=True, px=int(interval * 1000)))

    def reset(self) -> None:
        self.redis.delete(self.key, self.probe_key)
        self._cached = (time.monotonic(), CircuitState(False))


#: A relay's breaker is forgotten by a process (not closed: it lives in Redis) this long after
#: the process last asked about it.
FORGET_AFTER = 120.0


class Circuits:
    """This process's breakers, one per relay it has seen messages for; thread-safe (task
    threads, the dispatch and settle threads and the loop all ask). Remembers when each relay
    was last asked about: the relays "in use" here."""

    def __init__(
        self, client: redis.Redis, probe_interval: float = 10.0, quota_interval: float = 60.0
    ) -> None:
        self.redis = client
        self.probe_interval = probe_interval
        self.quota_interval = quota_interval
        self._circuits: dict[str, Circuit] = {}
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self, relay: str = DEFAULT_RELAY) -> Circuit:
        self._seen[relay] = time.monotonic()
        circuit = self._circuits.get(relay)
        if circuit is None:
            with self._lock:
                circuit = self._circuits.get(relay)
                if circuit is None:
                    circuit = Circuit.for_relay(
                        self.redis, relay, self.probe_interval, self.quota_interval
                    )
                    self._circuits[relay] = circuit
        return circuit

    def in_use(self, within: float = FORGET_AFTER) -> list[str]:
        """Relays asked about in the last `within` seconds."""
        since = time.monotonic() - within
        return [name for name, at in list(self._seen.items()) if at >= since]

    def forget_idle(self, within: float = FORGET_AFTER) -> None:
        since = time.monotonic() - within
        with self._lock:
            for name, at in list(self._seen.items()):
                if at < since and name != DEFAULT_RELAY:
                    self._seen.pop(name, None)
                    self._circuits.pop(name, None)

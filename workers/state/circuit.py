"""A fleet-wide circuit breaker for failures that no retry can fix: a bad or revoked API key,
a relay that will not do TLS, the account's quota spent. While it is open every worker leaves
queued messages waiting (without spending their retries); one probe per interval tries the
relay, and a probe that goes through closes it for everyone. The quota state probes rarely
(MAILER_QUOTA_PROBE_INTERVAL): the relay will not take anything before the quota is back.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from workers.state import keys


@dataclass(frozen=True)
class CircuitState:
    open: bool
    reason: str = ""
    since: float = 0.0
    kind: str = "auth"  # auth | tls | quota: what opened it


class Circuit:
    def __init__(
        self, client: redis.Redis, probe_interval: float = 10.0, quota_interval: float = 60.0
    ) -> None:
        self.redis = client
        self.probe_interval = probe_interval
        self.quota_interval = quota_interval
        self._cached: tuple[float, CircuitState] = (0.0, CircuitState(False))

    def interval(self, kind: str) -> float:
        return self.quota_interval if kind == "quota" else self.probe_interval

    def state(self, max_age: float = 0.5) -> CircuitState:
        """Cached for half a second: one GET per process, not one per message."""
        now = time.monotonic()
        at, state = self._cached
        if now - at < max_age:
            return state
        raw = self.redis.get(keys.CIRCUIT)
        if raw is None:
            state = CircuitState(False)
        else:
            data = json.loads(raw)
            state = CircuitState(
                True,
                str(data.get("reason", "")),
                float(data.get("since", 0)),
                str(data.get("kind", "auth")),
            )
        self._cached = (now, state)
        return state

    def trip(self, reason: str, kind: str = "auth") -> bool:
        """Opens the breaker; True when this call opened it (the caller logs it once)."""
        record = json.dumps({"reason": reason, "since": time.time(), "kind": kind})
        opened = bool(self.redis.set(keys.CIRCUIT, record, nx=True))
        if opened:
            # The tripping attempt was itself a probe: the next one waits a full interval.
            self.redis.set(keys.CIRCUIT_PROBE, "1", px=int(self.interval(kind) * 1000))
        self._cached = (time.monotonic(), CircuitState(True, reason, time.time(), kind))
        return opened

    def try_probe(self) -> bool:
        """True for one caller in the fleet per probe interval."""
        interval = self.interval(self.state().kind)
        return bool(self.redis.set(keys.CIRCUIT_PROBE, "1", nx=True, px=int(interval * 1000)))

    def reset(self) -> None:
        self.redis.delete(keys.CIRCUIT, keys.CIRCUIT_PROBE)
        self._cached = (time.monotonic(), CircuitState(False))

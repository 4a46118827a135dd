"""Small helpers the end-to-end tests share."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from workers.sink import SinkServer


def ids_at(sink: SinkServer) -> Counter[str]:
    """Our message ids as the server accepted them (the Message-ID's local part), with counts."""
    return Counter(mid.split("@", 1)[0] for mid in sink.message_ids().elements())


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, interval: float = 0.2) -> bool:
    """Polls without asserting on time: machines here are shared, so only the outcome counts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()

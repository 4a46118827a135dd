"""What picking a message's relay costs a worker, per message: `Runtime.route` (the relay's
parts) with the attempt's bookkeeping, for the `default` relay and for a named one, and the
task thread's check of the relay's circuit breaker. In-process, a private redis-server and
the local sink (nothing is sent: routing only).

    python bench/relay_route.py [--messages 200000]

Figures are printed, never asserted (bench/README.md); the end-to-end single-relay figures
come from `python bench/run.py --only zero --systems ours`, run on main and on the change.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devkit.redis_server import RedisServer
from devkit.sink import SinkServer, make_tls_material
from mailer.config import Secret, Settings
from mailer.message import Message
from mailer.relays import Relay
from mailer.wire import to_payload

KEY = "SG.bench-relay-route-key"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    args = parser.parse_args()

    from workers import settle
    from workers.engine import runtime as runtime_module
    from workers.engine.relayparts import StaticRelays
    from workers.engine.runtime import Runtime

    tls = make_tls_material(Path(tempfile.mkdtemp()))
    server = RedisServer().start()
    sink = SinkServer(tls="starttls", auth=("apikey", KEY), tls_material=tls).start()
    settings = Settings(
        redis_url=server.url,
        broker_url=server.url,
        smtp_host="localhost",
        smtp_port=sink.port,
        smtp_password=Secret(KEY),
        smtp_ca_file=str(tls.ca_file),
    )
    named = Relay("tenant-b", "localhost", sink.port, "starttls", "apikey", Secret(KEY))
    rt = Runtime(settings, relays=lambda _s, _r: StaticRelays([named]))
    runtime_module._runtime = rt  # workers/settle.py asks for the process's runtime
    settle.settings = settings
    try:
        payload: dict[str, Any] = dict(
            to_payload(
                Message(
                    to="a@example.com", subject="s", text="t", from_addr="f@example.com"
                ).render()
            )
        )
        other = {**payload, "meta": {**payload["meta"], "relay": "tenant-b"}}

        async def route(p: dict[str, Any], n: int) -> float:
            await rt.route(p)  # builds the named relay's parts once
            started = time.perf_counter()
            for _ in range(n):
                parts = await rt.route(p)
                parts.active += 1
                parts.active -= 1
                parts.last_used = time.monotonic()
            return (time.perf_counter() - started) / n * 1e6

        n = args.messages
        print(f"route, default relay   {rt.loop.run(route(payload, n)):.2f} µs per message")
        print(f"route, named relay     {rt.loop.run(route(other, n)):.2f} µs per message")
        started = time.perf_counter()
        for _ in range(n):
            settle.wait_for_circuit("default")
        check = (time.perf_counter() - started) / n * 1e6
        print(f"breaker check (closed) {check:.2f} µs per message")
    finally:
        rt.close(5)
        sink.stop()
        server.close()


if __name__ == "__main__":
    main()

"""Relay selection per message (issue 20): what choosing the relay, failing over and adapting the
header block add to the worker's own per-message work, against the single-relay path.

    python bench/relays.py                  # 20,000 messages per row, best of 7
    python bench/relays.py --count 5000 --repeat 3

Every row runs the same loop over the same rendered messages (1 KiB of text, a category and a
unique argument, as `mailer.send` makes them) on one asyncio loop, against a private
redis-server: the trouble runs are real, read at most twice a second as in a worker.

- baseline: what the worker does to every message whatever the relay: `from_payload` (the wire
  check) and `wire_body` (the bytes for DATA). Run twice: the gap between the two runs is the
  noise the other rows are read against.
- + route, sendgrid: `relay_of`, the registry lookup, `Router.route` (a relay with a fallback,
  a lane that fails over, the relay healthy), `adapt(..., "sendgrid")` and `record_success`:
  the common case.
- + route, no fallback: the same for a relay without a fallback (the fast path of `route`).
- + failover to ses: the relay's circuit open, the message goes to an SES fallback: `route`,
  `adapt(..., "ses")` (the header block rewritten and checked) and `record_success`.
- selection alone: the same steps without the baseline's, sendgrid and failed over to ses.
- adapt alone, per profile.

Prints µs per message, the best of N interleaved runs of each row; figures are noisy on a
shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import redis.asyncio as aioredis  # noqa: E402

from bench.common import BODY, FROM_ADDR, SUBJECT, recipient  # noqa: E402
from devkit.redis_server import RedisServer  # noqa: E402
from mailer.config import Secret  # noqa: E402
from mailer.message import Message  # noqa: E402
from mailer.profiles import adapt  # noqa: E402
from mailer.relays import Relay  # noqa: E402
from mailer.wire import from_payload, relay_of, to_payload  # noqa: E402
from workers.engine.failover import Router  # noqa: E402
from workers.engine.session import wire_body  # noqa: E402
from workers.state import keys  # noqa: E402
from workers.state.trouble import TroubleRuns  # noqa: E402

LANE = "transactional"


def relay(name: str, **fields: Any) -> Relay:
    return Relay(name, "localhost", 2525, "starttls", "apikey", Secret("k"), **fields)


def payloads(count: int) -> list[dict[str, Any]]:
    distinct = [
        to_payload(
            Message(
                to=recipient(i),
                subject=SUBJECT,
                text=BODY,
                from_addr=FROM_ADDR,
                smtpapi={"category": ["receipts"], "unique_args": {"order": f"A-{i}"}},
            ).render(),
            LANE,
        )
        for i in range(min(count, 1000))
    ]
    return [dict(distinct[i % len(distinct)]) for i in range(count)]  # type: ignore[arg-type]


async def once_us(step: Callable[[dict[str, Any]], Awaitable[None]], items: list[Any]) -> float:
    start = time.perf_counter()
    for item in items:
        await step(item)
    return (time.perf_counter() - start) / len(items) * 1e6


async def measure(redis_url: str, count: int, repeat: int) -> list[tuple[str, float]]:
    client = aioredis.Redis.from_url(redis_url)
    primary = relay("primary", fallback="ses-backup", fallback_lanes=(LANE,))
    alone = relay("alone")
    backup = relay("ses-backup", profile="ses", configuration_set="failover")
    registry = {r.name: r for r in (primary, alone, backup)}
    router = Router(TroubleRuns(client), registry.get, lambda name: False)
    items = payloads(count)
    for item in items:
        item["meta"]["relay"] = "primary"
    await client.set(keys.for_relay("primary", keys.TROUBLE_PROBE), "1", px=3_600_000)  # no probe

    async def baseline(payload: dict[str, Any]) -> None:
        from_payload(payload)
        wire_body(payload["data"].encode("ascii"))

    async def choose(payload: dict[str, Any], circuit_open: bool = False) -> str:
        """Relay selection alone: the relay, the route, the header block, the outcome hook."""
        chosen = registry[relay_of(payload)]
        route = await router.route(chosen, LANE, circuit_open, payload["data"])
        via = registry[route.relay_name]
        data = adapt(payload["data"], via.profile, via.configuration_set).data
        router.record_success(via.name)
        return data

    async def selected(payload: dict[str, Any], circuit_open: bool = False) -> None:
        from_payload(payload)
        wire_body((await choose(payload, circuit_open)).encode("ascii"))

    async def no_fallback(payload: dict[str, Any]) -> None:
        from_payload(payload)
        route = await router.route(alone, LANE, False)
        via = registry[route.relay_name]
        data = adapt(payload["data"], via.profile, via.configuration_set).data
        wire_body(data.encode("ascii"))
        router.record_success(via.name)

    async def failed_over(payload: dict[str, Any]) -> None:
        await selected(payload, circuit_open=True)

    def adapting(profile: str) -> Callable[[dict[str, Any]], Awaitable[None]]:
        async def step(payload: dict[str, Any]) -> None:
            adapt(payload["data"], profile, "failover" if profile == "ses" else None)  # type: ignore[arg-type]

        return step

    async def choose_sendgrid(payload: dict[str, Any]) -> None:
        await choose(payload)

    async def choose_ses(payload: dict[str, Any]) -> None:
        await choose(payload, circuit_open=True)

    rows = [
        ("baseline (single relay)", baseline),
        ("+ route, sendgrid (fallback lane, healthy)", selected),
        ("+ route, no fallback", no_fallback),
        ("+ failover to ses (circuit open)", failed_over),
        ("baseline again (the noise)", baseline),
        ("selection alone: sendgrid", choose_sendgrid),
        ("selection alone: failover to ses", choose_ses),
        ("adapt alone: sendgrid", adapting("sendgrid")),
        ("adapt alone: ses", adapting("ses")),
        ("adapt alone: postmark", adapting("postmark")),
        ("adapt alone: smtp", adapting("smtp")),
    ]
    for _, step in rows:
        await step(items[0])  # warm: the first trouble-run read happens here
    best = {name: float("inf") for name, _ in rows}
    for _ in range(repeat):  # rows interleaved, so a busy spell of the machine hits them all
        for name, step in rows:
            best[name] = min(best[name], await once_us(step, items))
    out = list(best.items())
    await client.aclose()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    server = RedisServer().start()
    try:
        rows = asyncio.run(measure(server.url, args.count, args.repeat))
    finally:
        server.close()
    base = rows[0][1]
    print(f"{'per message':<44} {'us':>7} {'vs baseline':>12}")
    for name, us in rows:
        added = f"{us - base:+.2f} us" if name.startswith(("+", "baseline")) else ""
        print(f"{name:<44} {us:>7.2f} {added:>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

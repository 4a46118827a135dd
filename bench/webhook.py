"""Events ingested per second by one webhook process (`mailer webhook`, uvicorn), Redis
included: signed POSTs of SendGrid-shaped batches over keep-alive connections, timed from the
first POST until every event is applied (its seen marker written, the inbox drained).

    python bench/webhook.py [--events 50000] [--batch 500] [--clients 4] [--messages 2000]
                            [--relay tenant-42]

`--messages` sets how many events each message gets (events / messages): the drain applies a
message's events of one drained batch in one script call, so fewer events per message costs
more per event. `--relay` posts to `/webhooks/sendgrid/<relay>` (a named relay's lists).

Figures are printed, never asserted (bench/README.md).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import redis
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port, proc_cpu, wait_port
from devkit.redis_server import RedisServer
from events.signature import SIGNATURE_HEADER, TIMESTAMP_HEADER
from workers.state import keys, lifecycle

KINDS = ("processed", "delivered", "deferred", "bounce", "open", "click")


def batches(total: int, size: int, messages: list[tuple[str, str]]) -> list[bytes]:
    now = int(time.time())
    out, events = [], []
    for i in range(total):
        mid, queue_id = messages[i % len(messages)]
        kind = KINDS[i % len(KINDS)]
        e = {
            "email": f"user{i % 997}@example.com",
            "timestamp": now,
            "event": kind,
            "sg_event_id": uuid.uuid4().hex,
            "sg_message_id": f"{queue_id}.filter-{i}",
            "smtp-id": f"<{mid}@example.com>",
            "category": ["bench"],
        }
        if i % 10:  # one in ten without unique args: matched through the queue id
            e["mailer_id"] = mid
        events.append(e)
        if len(events) == size:
            out.append(json.dumps(events).encode())
            events = []
    if events:
        out.append(json.dumps(events).encode())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--messages", type=int, default=2000, help="messages the events are for")
    parser.add_argument("--relay", default="", help="post for this named relay (its own URL)")
    args = parser.parse_args()

    key = ec.generate_private_key(ec.SECP256R1())
    public = base64.b64encode(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).decode()
    server = RedisServer().start()
    client = redis.Redis.from_url(server.url)
    messages = []
    note = client.register_script(lifecycle.NOTE_SOURCE)
    pipe = client.pipeline(transaction=False)
    for _ in range(args.messages):
        mid, queue_id = uuid.uuid4().hex, uuid.uuid4().hex[:22]
        names, call = lifecycle.note_call(mid, "sent", 3600, reply=f"250 Ok: queued as {queue_id}")
        note(keys=names, args=call, client=pipe)
        messages.append((mid, queue_id))
    pipe.execute()
    bodies = batches(args.events, args.batch, messages)
    port = free_port()
    env = {**os.environ, "MAILER_BROKER_URL": server.url, "MAILER_SENDGRID_WEBHOOK_KEY": public}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailer", "webhook", "--port", str(port), "--log-level", "warning"],
        env=env,
    )
    try:
        wait_port(port, 30)
        signed = []
        for body in bodies:
            stamp = str(int(time.time()))
            sig = key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
            signed.append(
                (
                    body,
                    {
                        SIGNATURE_HEADER: base64.b64encode(sig).decode(),
                        TIMESTAMP_HEADER: stamp,
                        "Content-Type": "application/json",
                    },
                )
            )
        assert server.proc is not None
        cpu0, redis0 = proc_cpu(proc.pid), proc_cpu(server.proc.pid)
        started = time.monotonic()
        posted: list[float] = []
        path = "/webhooks/sendgrid" + (f"/{args.relay}" if args.relay else "")

        def poster(part: list[tuple[bytes, dict[str, str]]]) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for body, headers in part:
                conn.request("POST", path, body, headers)
                response = conn.getresponse()
                response.read()
                assert response.status == 200, response.status
            conn.close()
            posted.append(time.monotonic())

        threads = [
            threading.Thread(target=poster, args=(signed[i :: args.clients],))
            for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        answered = max(posted) - started
        while client.llen(keys.EVENT_INBOX) or client.llen(keys.EVENT_PROCESSING):
            time.sleep(0.01)
        applied = time.monotonic() - started
        cpu, redis_cpu = proc_cpu(proc.pid) - cpu0, proc_cpu(server.proc.pid) - redis0
        seen = sum(1 for _ in client.scan_iter(keys.EVENT_SEEN_PREFIX + "*", count=10_000))
        print(
            f"webhook: {args.events:,} events in {len(bodies)} signed POSTs of {args.batch}, "
            f"{args.clients} clients, {args.messages:,} messages, one `mailer webhook` process, "
            f"Redis included; POST {path}"
        )
        print(f"  all POSTs answered in {answered:.2f} s ({args.events / answered:,.0f} events/s)")
        print(
            f"  all events applied in {applied:.2f} s ({args.events / applied:,.0f} events/s); "
            f"{seen:,} applied once"
        )
        print(
            f"  CPU: webhook process {cpu:.2f} s, redis-server (AOF on) {redis_cpu:.2f} s; "
            f"load average {os.getloadavg()[0]:.1f}"
        )
    finally:
        proc.terminate()
        proc.wait(15)
        client.close()
        server.close()


if __name__ == "__main__":
    main()

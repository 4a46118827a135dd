"""`mailer demo`: the whole path on this machine, with nothing configured.

Starts a throwaway redis-server when no broker is configured, a local SMTP sink (STARTTLS with
a CA made now, AUTH as `apikey`) when no relay is configured, and a real worker process; sends
messages with `mailer.send` and reports what arrived. Exits non-zero if any message is missing.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path


def _missing(redis_url: str, ids: list[str]) -> list[str]:
    import json

    import redis

    from workers.state import keys

    client = redis.Redis.from_url(redis_url)
    missing: list[str] = []
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        for message_id, raw in zip(
            chunk, client.mget([keys.ledger(i) for i in chunk]), strict=True
        ):
            if raw is None or json.loads(raw).get("state") != "sent":
                missing.append(message_id)
    client.close()
    return missing


def run_demo(count: int = 1000, per_connection: int = 0, timeout: float = 120.0) -> int:
    import mailer
    from devkit.redis_server import RedisServer
    from devkit.sink import SinkServer, make_tls_material
    from devkit.worker import WorkerProcess

    env: dict[str, str] = {}
    sink: SinkServer | None = None
    with ExitStack() as stack:
        if not os.environ.get("MAILER_BROKER_URL"):
            server = RedisServer().start()
            stack.callback(server.close)
            env["MAILER_BROKER_URL"] = server.url
            print(f"broker: throwaway redis-server at {server.url}")
        if not os.environ.get("MAILER_SMTP_HOST"):
            tls_dir = Path(tempfile.mkdtemp(prefix="mailer-demo-tls-"))
            key = "SG." + secrets.token_urlsafe(16)[:22] + "." + secrets.token_urlsafe(32)[:43]
            sink = SinkServer(
                tls="starttls",
                auth=("apikey", key),
                tls_material=make_tls_material(tls_dir),
                record_data=False,
            )
            sink.start()
            stack.callback(sink.stop)
            env.update(
                MAILER_SMTP_HOST="localhost",
                MAILER_SMTP_PORT=str(sink.port),
                MAILER_SMTP_TLS="starttls",
                MAILER_SMTP_CA_FILE=str(tls_dir / "ca.pem"),
                MAILER_SMTP_PASSWORD=key,
            )
            print(f"relay:  local SMTP sink at localhost:{sink.port} (STARTTLS, AUTH apikey)")
        if not os.environ.get("MAILER_DEFAULT_FROM"):
            env["MAILER_DEFAULT_FROM"] = "Demo <demo@example.com>"
        if per_connection:
            env["MAILER_MAX_MESSAGES_PER_CONNECTION"] = str(per_connection)
        os.environ.update(env)
        mailer.reset_default_mailer()

        from mailer.config import Settings

        settings = Settings.from_env()
        worker = WorkerProcess(env, name="demo")
        worker.start()
        stack.callback(worker.stop)
        print(
            f"worker: pid {worker.pid}, up to {settings.worker_connections} SMTP sessions, "
            f"rotating every {settings.max_messages_per_connection} messages"
        )

        started = time.monotonic()
        ids = [
            mailer.send(
                to=f"user{i}@example.com", subject=f"Demo message {i}", text=f"Hello number {i}.\n"
            )
            for i in range(count)
        ]
        enqueued = time.monotonic() - started
        deadline = started + timeout
        missing = ids
        while time.monotonic() < deadline:
            if sink is not None and sink.wait_for(count, timeout=0.5) is False:
                continue
            missing = _missing(settings.redis_url, ids)
            if not missing:
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started

        delivered = count - len(missing)
        print(f"enqueued:   {count} messages in {enqueued:.2f}s ({count / enqueued:.0f}/s)")
        print(f"delivered:  {delivered}/{count}")
        if sink is not None:
            sessions = sink.sessions
            ids_seen = sink.message_ids()
            duplicates = sum(n - 1 for n in ids_seen.values() if n > 1)
            print(
                f"sessions:   {len(sessions)} opened, most messages on one session: "
                f"{max((s.mail_count for s in sessions), default=0)}"
            )
            print(f"duplicates: {duplicates}")
        print(f"elapsed:    {elapsed:.2f}s, {delivered / elapsed:.0f} messages/s end to end")
        mailer.reset_default_mailer()
        if missing:
            print(f"MISSING {len(missing)} messages, e.g. {missing[:3]}", file=sys.stderr)
            return 1
        return 0
    return 1  # pragma: no cover

"""What the project sends to Redis, as Redis saw it: `python -m devkit.redis_trace`.

Starts a private redis-server, a TLS SMTP sink and a worker; sends single messages, a batch,
one refused, one deferred (a retry with a countdown) and two scheduled (one released, one
cancelled); runs `mailer status`, `mailer failures list/show/retry` and `mailer cancel`; and
records everything with MONITOR (commands run inside Lua scripts included). Prints each
command with the key patterns it touched: the ACL rule in README
"Production Redis" is derived from this list, and tests/e2e/test_redis_acl.py proves it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import redis

from devkit.redis_server import RedisServer
from devkit.sink import FaultPlan, SinkServer, make_tls_material
from devkit.worker import WorkerProcess

API_KEY = "SG." + "t" * 22 + "." + "r" * 43
#: Commands with a subcommand that matters to an ACL rule.
SUBCOMMANDS = {"client", "script", "config", "command", "acl", "object", "memory"}
#: Commands whose arguments name pub/sub channels (ACL `&` patterns), not keys.
CHANNELS = {"publish", "subscribe", "psubscribe", "unsubscribe", "punsubscribe"}
_ID = re.compile(r"[0-9a-f]{16,}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f-]{27}|\d{6,}")


def pattern(key: str) -> str:
    """A key with its ids (uuids, hex ids, timestamps) replaced by `*`."""
    return _ID.sub("*", key)


_LINE = re.compile(r"^\S+ \[\d+ ([^\]]*)\] (.*)$", re.S)


def record(url: str, stop: threading.Event, out: list[tuple[str, str]]) -> None:
    """MONITOR's raw lines, as (client, quoted words): redis-py's parser drops the quoting."""
    client = redis.Redis.from_url(url)
    with client.monitor() as monitor:
        while not stop.is_set():
            raw = monitor.connection.read_response()
            text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            match = _LINE.match(text)
            if match:
                out.append((match.group(1), match.group(2)))


def run() -> dict[str, dict[str, Any]]:
    server = RedisServer().start()
    tls = make_tls_material(Path(tempfile.mkdtemp(prefix="mailer-trace-")))
    sink = SinkServer(
        tls="starttls",
        auth=("apikey", API_KEY),
        tls_material=tls,
        faults=FaultPlan(reject_rcpt={"refused@example.com"}, defer_rcpt={"later@example.com"}),
    ).start()
    env = {
        "MAILER_BROKER_URL": server.url,
        "MAILER_SMTP_HOST": "localhost",
        "MAILER_SMTP_PORT": str(sink.port),
        "MAILER_SMTP_TLS": "starttls",
        "MAILER_SMTP_CA_FILE": str(tls.ca_file),
        "MAILER_SMTP_PASSWORD": API_KEY,
        "MAILER_DEFAULT_FROM": "Sender <sender@example.com>",
        "MAILER_LEASE_TTL": "10",
        "MAILER_MAX_RETRIES": "1",
    }
    os.environ.update(env)
    seen: list[tuple[str, str]] = []
    stop = threading.Event()
    threading.Thread(target=record, args=(server.url, stop, seen), daemon=True).start()
    time.sleep(0.3)
    worker = WorkerProcess(env, name="trace").start()
    try:
        import mailer

        for i in range(20):
            mailer.send(to=f"user{i}@example.com", subject=f"trace {i}", text="body\n")
        mailer.send_many(
            [
                mailer.Message(to=f"batch{i}@example.com", subject="batch", text="body\n")
                for i in range(5)
            ]
        )
        refused = mailer.send(to="refused@example.com", subject="refused", text="body\n")
        mailer.send(to="soon@example.com", subject="soon", text="body\n", send_at=time.time() + 1)
        dropped = mailer.send(
            to="never@example.com", subject="never", text="body\n", send_at=time.time() + 3600
        )
        mailer.send(to="later@example.com", subject="deferred", text="body\n")
        deadline = time.monotonic() + 60
        while len(sink.received) < 26 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)
        for args in (
            ("status", "--json"),
            ("failures", "list"),
            ("failures", "show", refused),
            ("failures", "retry", refused),
            ("cancel", dropped),
        ):
            subprocess.run(
                [sys.executable, "-m", "mailer", *args],
                env={**os.environ, **env},
                capture_output=True,
                timeout=60,
                check=False,
            )
        time.sleep(12)  # kombu's restore timer and the consumers' heartbeats run at least once
    finally:
        worker.stop()
        stop.set()
        redis.Redis.from_url(server.url).ping()  # wakes the monitor so it sees `stop`
        sink.stop()
    commands: dict[str, dict[str, Any]] = defaultdict(lambda: {"n": 0, "keys": set()})
    probe = redis.Redis.from_url(server.url).connection_pool.get_connection()
    for who, line in seen:
        words = _words(line)
        if not words:
            continue
        name = words[0].lower()
        if name in SUBCOMMANDS and len(words) > 1:
            name = f"{name}|{words[1].lower()}"
        entry = commands[name]
        entry["n"] += 1
        entry["lua"] = entry.get("lua", False) or who == "lua"
        if name in CHANNELS and len(words) > 1:
            entry["keys"].update(
                "&" + pattern(w) for w in words[1 : 2 if name == "publish" else None]
            )
        elif len(entry["keys"]) < 50 and name not in ("eval", "evalsha", "script|load"):
            probe.send_command("COMMAND", "GETKEYS", *words)
            try:
                keys = probe.read_response()
            except redis.ResponseError:
                keys = []
            entry["keys"].update(pattern(k.decode(errors="replace")) for k in keys)
    probe.disconnect()
    server.close()
    return dict(commands)


def _words(line: str) -> list[str]:
    """MONITOR's `"CMD" "arg" ...` line (redis-py joins the quoted words with spaces)."""
    return [w.encode().decode("unicode_escape") for w in re.findall(r'"((?:[^"\\]|\\.)*)"', line)]


def main() -> None:
    commands = run()
    for name in sorted(commands):
        entry = commands[name]
        keys = " ".join(sorted(entry["keys"])) or "-"
        where = " (in Lua)" if entry.get("lua") else ""
        print(f"{name:<24} {entry['n']:>6}{where:<9} {keys}")


if __name__ == "__main__":
    main()

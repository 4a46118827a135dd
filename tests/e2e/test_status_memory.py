"""`mailer status` shows Redis memory against maxmemory and warns above 80% (with noeviction a
full Redis refuses writes and producers fail). A real redis-server and the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import redis


def status(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MAILER_BROKER_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "mailer", "status", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_memory_against_maxmemory_and_the_warning(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        client.config_set("maxmemory", 0)
        calm = status(redis_url, "--json")
        assert calm.returncode == 0, calm.stderr
        (memory,) = json.loads(calm.stdout)["memory"]
        assert memory["role"] == "broker" and memory["used_bytes"] > 0
        assert memory["maxmemory_bytes"] == 0 and memory["used_ratio"] is None
        assert not memory["warning"]
        assert "WARNING" not in status(redis_url).stdout

        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", int(used / 0.9))  # about 90% full
        full = status(redis_url, "--json")
        (memory,) = json.loads(full.stdout)["memory"]
        assert memory["used_ratio"] > 0.8 and memory["policy"] == "noeviction"
        assert "maxmemory" in memory["warning"] and "producers fail" in memory["warning"]
        text = status(redis_url).stdout
        assert "memory broker" in text and "WARNING" in text, text
    finally:
        client.config_set("maxmemory", 0)
        client.close()

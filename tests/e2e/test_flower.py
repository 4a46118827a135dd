"""A real Flower process watching a real worker: a retried task shows RETRY, its retry count and
the SMTP reason (code and text), and nothing Flower serves carries the API key or the body."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import mailer
from devkit.redis_server import free_port
from devkit.sink import FaultPlan, SinkServer, TLSMaterial
from devkit.worker import WorkerProcess
from mailer.client import default_mailer
from tests.support.relay import relay_env

AUTH = ("admin", "flower-test-pw")


class Flower:
    """`python -m celery -A workers.app flower`, started as an operator would (basic auth on)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.app",
            "flower",
            f"--port={self.port}",
            "--address=127.0.0.1",
            f"--basic-auth={AUTH[0]}:{AUTH[1]}",
        ]
        self.proc = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"flower exited: {self.proc.stdout.read() if self.proc.stdout else ''}"
                )
            try:
                self.get("/healthcheck")
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        raise RuntimeError("flower did not start")

    def get(self, path: str) -> str:
        request = urllib.request.Request(self.base + path)
        token = base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(response.read().decode())

    def json(self, path: str) -> Any:
        return json.loads(self.get(path))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def flower() -> Iterator[Callable[[dict[str, str]], Flower]]:
    started: list[Flower] = []

    def start(env: dict[str, str]) -> Flower:
        server = Flower(env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _task_for(flower: Flower, message_id: str, timeout: float = 60.0) -> str:
    """The Celery task id whose args (our argsrepr) name `message_id`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task_id, task in flower.json("/api/tasks?limit=1000").items():
            if message_id in str(task.get("args")):
                return str(task_id)
        time.sleep(0.2)
    raise AssertionError(f"flower never listed a task for {message_id}")


def _send(subject: str, text: str) -> str:
    client = default_mailer()
    rendered = client.render(mailer.Message(to="ann@example.com", subject=subject, text=text))
    client.publisher.send(rendered.to_payload())
    return rendered.id


def test_flower_shows_a_retried_task_with_count_and_smtp_reason_and_no_secret(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: Callable[..., WorkerProcess],
    producer_env: Callable[[dict[str, str]], None],
    flower: Callable[[dict[str, str]], Flower],
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", api_key))
    env = relay_env(redis_url, sink, tls_material, api_key, MAILER_VISIBILITY_TIMEOUT=60)
    producer_env(env)
    server = flower(env)
    workers(env)

    # Flower only sees events sent while it listens: wait until it has seen one whole task.
    warm = _send("warm-up", "warm")
    warm_task = _task_for(server, warm)
    deadline = time.monotonic() + 60
    while server.json(f"/api/task/info/{warm_task}").get("state") != "SUCCESS":
        assert time.monotonic() < deadline, "flower never saw the warm-up task succeed"
        time.sleep(0.2)

    retries = 2
    sink.faults = FaultPlan(p_451_data=1.0, max_faults=retries)
    marker = "BODY-MARKER-" + os.urandom(6).hex()
    message_id = _send("retried in flower", f"the body {marker}\n")
    task_id = _task_for(server, message_id)

    snapshots: list[dict[str, Any]] = []
    deadline = time.monotonic() + 90
    while True:
        info = server.json(f"/api/task/info/{task_id}")
        snapshots.append(info)
        if info.get("state") == "SUCCESS":
            break
        assert time.monotonic() < deadline, f"task never succeeded: {info}"
        time.sleep(0.1)
    final = snapshots[-1]
    # RETRY lasts from the task-retried event to the retry's task-received, which the worker
    # sends as soon as it holds the countdown message: often too short to be polled. Flower
    # keeps the retried event's time and exception on the task, so the final record shows it.
    retried = [s for s in snapshots if s.get("state") == "RETRY"]
    print(f"\nflower: polled in RETRY {len(retried)} times; final keys {sorted(final)}")
    print(f"flower final: retried={final.get('retried')} exception={final.get('exception')}")
    print(f"flower final: retries={final.get('retries')} kwargs={final.get('kwargs')}")

    assert retried or final.get("retried"), "flower never saw the task-retried event"
    reasons = {str(s.get("exception")) for s in snapshots if s.get("exception")}
    assert any("451" in r and "Try again later" in r for r in reasons), reasons
    assert max(int(s.get("retries") or 0) for s in snapshots) == retries
    assert final["retries"] == retries
    assert final["kwargs"] == repr({"attempts": retries})  # our attempts, as Flower shows it
    assert message_id in final["args"] and "retried in flower" in final["args"]
    assert [r.message_id for r in sink.received].count(f"{message_id}@{_domain(sink)}") == 1

    # Everything Flower serves about tasks: no key, no body, on any page or field.
    params = urllib.parse.urlencode(
        {
            "draw": 1,
            "start": 0,
            "length": 100,
            "search[value]": "",
            "order[0][column]": 0,
            "columns[0][data]": "name",
            "order[0][dir]": "asc",
        }
    )
    served = [
        server.get("/api/tasks?limit=1000"),
        server.get(f"/api/task/info/{task_id}"),
        server.get(f"/tasks/datatable?{params}"),
        server.get(f"/task/{task_id}"),
        *(json.dumps(s) for s in snapshots),
    ]
    blob = "\n".join(served)
    assert task_id in blob and message_id in blob
    for secret in (api_key, marker, "the body"):
        assert secret not in blob, f"flower serves {secret!r}"
    b64 = base64.b64encode(f"\0apikey\0{api_key}".encode()).decode()
    assert b64 not in blob


def _domain(sink: SinkServer) -> str:
    """The Message-ID's domain as the producer rendered it (read back from the server)."""
    mid = sink.received[-1].message_id or ""
    return mid.split("@", 1)[1] if "@" in mid else ""

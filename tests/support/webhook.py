"""SendGrid's side of the Event Webhook for tests: a key pair the test makes, signed POSTs,
event batches shaped like SendGrid's documented ones, and the webhook server as a real
`python -m mailer webhook` process (uvicorn)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devkit.redis_server import free_port
from events.signature import SIGNATURE_HEADER, TIMESTAMP_HEADER


class Signer:
    """SendGrid's signing key, made by the test; `public` is the key as the console shows it."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public = base64.b64encode(der).decode()

    def headers(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signature = self.key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {
            SIGNATURE_HEADER: base64.b64encode(signature).decode(),
            TIMESTAMP_HEADER: stamp,
            "Content-Type": "application/json",
        }


def event(
    kind: str,
    email: str,
    *,
    mailer_id: str | None = None,
    sg_message_id: str | None = None,
    at: int | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """One event as SendGrid posts it: unique args (ours: `mailer_id`) as top-level keys."""
    data: dict[str, Any] = {
        "email": email,
        "timestamp": int(time.time()) if at is None else at,
        "event": kind,
        "sg_event_id": secrets.token_urlsafe(16),
        "smtp-id": f"<{secrets.token_hex(8)}@example.com>",
        "category": ["test"],
    }
    if sg_message_id is not None:
        data["sg_message_id"] = sg_message_id
    if mailer_id is not None:
        data["mailer_id"] = mailer_id
    defaults: dict[str, dict[str, Any]] = {
        "delivered": {"response": "250 OK", "ip": "168.1.1.1", "tls": 1},
        "deferred": {"response": "400 try again later", "attempt": "1"},
        "bounce": {"reason": "550 5.1.1 unknown user", "status": "5.1.1", "type": "bounce"},
        "dropped": {"reason": "Bounced Address", "status": "5.0.0"},
    }
    return {**data, **defaults.get(kind, {}), **fields}


def post(url: str, body: bytes, headers: Mapping[str, str]) -> int:
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def post_events(url: str, signer: Signer, events: Sequence[Mapping[str, Any]]) -> int:
    body = json.dumps(list(events)).encode()
    return post(url, body, signer.headers(body))


class WebhookServer:
    """`python -m mailer webhook` in a process of its own, as an operator runs it."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/sendgrid"

    def start(self, timeout: float = 30.0) -> WebhookServer:
        argv = [sys.executable, "-m", "mailer", "webhook", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        health = f"http://127.0.0.1:{self.port}/healthz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(health, timeout=2):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("webhook did not start:\n" + "".join(self.lines[-50:]))

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

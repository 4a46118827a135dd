"""A real SMTP server (aiosmtpd) for tests, the demo and the compose ``sink`` profile.

It speaks the parts of SMTP a relay such as SendGrid speaks (STARTTLS or implicit TLS from a CA
made at run time, AUTH PLAIN/LOGIN, a 35 MB size limit), records every TCP connection, session
and accepted message so tests can prove "no loss, no duplicates, never AUTH in clear", and
injects the failures a relay produces (421, 451, 550, dropped connections, slow replies).

It also behaves like a relay that shapes its clients: a per-second MAIL rate above which it
answers "throttled" (``throttle_rate``), a plan quota during which AUTH answers SendGrid's
``451 Authentication failed: Maximum credits exceeded`` (``start_quota``), a credential
that can be revoked at run time (replace ``auth``, or rewrite ``auth_file``, which every AUTH
reads: another process can revoke and restore the key), and an outage: it stops listening
(``refuse_connections``: connections are refused, open ones dropped) and listens again on the
same port (``accept_connections``; SIGUSR1 and SIGUSR2 from the CLI). Every session opened,
AUTH attempt and MAIL reply is recorded with its wall-clock time, so tests and benchmarks read
per-second series from it (``per_second``, ``max_in_window``, ``auth_failures``).

The server runs on its own thread with its own event loop, so synchronous tests (and Celery
workers in other processes) can talk to it while the test thread reads the records.

Run by hand::

    python -m devkit.sink --port 2525 --tls starttls --tls-dir /tmp/sink --auth apikey:KEY
    python -m devkit.sink --auth-file /tmp/sink/key    # "USER:PASSWORD", read at every AUTH
    kill -USR1 <pid>    # refuse connections (and drop the open ones); kill -USR2 <pid>: accept

One module, longer than most here, on purpose: it is a whole relay stand-in (the SMTP
handler, TLS material, the fault plan, the records and their queries, the CLI) whose parts only
make sense together, and nothing in production imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import random
import re
import secrets
import signal
import ssl
import sys
import tempfile
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import trustme
from aiosmtpd.smtp import (
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
    syntax,
)

__all__ = [
    "BAD_CREDENTIALS_REPLY",
    "DATA_SIZE_LIMIT",
    "QUOTA_REPLY",
    "SERIES_KINDS",
    "THROTTLE_REPLY",
    "AuthAttempt",
    "FaultPlan",
    "MailReply",
    "Received",
    "SeriesKind",
    "SessionRecord",
    "SinkServer",
    "TLSMaterial",
    "TLSMode",
    "main",
    "make_tls_material",
]

TLSMode = Literal["starttls", "tls", "none"]
SeriesKind = Literal["sessions", "accepted", "mail", "refused", "auth", "auth_failed"]
SERIES_KINDS: tuple[SeriesKind, ...] = (
    "sessions",
    "accepted",
    "mail",
    "refused",
    "auth",
    "auth_failed",
)

DATA_SIZE_LIMIT = 35 * 1024 * 1024
"""Like the relays we target (SendGrid accepts ~30 MB messages); aiosmtpd's default is 32 MiB."""

THROTTLE_REPLY = "421 4.7.0 Too many messages, throttled (try again later)"
"""What the sink answers to a MAIL above ``throttle_rate`` (SendGrid's 421 says "deferred")."""
QUOTA_REPLY = "451 Authentication failed: Maximum credits exceeded"
"""SendGrid's answer to AUTH once the plan's credits are spent, even with a good key."""
BAD_CREDENTIALS_REPLY = "535 Authentication failed: Bad username / password"
"""SendGrid's answer to AUTH with a wrong or revoked key."""

log = logging.getLogger(__name__)

# aiosmtpd calls socket.getfqdn() per connection when no hostname is given: a blocking DNS
# lookup on the event loop for every connection.
_GREETING_HOST = "sink.localhost"
# asyncio's default backlog of 100 makes hundreds of simultaneous connects stall on SYN retries.
_BACKLOG = 4096
#: Loop turns between a connection's open and its counting toward the peak (`_count_peak`).
PEAK_HOPS = 3
_DROP_GRACE = 60.0  # how long a dropping handler waits to be cancelled by connection_lost
_LAG_TICK = 0.05  # how often the loop checks it was not held up (see SinkServer.stalls)
_LAG_RECORDED = 0.02  # lateness worth recording
_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*<?([^\r\n>]*?)>?[ \t]*\r?$")
_FOLD = re.compile(rb"\r?\n[ \t]+")


def _quiet_login_data(record: logging.LogRecord) -> bool:
    # aiosmtpd's own smtp_AUTH sets the deprecated Session.login_data on every successful AUTH,
    # which logs a WARNING each time (to stderr via logging's last resort when unconfigured).
    return "login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_quiet_login_data)


# --------------------------------------------------------------------------------------------
# TLS material


@dataclass(frozen=True)
class TLSMaterial:
    """Paths of a throwaway CA and a server certificate it signed."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        """A server-side context for the sink (STARTTLS or implicit TLS)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only this CA (what a test client should use)."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_tls_material(
    directory: Path, hostnames: Sequence[str] = ("localhost", "127.0.0.1")
) -> TLSMaterial:
    """Write ``ca.pem``, ``server.pem`` (chain) and ``server.key`` (for ``hostnames``).

    A fresh CA per run means clients must really verify (no ``validate_certs=False`` shortcuts)
    and nothing secret or long-lived is checked in.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="relay-mailer sink CA")
    cert = ca.issue_cert(*hostnames)
    material = TLSMaterial(
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
    )
    ca.cert_pem.write_to_path(str(material.ca_file))
    material.cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(material.key_file))
    material.key_file.chmod(0o600)
    return material


# --------------------------------------------------------------------------------------------
# Faults


@dataclass(kw_only=True)
class FaultPlan:
    """Which failures to inject; probabilities draw from one ``random.Random(seed)``.

    With one client sending in order the sequence of faults is reproducible; with many
    concurrent clients only the rates are. ``p=1.0`` with ``max_faults=N`` is the deterministic
    "fail the first N times" rule; ``reject_rcpt`` is permanent and never counts against it.
    Replace the plan while the server runs with ``server.faults = FaultPlan(...)``.
    """

    seed: int | None = 0
    p_421_mail: float = 0.0
    """Reply ``421`` to MAIL, then close the connection."""
    p_drop_rcpt: float = 0.0
    """Drop the TCP connection without a reply at the first RCPT of a transaction."""
    p_drop_after_data: float = 0.0
    """Accept (record) the message, then drop the connection before the final ``250``."""
    p_451_data: float = 0.0
    """Reply ``451 4.3.0 Try again later`` at end of data (not recorded)."""
    reject_rcpt: AbstractSet[str] = frozenset()
    """Recipients that always get ``550 5.1.1 User unknown`` (compared case-insensitively)."""
    delay: float = 0.0
    """Seconds to wait before every MAIL, RCPT and end-of-data reply."""
    max_faults: int | None = None
    """Stop injecting probabilistic faults after this many."""
    p_421_rcpt: float = 0.0
    """Reply ``421`` to RCPT (MAIL was accepted), then close the connection."""
    p_451_data_command: float = 0.0
    """Reply ``451 4.3.0 Try again later`` to the DATA command itself, before any ``354``."""
    reject_mail: AbstractSet[str] = frozenset()
    """Senders that always get ``550 5.7.1 Sender rejected`` (compared case-insensitively)."""
    defer_rcpt: AbstractSet[str] = frozenset()
    """Recipients that always get ``450 4.2.1 Mailbox busy`` (compared case-insensitively)."""
    data_without_rcpt: bool = False
    """Answer ``354`` to DATA even when no recipient was accepted, which RFC 2920 §3.1 forbids
    (a pipelining client must then write nothing more); whatever it writes anyway is read as
    a body, refused with ``554`` and counted as ``body_without_rcpt``."""
    injected: Counter[str] = field(default_factory=Counter, init=False)
    """Faults injected so far, by kind: ``421_mail``, ``drop_rcpt``, ``drop_after_data``,
    ``451_data``, ``550_rcpt``, ``421_rcpt``, ``451_data_command``, ``550_mail``,
    ``450_rcpt``, ``354_no_rcpt``, ``body_without_rcpt``."""
    _rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in _PROBABILITIES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        self.reject_rcpt = frozenset(a.lower() for a in self.reject_rcpt)
        self.reject_mail = frozenset(a.lower() for a in self.reject_mail)
        self.defer_rcpt = frozenset(a.lower() for a in self.defer_rcpt)
        self._rng = random.Random(self.seed)

    def roll(self, kind: str, probability: float) -> bool:
        """Decide one fault; a zero probability consumes no randomness."""
        if probability <= 0.0:
            return False
        if self.max_faults is not None and self._probabilistic_total() >= self.max_faults:
            return False
        if probability < 1.0 and self._rng.random() >= probability:
            return False
        self.injected[kind] += 1
        return True

    def rejects(self, address: str) -> bool:
        if address.lower() in self.reject_rcpt:
            self.injected["550_rcpt"] += 1
            return True
        return False

    def listed(self, kind: str, addresses: AbstractSet[str], address: str) -> bool:
        """A deterministic, per-address fault (``reject_mail``, ``defer_rcpt``)."""
        if address.lower() in addresses:
            self.injected[kind] += 1
            return True
        return False

    def _probabilistic_total(self) -> int:
        return sum(n for kind, n in self.injected.items() if kind not in _DETERMINISTIC)


_PROBABILITIES = (
    "p_421_mail",
    "p_drop_rcpt",
    "p_drop_after_data",
    "p_451_data",
    "p_421_rcpt",
    "p_451_data_command",
)
# Faults that never count against max_faults.
_DETERMINISTIC = frozenset({"550_rcpt", "550_mail", "450_rcpt", "354_no_rcpt", "body_without_rcpt"})


# --------------------------------------------------------------------------------------------
# Records


@dataclass(slots=True)
class SessionRecord:
    """One TCP connection as the sink saw it (``server.sessions`` hands out copies)."""

    id: int
    peer: str
    opened_at: float
    closed_at: float | None = None
    tls: bool = False
    """TLS was established (implicit, or after STARTTLS)."""
    tls_at_auth: bool | None = None
    """Whether TLS was up when the client first sent AUTH; None if it never did."""
    authenticated_as: str | None = None
    auth_attempts: int = 0
    """AUTH commands, including ones refused because TLS was missing."""
    mail_count: int = 0
    """MAIL commands, accepted or not."""
    messages: int = 0
    """Messages accepted (recorded) in this session."""
    quit: bool = False
    pipelined_reads: int = 0
    """Reads (outside a message body) that carried more than one command: the client
    pipelined them (RFC 2920)."""
    max_commands_per_read: int = 0
    """The most commands one of those reads carried (0 if none did)."""
    peer_pid: int | None = None
    """The local process holding the client end (``SinkServer(peer_pids=True)`` only)."""


@dataclass(frozen=True, slots=True)
class Received:
    """One accepted message."""

    session_id: int
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    """Exactly the bytes received (dot-unstuffed); empty when ``record_data=False``."""
    message_id: str | None
    """The Message-ID header without angle brackets."""
    received_at: float
    ambiguous: bool = False
    """The connection was dropped before the client saw our 250 (the client cannot know)."""
    queue_id: str = ""
    """The id our 250 named ("250 2.0.0 OK queued as <id>"), 22 base64url characters like
    SendGrid's, so tests can shape events whose `sg_message_id` starts with it."""


def _code(reply: str) -> int:
    head = reply[:3]
    return int(head) if head.isdigit() else 0


@dataclass(frozen=True, slots=True)
class AuthAttempt:
    """One AUTH command and the sink's final reply to it."""

    session_id: int
    peer: str
    peer_pid: int | None
    at: float
    """Wall-clock time of the final reply."""
    mechanism: str
    reply: str

    @property
    def code(self) -> int:
        return _code(self.reply)

    @property
    def ok(self) -> bool:
        return self.code == 235


@dataclass(frozen=True, slots=True)
class MailReply:
    """One MAIL command and the sink's reply to it (refused ones included)."""

    session_id: int
    at: float
    reply: str

    @property
    def code(self) -> int:
        return _code(self.reply)

    @property
    def accepted(self) -> bool:
        return self.code == 250


def parse_message_id(data: bytes) -> str | None:
    """Message-ID from the header block, unfolded, without angle brackets."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    headers = _FOLD.sub(b" ", data if end < 0 else data[:end])
    match = _MESSAGE_ID.search(headers)
    if match is None:
        return None
    return match.group(1).strip().decode("utf-8", "replace") or None


# --------------------------------------------------------------------------------------------
# aiosmtpd glue


class _SinkSMTP(SMTP):
    """aiosmtpd's protocol, one per TCP connection, reporting to its SinkServer.

    Avoid attribute names starting with ``auth_``, ``smtp_`` or ``handle_``: aiosmtpd
    discovers mechanisms, commands and hooks by those prefixes.
    """

    def __init__(self, sink: SinkServer, handler: _Handler, **kwargs: Any) -> None:
        self.sink = sink
        self.sink_record: SessionRecord | None = None
        self._sink_lost = False
        self._sink_in_body = False
        # The command whose final reply is recorded when pushed ("AUTH <mechanism>" or "MAIL"):
        # recorded at push time because a reply that closes the connection never returns.
        self._sink_command: str | None = None
        super().__init__(handler, **kwargs)

    async def push(self, status: Any) -> None:
        command = self._sink_command
        if command is not None and self.sink_record is not None:
            text = status.decode() if isinstance(status, bytes) else str(status)
            if not text.startswith("334"):  # an AUTH challenge, not the outcome
                self._sink_command = None
                self.sink._replied(self.sink_record, command, text)
        await super().push(status)

    def data_received(self, data: bytes) -> None:
        # Counts how commands arrive: a pipelining client's MAIL, RCPT... and DATA come in one
        # read. Bytes of a message body (after our 354) are not commands.
        record = self.sink_record
        if not self._sink_in_body and record is not None:
            commands = data.count(b"\n")
            if commands > 1:
                self.sink._update(
                    record,
                    pipelined_reads=record.pipelined_reads + 1,
                    max_commands_per_read=max(record.max_commands_per_read, commands),
                )
        super().data_received(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called twice per connection with STARTTLS (again by the TLS layer after the handshake),
        # and aiosmtpd replaces self.session then; our record lives on the protocol instead.
        if self.sink_record is None:
            self.sink_record = self.sink._opened(self, transport)
        super().connection_made(transport)
        if transport.get_extra_info("ssl_object") is not None:
            self.sink._update(self.sink_record, tls=True)

    def connection_lost(self, error: Exception | None) -> None:
        # aiosmtpd calls this itself after a failed STARTTLS handshake, then asyncio may again.
        if self.sink_record is not None and not self._sink_lost:
            self._sink_lost = True
            self.sink._closed(self, self.sink_record)
        super().connection_lost(error)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        # Gate here instead of aiosmtpd's require_starttls/auth_required: require_starttls answers
        # AUTH-in-clear before any hook runs (we could not record the attempt), and auth_required
        # without auth_require_tls warns even for implicit TLS.
        record = self.sink_record
        assert record is not None and self.session is not None
        self.sink._update(record, mail_count=record.mail_count + 1)
        self._sink_command = "MAIL"
        try:
            if self.session.host_name:
                if self.tls_context is not None and not record.tls:
                    await self.push("530 5.7.0 Must issue a STARTTLS command first")
                    return
                if self.sink.requires_auth and not self.session.authenticated:
                    await self.push("530 5.7.0 Authentication required")
                    return
                throttled = self.sink._over_rate()
                if throttled is not None:
                    await self.push(throttled)
                    if throttled.startswith("421"):  # RFC 5321: 421 closes the channel
                        await self.sink_close(abort=False)
                    return
            await super().smtp_MAIL(arg)
        finally:
            self._sink_command = None

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        self._sink_in_body = True  # until the end-of-data reply (or a refusal) is pushed
        try:
            plan = self.sink.faults
            envelope = self.envelope
            if plan is not None and envelope is not None and envelope.mail_from and not arg:
                if not envelope.rcpt_tos and plan.data_without_rcpt:
                    plan.injected["354_no_rcpt"] += 1
                    await self.push("354 End data with <CR><LF>.<CR><LF>")
                    line = await self._reader.readuntil(b"\r\n")
                    plan.injected["body_without_rcpt"] += 1  # anything written after the 354
                    while line != b".\r\n":
                        line = await self._reader.readuntil(b"\r\n")
                    await self.push("554 5.5.1 Error: no valid recipients")
                    return
                if envelope.rcpt_tos and plan.roll("451_data_command", plan.p_451_data_command):
                    await self.push("451 4.3.0 Try again later")
                    return
            await super().smtp_DATA(arg)
        finally:
            self._sink_in_body = False

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        record = self.sink_record
        assert record is not None
        changes: dict[str, Any] = {"auth_attempts": record.auth_attempts + 1}
        if record.tls_at_auth is None:
            changes["tls_at_auth"] = record.tls
        self.sink._update(record, **changes)
        mechanism = (arg or "").split(" ", 1)[0].upper()
        self._sink_command = f"AUTH {mechanism}"
        try:
            await super().smtp_AUTH(arg)
        finally:
            self._sink_command = None

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str) -> None:
        if self.sink_record is not None and not arg:
            self.sink._update(self.sink_record, quit=True)
        await super().smtp_QUIT(arg)

    async def sink_close(self, *, abort: bool) -> None:
        """Close (flushing replies) or abort (no reply at all), then wait to be cancelled.

        connection_lost() cancels the command loop, which is how aiosmtpd itself ends a
        session; returning normally would make aiosmtpd write a reply to a dead transport.
        """
        transport = self.transport
        if transport is not None:
            if abort and isinstance(transport, asyncio.WriteTransport):
                transport.abort()
            else:
                transport.close()
        await asyncio.sleep(_DROP_GRACE)


class _Handler:
    """aiosmtpd hooks; ``server`` is the connection's _SinkSMTP."""

    def __init__(self, sink: SinkServer) -> None:
        self.sink = sink

    async def handle_EHLO(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # With an EHLO hook aiosmtpd no longer records the hostname itself.
        session.host_name = hostname
        if not self.sink.requires_auth:  # don't advertise an AUTH nobody could pass
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        if self.sink.pipelining:  # before the last line ("250 HELP")
            responses = [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_exception(self, error: Exception) -> str:
        # Without this hook aiosmtpd logs a full traceback whenever a client rejects our
        # certificate during STARTTLS (a client decision, and expected in tests).
        if isinstance(error, TLSSetupException):
            log.info("STARTTLS handshake failed: %r", error.__cause__)
            return "454 4.7.0 TLS not available"  # aiosmtpd closes without sending it
        log.exception("SMTP sink session error")
        return f"500 Error: ({type(error).__name__}) {error}"

    async def handle_MAIL(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        plan = self.sink.faults
        delay = self.sink.mail_delay + (plan.delay if plan else 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        if plan is not None and plan.roll("421_mail", plan.p_421_mail):
            await server.push("421 4.7.0 Service not available, closing transmission channel")
            await server.sink_close(abort=False)
            return "421 4.7.0 Closing"  # only reached if the close never completed
        if plan is not None and plan.listed("550_mail", plan.reject_mail, address):
            return "550 5.7.1 Sender rejected"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        plan = self.sink.faults
        if plan is not None:
            if plan.delay > 0:
                await asyncio.sleep(plan.delay)
            if plan.rejects(address):
                return "550 5.1.1 User unknown"
            if plan.listed("450_rcpt", plan.defer_rcpt, address):
                return "450 4.2.1 Mailbox busy, try again later"
            if plan.roll("421_rcpt", plan.p_421_rcpt):
                await server.push("421 4.7.0 Service not available, closing transmission channel")
                await server.sink_close(abort=False)
                return "421 4.7.0 Closing"  # only reached if the close never completed
            if not envelope.rcpt_tos and plan.roll("drop_rcpt", plan.p_drop_rcpt):
                await server.sink_close(abort=True)
                return "421 4.7.0 Closing"  # only reached if the abort never completed
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: _SinkSMTP, session: Session, envelope: Envelope) -> str:
        plan = self.sink.faults
        drop = False
        if plan is not None:
            if plan.delay > 0:
                await asyncio.sleep(plan.delay)
            if plan.roll("451_data", plan.p_451_data):
                return "451 4.3.0 Try again later"
            drop = plan.roll("drop_after_data", plan.p_drop_after_data)
        assert server.sink_record is not None
        received = self.sink._accept(server.sink_record, envelope, ambiguous=drop)
        if drop:
            await server.sink_close(abort=True)
        return f"250 2.0.0 OK queued as {received.queue_id}"


# --------------------------------------------------------------------------------------------
# The server


class SinkServer:
    """A recording, fault-injecting SMTP server on a background thread.

    >>> with SinkServer(tls="none") as sink:
    ...     ...  # send to ("127.0.0.1", sink.port); read sink.received / sink.sessions
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TLSMode = "starttls",
        offer_starttls: bool = True,
        auth: tuple[str, str] | None = None,
        tls_material: TLSMaterial | None = None,
        record_data: bool = True,
        faults: FaultPlan | None = None,
        mail_delay: float = 0.0,
        timeout: float = 300.0,
        pipelining: bool = True,
        throttle_rate: int | None = None,
        throttle_reply: str = THROTTLE_REPLY,
        throttle_window: float = 1.0,
        auth_failure_reply: str = BAD_CREDENTIALS_REPLY,
        peer_pids: bool = False,
        auth_file: Path | str | None = None,
    ) -> None:
        if tls not in ("starttls", "tls", "none"):
            raise ValueError(f"tls must be 'starttls', 'tls' or 'none', not {tls!r}")
        needs_material = tls == "tls" or (tls == "starttls" and offer_starttls)
        if needs_material and tls_material is None:
            raise ValueError(f"tls={tls!r} needs tls_material (see make_tls_material)")
        if auth is not None and auth_file is not None:
            raise ValueError("give auth or auth_file, not both")
        self.host = host
        self.port = port
        self.tls: TLSMode = tls
        self.offer_starttls = offer_starttls
        self.auth = auth
        self.tls_material = tls_material
        self.record_data = record_data
        self.faults = faults
        self.mail_delay = mail_delay
        self.timeout = timeout
        self.pipelining = pipelining
        """Advertise PIPELINING (RFC 2920) after EHLO, as SendGrid does (so by default clients
        take their pipelined path here too). aiosmtpd reads commands one line at a time, so it
        handles pipelined ones in order either way; it just does not say so by itself."""
        self.throttle_rate = throttle_rate
        """At most this many MAILs per wall-clock second get on; every MAIL above it is
        answered ``throttle_reply`` (a ``421`` one then closes the connection). None: no limit.
        Assign at run time to impose or lift it."""
        self.throttle_reply = throttle_reply
        self.throttle_window = throttle_window
        """The throttle's window, seconds. 1: wall-clock seconds (a rate). Longer: counted as
        Postfix's anvil counts, from the first MAIL after the previous window ended (a budget:
        once ``throttle_rate`` MAILs got on, every MAIL is refused until the window ends)."""
        self._window_end = 0.0
        self.auth_failure_reply = auth_failure_reply
        """The reply to AUTH with credentials other than ``auth`` (replace ``auth`` at run time
        to revoke a key, and again to restore it)."""
        self.auth_file = None if auth_file is None else Path(auth_file)
        """A file holding ``USER:PASSWORD``, read at every AUTH instead of ``auth``: rewrite it
        to revoke or restore the key from any process (missing or malformed: every AUTH is
        refused, as a revoked key is)."""
        self.peer_pids = peer_pids
        """Look up which local process holds each connection's client end (reads /proc at
        every connect): failed AUTHs per worker process. Linux, loopback clients only."""
        for name, reply in (
            ("throttle_reply", throttle_reply),
            ("auth_failure_reply", auth_failure_reply),
        ):
            if not re.match(r"^[45]\d\d ", reply):
                raise ValueError(f"{name} must be a 4xx or 5xx reply line, got {reply!r}")
        if throttle_rate is not None and throttle_rate < 0:
            raise ValueError(f"throttle_rate must be >= 0 or None, got {throttle_rate}")
        if throttle_window < 1.0:
            raise ValueError(f"throttle_window must be >= 1 second, got {throttle_window}")

        self._cond = threading.Condition()
        self._received: list[Received] = []
        self._ambiguous: list[Received] = []
        self._sessions: list[SessionRecord] = []
        self._session_ids = itertools.count(1)
        self._open = 0
        self._peak = 0
        self._total = 0
        self._protocols: set[_SinkSMTP] = set()  # event-loop thread only
        self._auths: list[AuthAttempt] = []
        self._mails: list[MailReply] = []
        self._quota_until = 0.0  # time.monotonic() deadline; inf while on until ended
        self._rate_second = 0  # the wall-clock second the MAIL count below belongs to
        self._rate_count = 0
        self._stalls: list[tuple[float, float]] = []  # (wall-clock time, seconds late)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: asyncio.Server | None = None  # None while refusing connections
        self._serve: Callable[[], Awaitable[asyncio.Server]] | None = None
        self._thread: threading.Thread | None = None
        self._startup_error: BaseException | None = None

    # ---- lifecycle

    def start(self, timeout: float = 10.0) -> SinkServer:
        """Bind and serve on a new thread; ``.port`` is the real port when this returns."""
        if self._thread is not None:
            raise RuntimeError("SinkServer already started")
        _raise_fd_limit()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="smtp-sink", daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("SMTP sink did not start in time")
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise self._startup_error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Abort every open connection and stop the loop; records stay readable."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None

    def __enter__(self) -> SinkServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _smtp_kwargs(self, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        starttls_ctx = None
        if self.tls == "starttls" and self.offer_starttls:
            assert self.tls_material is not None
            starttls_ctx = self.tls_material.server_context()
        kwargs: dict[str, Any] = {
            "data_size_limit": DATA_SIZE_LIMIT,
            "hostname": _GREETING_HOST,
            "ident": "relay-mailer sink",
            "tls_context": starttls_ctx,
            # aiosmtpd only knows about TLS it negotiated itself (STARTTLS): with implicit TLS it
            # would refuse AUTH as "in clear". The no-STARTTLS server deliberately offers AUTH in
            # clear so tests can prove clients refuse it.
            "auth_require_tls": starttls_ctx is not None,
            "timeout": self.timeout,
            "loop": loop,
        }
        if self.requires_auth:
            kwargs["authenticator"] = self._authenticate
        return kwargs

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # this thread's loop; gather() and friends look it up
        loop.set_exception_handler(_exception_handler)
        self._loop = loop
        handler = _Handler(self)
        try:
            kwargs = self._smtp_kwargs(loop)
            implicit = None
            if self.tls == "tls":
                assert self.tls_material is not None
                implicit = self.tls_material.server_context()

            def serve() -> Awaitable[asyncio.Server]:
                return loop.create_server(
                    lambda: _SinkSMTP(self, handler, **kwargs),
                    host=self.host,
                    port=self.port,
                    ssl=implicit,
                    backlog=_BACKLOG,
                    reuse_address=True,
                )

            self._serve = serve
            server = self._listener = loop.run_until_complete(serve())
        except BaseException as error:
            self._startup_error = error
            loop.close()
            ready.set()
            return
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self._watch_loop(loop, loop.time())
        try:
            loop.run_forever()
        finally:
            if self._listener is not None:
                self._listener.close()
            for protocol in list(self._protocols):
                if isinstance(protocol.transport, asyncio.WriteTransport):
                    protocol.transport.abort()
            loop.run_until_complete(asyncio.sleep(0.05))  # let connection_lost callbacks run
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            if self._listener is not None:
                loop.run_until_complete(self._listener.wait_closed())
            loop.close()

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        assert isinstance(server, _SinkSMTP)
        pair = self._credential()
        if pair is None:
            return AuthResult(success=False, handled=False, message=self.auth_failure_reply)
        user, password = pair
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user.encode()
            and auth_data.password == password.encode()
        )
        # handled=False makes aiosmtpd push `message`; its default (handled=True) means
        # "I already replied" and the client would hang.
        if not ok:
            return AuthResult(success=False, handled=False, message=self.auth_failure_reply)
        if self.quota_active:  # a good key on a spent plan, as SendGrid answers it
            return AuthResult(success=False, handled=False, message=QUOTA_REPLY)
        if server.sink_record is not None:
            self._update(server.sink_record, authenticated_as=user)
        return AuthResult(success=True, handled=False, auth_data=auth_data)

    @property
    def requires_auth(self) -> bool:
        return self.auth is not None or self.auth_file is not None

    def _credential(self) -> tuple[str, str] | None:
        """The pair AUTH must match now: ``auth``, or what ``auth_file`` says at this moment."""
        if self.auth_file is None:
            return self.auth
        try:
            text = self.auth_file.read_text().strip()
        except (OSError, UnicodeError):
            return None
        user, sep, password = text.partition(":")
        return (user, password) if sep and user else None

    def _watch_loop(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        """Notes each time the loop ran a timer late: while it was held up (CPU starved, a long
        callback), connections waited in the kernel and their timestamps bunched up after."""
        now = loop.time()
        if now - due > _LAG_RECORDED:
            with self._cond:
                self._stalls.append((time.time(), now - due))
        loop.call_at(now + _LAG_TICK, self._watch_loop, loop, now + _LAG_TICK)

    # ---- relay behaviours (any thread)

    def start_quota(self, seconds: float | None = None) -> None:
        """Answer every AUTH with a good key ``QUOTA_REPLY`` for ``seconds`` (None: until
        ``end_quota``). Sessions already authenticated go on sending, as on SendGrid."""
        if seconds is not None and seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        with self._cond:
            self._quota_until = math.inf if seconds is None else time.monotonic() + seconds

    def end_quota(self) -> None:
        with self._cond:
            self._quota_until = 0.0

    def refuse_connections(self, *, drop_open: bool = True, timeout: float = 10.0) -> None:
        """An outage: stop listening, so new connections are refused (ECONNREFUSED), and with
        ``drop_open`` abort the connections already open (without a reply, as a relay that went
        away). Records stay; ``accept_connections`` listens again on the same port."""

        async def unlisten() -> None:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            if drop_open:
                for protocol in list(self._protocols):
                    if isinstance(protocol.transport, asyncio.WriteTransport):
                        protocol.transport.abort()
                await asyncio.sleep(0)  # let connection_lost record the closes

        self._on_loop(unlisten(), timeout)

    def accept_connections(self, timeout: float = 10.0) -> None:
        """Listen again on the same port after ``refuse_connections`` (no-op if listening).
        Retries while the port is briefly taken (a client's ephemeral port, say)."""

        async def listen() -> None:
            assert self._serve is not None
            deadline = time.monotonic() + timeout / 2
            while self._listener is None:
                try:
                    self._listener = await self._serve()
                except OSError:
                    if time.monotonic() >= deadline:
                        raise
                    await asyncio.sleep(0.1)

        self._on_loop(listen(), timeout)

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def _on_loop(self, step: Coroutine[Any, Any, None], timeout: float) -> None:
        loop = self._loop
        if self._thread is None or loop is None:
            step.close()
            raise RuntimeError("SinkServer is not running")
        asyncio.run_coroutine_threadsafe(step, loop).result(timeout)

    @property
    def quota_active(self) -> bool:
        with self._cond:
            return time.monotonic() < self._quota_until

    def _over_rate(self) -> str | None:
        """The throttle reply if this MAIL is above ``throttle_rate`` in the current window."""
        limit = self.throttle_rate
        if limit is None:
            return None
        second = int(time.time())
        now = time.monotonic()
        with self._cond:
            if self.throttle_window > 1.0:
                if now >= self._window_end:
                    self._window_end, self._rate_count = now + self.throttle_window, 0
            elif second != self._rate_second:
                self._rate_second, self._rate_count = second, 0
            self._rate_count += 1
            over = self._rate_count > limit
        return self.throttle_reply if over else None

    # ---- recording (called on the loop thread)

    def _opened(self, protocol: _SinkSMTP, transport: asyncio.BaseTransport) -> SessionRecord:
        opened_at = time.time()
        peer = transport.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        pid = None
        if self.peer_pids and isinstance(peer, tuple):
            pid = client_pid(int(peer[1]), self.port)
        self._protocols.add(protocol)
        with self._cond:
            record = SessionRecord(
                id=next(self._session_ids), peer=peer_text, opened_at=opened_at, peer_pid=pid
            )
            self._sessions.append(record)
            self._open += 1
            self._total += 1
        self._count_peak(PEAK_HOPS)
        return record

    def _count_peak(self, hops: int) -> None:
        """Counts this open toward the peak a few loop turns later: a client's close and
        another client's connect that its release allowed can be ready in the same turn of a
        busy loop, and asyncio runs `connection_made` (scheduled by the accept) before the
        close's `connection_lost` (scheduled by the read that saw it), which made a cap that
        held at the clients read one over here. Opens that overlap for real stay open far
        longer than these turns (TLS, AUTH, the transactions)."""
        if hops > 0:
            asyncio.get_running_loop().call_soon(self._count_peak, hops - 1)
            return
        with self._cond:
            self._peak = max(self._peak, self._open)

    def _closed(self, protocol: _SinkSMTP, record: SessionRecord) -> None:
        self._protocols.discard(protocol)
        with self._cond:
            record.closed_at = time.time()
            self._open -= 1
            self._cond.notify_all()

    def _replied(self, record: SessionRecord, command: str, reply: str) -> None:
        now = time.time()
        with self._cond:
            if command == "MAIL":
                self._mails.append(MailReply(record.id, now, reply))
            else:
                mechanism = command.partition(" ")[2]
                self._auths.append(
                    AuthAttempt(record.id, record.peer, record.peer_pid, now, mechanism, reply)
                )
            self._cond.notify_all()

    def _update(self, record: SessionRecord, **changes: Any) -> None:
        with self._cond:
            for name, value in changes.items():
                setattr(record, name, value)

    def _accept(self, record: SessionRecord, envelope: Envelope, *, ambiguous: bool) -> Received:
        data = envelope.original_content or b""
        received = Received(
            session_id=record.id,
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=data if self.record_data else b"",
            message_id=parse_message_id(data),
            received_at=time.time(),
            ambiguous=ambiguous,
            queue_id=secrets.token_urlsafe(16)[:22],
        )
        with self._cond:
            self._received.append(received)
            if ambiguous:
                self._ambiguous.append(received)
            record.messages += 1
            self._cond.notify_all()
        return received

    # ---- reading (any thread)

    @property
    def received(self) -> list[Received]:
        """Every accepted message, in order (including ambiguous ones)."""
        with self._cond:
            return list(self._received)

    def received_since(self, index: int) -> list[Received]:
        """The accepted messages from ``index`` on (``received`` is append-only): a reader
        polling a long run copies only what is new."""
        with self._cond:
            return self._received[index:]

    @property
    def ambiguous(self) -> list[Received]:
        """Messages recorded as accepted whose connection we dropped before the 250."""
        with self._cond:
            return list(self._ambiguous)

    @property
    def sessions(self) -> list[SessionRecord]:
        """Snapshots of every session since start (or reset)."""
        with self._cond:
            return [dataclasses.replace(s) for s in self._sessions]

    @property
    def open_connections(self) -> int:
        with self._cond:
            return self._open

    @property
    def peak_connections(self) -> int:
        """Most TCP connections open at once (implicit TLS: counted once the handshake is done)."""
        with self._cond:
            return self._peak

    @property
    def total_connections(self) -> int:
        with self._cond:
            return self._total

    @property
    def auth_attempts(self) -> list[AuthAttempt]:
        """Every AUTH command with its final reply, in order."""
        with self._cond:
            return list(self._auths)

    @property
    def mail_replies(self) -> list[MailReply]:
        """Every MAIL command with the sink's reply (accepted and refused), in order."""
        with self._cond:
            return list(self._mails)

    def auth_failures(self) -> list[AuthAttempt]:
        """AUTH attempts that did not succeed (535, quota 451, aborted, ...)."""
        return [a for a in self.auth_attempts if not a.ok]

    def auth_failures_per_pid(self) -> Counter[int | None]:
        """Failed AUTHs per client process (None: not resolved; see ``peer_pids``)."""
        return Counter(a.peer_pid for a in self.auth_failures())

    def timestamps(self, kind: SeriesKind) -> list[float]:
        """Sorted wall-clock times of one kind of event:

        ``sessions`` connections opened (for implicit TLS, once the handshake is done),
        ``accepted`` messages accepted (the 250 after the body), ``mail`` every MAIL reply,
        ``refused`` MAILs not answered 250, ``auth`` every AUTH reply, ``auth_failed`` AUTHs
        not answered 235.
        """
        with self._cond:
            if kind == "sessions":
                times = [s.opened_at for s in self._sessions]
            elif kind == "accepted":
                times = [r.received_at for r in self._received]
            elif kind == "mail":
                times = [m.at for m in self._mails]
            elif kind == "refused":
                times = [m.at for m in self._mails if not m.accepted]
            elif kind == "auth":
                times = [a.at for a in self._auths]
            elif kind == "auth_failed":
                times = [a.at for a in self._auths if not a.ok]
            else:
                raise ValueError(f"kind must be one of {', '.join(SERIES_KINDS)}, not {kind!r}")
        return sorted(times)

    def per_second(
        self, kind: SeriesKind, start: float | None = None, end: float | None = None
    ) -> list[int]:
        """Events of ``kind`` in each whole wall-clock second from ``start`` (default: the first
        event's second) up to ``end`` (default: the last event's), empty seconds included."""
        times = self.timestamps(kind)
        if start is None and not times:
            return []
        first = int(start if start is not None else times[0])
        last = int(end if end is not None else (times[-1] if times else first))
        counts = [0] * (last - first + 1)
        for t in times:
            if first <= t < last + 1:
                counts[int(t) - first] += 1
        return counts

    def max_in_window(
        self, kind: SeriesKind, window: float = 1.0, start: float | None = None
    ) -> int:
        """The most events of ``kind`` in any sliding window of ``window`` seconds (from
        ``start`` on, if given)."""
        times = self.timestamps(kind)
        if start is not None:
            times = times[bisect_left(times, start) :]
        best = 0
        for i, t in enumerate(times):
            best = max(best, bisect_left(times, t + window, lo=i) - i)
        return best

    def stalls(self, start: float = 0.0, end: float = math.inf) -> list[tuple[float, float]]:
        """(wall-clock time, seconds) of each time the sink's loop was held up more than 20 ms
        between ``start`` and ``end``: events recorded right after one were late by that much,
        so a per-second figure near a long stall reads the sink, not the client."""
        with self._cond:
            return [(t, lag) for t, lag in self._stalls if start <= t <= end]

    def message_ids(self) -> Counter[str]:
        """Accepted Message-IDs with their counts; anything above 1 is a duplicate delivery."""
        with self._cond:
            return Counter(r.message_id for r in self._received if r.message_id is not None)

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` messages were accepted; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._received) >= count, timeout)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no connection is open; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._open == 0, timeout)

    def reset(self) -> None:
        """Forget messages and sessions; peak restarts from the connections open now."""
        with self._cond:
            self._received.clear()
            self._ambiguous.clear()
            self._sessions.clear()
            self._auths.clear()
            self._mails.clear()
            self._stalls.clear()
            self._total = 0
            self._peak = self._open

    def summary(self) -> str:
        with self._cond:
            return (
                f"messages={len(self._received)} ambiguous={len(self._ambiguous)} "
                f"sessions={len(self._sessions)} peak_connections={self._peak} "
                f"mail_refused={sum(not m.accepted for m in self._mails)} "
                f"auth_failed={sum(not a.ok for a in self._auths)}"
            )


def _exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Clients that reset mid-command end aiosmtpd's session task with ConnectionResetError,
    # which asyncio would report as "Task exception was never retrieved": routine for a sink.
    if isinstance(context.get("exception"), ConnectionError):
        return
    loop.default_exception_handler(context)


def client_pid(client_port: int, server_port: int) -> int | None:
    """The local process holding the client end of a loopback TCP connection from
    ``client_port`` to ``server_port`` (Linux /proc; None if not found or not readable)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                local, remote = cols[1], cols[2]
                if (
                    int(local.rsplit(":", 1)[1], 16) == client_port
                    and int(remote.rsplit(":", 1)[1], 16) == server_port
                ):
                    inode = cols[9]
                    break
        if inode is not None:
            break
    if inode is None or inode == "0":
        return None
    target = f"socket:[{inode}]"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError), os.scandir(f"/proc/{entry.name}/fd") as fds:
            for fd in fds:
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) == target:
                        return int(entry.name)
    return None


def _raise_fd_limit() -> None:
    """Raise the soft open-files limit: benchmarks hold thousands of connections per process."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# --------------------------------------------------------------------------------------------
# CLI


_FAULT_FIELDS = {*_PROBABILITIES, "delay"}


def _parse_fault(text: str) -> tuple[str, Any]:
    name, _, value = text.partition("=")
    if name in ("reject_rcpt", "reject_mail", "defer_rcpt"):
        return name, frozenset(v for v in value.split(",") if v)
    if name == "data_without_rcpt":
        return name, value.strip().lower() in ("1", "true", "yes")
    if name == "max_faults":
        return name, int(value)
    if name not in _FAULT_FIELDS:
        raise argparse.ArgumentTypeError(f"unknown fault {name!r}")
    return name, float(value)


def main(argv: Iterable[str] | None = None) -> int:
    """Run a sink until SIGINT/SIGTERM, then print a summary line."""
    # `mailer sink` calls this with sys.argv[0] == "mailer sink"; keep that name in --help.
    prog = None if sys.argv[0].startswith("mailer") else "python -m devkit.sink"
    parser = argparse.ArgumentParser(prog=prog, description="Run a recording SMTP sink.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525, help="0 picks a free port")
    parser.add_argument("--tls", choices=["starttls", "tls", "none"], default="starttls")
    parser.add_argument("--no-starttls", action="store_true", help="never advertise STARTTLS")
    parser.add_argument("--tls-dir", type=Path, help="where to write ca.pem (default: a temp dir)")
    parser.add_argument(
        "--hostname",
        action="append",
        default=[],
        help="extra name/IP for the certificate (besides localhost, 127.0.0.1); repeatable",
    )
    parser.add_argument("--auth", metavar="USER:PASSWORD", help="require AUTH with this pair")
    parser.add_argument(
        "--auth-file",
        type=Path,
        metavar="PATH",
        help="require AUTH with the USER:PASSWORD this file holds, read at every AUTH "
        "(rewrite it to revoke or restore the key; missing: every AUTH is refused)",
    )
    parser.add_argument("--record-data", action="store_true", help="keep message bodies in memory")
    parser.add_argument(
        "--mail-delay", type=float, default=0.0, help="seconds before each MAIL reply"
    )
    parser.add_argument(
        "--no-pipelining",
        dest="pipelining",
        action="store_false",
        help="do not advertise PIPELINING (RFC 2920) after EHLO (it is, like SendGrid, by default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for --fault draws")
    parser.add_argument(
        "--fault",
        action="append",
        type=_parse_fault,
        default=[],
        metavar="NAME=VALUE",
        help="e.g. p_421_mail=0.05, p_drop_after_data=0.01, delay=0.2, reject_rcpt=a@x,b@y",
    )
    parser.add_argument(
        "--throttle-rate",
        type=int,
        metavar="N",
        help="answer every MAIL above N in a wall-clock second with --throttle-reply",
    )
    parser.add_argument(
        "--throttle-reply",
        default=THROTTLE_REPLY,
        metavar="REPLY",
        help=f"the reply line for a throttled MAIL (a 421 closes the session); "
        f"default {THROTTLE_REPLY!r}",
    )
    parser.add_argument(
        "--quota",
        type=float,
        nargs="?",
        const=math.inf,
        metavar="SECONDS",
        help=f"answer AUTH {QUOTA_REPLY!r} for SECONDS from the start (no value: until stopped)",
    )
    args = parser.parse_args(None if argv is None else list(argv))
    if args.throttle_rate is not None and args.throttle_rate < 0:
        parser.error("--throttle-rate must be 0 or more")
    if not re.match(r"^[45]\d\d ", args.throttle_reply):
        parser.error("--throttle-reply must be a 4xx or 5xx reply line, e.g. '451 4.7.1 throttled'")
    if args.quota is not None and (args.quota < 0 or (args.auth is None and not args.auth_file)):
        parser.error("--quota takes a number of seconds >= 0 and needs --auth or --auth-file")
    if args.auth and args.auth_file:
        parser.error("give --auth or --auth-file, not both")

    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep:
            parser.error("--auth must be USER:PASSWORD")
        auth = (user, password)
    material = None
    if args.tls != "none":
        directory = args.tls_dir or Path(tempfile.mkdtemp(prefix="smtp-sink-"))
        names = ["localhost", "127.0.0.1", *(h for h in args.hostname if h)]
        if args.host not in ("0.0.0.0", "::", ""):
            names.append(args.host)
        material = make_tls_material(directory, tuple(dict.fromkeys(names)))
    faults = FaultPlan(seed=args.seed, **dict(args.fault)) if args.fault else None

    server = SinkServer(
        host=args.host,
        port=args.port,
        tls=args.tls,
        offer_starttls=not args.no_starttls,
        auth=auth,
        tls_material=material,
        record_data=args.record_data,
        faults=faults,
        mail_delay=args.mail_delay,
        pipelining=args.pipelining,
        throttle_rate=args.throttle_rate,
        throttle_reply=args.throttle_reply,
        auth_file=args.auth_file,
    )
    if args.quota is not None:
        server.start_quota(None if math.isinf(args.quota) else args.quota)
    # Signal handlers only take note; this thread acts. SIGUSR1 and SIGUSR2 are an outage from
    # another process: refuse connections, accept them again (each said on stdout).
    wake = threading.Event()
    actions: list[str] = []

    def on_signal(action: str) -> Callable[..., None]:
        def handler(*_: object) -> None:
            actions.append(action)
            wake.set()

        return handler

    for signum, action in (
        (signal.SIGINT, "stop"),
        (signal.SIGTERM, "stop"),
        (signal.SIGUSR1, "refuse"),
        (signal.SIGUSR2, "accept"),
    ):
        signal.signal(signum, on_signal(action))
    with server:
        ca = material.ca_file if material else "none"
        print(f"listening on {args.host}:{server.port} ca={ca}", flush=True)
        running = True
        while running:
            if not wake.wait(0.5):
                continue
            wake.clear()
            while actions and running:
                action = actions.pop(0)
                if action == "stop":
                    running = False
                elif action == "refuse":
                    server.refuse_connections()
                    print("refusing connections", flush=True)
                else:
                    server.accept_connections()
                    print("accepting connections", flush=True)
    print(f"summary {server.summary()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

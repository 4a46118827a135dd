"""One authenticated SMTP connection to the relay, carrying one transaction at a time.

TLS is enforced before AUTH (STARTTLS required, or implicit TLS on 465), certificates are
verified with TLS 1.2 at least. The transaction is written on aiosmtplib's protocol layer
rather than `sendmail()` so we know exactly whether the DATA terminator left us: a failure
before it is safe to retry, a failure after it is ambiguous. When the relay advertises
PIPELINING, MAIL, RCPT... and DATA leave in one write (workers/engine/protocol.py keeps every
reply), and the next message's MAIL, RCPT... and DATA may ride behind a body (`hand_over`,
RFC 2920 §3.1: message content may open a group), so a busy session costs one write and one
round trip per message instead of two.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, cast

import aiosmtplib

from mailer.config import Settings
from workers.engine.classify import Failure, Kind, Phase, by_code, classify
from workers.engine.protocol import PipeliningProtocol, adopt, check_arg

_LEADING_DOT = re.compile(rb"(?m)^\.")
#: Refused commands after which a session is QUIT and replaced (see `Session.refusals`).
MAX_REFUSALS = 8


@lru_cache(maxsize=8)
def tls_context(ca_file: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def wire_body(data: bytes) -> bytes:
    """Dot-stuffs the rendered message and adds the terminator (RFC 5321 §4.5.2)."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b".") or b"\n." in data:  # rare: the scan alone is cheap
        data = _LEADING_DOT.sub(b"..", data)
    return data + b".\r\n"


async def _login(smtp: aiosmtplib.SMTP, username: str, password: str) -> None:
    """AUTH with one mechanism, the first the relay offers: aiosmtplib's `login` tries the
    next mechanism with the same key after a refusal, and every try is one more failed login
    on the relay's books (a key or IP block on SendGrid)."""
    methods = smtp.supported_auth_methods
    if not methods:
        await smtp.login(username, password)  # raises aiosmtplib's "not supported" error
        return
    try:
        await getattr(smtp, f"auth_{methods[0].replace('-', '')}")(username, password)
    except aiosmtplib.SMTPAuthenticationError as exc:
        if exc.code >= 400:
            raise
        # Neither 235 nor a refusal (Postfix's smtp-sink answers 250): name it.
        text = f"relay answered AUTH with {exc.code}, not 235 ({exc.message})"
        raise aiosmtplib.SMTPAuthenticationError(exc.code, text) from None


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(aiosmtplib.SMTPException, OSError):
        await smtp.quit(timeout=5.0)


@dataclass
class Delivered:
    reply: str
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


class Session:
    """Counts every MAIL transaction so the pool can rotate it before the relay's limit."""

    def __init__(self, settings: Settings, lease: Any = None) -> None:
        self.settings = settings
        self.lease = lease
        self.mail_count = 0
        #: Commands the relay refused on this connection. Relays count errors per connection and
        #: never forget them (Postfix: a delay after 10, a disconnect after 20, whatever was
        #: delivered in between), so a session is rotated before that (`due_for_rotation`).
        self.refusals = 0
        self.opened_at = 0.0
        self.last_used = 0.0
        self.broken = False
        self.pipelining = False  # the relay advertised PIPELINING (RFC 2920) after AUTH
        self._size = False
        self._smtp: aiosmtplib.SMTP | None = None
        self._protocol: PipeliningProtocol | None = None
        #: Set when a transaction wrote the next one's commands behind its body: done once it
        #: has read its own final reply, the next one's replies follow on the stream.
        self._turn: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return (
            f"<Session {self.settings.smtp_host}:{self.settings.smtp_port} sent={self.mail_count}>"
        )

    @property
    def connected(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected and not self.broken

    async def open(self) -> None:
        s = self.settings
        implicit = s.smtp_tls == "tls"
        starttls = s.smtp_tls == "starttls"
        smtp = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            use_tls=implicit,
            start_tls=starttls,  # True = required, never the opportunistic default (None)
            tls_context=tls_context(s.smtp_ca_file) if s.smtp_tls != "none" else None,
            timeout=s.smtp_timeout,
        )
        try:
            await smtp.connect()
            if s.smtp_tls != "none" and smtp.get_transport_info("sslcontext") is None:
                raise Failure(Kind.TLS, None, "connection is not encrypted", Phase.CONNECT)
            if smtp.last_ehlo_response is None:
                await smtp.ehlo()
            if s.smtp_auth:
                await _login(smtp, s.smtp_username, s.smtp_password.reveal())
            protocol = adopt(smtp.protocol)  # handshake over, nothing pending: see protocol.py
        except BaseException as exc:
            failure = classify(exc, Phase.CONNECT)
            if failure.kind in (Kind.AUTH, Kind.QUOTA) and smtp.is_connected:
                await _quit(smtp)  # a refused login still says goodbye: no "lost connection"
            smtp.close()
            raise failure from None
        self.pipelining = smtp.supports_extension("pipelining")
        self._size = smtp.supports_extension("size")
        self._smtp = smtp
        self._protocol = protocol
        self.opened_at = self.last_used = time.monotonic()
        self.broken = False

    def due_for_rotation(self, now: float) -> bool:
        s = self.settings
        return (
            self.mail_count >= s.max_messages_per_connection
            or now - self.opened_at >= s.session_max_age
            or self.refusals >= MAX_REFUSALS
        )

    def idle_for(self, now: float) -> float:
        return now - self.last_used

    @property
    def owes_turn(self) -> bool:
        """A transaction wrote the next message's commands and that message has not taken
        them over: nobody else may use the session (see `transaction`)."""
        return self._turn is not None

    async def wait_turn(self) -> None:
        """Until the transaction that wrote the next message's commands has read its reply."""
        if self._turn is not None:
            await asyncio.shield(self._turn)

    def commands(self, mail_from: str, rcpt_to: list[str], size: int) -> tuple[bytes, int]:
        """The pipelined MAIL, RCPT... and DATA of a message (one write) and their reply count;
        Failure (PERMANENT) for an address that can never be written."""
        mail, rcpts = _commands(mail_from, rcpt_to, size if self._size else None)
        return b"".join((mail, *rcpts, b"DATA\r\n")), len(rcpts) + 2

    async def transaction(
        self,
        mail_from: str,
        rcpt_to: list[str],
        body: bytes,
        before_body: Callable[[], Awaitable[None]] | None = None,
        hand_over: Callable[[Session], tuple[bytes, int] | None] | None = None,
        pipeline: bool = True,
    ) -> Delivered:
        """MAIL, RCPT..., DATA; `body` is already dot-stuffed and terminated (see `wire_body`).

        With PIPELINING the commands leave in one write and their replies are read in order
        (RFC 2920); without it each command waits for its reply. Either way the body is
        written only after the 354, right after `before_body` and the fence check.

        `hand_over(session)`, called just before the body is written, may return the next
        message's commands (`commands()`): they leave in the same write, and from then on the
        session is that message's, whose transaction finds its commands written and reads
        their replies once this one has read its own. `pipeline=False` sends one command at a
        time even to a relay that pipelines (while it throttles us: a refused MAIL then costs
        one error, not three).
        """
        turn = self._turn
        written = turn is not None  # our commands left behind the previous message's body
        if turn is not None:
            try:
                await asyncio.shield(turn)  # the previous message reads its final reply first
            except BaseException:
                self.broken = True  # our replies are owed and nobody will read them
                raise
            self._turn = None
        smtp = self._smtp
        protocol = self._protocol
        if smtp is None or protocol is None or not self.connected:
            said = "the message before it failed" if written else "the session is not connected"
            raise Failure(Kind.RECONNECT, None, said, Phase.MAIL)
        self.mail_count += 1  # every MAIL counts toward the relay's per-connection limit
        self.last_used = time.monotonic()
        mail = b""
        rcpts: list[bytes] = []  # when `written`, `commands()` built and checked them already
        if not written:
            mail, rcpts = _commands(mail_from, rcpt_to, len(body) if self._size else None)
        pipelined = self.pipelining and pipeline
        timeout = self.settings.smtp_timeout
        phase = Phase.MAIL
        body_owed = False  # after the 354 the relay reads everything we write as the body
        passed: asyncio.Future[None] | None = None  # our turn, once the next one has our session
        try:
            if not written:
                self._fence_check(phase)  # no await between this check and the write
                if pipelined:
                    group = [mail, *rcpts, b"DATA\r\n"]
                    protocol.send(b"".join(group), len(group))
                else:
                    protocol.send(mail, 1)
            reply = await protocol.read_response(timeout)
            if reply.code != 250:
                failure = by_code(reply.code, reply.message, phase)
                if pipelined and reply.code != 421:
                    await self._skip_replies(protocol, len(rcpt_to) + 1)  # RCPT..., DATA
                raise failure
            phase = Phase.RCPT
            refused: dict[str, tuple[int, str]] = {}
            for index, rcpt in enumerate(rcpt_to):
                if not pipelined:
                    self._fence_check(phase)
                    protocol.send(rcpts[index], 1)
                reply = await protocol.read_response(timeout)
                code = reply.code
                if code != 250 and code != 251:
                    if code == 421:
                        raise by_code(code, reply.message, phase)
                    refused[rcpt] = (code, reply.message)
            if len(refused) == len(rcpt_to):  # the except clause below sends RSET
                failure = _all_refused(refused, phase)
                if pipelined:
                    await self._skip_replies(protocol, 1)  # DATA: refused, unless the relay errs
                raise failure
            phase = Phase.DATA
            if not pipelined:
                self._fence_check(phase)
                protocol.send(b"DATA\r\n", 1)
            reply = await protocol.read_response(timeout)
            if reply.code != 354:
                raise by_code(reply.code, reply.message, phase)
            body_owed = True
            if before_body is not None:
                await before_body()
            self._fence_check(phase)  # no await between this check and the write
            chained = hand_over(self) if hand_over is not None and pipelined else None
            if chained is None:
                protocol.send(body, 1)
            else:
                passed = self._turn = asyncio.get_running_loop().create_future()
                protocol.send(body + chained[0], 1 + chained[1])
            body_owed = False
            phase = Phase.REPLY
            reply = await protocol.read_response(self.settings.data_timeout)
            if not 200 <= reply.code < 300:
                raise by_code(reply.code, reply.message, phase)
            return Delivered(reply.message, refused)
        except Failure as failure:
            if failure.code is not None and failure.code >= 400:
                self.refusals += 1
            if failure.code == 421:
                smtp.close()  # what aiosmtplib does on a 421: the relay is hanging up
            if failure.kind not in (Kind.RETRY, Kind.PERMANENT, Kind.THROTTLED) or body_owed:
                # 421, drop, ambiguous reply, AUTH lost, a body the relay still waits for:
                # never reuse it.
                self.broken = True
            elif phase in (Phase.RCPT, Phase.DATA) and not self.broken:
                # A refused DATA command leaves MAIL and RCPT open on the relay: without RSET
                # the next message's MAIL would get "503 nested MAIL" and be dead-lettered.
                await self._reset()
            if not smtp.is_connected:
                self.broken = True
            raise
        except BaseException as exc:
            self.broken = True
            raise classify(exc, phase) from None
        finally:
            self.last_used = time.monotonic()
            if passed is not None and not passed.done():
                passed.set_result(None)  # the next message may read its replies now

    async def _skip_replies(self, protocol: PipeliningProtocol, count: int) -> None:
        """Reads the replies to pipelined commands that follow a refusal (RFC 2920 §3.1).

        They must be errors: a 2xx/3xx (a DATA answered 354 with no recipient, say) or a
        421 leaves the relay in a state we will not chase: the session is broken and closed,
        and since no body follows a 354 here, nothing can be delivered by it.
        """
        try:
            for _ in range(count):
                reply = await protocol.read_response(self.settings.smtp_timeout)
                if reply.code < 400 or reply.code == 421:
                    self.broken = True
                    break
        except (aiosmtplib.SMTPException, OSError):
            self.broken = True
        if self.broken and self._smtp is not None:
            self._smtp.close()

    def lease_expired(self, now: float | None = None) -> bool:
        """True once this connection's lease may belong to someone else: never write again."""
        lease = self.lease
        if lease is None:
            return False
        valid_until = float(getattr(lease, "valid_until", 0.0))
        return valid_until <= (time.monotonic() if now is None else now)

    def _fence_check(self, phase: Phase) -> None:
        """Called right before every write of a transaction (no await in between).

        After a stall (SIGSTOP, a long GC, a blocked loop) the task can resume mid-transaction
        before the lease keeper runs; the lease's `valid_until` is local monotonic time, so this
        check needs no Redis and cannot be late. Bytes already handed to the kernel (or
        buffered in the transport) before the stall are out of our hands.
        """
        if self.lease_expired() or self.broken or self._smtp is None:
            self.abort()
            raise Failure(Kind.RECONNECT, None, "connection fenced: its lease expired", phase)

    async def _reset(self) -> None:
        if self._smtp is not None and self.lease_expired():
            self.abort()
            return
        if self._protocol is not None and self._protocol.outstanding:
            self.broken = True  # replies still owed: an RSET would read one of them
            return
        if self._smtp is not None:
            try:
                await self._smtp.rset()
            except (aiosmtplib.SMTPException, OSError):
                self.broken = True

    async def close(self) -> None:
        """QUIT, then wait for the server to close its end: only then is the slot free.

        With an expired lease there is no QUIT (that would be a write): the socket is aborted.
        """
        if self.lease_expired():
            self.abort()
            return
        smtp = self._smtp  # kept on self until closed, so `abort()` can still cut it short
        if smtp is None:
            return
        protocol = smtp.protocol
        try:
            if smtp.is_connected and not self.broken:
                # Not smtp.quit(): it closes our end at once; we let the relay hang up first.
                await smtp.execute_command(b"QUIT", timeout=min(10.0, self.settings.smtp_timeout))
                if protocol is not None:
                    await _wait_lost(protocol, timeout=2.0)
        except (TimeoutError, aiosmtplib.SMTPException, OSError):
            pass
        finally:
            if self._smtp is smtp:
                self._smtp = None
                self._protocol = None
            smtp.close()
        if protocol is not None:
            await _wait_lost(protocol, timeout=2.0)

    def abort(self) -> None:
        """Drops the socket at once: used when our lease is lost and we must stop sending."""
        smtp, self._smtp = self._smtp, None
        self._protocol = None
        self.broken = True
        if smtp is not None and smtp.transport is not None:
            cast(asyncio.Transport, smtp.transport).abort()
        if smtp is not None:
            smtp.close()


async def _wait_lost(protocol: asyncio.BaseProtocol, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not getattr(protocol, "_connection_lost", True) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


def _commands(mail_from: str, rcpt_to: list[str], size: int | None) -> tuple[bytes, list[bytes]]:
    """MAIL and RCPT lines, checked before anything is written: an address the relay can never
    take (non-ASCII, CR/LF/NUL in it) fails the message and leaves the session as it was."""
    phase = Phase.MAIL
    try:
        mail = b"MAIL FROM:<" + check_arg(mail_from.encode("ascii"))
        mail += b">\r\n" if size is None else b"> SIZE=%d\r\n" % size
        phase = Phase.RCPT
        if not rcpt_to:
            raise Failure(Kind.PERMANENT, None, "unsendable: no recipients", phase)
        rcpts = [b"RCPT TO:<" + check_arg(r.encode("ascii")) + b">\r\n" for r in rcpt_to]
    except ValueError as exc:
        raise classify(exc, phase) from None
    return mail, rcpts


def _all_refused(refused: dict[str, tuple[int, str]], phase: Phase) -> Failure:
    """PERMANENT if every refusal was 5xx, else RETRY; the lowest code and its text."""
    codes = [c for c, _ in refused.values()]
    kind = Kind.PERMANENT if all(c >= 500 for c in codes) else Kind.RETRY
    code = min(codes)
    said = next(text for c, text in refused.values() if c == code)
    what = f"{said}" if len(refused) == 1 else f"all {len(refused)} refused: {said}"
    return Failure(kind, code, " ".join(what.split())[:300], phase, refused)

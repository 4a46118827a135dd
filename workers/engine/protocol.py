"""aiosmtplib's protocol, made to keep every reply: the basis for PIPELINING (RFC 2920).

`aiosmtplib.SMTPProtocol` parses one reply per `read_response()` and drops whatever arrives
while no read is pending, so several commands written at once would lose replies.
`PipeliningProtocol` counts the replies the server owes for what was written (`send`), parses
every complete one as it arrives, queues those nobody awaits yet, and hands them out in order;
a queued reply is returned without a future or a timer.

aiosmtplib's `SMTP` builds a plain `SMTPProtocol` itself, so `adopt()` swaps the class of the
connected protocol once the handshake is over (nothing pending then). The subclass adds state,
no slots, and overrides only the read side (`data_received`, `read_response`); aiosmtplib's
`execute_command`, `write`, `connection_lost`, `eof_received` and `start_tls` keep working on
top of it. It relies on these private parts of aiosmtplib >= 5.1.3, < 5.2 (tested with 5.1.3;
5.1.2 lacks `_response_pending`): `_buffer`, `_response_waiter`, `_response_pending`, `_loop`,
`_read_response_from_buffer`, and `connection_lost`/`eof_received` failing whatever
`_response_waiter` holds; `adopt()` checks that the attributes exist.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Callable
from typing import cast

from aiosmtplib import SMTPReadTimeoutError, SMTPResponseException, SMTPServerDisconnected
from aiosmtplib.protocol import MAX_LINE_LENGTH, MAX_RESPONSE_LENGTH, SMTPProtocol
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import SMTPStatus

from workers.compat import Private

__all__ = ["PRIVATE", "PipeliningProtocol", "adopt", "check_arg"]

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # aiosmtplib's COMMAND_INJECTION_REGEX

#: aiosmtplib's private parts this module relies on (tests/unit/test_private_api.py checks them).
PRIVATE: tuple[Private, ...] = (
    Private(SMTPProtocol, "_buffer", "the bytes received and not parsed yet", instance=True),
    Private(SMTPProtocol, "_response_waiter", "the future a read waits on", instance=True),
    Private(SMTPProtocol, "_response_pending", "`adopt` refuses mid-reply", instance=True),
    Private(SMTPProtocol, "_loop", "the loop our read's future and timer belong to", instance=True),
    Private(SMTPProtocol, "_read_response_from_buffer", "parses a multi-line reply"),
    Private(SMTPProtocol, "__init__", "subclassed", ("loop", "connection_lost_callback")),
    Private(SMTPProtocol, "read_response", "overridden", ("timeout",)),
    Private(SMTPProtocol, "data_received", "overridden", ("data",)),
)
_REQUIRED = tuple(p.name for p in PRIVATE if p.name.startswith("_") and p.name != "__init__")
_DASH = 0x2D  # "-" after the code: more lines of this reply follow


def check_arg(arg: bytes) -> bytes:
    """What `SMTPProtocol.execute_command` checks: no CR, LF, NUL (or other control) in a
    command argument, which would let an address inject commands."""
    if _CONTROL.search(arg) is not None:
        raise ValueError("Command arg contains a prohibited control character")
    return arg


class PipeliningProtocol(SMTPProtocol):
    """Keeps every reply owed for what `send` wrote and returns them in order."""

    _replies: deque[SMTPResponse]
    _owed: int
    _failed: BaseException | None

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        connection_lost_callback: Callable[[SMTPProtocol], None] | None = None,
    ) -> None:
        super().__init__(loop=loop, connection_lost_callback=connection_lost_callback)
        self._init_pipelining()

    def _init_pipelining(self) -> None:
        self._replies = deque()  # parsed, not read yet
        self._owed = 0  # written commands whose reply is not complete yet
        self._failed = None  # a broken reply stream: every later read raises it
        self._response_waiter = None  # set only while a read is blocked

    @property
    def outstanding(self) -> int:
        """Replies owed or queued: anything but 0 between transactions means out of sync."""
        return self._owed + len(self._replies)

    def send(self, data: bytes, replies: int) -> None:
        """Writes one or more commands (or the body) that the server answers `replies` times."""
        self.write(data)
        self._owed += replies

    async def read_response(self, timeout: float | None = None) -> SMTPResponse:
        """The next reply, in order; one already received is returned at once."""
        if self._replies:
            return self._replies.popleft()
        if self._failed is not None:
            raise self._failed
        transport = self.transport
        if transport is None or transport.is_closing():
            raise SMTPServerDisconnected("Connection lost")
        if self._owed <= 0:
            # aiosmtplib's own commands (RSET, QUIT, ...) write without `send`: the read
            # declares the one reply it waits for, before any of it can arrive.
            self._owed = 1
        loop = self._loop
        waiter: asyncio.Future[SMTPResponse] = loop.create_future()
        self._response_waiter = waiter
        timer = None if timeout is None else loop.call_later(timeout, self._time_out, waiter)
        try:
            return await waiter
        finally:
            if self._response_waiter is waiter:
                self._response_waiter = None
            if timer is not None:
                timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self._owed <= 0:
            return  # nothing was asked: like aiosmtplib, never pair it with a later command
        buffer = self._buffer
        buffer += data
        try:
            while self._owed > 0:
                reply = self._parse()
                if reply is None:
                    break
                self._owed -= 1
                waiter = self._response_waiter
                if waiter is not None and not waiter.done():
                    self._response_waiter = None
                    waiter.set_result(reply)
                else:
                    self._replies.append(reply)
            if len(buffer) > MAX_RESPONSE_LENGTH:
                raise SMTPResponseException(SMTPStatus.invalid_response.value, "Response too long")
        except Exception as exc:  # a malformed reply: the stream cannot be trusted any more
            self._fail(exc)

    def _parse(self) -> SMTPResponse | None:
        """One complete reply off the front of the buffer, or None if it is not all here."""
        buffer = self._buffer
        end = buffer.find(b"\n")
        if end < 0:
            if len(buffer) > MAX_LINE_LENGTH:
                raise SMTPResponseException(SMTPStatus.invalid_response.value, "Response too long")
            return None
        if end > 3 and buffer[3] == _DASH:
            return self._read_response_from_buffer()  # multi-line: aiosmtplib's own parser
        if end >= MAX_LINE_LENGTH:
            raise SMTPResponseException(SMTPStatus.invalid_response.value, "Response too long")
        line = buffer[: end + 1]
        try:
            code = int(line[:3])
        except ValueError:
            text = line.decode("utf-8", errors="ignore")
            raise SMTPResponseException(
                SMTPStatus.invalid_response.value, f"Malformed SMTP response line: {text}"
            ) from None
        del buffer[: end + 1]
        return SMTPResponse(code, line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))

    def _time_out(self, waiter: asyncio.Future[SMTPResponse]) -> None:
        if self._response_waiter is waiter and not waiter.done():
            # A reply given up on would be paired with the next read: the stream is over.
            self._fail(SMTPReadTimeoutError("Timed out waiting for server response"))

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        self._owed = 0
        del self._buffer[:]
        waiter = self._response_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
            waiter.exception()  # retrieved: its reader may be gone (cancelled)


def adopt(protocol: SMTPProtocol | None) -> PipeliningProtocol:
    """Turns the connected `aiosmtplib.SMTP().protocol` into a PipeliningProtocol in place.

    Only between commands: a reply in flight would be lost in the switch.
    """
    if protocol is None:
        raise SMTPServerDisconnected("Server not connected")
    if isinstance(protocol, PipeliningProtocol):
        return protocol
    if type(protocol) is not SMTPProtocol or not all(hasattr(protocol, a) for a in _REQUIRED):
        raise TypeError(f"cannot adopt {type(protocol).__name__}: aiosmtplib changed?")
    waiter = protocol._response_waiter
    if protocol._response_pending or (waiter is not None and waiter.done()):
        raise RuntimeError("cannot adopt an SMTP protocol while a reply is pending")
    protocol.__class__ = PipeliningProtocol
    adopted = cast(PipeliningProtocol, protocol)
    adopted._init_pipelining()
    if adopted.transport is not None:
        # uvloop's transports keep the bound `data_received` they found at connection time:
        # handing the protocol over again makes them look up the subclass's.
        adopted.transport.set_protocol(adopted)
    return adopted

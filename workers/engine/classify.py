"""What a failed SMTP step means for the message: reconnect, back off, give up, or stop the fleet.

The map follows the relay's reply codes (docs/sendgrid.md) and RFC 5321 (docs/failures.md):
a 421 or a dropped connection is the session's fault, not the message's; other 4xx are the
relay asking us to come back later; 5xx on MAIL/RCPT/DATA is final for that message; an
authentication failure (or a relay that refuses us service at connect) is the whole fleet's
configuration; silence after the DATA terminator is ambiguous because the relay may already
have queued the message.

The phase is what makes a dropped connection safe or ambiguous, so it is tracked by the session
(workers/engine/session.py): anything but a definite reply once the terminator was written is
UNCERTAIN.

    kind         attempt  what the task does
    RECONNECT    spent    new session, retry within a second
    RETRY        spent    retry with exponential backoff and full jitter
    PERMANENT    -        dead letter "permanent", with the code and text
    UNCERTAIN    -        MAILER_UNCERTAIN_POLICY: hold (dead letter "uncertain") or retry
    AUTH, TLS    kept     open the relay's circuit breaker (fleet-wide); wait for it to close
    NO_LEASE     kept     the fleet is at its connection cap: wait
    UNAVAILABLE  kept     our own Redis (ledger, leases) is unreachable: wait
    IN_FLIGHT    kept     another copy of this message is being sent right now: wait
    THROTTLED    kept     the relay asks us to slow down: lower the fleet's rate, wait for it
    QUOTA        kept     the account's quota is spent: stop the fleet, probe rarely
    NO_RELAY     kept     the message's relay is not configured (or unusable on this host):
                          wait as for a circuit, never through another relay
"""

from __future__ import annotations

import asyncio
import enum
import re
import ssl
from dataclasses import dataclass, field

import aiosmtplib


class Kind(enum.Enum):
    RECONNECT = "reconnect"  # replace the session and retry promptly
    RETRY = "retry"  # retry with exponential backoff
    PERMANENT = "permanent"  # dead-letter the message
    AUTH = "auth"  # open the relay's circuit breaker
    UNCERTAIN = "uncertain"  # the relay may have the message
    TLS = "tls"  # the relay would not give us TLS: never send the key in clear
    NO_LEASE = "no_lease"  # the fleet is at its connection cap: retry later
    UNAVAILABLE = "unavailable"  # the ledger/lease Redis is unreachable: retry later
    IN_FLIGHT = "in_flight"  # another attempt holds this message's claim: retry later
    THROTTLED = "throttled"  # the relay asks the fleet to slow down (or we wait for our rate)
    QUOTA = "quota"  # the account's sending quota is spent: nothing goes until it is back
    NO_RELAY = "no_relay"  # the message's relay is not configured, or unusable on this host


#: Not the message's fault: waiting for these never spends one of its attempts.
WAIT_KINDS = frozenset(
    {
        Kind.AUTH,
        Kind.TLS,
        Kind.NO_LEASE,
        Kind.UNAVAILABLE,
        Kind.IN_FLIGHT,
        Kind.THROTTLED,
        Kind.QUOTA,
        Kind.NO_RELAY,
    }
)
#: The relay's own configuration is at fault: these open that relay's circuit breaker.
CIRCUIT_KINDS = frozenset({Kind.AUTH, Kind.TLS, Kind.QUOTA})

#: Replies that mean the account's quota is spent (SendGrid at AUTH, SES), not a bad key.
QUOTA_TEXT = re.compile(
    r"maximum credits exceeded|exceeded your messaging limit|daily message quota|"
    r"sending quota|quota exceeded",
    re.IGNORECASE,
)
#: Temporary replies that ask us to slow down (SendGrid, Postfix's anvil and rate limits, SES).
THROTTLE_TEXT = re.compile(
    r"throttl|too much mail|too many (messages|connections|recipients received)|"
    r"temporarily deferred|rate exceeded|rate limit|sending rate|slow down",
    re.IGNORECASE,
)
THROTTLE_CODES = frozenset({421, 450, 451, 452, 454})

AUTH_CODES = frozenset({530, 534, 535, 538})


class Phase(enum.Enum):
    CONNECT = "connect"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # DATA command or body written, terminator not yet
    REPLY = "reply"  # terminator written, waiting for the final reply


@dataclass(repr=False)
class Failure(Exception):
    """A classified failure; its text carries the SMTP code and reply, never the API key.

    Its repr is its reason: Celery puts `repr(exc)` in the `task-retried` event, which is what
    Flower shows as the exception of a retried task."""

    kind: Kind
    code: int | None
    text: str
    phase: Phase
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: Set by the runtime when the failed attempt certainly left nothing at the relay but could
    #: not clean up its ledger record (Redis was down): its owner id, so the retry may reclaim
    #: that record. Never set for an UNCERTAIN failure.
    attempt: str = field(default="", compare=False)
    #: Set by the runtime: the relay the attempt went through (its circuit is the one a
    #: circuit kind opens; with failover it may not be the relay the message names).
    relay: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        code = f"{self.code} " if self.code is not None else ""
        return f"{self.kind.value} at {self.phase.value}: {code}{self.text}".strip()

    def __str__(self) -> str:
        return self.reason

    def __repr__(self) -> str:
        return f"Failure({self.reason!r})"

    def __reduce__(self) -> tuple[object, ...]:
        args = (self.kind, self.code, self.text, self.phase, self.refused, self.attempt, self.relay)
        return (Failure, args)


def by_code(code: int, text: str, phase: Phase) -> Failure:
    """A definite reply from the relay."""
    text = _clean(text)
    if 400 <= code < 600 and QUOTA_TEXT.search(text):
        return Failure(Kind.QUOTA, code, text, phase)
    if code in THROTTLE_CODES and THROTTLE_TEXT.search(text):
        return Failure(Kind.THROTTLED, code, text, phase)
    if code == 421:
        return Failure(Kind.RECONNECT, code, text, phase)
    if code == 503 and phase is not Phase.REPLY:
        # "Bad sequence of commands" judges the session's state, never the message: e.g. a
        # server answering pipelined commands out of order (smtp-sink -W does). A new session.
        return Failure(Kind.RECONNECT, code, text, phase)
    if code in AUTH_CODES or (code == 454 and phase is Phase.CONNECT):
        return Failure(Kind.AUTH, code, text, phase)
    if phase is Phase.CONNECT and code >= 500:
        # Refused at greeting/EHLO/STARTTLS: no message is at fault, every one would be.
        return Failure(Kind.AUTH, code, text, phase)
    if 400 <= code < 500:
        return Failure(Kind.RETRY, code, text, phase)
    if code >= 500:
        return Failure(Kind.PERMANENT, code, text, phase)
    if phase is Phase.REPLY:  # desynced after the terminator: it may have been accepted
        return Failure(Kind.UNCERTAIN, code, f"unexpected reply: {text}", phase)
    return Failure(Kind.RECONNECT, code, f"unexpected reply: {text}", phase)


def classify(exc: BaseException, phase: Phase) -> Failure:
    """Turns whatever aiosmtplib, the socket or a cancellation raised into a Failure."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        if QUOTA_TEXT.search(_text(exc)):
            return Failure(Kind.QUOTA, exc.code, _text(exc), phase)
        return Failure(Kind.AUTH, exc.code, _text(exc), phase)
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 0:
        return by_code(exc.code, _text(exc), phase)
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        refused = {r.recipient: (r.code, _text(r)) for r in exc.recipients}
        codes = [code for code, _ in refused.values()]
        kind = Kind.PERMANENT if all(c >= 500 for c in codes) else Kind.RETRY
        worst = min(codes) if kind is Kind.RETRY else max(codes)
        return Failure(kind, worst, "all recipients refused", phase, refused)
    if phase is Phase.REPLY:
        # The terminator left us and no definite reply came back: the relay may have queued it.
        what = _what(exc)
        return Failure(Kind.UNCERTAIN, None, f"{what} after the DATA terminator", phase)
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = getattr(exc, "verify_message", None) or _text(exc)
        return Failure(Kind.TLS, None, f"certificate verification failed: {detail}", phase)
    if isinstance(exc, aiosmtplib.SMTPException) and "STARTTLS" in str(exc).upper():
        return Failure(
            Kind.TLS,
            None,
            "relay does not offer STARTTLS; refusing to authenticate in clear",
            phase,
        )
    if isinstance(exc, aiosmtplib.SMTPException) and "AUTH" in str(exc).upper():
        return Failure(Kind.AUTH, None, _text(exc), phase)
    if isinstance(exc, ssl.SSLError) and phase is Phase.CONNECT:
        return Failure(Kind.TLS, None, f"TLS handshake failed ({type(exc).__name__})", phase)
    if isinstance(exc, ValueError) and phase in (Phase.MAIL, Phase.RCPT):
        # An address the relay can never take as given (non-ASCII, or CR/LF/NUL in it).
        return Failure(Kind.PERMANENT, None, f"unsendable: {_text(exc)}", phase)
    return Failure(Kind.RECONNECT, None, _what(exc), phase)


def _what(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "attempt cancelled"
    if isinstance(exc, TimeoutError | aiosmtplib.SMTPTimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionError | OSError | aiosmtplib.SMTPException):
        return f"connection lost ({type(exc).__name__})"
    return f"{type(exc).__name__}: {_text(exc)}"


def _clean(text: str) -> str:
    return " ".join(str(text).split())[:300]


def _text(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return _clean(str(message))

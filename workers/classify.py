"""What a failed SMTP step means for the message: reconnect, back off, give up, or stop the fleet.

The map follows the relay's reply codes (../shared/reference/sendgrid-smtp.md §4) and RFC 5321:
a 421 or a dropped connection is the session's fault, not the message's; other 4xx are the
relay asking us to come back later; 5xx on MAIL/RCPT/DATA is final for that message; an
authentication failure is the whole fleet's configuration; silence after the DATA terminator
is ambiguous because the relay may already have queued the message.
"""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass, field

import aiosmtplib


class Kind(enum.Enum):
    RECONNECT = "reconnect"  # replace the session and retry promptly
    RETRY = "retry"  # retry with exponential backoff
    PERMANENT = "permanent"  # dead-letter the message
    AUTH = "auth"  # open the fleet-wide circuit breaker
    UNCERTAIN = "uncertain"  # the relay may have the message
    TLS = "tls"  # the relay would not give us TLS: never send the key in clear
    NO_LEASE = "no_lease"  # the fleet is at its connection cap: retry later


class Phase(enum.Enum):
    CONNECT = "connect"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # DATA command or body written, terminator not yet
    REPLY = "reply"  # terminator written, waiting for the final reply


@dataclass
class Failure(Exception):
    """A classified failure; its text carries the SMTP code and reply, never the API key."""

    kind: Kind
    code: int | None
    text: str
    phase: Phase
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        code = f"{self.code} " if self.code is not None else ""
        return f"{self.kind.value} at {self.phase.value}: {code}{self.text}".strip()

    def __str__(self) -> str:
        return self.reason


def by_code(code: int, text: str, phase: Phase) -> Failure:
    if code == 421:
        return Failure(Kind.RECONNECT, code, text, phase)
    if code in (530, 534, 535, 538) or (code == 454 and phase is Phase.CONNECT):
        return Failure(Kind.AUTH, code, text, phase)
    if 400 <= code < 500:
        return Failure(Kind.RETRY, code, text, phase)
    if code >= 500:
        return Failure(Kind.PERMANENT, code, text, phase)
    return Failure(Kind.RECONNECT, code, f"unexpected reply: {text}", phase)


def classify(exc: BaseException, phase: Phase) -> Failure:
    """Turns whatever aiosmtplib or the socket raised into a Failure."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return Failure(Kind.AUTH, exc.code, _text(exc), phase)
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 0:
        return by_code(exc.code, _text(exc), phase)
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        refused = {r.recipient: (r.code, _text(r)) for r in exc.recipients}
        codes = [code for code, _ in refused.values()]
        kind = Kind.PERMANENT if all(c >= 500 for c in codes) else Kind.RETRY
        worst = min(codes) if kind is Kind.RETRY else max(codes)
        return Failure(kind, worst, "all recipients refused", phase, refused)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Failure(
            Kind.TLS, None, f"certificate verification failed: {exc.verify_message}", phase
        )
    if isinstance(exc, aiosmtplib.SMTPException) and "STARTTLS" in str(exc).upper():
        return Failure(
            Kind.TLS,
            None,
            "relay does not offer STARTTLS; refusing to authenticate in clear",
            phase,
        )
    if isinstance(exc, aiosmtplib.SMTPException) and "AUTH" in str(exc).upper():
        return Failure(Kind.AUTH, None, _text(exc), phase)
    timeout = isinstance(exc, TimeoutError | aiosmtplib.SMTPTimeoutError)
    if isinstance(exc, ConnectionError | OSError | aiosmtplib.SMTPException) or timeout:
        what = "timed out" if timeout else f"connection lost ({type(exc).__name__})"
        if phase is Phase.REPLY:
            return Failure(Kind.UNCERTAIN, None, f"{what} after the DATA terminator", phase)
        return Failure(Kind.RECONNECT, None, what, phase)
    return Failure(Kind.RECONNECT, None, f"{type(exc).__name__}: {exc}", phase)


def _text(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return " ".join(str(message).split())[:300]

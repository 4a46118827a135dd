"""What each failure means: the reply-code table, and the same table produced by a real SMTP
session against the fault-injecting test server (no worker, no broker: just the transaction)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiosmtplib
import pytest

from devkit.sink import FaultPlan, SinkServer, TLSMaterial
from mailer.config import Settings
from tests.support.helpers import sink_settings
from workers.engine.classify import (
    CIRCUIT_KINDS,
    WAIT_KINDS,
    Failure,
    Kind,
    Phase,
    by_code,
    classify,
)
from workers.engine.session import Session, wire_body


@pytest.mark.parametrize(
    ("code", "phase", "kind"),
    [
        (421, Phase.MAIL, Kind.RECONNECT),
        (421, Phase.RCPT, Kind.RECONNECT),
        (421, Phase.REPLY, Kind.RECONNECT),  # an explicit refusal of the message: resend
        (450, Phase.RCPT, Kind.RETRY),
        (451, Phase.REPLY, Kind.RETRY),
        (452, Phase.RCPT, Kind.RETRY),
        (451, Phase.CONNECT, Kind.RETRY),
        (550, Phase.MAIL, Kind.PERMANENT),
        (550, Phase.RCPT, Kind.PERMANENT),
        (554, Phase.DATA, Kind.PERMANENT),
        (552, Phase.REPLY, Kind.PERMANENT),
        (535, Phase.CONNECT, Kind.AUTH),
        (530, Phase.MAIL, Kind.AUTH),
        (454, Phase.CONNECT, Kind.AUTH),
        (554, Phase.CONNECT, Kind.AUTH),  # refused at the greeting: the fleet's problem
        (354, Phase.MAIL, Kind.RECONNECT),  # out of sequence: the session is desynced
        (503, Phase.MAIL, Kind.RECONNECT),  # bad sequence: the session's state, not the message
        (503, Phase.RCPT, Kind.RECONNECT),
        (503, Phase.DATA, Kind.RECONNECT),
        (503, Phase.REPLY, Kind.PERMANENT),  # a definite refusal of the message after its body
        (354, Phase.REPLY, Kind.UNCERTAIN),  # desynced after the terminator: ambiguous
    ],
)
def test_reply_codes(code: int, phase: Phase, kind: Kind) -> None:
    failure = by_code(code, "some text", phase)
    assert failure.kind is kind
    assert failure.code == code
    assert str(code) in failure.reason and "some text" in failure.reason


@pytest.mark.parametrize(
    ("exc", "phase", "kind"),
    [
        (aiosmtplib.SMTPServerDisconnected("gone"), Phase.MAIL, Kind.RECONNECT),
        (aiosmtplib.SMTPServerDisconnected("gone"), Phase.RCPT, Kind.RECONNECT),
        (aiosmtplib.SMTPServerDisconnected("gone"), Phase.DATA, Kind.RECONNECT),
        (aiosmtplib.SMTPServerDisconnected("gone"), Phase.REPLY, Kind.UNCERTAIN),
        (aiosmtplib.SMTPReadTimeoutError("slow"), Phase.RCPT, Kind.RECONNECT),
        (aiosmtplib.SMTPReadTimeoutError("slow"), Phase.REPLY, Kind.UNCERTAIN),
        (ConnectionResetError(), Phase.REPLY, Kind.UNCERTAIN),
        (asyncio.CancelledError(), Phase.REPLY, Kind.UNCERTAIN),
        (asyncio.CancelledError(), Phase.MAIL, Kind.RECONNECT),
        (RuntimeError("bug"), Phase.REPLY, Kind.UNCERTAIN),
        (ConnectionRefusedError(), Phase.CONNECT, Kind.RECONNECT),
        (
            aiosmtplib.SMTPAuthenticationError(535, "Authentication failed"),
            Phase.CONNECT,
            Kind.AUTH,
        ),
        (aiosmtplib.SMTPDataError(451, "later"), Phase.REPLY, Kind.RETRY),
        (aiosmtplib.SMTPResponseException(550, "no"), Phase.MAIL, Kind.PERMANENT),
        (aiosmtplib.SMTPException("SMTP AUTH extension not supported"), Phase.CONNECT, Kind.AUTH),
        (
            aiosmtplib.SMTPException("server does not support STARTTLS"),
            Phase.CONNECT,
            Kind.TLS,
        ),
        (ssl.SSLCertVerificationError("bad cert"), Phase.CONNECT, Kind.TLS),
        (UnicodeEncodeError("ascii", "é", 0, 1, "x"), Phase.MAIL, Kind.PERMANENT),
    ],
)
def test_exceptions(exc: BaseException, phase: Phase, kind: Kind) -> None:
    assert classify(exc, phase).kind is kind


def test_recipients_refused_all() -> None:
    refused = aiosmtplib.SMTPRecipientsRefused(
        [
            aiosmtplib.SMTPRecipientRefused(550, "unknown", "a@x.example"),
            aiosmtplib.SMTPRecipientRefused(452, "too many", "b@x.example"),
        ]
    )
    failure = classify(refused, Phase.RCPT)
    assert failure.kind is Kind.RETRY and failure.code == 452  # one may still take it
    assert failure.refused == {"a@x.example": (550, "unknown"), "b@x.example": (452, "too many")}


def test_wait_kinds_are_the_ones_that_are_not_the_messages_fault() -> None:
    assert {
        Kind.AUTH,
        Kind.TLS,
        Kind.NO_LEASE,
        Kind.UNAVAILABLE,
        Kind.IN_FLIGHT,
        Kind.THROTTLED,
        Kind.QUOTA,
        Kind.NO_RELAY,
    } == WAIT_KINDS
    assert {Kind.AUTH, Kind.TLS, Kind.QUOTA} == CIRCUIT_KINDS
    assert not WAIT_KINDS & {Kind.RECONNECT, Kind.RETRY, Kind.PERMANENT, Kind.UNCERTAIN}


@pytest.mark.parametrize(
    ("code", "text", "phase", "kind"),
    [
        (
            421,
            "Message from (192.0.2.1) temporarily deferred - 4.16.50",
            Phase.MAIL,
            Kind.THROTTLED,
        ),
        (452, "Too many recipients received this hour (throttled)", Phase.RCPT, Kind.THROTTLED),
        (451, "4.7.1 throttled, try again later", Phase.MAIL, Kind.THROTTLED),
        (450, "4.7.1 Error: too much mail from 127.0.0.1", Phase.MAIL, Kind.THROTTLED),
        (421, "4.7.0 Error: too many connections from 127.0.0.1", Phase.CONNECT, Kind.THROTTLED),
        (454, "Throttling failure: Maximum sending rate exceeded.", Phase.MAIL, Kind.THROTTLED),
        (451, "Authentication failed: Maximum credits exceeded", Phase.CONNECT, Kind.QUOTA),
        (451, "You've exceeded your messaging limits", Phase.MAIL, Kind.QUOTA),
        (454, "Throttling failure: Daily message quota exceeded.", Phase.MAIL, Kind.QUOTA),
        # Not throttling: a greylist or a generic temporary failure is the message's own.
        (450, "4.2.0 Greylisted, please try again later", Phase.RCPT, Kind.RETRY),
        (451, "4.3.0 Try again later", Phase.REPLY, Kind.RETRY),
        (421, "4.3.2 Service shutting down", Phase.MAIL, Kind.RECONNECT),
        (452, "4.5.3 Too many recipients", Phase.RCPT, Kind.RETRY),  # per message, RFC 5321
    ],
)
def test_throttling_and_quota_replies_are_told_apart(
    code: int, text: str, phase: Phase, kind: Kind
) -> None:
    assert by_code(code, text, phase).kind is kind


def test_a_quota_reply_at_auth_is_not_a_bad_key() -> None:
    quota = aiosmtplib.SMTPAuthenticationError(
        451, "Authentication failed: Maximum credits exceeded"
    )
    assert classify(quota, Phase.CONNECT).kind is Kind.QUOTA
    bad = aiosmtplib.SMTPAuthenticationError(535, "Authentication failed: Bad username / password")
    assert classify(bad, Phase.CONNECT).kind is Kind.AUTH


def test_failure_repr_is_its_reason_and_it_pickles() -> None:
    import pickle

    failure = Failure(Kind.RETRY, 451, "4.3.0 Try again later", Phase.REPLY)
    assert repr(failure) == "Failure('retry at reply: 451 4.3.0 Try again later')"
    copy = pickle.loads(pickle.dumps(failure))
    assert copy.reason == failure.reason and copy.kind is Kind.RETRY
    failure.relay = "tenant-a"  # the relay the attempt went through travels with it
    assert pickle.loads(pickle.dumps(failure)).relay == "tenant-a"


# ---- the countdowns and the verdicts of workers.tasks ---------------------------------------


@pytest.fixture
def tasks_with(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """workers.settle with settings replaced (the module reads them at import)."""
    import workers.settle as tasks

    def apply(**overrides: Any) -> Any:
        monkeypatch.setattr(tasks, "settings", Settings(**overrides))
        return tasks

    yield apply


@pytest.mark.parametrize("visibility", [60, 300, 3600, 7 * 86400])
def test_every_countdown_stays_below_the_visibility_timeout(
    tasks_with: Callable[..., Any], visibility: int
) -> None:
    tasks = tasks_with(visibility_timeout=visibility, circuit_probe_interval=3600.0)
    for kind in Kind:
        failure = Failure(kind, None, "x", Phase.MAIL)
        for attempts in range(0, 40):
            countdown = tasks.countdown_for(failure, attempts)
            assert 0 < countdown <= visibility / 4, (kind, attempts, countdown)


def test_backoff_grows_then_is_capped(tasks_with: Callable[..., Any]) -> None:
    tasks = tasks_with(visibility_timeout=3600)
    highs = [max(tasks.backoff(n) for _ in range(300)) for n in (1, 3, 6, 12)]
    assert highs[0] <= 5.0 < highs[1] <= 20.0 < highs[2] <= 160.0
    assert highs[3] <= 600.0


def _payload(age: float = 0.0) -> dict[str, Any]:
    return {"id": "0" * 32, "rcpt_to": ["a@example.com"], "meta": {"created_at": time.time() - age}}


def test_decide(tasks_with: Callable[..., Any]) -> None:
    tasks = tasks_with(max_retries=3, max_message_age=100.0, uncertain_policy="hold")
    f = {k: Failure(k, None, "x", Phase.MAIL) for k in Kind}
    assert tasks.decide(_payload(), 0, f[Kind.RETRY])[:2] == ("retry", 1)
    assert tasks.decide(_payload(), 0, f[Kind.RECONNECT])[:2] == ("retry", 1)
    assert tasks.decide(_payload(), 3, f[Kind.RETRY])[:2] == ("expired", 4)  # over max retries
    assert tasks.decide(_payload(age=200), 0, f[Kind.RETRY])[:2] == ("expired", 1)  # too old
    assert tasks.decide(_payload(), 2, f[Kind.PERMANENT])[:2] == ("dead", 3)
    assert tasks.decide(_payload(), 0, f[Kind.UNCERTAIN])[:2] == ("held", 1)
    for kind in (Kind.NO_LEASE, Kind.UNAVAILABLE, Kind.IN_FLIGHT, Kind.NO_RELAY):
        assert tasks.decide(_payload(), 3, f[kind])[:2] == ("retry", 3)  # waiting spends nothing
        assert tasks.decide(_payload(age=200), 3, f[kind])[:2] == ("expired", 3)
    tasks = tasks_with(max_retries=3, uncertain_policy="retry")
    assert tasks.decide(_payload(), 0, f[Kind.UNCERTAIN])[:2] == ("retry", 1)


# ---- a real session against the fault-injecting server ----------------------------------------

KEY = "SG.classify-test-key"


def _settings(sink: SinkServer, tls: TLSMaterial, key: str = KEY) -> Settings:
    return sink_settings(sink, tls, key)


MESSAGE = b"From: s@example.com\r\nTo: a@example.com\r\nSubject: t\r\n\r\nhello\r\n"


async def _attempt(settings: Settings, rcpt: list[str]) -> tuple[Any, list[str]]:
    """Opens a session and runs one transaction; returns (Delivered or Failure, ledger steps)."""
    steps: list[str] = []

    async def before_body() -> None:
        steps.append("data")

    session = Session(settings)
    try:
        await session.open()
        result: Any = await session.transaction(
            "s@example.com", rcpt, wire_body(MESSAGE), before_body
        )
    except Failure as failure:
        result = failure
    finally:
        session.abort()
    return result, steps


@pytest.mark.parametrize(
    ("plan", "kind", "phase", "code", "reached_data"),
    [
        (FaultPlan(p_421_mail=1.0), Kind.RECONNECT, Phase.MAIL, 421, False),
        (FaultPlan(p_drop_rcpt=1.0), Kind.RECONNECT, Phase.RCPT, None, False),
        (FaultPlan(p_451_data=1.0), Kind.RETRY, Phase.REPLY, 451, True),
        (FaultPlan(p_drop_after_data=1.0), Kind.UNCERTAIN, Phase.REPLY, None, True),
        (FaultPlan(reject_rcpt={"a@example.com"}), Kind.PERMANENT, Phase.RCPT, 550, False),
    ],
)
def test_real_session_classifies_each_fault(
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    plan: FaultPlan,
    kind: Kind,
    phase: Phase,
    code: int | None,
    reached_data: bool,
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", KEY), faults=plan)
    result, steps = asyncio.run(_attempt(_settings(sink, tls_material), ["a@example.com"]))
    assert isinstance(result, Failure), result
    assert (result.kind, result.phase, result.code) == (kind, phase, code)
    # The ledger step that opens the ambiguous window ran exactly when the body was sent.
    assert steps == (["data"] if reached_data else [])
    ambiguous = kind is Kind.UNCERTAIN
    assert len(sink.received) == (1 if ambiguous else 0)


def test_real_session_wrong_key_is_auth(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", KEY))
    wrong = "SG.not-the-key-at-all"
    result, _ = asyncio.run(_attempt(_settings(sink, tls_material, key=wrong), ["a@example.com"]))
    assert isinstance(result, Failure) and result.kind is Kind.AUTH and result.code == 535
    assert wrong not in result.reason and wrong not in repr(result)


def test_partial_refusal_delivers_to_the_others_and_records_each_refusal(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial
) -> None:
    sink = make_sink(
        tls="starttls", auth=("apikey", KEY), faults=FaultPlan(reject_rcpt={"bad@example.com"})
    )
    rcpt = ["a@example.com", "bad@example.com", "c@example.com"]
    result, _ = asyncio.run(_attempt(_settings(sink, tls_material), rcpt))
    assert not isinstance(result, Failure)
    assert list(result.refused) == ["bad@example.com"]
    assert result.refused["bad@example.com"][0] == 550
    assert [r.rcpt_tos for r in sink.received] == [("a@example.com", "c@example.com")]


def test_session_stays_usable_after_a_refused_message(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial
) -> None:
    """A 5xx or 4xx for one message must not poison the next one on the same connection."""
    sink = make_sink(
        tls="starttls",
        auth=("apikey", KEY),
        faults=FaultPlan(reject_rcpt={"bad@example.com"}, p_451_data=1.0, max_faults=1),
    )

    async def run() -> list[Any]:
        session = Session(_settings(sink, tls_material))
        await session.open()
        outcomes: list[Any] = []
        for rcpt in (["bad@example.com"], ["a@example.com"], ["a@example.com"]):
            try:
                outcomes.append(
                    await session.transaction("s@example.com", rcpt, wire_body(MESSAGE))
                )
            except Failure as failure:
                outcomes.append(failure)
        assert session.connected
        await session.close()
        return outcomes

    refused, retry, delivered = asyncio.run(run())
    assert isinstance(refused, Failure) and refused.kind is Kind.PERMANENT
    assert isinstance(retry, Failure) and retry.kind is Kind.RETRY and retry.code == 451
    assert not isinstance(delivered, Failure)
    assert len(sink.received) == 1
    assert len([s for s in sink.sessions if s.mail_count]) == 1

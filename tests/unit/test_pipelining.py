"""SMTP PIPELINING (RFC 2920) in `workers.engine.session.Session`, against the real aiosmtpd sink
over STARTTLS with AUTH, with PIPELINING advertised and not: every outcome must be the same, and the
session must stay in step with the server after every refusal.

The sink counts how commands arrive (`SessionRecord.pipelined_reads`): that is how these tests
know the client really pipelined (MAIL, RCPT... and DATA in one read), or really did not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import aiosmtplib
import pytest

from devkit.sink import FaultPlan, SinkServer, TLSMaterial
from tests.support.helpers import sink_settings
from workers.engine.classify import Failure, Kind, Phase
from workers.engine.loop import new_loop
from workers.engine.protocol import PipeliningProtocol, adopt
from workers.engine.session import Delivered, Session, tls_context, wire_body

T = TypeVar("T")
PIPELINING = pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "serial"])
# Both loops a worker may run (MAILER_EVENT_LOOP): uvloop's transports hold on to the protocol's
# methods, which is what `adopt()` has to deal with.
LOOPS = pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])


def run_on(loop_kind: str, coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=partial(new_loop, loop_kind)) as runner:
        return runner.run(coro)


def _message(n: int, rcpt: list[str]) -> bytes:
    return (
        f"From: s@example.com\r\nTo: {', '.join(rcpt)}\r\nSubject: m {n}\r\n"
        f"Message-ID: <m{n}@example.com>\r\n\r\nbody {n}\r\n.leading dot\r\n..two\r\n.\r\nend\r\n"
    ).encode()


@dataclass
class Lease:
    """What the pool hands a session: only `valid_until` (local monotonic time) matters."""

    valid_until: float


class Run:
    """A session on a sink, plus the ledger steps (`before_body` calls) it made."""

    def __init__(
        self,
        sink: SinkServer,
        tls: TLSMaterial,
        key: str,
        lease: Any = None,
        timeout: float = 10.0,
    ) -> None:
        self.sink = sink
        self.session = Session(
            sink_settings(sink, tls, key, smtp_timeout=timeout, data_timeout=10.0),
            lease,
        )
        self.steps = 0

    async def send(self, n: int, rcpt: list[str], mail_from: str = "s@example.com") -> Any:
        """Delivered, or the Failure raised."""

        async def before_body() -> None:
            self.steps += 1

        try:
            return await self.session.transaction(
                mail_from, rcpt, wire_body(_message(n, rcpt)), before_body
            )
        except Failure as failure:
            return failure


def _sink(
    make_sink: Callable[..., SinkServer], key: str, pipelining: bool, **faults: Any
) -> SinkServer:
    plan = FaultPlan(**faults) if faults else None
    return make_sink(tls="starttls", auth=("apikey", key), pipelining=pipelining, faults=plan)


def _record(sink: SinkServer) -> Any:
    (record,) = [s for s in sink.sessions if s.authenticated_as]
    return record


def _is_failure(result: Any, kind: Kind, phase: Phase, code: int | None) -> bool:
    return isinstance(result, Failure) and (result.kind, result.phase, result.code) == (
        kind,
        phase,
        code,
    )


@PIPELINING
def test_session_sees_pipelining_only_when_advertised(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str, pipelining: bool
) -> None:
    sink = _sink(make_sink, api_key, pipelining)

    async def scenario() -> tuple[bool, bool]:
        run = Run(sink, tls_material, api_key)
        await run.session.open()
        assert isinstance(run.session._smtp, aiosmtplib.SMTP)
        adopted = isinstance(run.session._smtp.protocol, PipeliningProtocol)
        await run.session.close()
        return run.session.pipelining, adopted

    assert asyncio.run(scenario()) == (pipelining, True)


@LOOPS
@PIPELINING
def test_many_messages_through_one_session_arrive_intact(
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    pipelining: bool,
    loop_kind: str,
) -> None:
    sink = _sink(make_sink, api_key, pipelining)
    count = 60

    def rcpt(i: int) -> list[str]:
        return [f"u{i}-{j}@example.com" for j in range(1 + i % 3)]

    async def scenario() -> list[Any]:
        run = Run(sink, tls_material, api_key)
        await run.session.open()
        results = [await run.send(i, rcpt(i)) for i in range(count)]
        assert run.steps == count and run.session.mail_count == count
        await run.session.close()
        return results

    results = run_on(loop_kind, scenario())
    assert all(isinstance(r, Delivered) and not r.refused for r in results), results
    received = sink.received
    assert [r.data for r in received] == [_message(i, rcpt(i)) for i in range(count)]
    assert [r.rcpt_tos for r in received] == [tuple(rcpt(i)) for i in range(count)]
    record = _record(sink)
    assert record.tls and record.mail_count == count and record.quit
    if pipelining:  # each MAIL, its RCPTs and DATA came in one read
        assert record.pipelined_reads == count
        assert record.max_commands_per_read == 2 + 3
    else:
        assert record.pipelined_reads == 0


@PIPELINING
def test_partial_refusal_is_recorded_and_the_rest_delivered(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str, pipelining: bool
) -> None:
    sink = _sink(
        make_sink,
        api_key,
        pipelining,
        reject_rcpt={"bad@example.com"},
        defer_rcpt={"busy@example.com"},
    )
    rcpt = ["a@example.com", "bad@example.com", "busy@example.com", "c@example.com"]

    async def scenario() -> list[Any]:
        run = Run(sink, tls_material, api_key)
        await run.session.open()
        results = [await run.send(1, rcpt), await run.send(2, ["d@example.com"])]
        assert run.session.connected and run.steps == 2
        await run.session.close()
        return results

    partial, next_one = asyncio.run(scenario())
    assert isinstance(partial, Delivered)
    assert list(partial.refused) == ["bad@example.com", "busy@example.com"]
    assert partial.refused["bad@example.com"][0] == 550
    assert partial.refused["busy@example.com"][0] == 450
    assert isinstance(next_one, Delivered)
    assert [r.rcpt_tos for r in sink.received] == [
        ("a@example.com", "c@example.com"),
        ("d@example.com",),
    ]


@PIPELINING
@pytest.mark.parametrize(
    ("rcpt", "kind", "code", "text"),
    [
        (["bad@example.com"], Kind.PERMANENT, 550, "5.1.1 User unknown"),
        (["bad@example.com", "worse@example.com"], Kind.PERMANENT, 550, "all 2 refused: "),
        (["busy@example.com"], Kind.RETRY, 450, "4.2.1 Mailbox busy"),
        (["bad@example.com", "busy@example.com"], Kind.RETRY, 450, "all 2 refused: 4.2.1"),
    ],
    ids=["one-5xx", "all-5xx", "one-4xx", "4xx-and-5xx"],
)
def test_all_recipients_refused_fails_the_message_and_keeps_the_session(
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    pipelining: bool,
    rcpt: list[str],
    kind: Kind,
    code: int,
    text: str,
) -> None:
    sink = _sink(
        make_sink,
        api_key,
        pipelining,
        reject_rcpt={"bad@example.com", "worse@example.com"},
        defer_rcpt={"busy@example.com"},
    )

    async def scenario() -> list[Any]:
        run = Run(sink, tls_material, api_key)
        await run.session.open()
        results = [await run.send(1, rcpt), await run.send(2, ["a@example.com"])]
        assert run.steps == 1  # the ledger never marked the refused one
        assert run.session.connected
        await run.session.close()
        return results

    refused, delivered = asyncio.run(scenario())
    assert _is_failure(refused, kind, Phase.RCPT, code), refused
    assert refused.text.startswith(text) and set(refused.refused) == set(rcpt)
    assert isinstance(delivered, Delivered)
    assert [r.rcpt_tos for r in sink.received] == [("a@example.com",)]
    assert _record(sink).pipelined_reads == (2 if pipelining else 0)


@PIPELINING
def test_mail_refused_then_the_next_message_goes_through(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str, pipelining: bool
) -> None:
    sink = _sink(make_sink, api_key, pipelining, reject_mail={"blocked@example.com"})

    async def scenario() -> list[Any]:
        run = Run(sink, tls_material, api_key)
        await run.session.open()
        results = [
            await run.send(1, ["a@example.com", "b@example.com"], "blocked@example.com"),
            await run.send(2, ["c@example.com"]),
        ]
        assert run.steps == 1 and run.session.connected
        await run.session.close()
        return results

    refused, delivered = asyncio.run(scenario())
    assert _is_failure(refused, Kind.PERMANENT, Phase.MAIL, 550), refused
    assert isinstance(delivered, Delivered)
    assert [(r.mail_from, r.rcpt_tos) for r in sink.received] == [
        ("s@example.com", ("c@example.com",))
    ]
    assert _record(sink).mail_count == 2


@PIPELINING
def test_data_refused_then_rset_keeps_the_session_in_step(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str, pipelining: bool
) -> None:
    sink = _sink(make_sink, api_key, pipelining, p_451_data_command=1.0, max_faults=1)

    async def scenario() -> list[Any]:
        run = Run(sink, tls_material, api_key)
        await run.session.open()
        results = [await run.send(1, ["a@example.com"]), await run.send(2, ["b@example.com"])]
        assert run.steps == 1 and run.session.connected
        await run.session.close()
        return results

    refused, delivered = asyncio.run(scenario())
    assert _is_failure(refused, Kind.RETRY, Phase.DATA, 451), refused
    assert isinstance(delivered, Delivered), delivered  # no "503 nested MAIL": RSET was read
    assert [r.rcpt_tos for r in sink.received] == [("b@example.com",)]
    assert sink.faults is not None and sink.faults.injected["451_data_command"] == 1


@PIPELINING
@pytest.mark.parametrize(
    ("faults", "phase"),
    [({"p_421_mail": 1.0}, Phase.MAIL), ({"p_421_rcpt": 1.0}, Phase.RCPT)],
    ids=["at-mail", "at-rcpt"],
)
def test_421_mid_transaction_breaks_the_session(
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    pipelining: bool,
    faults: dict[str, float],
    phase: Phase,
) -> None:
    sink = _sink(make_sink, api_key, pipelining, **faults)

    async def scenario() -> tuple[Any, Any]:
        run = Run(sink, tls_material, api_key)
        await run.session.open()
        result = await run.send(1, ["a@example.com", "b@example.com"])
        assert run.steps == 0 and run.session.broken and not run.session.connected
        again = await run.send(2, ["a@example.com"])  # never written on a broken session
        run.session.abort()
        return result, again

    result, again = asyncio.run(scenario())
    assert _is_failure(result, Kind.RECONNECT, phase, 421), result
    assert _is_failure(again, Kind.RECONNECT, Phase.MAIL, None), again
    assert sink.received == []
    assert _record(sink).mail_count == 1


@PIPELINING
def test_354_with_every_recipient_refused_sends_no_body(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str, pipelining: bool
) -> None:
    """A server that answers the pipelined DATA with 354 although it refused every RCPT
    (RFC 2920 forbids it) gets no body: the session is dropped, the message fails as refused."""
    sink = _sink(
        make_sink, api_key, pipelining, reject_rcpt={"bad@example.com"}, data_without_rcpt=True
    )

    async def scenario() -> Any:
        run = Run(sink, tls_material, api_key)
        await run.session.open()
        result = await run.send(1, ["bad@example.com"])
        assert run.steps == 0
        # Pipelined, the DATA was already out: the session cannot be trusted any more.
        # Serially there never was a DATA and the session carries on.
        assert run.session.connected is not pipelining
        await run.session.close()
        return result

    result = asyncio.run(scenario())
    assert _is_failure(result, Kind.PERMANENT, Phase.RCPT, 550), result
    assert sink.wait_idle(timeout=10) and sink.faults is not None
    assert sink.faults.injected["354_no_rcpt"] == (1 if pipelining else 0)
    assert sink.faults.injected["body_without_rcpt"] == 0
    assert sink.received == []


@PIPELINING
def test_unsendable_addresses_fail_before_anything_is_written(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str, pipelining: bool
) -> None:
    sink = _sink(make_sink, api_key, pipelining)

    async def scenario() -> list[Any]:
        run = Run(sink, tls_material, api_key)
        await run.session.open()
        results = [
            await run.send(1, ["a@example.com", "b@example.com\r\nRCPT TO:<evil@example.com>"]),
            await run.send(2, ["a@example.com"], "s\x00@example.com"),
            await run.send(3, ["é@example.com"]),
            await run.send(4, []),
            await run.send(5, ["a@example.com"]),
        ]
        assert run.session.connected
        await run.session.close()
        return results

    *unsendable, delivered = asyncio.run(scenario())
    phases = [Phase.RCPT, Phase.MAIL, Phase.RCPT, Phase.RCPT]
    for result, phase in zip(unsendable, phases, strict=True):
        assert _is_failure(result, Kind.PERMANENT, phase, None), result
        assert result.text.startswith("unsendable")
    assert isinstance(delivered, Delivered)
    assert [r.rcpt_tos for r in sink.received] == [("a@example.com",)]
    assert _record(sink).mail_count == 1  # only the good one reached the wire


@PIPELINING
@pytest.mark.parametrize("when", ["before-mail", "during-ledger-step"])
def test_an_expired_lease_fences_every_write(
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    pipelining: bool,
    when: str,
) -> None:
    sink = _sink(make_sink, api_key, pipelining)
    lease = Lease(valid_until=float("inf"))

    async def scenario() -> Any:
        run = Run(sink, tls_material, api_key, lease)
        await run.session.open()
        if when == "before-mail":
            lease.valid_until = 0.0
            result = await run.send(1, ["a@example.com"])
        else:

            async def expire_then_mark() -> None:
                lease.valid_until = 0.0  # as if the loop stalled while Redis answered

            result = None
            try:
                await run.session.transaction(
                    "s@example.com", ["a@example.com"], wire_body(_message(1, [])), expire_then_mark
                )
            except Failure as failure:
                result = failure
        assert not run.session.connected
        return result

    result = asyncio.run(scenario())
    phase = Phase.MAIL if when == "before-mail" else Phase.DATA
    assert _is_failure(result, Kind.RECONNECT, phase, None), result
    assert sink.wait_idle(timeout=10)
    assert sink.received == []
    assert _record(sink).mail_count == (0 if when == "before-mail" else 1)


@PIPELINING
def test_a_ledger_step_failing_after_the_354_never_resets_into_the_body(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str, pipelining: bool
) -> None:
    """After a 354 the relay takes whatever comes as the message: the only safe end is to drop
    the connection, whatever kind of failure stopped us (no RSET, which would be body text)."""
    sink = _sink(make_sink, api_key, pipelining)

    async def refuse() -> None:
        raise Failure(Kind.RETRY, None, "ledger said no", Phase.DATA)

    async def scenario() -> Any:
        run = Run(sink, tls_material, api_key)
        await run.session.open()
        try:
            await run.session.transaction(
                "s@example.com", ["a@example.com"], wire_body(_message(1, [])), refuse
            )
        except Failure as failure:
            assert run.session.broken
            run.session.abort()
            return failure
        return None

    result = asyncio.run(scenario())
    assert _is_failure(result, Kind.RETRY, Phase.DATA, None), result
    assert sink.wait_idle(timeout=10)
    assert sink.received == []


@PIPELINING
def test_a_silent_relay_times_out_and_breaks_the_session(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str, pipelining: bool
) -> None:
    sink = _sink(make_sink, api_key, pipelining, delay=5.0)  # before each MAIL/RCPT/DATA reply

    async def scenario() -> Any:
        run = Run(sink, tls_material, api_key, timeout=0.3)
        await run.session.open()
        result = await run.send(1, ["a@example.com"])
        assert run.steps == 0 and run.session.broken
        run.session.abort()
        return result

    result = asyncio.run(scenario())
    assert _is_failure(result, Kind.RECONNECT, Phase.MAIL, None), result
    assert result.text == "timed out"
    assert sink.wait_idle(timeout=10)
    assert sink.received == []


@LOOPS
@pytest.mark.parametrize("tls", ["starttls", "none"])
def test_protocol_keeps_every_reply_of_a_pipelined_group(
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    loop_kind: str,
    tls: str,
) -> None:
    """aiosmtplib's own protocol loses replies to commands written together; ours hands them
    all out in order, multi-line ones included, and aiosmtplib's commands still work on it.
    In plain text under uvloop, its socket transport must be handed the adopted protocol."""
    plain = tls == "none"
    sink = make_sink(tls=tls, auth=None if plain else ("apikey", api_key))

    async def scenario() -> list[tuple[int, str]]:
        smtp = aiosmtplib.SMTP(
            hostname="localhost",
            port=sink.port,
            start_tls=not plain,
            tls_context=None if plain else tls_context(str(tls_material.ca_file)),
        )
        await smtp.connect()
        if not plain:
            await smtp.login("apikey", api_key)
        protocol = adopt(smtp.protocol)
        assert adopt(protocol) is protocol
        protocol.send(b"NOOP\r\nEHLO again.example\r\nNOOP\r\nRSET\r\nNOOP\r\n", 5)
        replies = [await protocol.read_response(10.0) for _ in range(5)]
        assert protocol.outstanding == 0
        replies.append(tuple(await smtp.noop()))  # aiosmtplib's execute_command on top
        await smtp.quit()
        return [(r[0], r[1].split("\n")[0]) for r in replies]

    replies = run_on(loop_kind, scenario())
    assert [code for code, _ in replies] == [250] * 6
    assert replies[1][1] == "sink.localhost"  # the first line of the multi-line EHLO reply
    (record,) = sink.sessions
    assert record.pipelined_reads == 1


@pytest.mark.parametrize(
    ("rendered", "wire"),
    [
        (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b".a\r\n", b"..a\r\n.\r\n"),
        (b"a\r\n.\r\n..b\r\nc.d\r\n", b"a\r\n..\r\n...b\r\nc.d\r\n.\r\n"),
    ],
)
def test_wire_body_dot_stuffs_every_line_and_ends_with_the_terminator(
    rendered: bytes, wire: bytes
) -> None:
    assert wire_body(rendered) == wire


def test_a_session_the_relay_keeps_refusing_is_rotated_before_the_relay_drops_it(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str
) -> None:
    """Relays count refused commands per connection and never forget them (Postfix drops a
    session at its 20th error): after MAX_REFUSALS the session asks to be replaced."""
    from workers.engine.session import MAX_REFUSALS

    sink = make_sink(
        tls="starttls",
        auth=("apikey", api_key),
        throttle_rate=0,
        throttle_reply="450 4.7.1 Error: too much mail from 127.0.0.1",
    )
    run = Run(sink, tls_material, api_key)

    async def body() -> list[Any]:
        await run.session.open()
        results = []
        for n in range(MAX_REFUSALS):
            assert not run.session.due_for_rotation(time.monotonic())
            results.append(await run.send(n, ["a@example.com"]))
        return results

    results = run_on("asyncio", body())
    assert all(_is_failure(r, Kind.THROTTLED, Phase.MAIL, 450) for r in results)
    assert run.session.connected  # the relay kept it: no reconnect per refusal
    assert run.session.due_for_rotation(time.monotonic())

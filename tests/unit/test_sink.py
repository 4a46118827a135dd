"""The SMTP sink, exercised with aiosmtplib as a real client over real TLS.

`make_sink` and `tls_material` are the conftest fixtures.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from devkit.sink import FaultPlan, SinkServer, TLSMaterial, parse_message_id

USER, PASSWORD = "apikey", "s3cret"
ROOT = Path(__file__).resolve().parents[2]


def message(n: int = 1, to: str = "to@example.com") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "from@example.com"
    msg["To"] = to
    msg["Subject"] = f"test {n}"
    msg["Message-ID"] = f"<msg-{n}@example.com>"
    msg.set_content(f"body {n}\n.leading dot\n")
    return msg


def test_tls_material_files(tls_material: TLSMaterial) -> None:
    for path in (tls_material.ca_file, tls_material.cert_file, tls_material.key_file):
        assert path.read_bytes().startswith(b"-----BEGIN")
    assert tls_material.key_file.stat().st_mode & 0o077 == 0


def test_starttls_auth_plain(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial
) -> None:
    sink = make_sink(tls="starttls", tls_material=tls_material, auth=(USER, PASSWORD))

    async def scenario() -> None:
        # Before STARTTLS: STARTTLS offered, AUTH not, MAIL refused.
        async with aiosmtplib.SMTP(hostname="localhost", port=sink.port, start_tls=False) as plain:
            await plain.ehlo()
            assert plain.supports_extension("starttls")
            assert not plain.supports_extension("auth")
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await plain.mail("from@example.com")
            assert refused.value.code == 530

        async with aiosmtplib.SMTP(
            hostname="localhost",
            port=sink.port,
            start_tls=True,
            tls_context=tls_material.client_context(),
        ) as client:
            await client.ehlo()  # aiosmtplib forgets extensions after STARTTLS
            assert client.supports_extension("auth")
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await client.mail("from@example.com")  # TLS but no AUTH yet
            assert refused.value.code == 530
            assert "Authentication required" in refused.value.message
            await client.rset()
            await client.auth_plain(USER, PASSWORD)
            await client.send_message(message(1))

    asyncio.run(scenario())
    assert sink.wait_for(1, timeout=1)
    [got] = sink.received
    assert got.message_id == "msg-1@example.com"
    assert got.mail_from == "from@example.com"
    assert got.rcpt_tos == ("to@example.com",)
    assert b"\r\n.leading dot\r\n" in got.data  # dot-unstuffed, CRLF as on the wire
    assert not got.ambiguous
    assert sink.wait_idle(timeout=2)
    plain_session, session = sink.sessions
    assert plain_session.mail_count == 1 and not plain_session.tls and plain_session.quit
    assert session.tls and session.tls_at_auth is True
    assert session.authenticated_as == USER
    assert session.auth_attempts == 1
    assert session.mail_count == 2 and session.messages == 1
    assert session.quit and session.closed_at is not None


def test_implicit_tls_auth_login(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial
) -> None:
    sink = make_sink(tls="tls", tls_material=tls_material, auth=(USER, PASSWORD))

    async def scenario() -> None:
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=sink.port,
            use_tls=True,
            tls_context=tls_material.client_context(),
        ) as client:
            await client.ehlo()
            await client.auth_login(USER, PASSWORD)
            await client.send_message(message(2))

    asyncio.run(scenario())
    assert [r.message_id for r in sink.received] == ["msg-2@example.com"]
    [session] = sink.sessions
    assert session.tls and session.tls_at_auth is True and session.authenticated_as == USER


def test_wrong_password_is_535(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial
) -> None:
    sink = make_sink(tls="starttls", tls_material=tls_material, auth=(USER, PASSWORD))

    async def scenario() -> None:
        async with aiosmtplib.SMTP(
            hostname="localhost",
            port=sink.port,
            start_tls=True,
            tls_context=tls_material.client_context(),
        ) as client:
            await client.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
                await client.auth_plain(USER, "wrong")
            assert failed.value.code == 535
            assert "5.7.8" in failed.value.message

    asyncio.run(scenario())
    [session] = sink.sessions
    assert session.auth_attempts == 1 and session.authenticated_as is None
    assert sink.received == []


def test_client_requiring_starttls_never_auths_in_clear(
    make_sink: Callable[..., SinkServer],
) -> None:
    """The server offers AUTH in clear and no STARTTLS; a client that demands TLS must stop."""
    sink = make_sink(tls="starttls", offer_starttls=False, auth=(USER, PASSWORD))

    async def scenario() -> None:
        client = aiosmtplib.SMTP(hostname="localhost", port=sink.port, start_tls=True)
        with pytest.raises(aiosmtplib.SMTPException, match="STARTTLS"):
            await client.connect()
            await client.login(USER, PASSWORD)
        client.close()

    asyncio.run(scenario())
    assert sink.wait_idle(timeout=2)
    [session] = sink.sessions
    assert session.auth_attempts == 0 and session.tls_at_auth is None and not session.tls

    async def lure_is_real() -> None:  # the same server would have taken the password in clear
        async with aiosmtplib.SMTP(hostname="localhost", port=sink.port, start_tls=False) as c:
            await c.ehlo()
            assert c.supports_extension("auth") and not c.supports_extension("starttls")
            await c.auth_plain(USER, PASSWORD)

    asyncio.run(lure_is_real())
    assert sink.sessions[1].tls_at_auth is False


def test_421_at_mail_closes_then_plan_can_change(make_sink: Callable[..., SinkServer]) -> None:
    sink = make_sink(tls="none", faults=FaultPlan(p_421_mail=1.0))

    async def send(n: int) -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port) as client:
            await client.send_message(message(n))

    with pytest.raises((aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPServerDisconnected)) as e:
        asyncio.run(send(1))
    assert getattr(e.value, "code", 421) == 421
    assert sink.wait_idle(timeout=2)
    [session] = sink.sessions
    assert session.mail_count == 1 and session.messages == 0 and not session.quit
    assert sink.faults is not None and sink.faults.injected["421_mail"] == 1

    sink.faults = FaultPlan()
    asyncio.run(send(2))
    assert sink.message_ids() == {"msg-2@example.com": 1}


def test_drop_after_data_is_recorded_as_ambiguous(make_sink: Callable[..., SinkServer]) -> None:
    sink = make_sink(tls="none", faults=FaultPlan(p_drop_after_data=1.0, max_faults=1))

    async def send(n: int) -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port) as client:
            await client.send_message(message(n))

    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        asyncio.run(send(1))
    [got] = sink.received
    assert sink.ambiguous == [got] and got.ambiguous
    assert got.message_id == "msg-1@example.com"

    asyncio.run(send(1))  # the retry a client must make: now a duplicate, visible as such
    assert sink.message_ids()["msg-1@example.com"] == 2
    assert len(sink.ambiguous) == 1


def test_rcpt_and_data_faults(make_sink: Callable[..., SinkServer]) -> None:
    sink = make_sink(tls="none", faults=FaultPlan(reject_rcpt={"Gone@Example.com"}))

    async def send(msg: EmailMessage) -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port) as client:
            await client.send_message(msg)

    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        asyncio.run(send(message(1, to="gone@example.com")))
    assert refused.value.recipients[0].code == 550

    sink.faults = FaultPlan(p_451_data=1.0)
    with pytest.raises(aiosmtplib.SMTPDataError) as data_error:
        asyncio.run(send(message(2)))
    assert data_error.value.code == 451

    sink.faults = FaultPlan(p_drop_rcpt=1.0)
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        asyncio.run(send(message(3)))
    assert sink.received == []


def test_peak_connections_counts_concurrent_tcp_connections(
    make_sink: Callable[..., SinkServer],
) -> None:
    sink = make_sink(tls="none")

    async def scenario() -> None:
        clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port) for _ in range(20)]
        await asyncio.gather(*(c.connect() for c in clients))
        assert sink.open_connections == 20
        await asyncio.gather(*(c.quit() for c in clients))

    asyncio.run(scenario())
    assert sink.wait_idle(timeout=2)
    assert (sink.peak_connections, sink.total_connections, sink.open_connections) == (20, 20, 0)
    assert all(s.quit for s in sink.sessions)
    sink.reset()
    assert (sink.peak_connections, sink.total_connections, sink.sessions) == (0, 0, [])


def test_record_data_false_keeps_message_ids(make_sink: Callable[..., SinkServer]) -> None:
    sink = make_sink(tls="none", record_data=False)

    async def scenario() -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port) as client:
            for n in (1, 2, 1):
                await client.send_message(message(n))

    asyncio.run(scenario())
    assert all(r.data == b"" for r in sink.received)
    assert sink.message_ids() == {"msg-1@example.com": 2, "msg-2@example.com": 1}


def test_fault_plan_is_reproducible() -> None:
    def draws(plan: FaultPlan) -> list[bool]:
        return [plan.roll("x", 0.3) for _ in range(200)]

    assert draws(FaultPlan(seed=7)) == draws(FaultPlan(seed=7))
    assert 30 < sum(draws(FaultPlan(seed=7))) < 90
    capped = FaultPlan(max_faults=2)
    assert [capped.roll("x", 1.0) for _ in range(4)] == [True, True, False, False]
    with pytest.raises(ValueError):
        FaultPlan(p_451_data=1.5)


def test_parse_message_id_unfolds_headers() -> None:
    assert parse_message_id(b"Subject: x\r\nMessage-ID:\r\n <a@b>\r\n\r\nbody") == "a@b"
    assert parse_message_id(b"Subject: x\r\n\r\nMessage-ID: <in@body>\r\n") is None


def test_cli_runs_until_sigterm(tmp_path: Path) -> None:
    argv = ["--port", "0", "--tls", "starttls", "--tls-dir", str(tmp_path)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "devkit.sink", *argv, "--auth", f"{USER}:{PASSWORD}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        port = int(line.split()[2].rsplit(":", 1)[1])
        assert line.strip().endswith(f"ca={tmp_path / 'ca.pem'}")

        async def send() -> None:
            await aiosmtplib.send(
                message(1),
                hostname="localhost",
                port=port,
                start_tls=True,
                cert_bundle=str(tmp_path / "ca.pem"),
                username=USER,
                password=PASSWORD,
            )

        asyncio.run(send())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "messages=1 " in out and "sessions=1 " in out and "peak_connections=1" in out

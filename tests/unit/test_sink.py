"""The SMTP sink, exercised with aiosmtplib as a real client over real TLS.

`make_sink` and `tls_material` are the conftest fixtures.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from devkit.sink import (
    QUOTA_REPLY,
    THROTTLE_REPLY,
    FaultPlan,
    SinkServer,
    TLSMaterial,
    parse_message_id,
)
from tests.support.helpers import wait_until

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
            assert failed.value.message == "Authentication failed: Bad username / password"

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


def start_cli(
    tmp_path: Path, *extra: str, auth: tuple[str, ...] = ("--auth", f"{USER}:{PASSWORD}")
) -> tuple[subprocess.Popen[str], int]:
    """`python -m devkit.sink` (what `mailer sink` runs) with STARTTLS and AUTH; its port."""
    argv = ["--port", "0", "--tls", "starttls", "--tls-dir", str(tmp_path)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "devkit.sink", *argv, *auth, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on 127.0.0.1:"), line
    assert line.strip().endswith(f"ca={tmp_path / 'ca.pem'}")
    return proc, int(line.split()[2].rsplit(":", 1)[1])


def test_cli_runs_until_sigterm(tmp_path: Path) -> None:
    proc, port = start_cli(tmp_path)
    try:

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


# ---- relay behaviours: throttling, quota, revoked key, and the records they leave


def tls_client(sink: SinkServer, tls_material: TLSMaterial) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(
        hostname="localhost",
        port=sink.port,
        start_tls=True,
        tls_context=tls_material.client_context(),
    )


def test_throttle_refuses_mails_above_the_rate_until_lifted(
    make_sink: Callable[..., SinkServer],
) -> None:
    sink = make_sink(tls="none", throttle_rate=3, throttle_reply="451 4.7.1 Slow down, throttled")
    codes: list[int] = []

    async def burst(n: int) -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port) as client:
            for _ in range(n):
                try:
                    code = (await client.mail("from@example.com")).code
                except aiosmtplib.SMTPSenderRefused as refused:
                    code = refused.code
                codes.append(code)
                await client.rset()  # a 451 keeps the session open: the next MAIL goes on

    asyncio.run(burst(10))
    replies = sink.mail_replies
    assert [r.code for r in replies] == codes
    # Never more than 3 on per wall-clock second; a burst this short spans one or two seconds.
    per_second: dict[int, int] = {}
    for r in replies:
        per_second[int(r.at)] = per_second.get(int(r.at), 0) + r.accepted
    assert max(per_second.values()) <= 3 and codes[:3] == [250, 250, 250]
    refused = [r for r in replies if not r.accepted]
    assert len(refused) >= 10 - 3 * len(per_second)
    assert {r.reply for r in refused} == {"451 4.7.1 Slow down, throttled"}
    assert sum(sink.per_second("refused")) == len(refused)
    assert sum(sink.per_second("mail")) == 10

    sink.throttle_rate = None  # lifted at run time
    codes.clear()
    asyncio.run(burst(10))
    assert codes == [250] * 10


def test_throttle_421_closes_the_session_and_is_recorded(
    make_sink: Callable[..., SinkServer],
) -> None:
    sink = make_sink(tls="none", throttle_rate=0)

    async def send() -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port) as client:
            await client.send_message(message(1))

    with pytest.raises((aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPServerDisconnected)):
        asyncio.run(send())
    assert sink.wait_idle(timeout=5)
    [refused] = sink.mail_replies
    assert refused.reply == THROTTLE_REPLY and refused.code == 421 and not refused.accepted
    assert "throttled" in THROTTLE_REPLY and sink.received == []
    [session] = sink.sessions
    assert session.closed_at is not None and not session.quit  # the sink closed it


def test_quota_answers_auth_451_until_it_ends(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial
) -> None:
    sink = make_sink(tls="starttls", auth=(USER, PASSWORD))
    sink.start_quota()
    assert sink.quota_active

    async def login(password: str = PASSWORD) -> None:
        async with tls_client(sink, tls_material) as client:
            await client.login(USER, password)
            await client.send_message(message(1))

    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as quota:
        asyncio.run(login())
    assert quota.value.code == 451
    assert quota.value.message == "Authentication failed: Maximum credits exceeded"
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as bad:
        asyncio.run(login("wrong"))  # a wrong key still reads as a wrong key
    assert bad.value.code == 535

    sink.end_quota()
    assert not sink.quota_active
    asyncio.run(login())
    assert len(sink.received) == 1
    sink.start_quota(3600)  # for a given time
    assert sink.quota_active
    sink.start_quota(0)
    assert not sink.quota_active
    with pytest.raises(ValueError):
        sink.start_quota(-1)

    attempts = sink.auth_attempts
    # aiosmtplib's login() tries its preferred mechanism first (CRAM-MD5 is not offered).
    assert [(a.code, a.ok) for a in attempts][:1] == [(451, False)]
    assert attempts[0].reply == QUOTA_REPLY
    assert attempts[-1].ok and attempts[-1].code == 235
    assert [a.code for a in sink.auth_failures()] == [a.code for a in attempts if not a.ok]


def test_revoked_key_is_535_and_restoring_it_works(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial
) -> None:
    sink = make_sink(tls="starttls", auth=(USER, PASSWORD))

    async def auth(mechanism: str) -> None:
        async with tls_client(sink, tls_material) as client:
            await client.ehlo()  # aiosmtplib forgets extensions after STARTTLS
            if mechanism == "PLAIN":
                await client.auth_plain(USER, PASSWORD)
            else:
                await client.auth_login(USER, PASSWORD)

    sink.auth = (USER, "the-new-key")  # revoked: the client still has the old one
    for mechanism in ("PLAIN", "LOGIN"):
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
            asyncio.run(auth(mechanism))
        assert failed.value.code == 535
        assert failed.value.message == "Authentication failed: Bad username / password"
    sink.auth = (USER, PASSWORD)  # restored
    asyncio.run(auth("LOGIN"))

    attempts = sink.auth_attempts
    assert [(a.mechanism, a.code) for a in attempts] == [
        ("PLAIN", 535),
        ("LOGIN", 535),
        ("LOGIN", 235),
    ]
    sessions = sink.sessions
    assert [a.session_id for a in attempts] == [s.id for s in sessions]
    assert [a.peer for a in attempts] == [s.peer for s in sessions]
    assert len(sink.auth_failures()) == 2
    assert sum(sink.per_second("auth_failed")) == 2 and sum(sink.per_second("auth")) == 3
    assert sink.max_in_window("auth_failed", window=3600) == 2


def test_series_and_sliding_windows(make_sink: Callable[..., SinkServer]) -> None:
    sink = make_sink(tls="none")
    assert sink.per_second("sessions") == [] and sink.max_in_window("accepted") == 0

    async def scenario() -> None:
        for n in range(4):
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port) as client:
                await client.send_message(message(n))

    started = time.time()
    asyncio.run(scenario())
    opened = sink.timestamps("sessions")
    accepted = sink.timestamps("accepted")
    assert len(opened) == 4 and opened == sorted(opened) and opened[0] >= started
    assert accepted == sorted(r.received_at for r in sink.received)
    series = sink.per_second("accepted", start=started, end=time.time())
    assert sum(series) == 4 and len(series) == int(time.time()) - int(started) + 1
    assert sink.per_second("accepted", start=started + 3600) == [0] * len(
        sink.per_second("accepted", start=started + 3600)
    )
    assert sink.max_in_window("sessions", window=3600) == 4
    assert sink.max_in_window("sessions", window=3600, start=opened[1]) == 3
    assert sink.max_in_window("accepted", window=3600) == 4
    assert sink.per_second("refused") == [] and sink.per_second("mail", start=started)
    with pytest.raises(ValueError, match="kind must be one of"):
        sink.timestamps("bogus")  # type: ignore[arg-type]
    sink.reset()
    assert sink.mail_replies == [] and sink.auth_attempts == []


def test_peer_pids_tell_client_processes_apart(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial
) -> None:
    sink = make_sink(tls="starttls", auth=(USER, PASSWORD), peer_pids=True)
    client = (
        "import asyncio, ssl, sys, aiosmtplib\n"
        "async def main():\n"
        "    ctx = ssl.create_default_context(cafile=sys.argv[2])\n"
        "    async with aiosmtplib.SMTP(hostname='localhost', port=int(sys.argv[1]),\n"
        "                               start_tls=True, tls_context=ctx) as c:\n"
        "        await c.ehlo()\n"
        "        try:\n"
        "            await c.auth_plain('apikey', 'wrong')\n"
        "        except aiosmtplib.SMTPAuthenticationError:\n"
        "            pass\n"
        "asyncio.run(main())\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", client, str(sink.port), str(tls_material.ca_file)])
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.wait(30) == 0

    async def here() -> None:
        async with tls_client(sink, tls_material) as c:
            await c.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await c.auth_plain(USER, "wrong")

    asyncio.run(here())
    assert {a.code for a in sink.auth_attempts} == {535}
    assert sink.auth_failures_per_pid() == {procs[0].pid: 1, procs[1].pid: 1, os.getpid(): 1}
    assert sorted(s.peer_pid or 0 for s in sink.sessions) == sorted(
        [*(p.pid for p in procs), os.getpid()]
    )


def test_bad_throttle_and_auth_replies_are_refused() -> None:
    with pytest.raises(ValueError, match="throttle_reply"):
        SinkServer(tls="none", throttle_reply="throttled")
    with pytest.raises(ValueError, match="auth_failure_reply"):
        SinkServer(tls="none", auth_failure_reply="250 ok")
    with pytest.raises(ValueError, match="throttle_rate"):
        SinkServer(tls="none", throttle_rate=-1)


def test_cli_throttle_and_quota_flags(tmp_path: Path) -> None:
    async def send(port: int) -> None:
        await aiosmtplib.send(
            message(1),
            hostname="localhost",
            port=port,
            start_tls=True,
            cert_bundle=str(tmp_path / "ca.pem"),
            username=USER,
            password=PASSWORD,
        )

    throttled, port = start_cli(
        tmp_path, "--throttle-rate", "0", "--throttle-reply", "451 4.7.1 throttled"
    )
    try:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            asyncio.run(send(port))
        assert (refused.value.code, refused.value.message) == (451, "4.7.1 throttled")
        throttled.send_signal(signal.SIGTERM)
        out, _ = throttled.communicate(timeout=10)
    finally:
        throttled.kill()
    assert "messages=0 " in out and "mail_refused=1 " in out

    quota, port = start_cli(tmp_path, "--quota")
    try:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
            asyncio.run(send(port))
        assert failed.value.code == 451 and "Maximum credits exceeded" in failed.value.message
        quota.send_signal(signal.SIGTERM)
        out, _ = quota.communicate(timeout=10)
    finally:
        quota.kill()
    assert "messages=0 " in out and "auth_failed=" in out

    bad = subprocess.run(
        [sys.executable, "-m", "devkit.sink", "--throttle-reply", "slow down"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "--throttle-reply must be" in bad.stderr


def test_stalls_record_a_held_up_loop(make_sink: Callable[..., SinkServer]) -> None:
    sink = make_sink(tls="none")
    started = time.time()
    assert sink._loop is not None
    sink._loop.call_soon_threadsafe(time.sleep, 0.3)  # a callback that holds the loop up
    assert wait_until(lambda: any(lag > 0.2 for _, lag in sink.stalls(started)), timeout=10)
    at, lag = max(sink.stalls(started), key=lambda stall: stall[1])
    assert at >= started and lag < 10  # the shared machine may add small stalls of its own
    assert all(t <= at for t, _ in sink.stalls(end=at))
    sink.reset()
    assert sink.stalls() == []


# ---- an outage and a key revoked from another process (issue 20's failover tests) -------------


def test_refusing_connections_drops_the_open_ones_then_listens_on_the_same_port(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial
) -> None:
    sink = make_sink(tls="starttls", auth=(USER, PASSWORD))
    port = sink.port

    async def scenario() -> None:
        client = tls_client(sink, tls_material)
        await client.connect()
        await client.login(USER, PASSWORD)
        await client.send_message(message(1))
        assert sink.listening

        sink.refuse_connections()  # the relay goes away: new and open connections alike
        assert not sink.listening
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await client.send_message(message(2))
        with pytest.raises(aiosmtplib.SMTPConnectError) as refused:
            await tls_client(sink, tls_material).connect()
        assert "[Errno 111]" in str(refused.value)  # ECONNREFUSED

        sink.accept_connections()  # back, on the same port
        assert sink.listening and sink.port == port
        async with tls_client(sink, tls_material) as again:
            await again.login(USER, PASSWORD)
            await again.send_message(message(3))

    asyncio.run(scenario())
    assert [r.message_id for r in sink.received] == ["msg-1@example.com", "msg-3@example.com"]
    first, second = sink.sessions
    assert first.closed_at is not None and not first.quit  # dropped by the outage
    assert second.quit
    sink.accept_connections()  # already listening: nothing happens
    assert sink.listening


def test_refusing_connections_can_keep_the_open_ones(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial
) -> None:
    sink = make_sink(tls="starttls", auth=(USER, PASSWORD))

    async def scenario() -> None:
        async with tls_client(sink, tls_material) as client:
            await client.login(USER, PASSWORD)
            sink.refuse_connections(drop_open=False)
            await client.send_message(message(1))  # the session already open goes on
            with pytest.raises(aiosmtplib.SMTPConnectError):
                await tls_client(sink, tls_material).connect()

    asyncio.run(scenario())
    assert len(sink.received) == 1
    with pytest.raises(RuntimeError, match="not running"):
        SinkServer(tls="none").refuse_connections()


def test_auth_file_is_read_at_every_auth(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"{USER}:{PASSWORD}\n")
    sink = make_sink(tls="starttls", auth_file=key_file)

    async def login() -> None:
        async with tls_client(sink, tls_material) as client:
            await client.ehlo()
            assert client.supports_extension("auth")
            await client.login(USER, PASSWORD)
            await client.send_message(message(len(sink.received) + 1))

    asyncio.run(login())
    key_file.write_text(f"{USER}:rotated")  # revoked: the client still has the old key
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as revoked:
        asyncio.run(login())
    assert revoked.value.code == 535
    key_file.unlink()  # no file: every AUTH is refused
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        asyncio.run(login())
    key_file.write_text(f"{USER}:{PASSWORD}")  # restored
    asyncio.run(login())
    assert len(sink.received) == 2
    assert [a.ok for a in sink.auth_attempts if a.ok] == [True, True]
    with pytest.raises(ValueError, match="not both"):
        SinkServer(tls="none", auth=(USER, PASSWORD), auth_file=key_file)


def test_cli_outage_signals_and_auth_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"{USER}:{PASSWORD}")

    async def send(port: int) -> None:
        await aiosmtplib.send(
            message(1),
            hostname="localhost",
            port=port,
            start_tls=True,
            cert_bundle=str(tmp_path / "ca.pem"),
            username=USER,
            password=PASSWORD,
        )

    proc, port = start_cli(tmp_path, auth=("--auth-file", str(key_file)))
    assert proc.stdout is not None
    try:
        asyncio.run(send(port))
        proc.send_signal(signal.SIGUSR1)
        assert proc.stdout.readline().strip() == "refusing connections"
        with pytest.raises(aiosmtplib.SMTPConnectError):
            asyncio.run(send(port))
        proc.send_signal(signal.SIGUSR2)
        assert proc.stdout.readline().strip() == "accepting connections"
        asyncio.run(send(port))
        key_file.write_text(f"{USER}:revoked")
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            asyncio.run(send(port))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "messages=2 " in out and "auth_failed=" in out

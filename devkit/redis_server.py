"""A throwaway `redis-server` on a free port in a temp dir, for `mailer demo` and the tests
(which must never touch a Redis they did not start): plain, or TLS only (`tls`), with ACL users
(`users`) and a replica of another (`replicaof`); and its sentinels (`SentinelServer`)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ServerTLS:
    """The server's certificate chain and key, and the CA its clients' certificates must
    chain to (clients need none unless `client_certs`)."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    client_certs: bool = False


@dataclass(frozen=True)
class User:
    """An ACL user: `rule` is the ACL SETUSER text after the name and password (e.g.
    "~mailer* +@all")."""

    name: str
    password: str
    rule: str


ADMIN = User("admin", "admin-pw", "~* &* +@all")  # what the tests' own clients log in as


class RedisServer:
    """Starts, stops and restarts a private redis-server (AOF on, like production).

    With `tls`, it listens for TLS only (`--port 0 --tls-port`), so a client that does not
    speak TLS gets nothing. With `users`, the default user is off and `ADMIN` is added for the
    harness itself (flushing, inspecting)."""

    def __init__(
        self,
        port: int | None = None,
        appendonly: bool = True,
        *,
        tls: ServerTLS | None = None,
        users: Sequence[User] = (),
        replicaof: RedisServer | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mailer-redis-"))
        self.appendonly = appendonly
        self.tls = tls
        self.users = [*users, ADMIN] if users else []
        self.replicaof = replicaof
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The harness's own URL (the admin user when there are ACL users)."""
        return self.url_for(ADMIN if self.users else None)

    def url_for(self, user: User | None, db: int = 0) -> str:
        scheme, host = ("rediss", "localhost") if self.tls else ("redis", "127.0.0.1")
        auth = f"{quote(user.name)}:{quote(user.password)}@" if user else ""
        return f"{scheme}://{auth}{host}:{self.port}/{db}"

    def client_kwargs(self) -> dict[str, object]:
        """redis-py keyword arguments for the harness's own client (verifying TLS)."""
        kwargs: dict[str, object] = {"host": "localhost", "port": self.port}
        if self.users:
            kwargs.update(username=ADMIN.name, password=ADMIN.password)
        if self.tls:
            kwargs.update(ssl=True, ssl_ca_certs=str(self.tls.ca_file))
            if self.tls.client_certs:
                kwargs.update(
                    ssl_certfile=str(self.tls.cert_file), ssl_keyfile=str(self.tls.key_file)
                )
        return kwargs

    def _args(self) -> list[str]:
        if self.tls is None:
            args = ["--port", str(self.port)]
        else:
            args = ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", str(self.tls.cert_file)]
            args += ["--tls-key-file", str(self.tls.key_file)]
            args += ["--tls-ca-cert-file", str(self.tls.ca_file)]
            args += ["--tls-auth-clients", "yes" if self.tls.client_certs else "no"]
            args += ["--tls-replication", "yes"]
        for user in self.users:
            args += ["--user", user.name, "on", f">{user.password}", *user.rule.split()]
        if self.users:
            args += ["--user", "default", "off"]
        # A replica's first full sync starts at once (Redis waits 5 s for more replicas).
        args += ["--repl-diskless-sync-delay", "0"]
        if self.replicaof is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replicaof.port)]
            if self.users:
                args += ["--masteruser", ADMIN.name, "--masterauth", ADMIN.password]
        return args + self.extra

    def _answers(self) -> bool:
        """Whether the server answers (an error such as NOAUTH counts: it is up)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
            sock: socket.socket = raw
            if self.tls is not None:
                ctx = ssl.create_default_context(cafile=str(self.tls.ca_file))
                if self.tls.client_certs:
                    ctx.load_cert_chain(self.tls.cert_file, self.tls.key_file)
                sock = ctx.wrap_socket(raw, server_hostname="localhost")
            sock.sendall(b"PING\r\n")
            return sock.recv(64)[:1] in (b"+", b"-")

    def start_unchecked(self) -> RedisServer:
        """Starts it and waits for its port, without a handshake (for a certificate that
        names another host, which no verifying client accepts)."""
        self._spawn()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def start(self) -> RedisServer:
        self._spawn()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self._answers():
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def _spawn(self) -> None:
        args = [
            self.binary,
            *self._args(),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--maxmemory-policy",
            "noeviction",
            "--logfile",
            str(self.dir / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        """SIGKILL: nothing flushed, no goodbye to replicas or clients."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        _terminate(self.proc)
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelServer:
    """One `redis-server --sentinel` watching `primary` as `master_name`: quick to decide
    (`down_after_ms`, a quorum of 2 of 3) so a test's failover takes seconds."""

    def __init__(
        self, primary: RedisServer, master_name: str = "mailer", down_after_ms: int = 1000
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mailer-sentinel-"))
        self.config = self.dir / "sentinel.conf"
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self.dir}",
            f"logfile {self.dir / 'sentinel.log'}",
            f"sentinel monitor {master_name} 127.0.0.1 {primary.port} 2",
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
            f"sentinel failover-timeout {master_name} 10000",
            f"sentinel parallel-syncs {master_name} 1",
        ]
        if primary.users:
            lines += [
                f"sentinel auth-user {master_name} {ADMIN.name}",
                f"sentinel auth-pass {master_name} {ADMIN.password}",
            ]
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelServer:
        self.proc = subprocess.Popen(
            [self.binary, str(self.config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sentinel did not start on port {self.port}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        _terminate(self.proc)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

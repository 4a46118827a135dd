"""What every benchmark shares: the message, the sinks, processes started like a user starts them,
and readings from /proc (CPU seconds, RSS).

Everything listens on 127.0.0.1 and free ports; nothing here touches a Redis it did not start.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# ---- the message: the same for every system --------------------------------------------------

SUBJECT = "Benchmark message"
FROM_ADDR = "Bench <bench@example.com>"
ENVELOPE_FROM = "bench@example.com"
BODY_SIZE = 1024


_SENTENCE = (
    "The relay keeps a few hundred sessions warm; every command is a round trip, so "
    "throughput comes from many sessions at once and from little CPU per message. "
)


def _body(size: int) -> str:
    """Plain text lines under 78 characters (no quoted-printable), exactly `size` bytes."""
    words = (_SENTENCE * (size // len(_SENTENCE) + 2)).split()
    text, line = "", ""
    for word in words:
        if len(line) + 1 + len(word) > 70:
            text += line + "\n"
            line = word
        else:
            line = f"{line} {word}" if line else word
        if len(text) >= size:
            break
    text = text[: size - 1].rstrip()
    return text + "." * (size - 1 - len(text)) + "\n"


BODY = _body(BODY_SIZE)


def recipient(i: int) -> str:
    return f"user{i}@example.com"


# ---- small helpers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name (which may contain spaces): field 3 onwards."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def proc_cpu(pid: int) -> float:
    """utime + stime (+ reaped children's) of one process, all its threads, in seconds."""
    try:
        f = _stat_fields(pid)
    except (OSError, ValueError):
        return 0.0
    return (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / CLK_TCK


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (prefork children), scanning /proc once."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def tree_cpu(pids: Sequence[int]) -> float:
    return sum(proc_cpu(p) for root in pids for p in descendants(root))


def machine_busy() -> float:
    """CPU seconds every process on the machine has used (and lost to steal), from /proc/stat:
    against our own processes' CPU it tells how much else ran meanwhile (shared machines)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _established() -> dict[tuple[str, str], str]:
    """(local, remote) -> inode of every ESTABLISHED TCP socket, from /proc/net/tcp(6).

    Keyed so each socket counts once: the kernel writes these tables a page per read() and
    resumes its walk by position, so connections opened or closed elsewhere between two reads
    make it list sockets it already listed, over and over on a busy machine (bench/README.md,
    "Figures behind the code").
    A socket the sink has not accepted yet shows inode 0.
    """
    rows: dict[tuple[str, str], str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "01":
                    rows[(cols[1], cols[2])] = cols[9]
    return rows


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1], 16)


def established_to(pid: int, port: int) -> int:
    """TCP connections of process `pid` established to 127.0.0.1:`port` (its open sessions)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return sum(
        1
        for (_, remote), inode in _established().items()
        if inode in inodes and _port(remote) == port
    )


SS = shutil.which("ss")


def sessions_at(port: int) -> int:
    """SMTP sessions open at 127.0.0.1:`port`: its established TCP connections, server side
    (those the kernel completed but the sink has not accepted yet included).

    With `ss` (iproute2): a netlink dump filtered in the kernel, which resumes its walk only
    when a reply buffer fills (hundreds of sockets) and then within one hash bucket; it never
    over-counted where /proc did. Else /proc/net/tcp, each connection once (`_established`).
    """
    if SS is not None:
        done = subprocess.run(
            [SS, "-Htn", "state", "established", f"( sport = :{port} )"],
            capture_output=True,
            check=False,
        )
        if done.returncode == 0:
            return sum(1 for line in done.stdout.splitlines() if line.strip())
    return sum(1 for local, _ in _established() if _port(local) == port)


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def rate(count: int, seconds: float | None) -> float | None:
    return count / seconds if seconds else None


# ---- sinks --------------------------------------------------------------------------------------


class Sink(Protocol):
    name: str
    port: int
    think: float

    @property
    def pid(self) -> int | None: ...
    def count(self) -> int: ...
    def wait_for(self, target: int, timeout: float) -> float | None: ...
    def stop(self) -> None: ...


def postfix_sink_binary() -> str | None:
    return shutil.which("smtp-sink") or (
        "/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None
    )


def smtp_source_binary() -> str | None:
    return shutil.which("smtp-source") or (
        "/usr/sbin/smtp-source" if os.path.exists("/usr/sbin/smtp-source") else None
    )


_MESG = re.compile(rb"mesg=(\d+)")


class PostfixSink:
    """Postfix's `smtp-sink`: an event-driven C sink, the fastest thing we can send to.

    `-c` makes it write running counters ("sess=.. quit=.. mesg=N\\r") on every ".", QUIT and
    session end; we send those to a file and read its tail. `-W mail:S` adds S seconds of
    think time before each MAIL reply (the latency-bound regime). `-m` caps its concurrency
    (default 256, below our 500). As root it must drop privileges (`-u nobody`).

    It advertises AUTH but answers every AUTH command with 250, which clients read as a failed
    login: systems run against it without AUTH (ours with MAILER_SMTP_NO_AUTH=1).
    """

    name = "smtp-sink"

    def __init__(self, workdir: Path, *, think: int = 0, max_sessions: int = 2048) -> None:
        binary = postfix_sink_binary()
        if binary is None:
            raise RuntimeError("smtp-sink is not installed (Debian package postfix)")
        self.binary = binary
        self.port = free_port()
        self.think = float(think)
        self.max_sessions = max_sessions
        self.counter_file = workdir / f"smtp-sink-{self.port}.counters"
        self.log_file = workdir / f"smtp-sink-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> PostfixSink:
        argv = [self.binary, "-c", "-m", str(self.max_sessions)]
        if self.think:
            # -p: no PIPELINING. smtp-sink's -W delays the MAIL reply on a timer but answers the
            # RCPT and DATA pipelined behind it at once ("503 need MAIL"), out of order, which
            # RFC 2920 forbids and real relays do not do. The think time is on MAIL alone, so
            # pipelining would save nothing here anyway.
            argv += ["-W", f"mail:{int(self.think)}", "-p"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        argv += [f"127.0.0.1:{self.port}", "4096"]
        with open(self.counter_file, "wb") as out, open(self.log_file, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, start_new_session=True)
        try:
            wait_port(self.port)
        except RuntimeError:
            raise RuntimeError(f"smtp-sink did not start: {self.log_file.read_text()}") from None
        return self

    def count(self) -> int:
        with open(self.counter_file, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256))
            found = _MESG.findall(f.read())
        return int(found[-1]) if found else 0

    def wait_for(self, target: int, timeout: float) -> float | None:
        """The monotonic time the sink had `target` messages, or None after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count() >= target:
                return time.monotonic()
            time.sleep(0.002)
        return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class AiosmtpdSink:
    """Fallback when Postfix is missing (CI): our own aiosmtpd sink, plain, no AUTH, in this
    process. Much slower than smtp-sink, so its figures are not comparable; for smoke runs."""

    name = "aiosmtpd-sink"

    def __init__(self, workdir: Path, *, think: int = 0, max_sessions: int = 2048) -> None:
        from devkit.sink import SinkServer

        del workdir, max_sessions
        self.think = float(think)
        self.server = SinkServer(tls="none", record_data=False, mail_delay=self.think)
        self.port = 0

    @property
    def pid(self) -> int | None:
        return None  # runs in this process: its CPU is not told apart

    def start(self) -> AiosmtpdSink:
        self.server.start()
        self.port = self.server.port
        return self

    def count(self) -> int:
        return len(self.server.received)

    def wait_for(self, target: int, timeout: float) -> float | None:
        return time.monotonic() if self.server.wait_for(target, timeout) else None

    def stop(self) -> None:
        self.server.stop()


def make_sink(kind: str, workdir: Path, *, think: int = 0, max_sessions: int = 2048) -> Sink:
    """kind: postfix | aiosmtpd | auto (Postfix when installed)."""
    if kind == "auto":
        kind = "postfix" if postfix_sink_binary() else "aiosmtpd"
    cls: type[PostfixSink] | type[AiosmtpdSink] = PostfixSink if kind == "postfix" else AiosmtpdSink
    return cls(workdir, think=think, max_sessions=max_sessions).start()


class Watch:
    """Notes the moment a sink reaches a count, from a thread that starts before the producer
    (so a producer slower than the workers does not hide when the last message arrived).

    A second thread samples, every `every` seconds, the sink's count and its open sessions:
    the timeline shows ramp-up, steady state and how many sessions were really in use.
    """

    def __init__(self, sink: Sink, target: int, timeout: float, every: float = 0.25) -> None:
        self.at: float | None = None
        self.started = time.monotonic()
        self.base = sink.count()
        self.timeline: list[tuple[float, int, int]] = []  # (seconds, delivered, sessions)
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(sink, target, timeout), name="bench-watch", daemon=True
        )
        self._sampler = threading.Thread(
            target=self._sample, args=(sink, every), name="bench-sample", daemon=True
        )
        self._thread.start()
        self._sampler.start()

    def _run(self, sink: Sink, target: int, timeout: float) -> None:
        self.at = sink.wait_for(target, timeout)
        self._done.set()

    def _sample(self, sink: Sink, every: float) -> None:
        while not self._done.wait(every):
            self.timeline.append(
                (time.monotonic() - self.started, sink.count() - self.base, sessions_at(sink.port))
            )

    def result(self) -> float | None:
        self._thread.join()
        self._sampler.join()
        return self.at

    def steady_rate(self, total: int) -> float | None:
        """Messages per second between 10% and 90% delivered (no ramp-up, no tail)."""
        lo = next(((t, c) for t, c, _ in self.timeline if c >= total * 0.1), None)
        hi = next(((t, c) for t, c, _ in self.timeline if c >= total * 0.9), None)
        if lo is None or hi is None or hi[0] <= lo[0]:
            return None
        return (hi[1] - lo[1]) / (hi[0] - lo[0])

    def peak_sessions(self) -> int:
        return max((s for _, _, s in self.timeline), default=0)


# ---- processes ----------------------------------------------------------------------------------


class Service:
    """A long-running subprocess started like a user starts it, its output in a log file (no
    pump thread in the bench process), ready when a marker line appears."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        logdir: Path,
        *,
        ready: str = " ready.",
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), self.env.get("PYTHONPATH", "")) if p
        )
        self.log_path = logdir / f"{name}.log"
        self.ready = ready
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Service:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 90.0) -> Service:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.ready not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.log()[-4000:]}")
            time.sleep(0.1)
        return self

    def cpu(self) -> float:
        return tree_cpu([self.pid])

    def terminate(self) -> None:
        """SIGTERM: Celery's warm shutdown (QUIT every session, release every lease)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL to its process group if it overstays `timeout`."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        self.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_all(services: Sequence[Service], timeout: float = 90.0) -> list[Service]:
    """Starts in parallel, waits for each (Celery takes a couple of seconds to boot)."""
    for s in services:
        s.start()
    try:
        for s in services:
            s.wait_ready(timeout)
    except BaseException:
        stop_all(services)
        raise
    return list(services)


def stop_all(services: Sequence[Service]) -> None:
    """Warm shutdowns in parallel (each takes a second or two)."""
    for s in services:
        s.terminate()
    for s in services:
        s.stop()

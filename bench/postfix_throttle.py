#!/usr/bin/env python
"""A real MTA's throttle (issue 18): our workers against a private Postfix on loopback whose
anvil limits each client to 10 connections and N messages a minute.

    python bench/postfix_throttle.py                       # 600/min (1,500) and 60/min (13 min)
    python bench/postfix_throttle.py --only fast           # the 600/min run alone (~3-6 min)
    python bench/postfix_throttle.py --minutes 4           # the 60/min run shortened (240 msgs)
    python bench/postfix_throttle.py --compare 7ba55b1     # also the same runs at another commit

The bench starts its own Postfix instance (config and queue directories in a temp dir, its own
maillog file, mail delivered to the `discard:` transport: nothing leaves the machine), its own
redis-server and two `mailer worker` processes with `MAILER_MAX_CONNECTIONS=10`, enqueues the
whole backlog at once, and reads every figure from Postfix's log: messages delivered
(`discard` status=sent), duplicates (cleanup's `message-id=` of delivered queue ids), MAILs
refused by the message-rate limit, sessions and sessions ended for "too many errors"; dead
letters from Redis, `throttled` and `retried` events from the worker logs. `--compare REF`
runs the same scenarios with the workers and producer of another commit (exported with
`git archive`), e.g. the one before traffic shaping. Figures are printed, never asserted;
bench/README.md ("Real MTA throttle") has the command and the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from bench.common import free_port, wait_port  # noqa: E402
from devkit.redis_server import RedisServer  # noqa: E402
from devkit.worker import WorkerProcess  # noqa: E402
from workers.state import keys  # noqa: E402
from workers.state.ratelimit import peek_ceiling  # noqa: E402

FROM_ADDR = "Bench <bench@example.com>"
Say = Callable[[str], None]

# Postfix log lines (Postfix 3.x wording).
CONNECT = re.compile(r"postfix/smtpd\[\d+\]: connect from ")
DISCONNECT = re.compile(r"postfix/smtpd\[\d+\]: disconnect from \S+ (.*)$")
TOO_MANY_ERRORS = re.compile(r"postfix/smtpd\[\d+\]: too many errors after (\S+)")
RATE_REFUSED = re.compile(r"Message delivery request rate limit exceeded: (\d+)")
CONN_REFUSED = re.compile(r"Connection concurrency limit exceeded: (\d+)")
CLEANUP_ID = re.compile(r"postfix/cleanup\[\d+\]: ([0-9A-F]+): message-id=<([^>]*)>")
SENT = re.compile(r"postfix/discard\[\d+\]: ([0-9A-F]+): to=<[^>]*>.* status=sent")
NOQUEUE = re.compile(r"NOQUEUE: reject: (\S+)")
ANVIL_STATS = re.compile(r"postfix/anvil\[\d+\]: statistics: (.*)$")
LOST = re.compile(r"postfix/smtpd\[\d+\]: (lost connection|timeout) after (\S+)")
EVENT = re.compile(r'"event": ?"([a-z_]+)"')

PRODUCER = """
import sys, mailer
n, tag = int(sys.argv[1]), sys.argv[2]
for start in range(0, n, 500):
    mailer.send_many([
        {"to": f"{tag}{i}@example.com", "subject": f"{tag} {i}", "text": "postfix bench\\n"}
        for i in range(start, min(start + 500, n))
    ])
"""

MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def postfix_binary() -> str | None:
    return shutil.which("postfix") or (
        "/usr/sbin/postfix" if Path("/usr/sbin/postfix").exists() else None
    )


# ---- the relay ---------------------------------------------------------------------------------


@dataclass
class LogLine:
    at: float  # when the bench read it (the log's own stamps have one-second resolution)
    text: str


class PostfixRelay:
    """A private Postfix instance on 127.0.0.1:<free port>: its own config_directory,
    queue_directory, data_directory and maillog_file under `root`, anvil's per-client limits,
    every recipient relayed to `discard:`. `postfix -c DIR start`/`stop` as root."""

    def __init__(self, root: Path, *, message_rate: int, connections: int = 10) -> None:
        self.root = root
        self.port = free_port()
        self.message_rate = message_rate
        self.connections = connections
        self.config = root / "etc"
        self.maillog = root / "maillog"
        self.lines: list[LogLine] = []
        self._stop = threading.Event()
        self._tail: threading.Thread | None = None

    def main_cf(self) -> str:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.root / "queue",
            "data_directory": self.root / "data",
            "myhostname": "relay.bench.invalid",
            "mydomain": "bench.invalid",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "mynetworks": "127.0.0.0/8",
            "default_transport": "discard",
            "relay_transport": "discard",
            "local_transport": "discard",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.root,
            # anvil: per-client limits, loopback included (no exceptions)
            "smtpd_client_connection_count_limit": self.connections,
            "smtpd_client_message_rate_limit": self.message_rate,
            "anvil_rate_time_unit": "60s",
            "smtpd_client_event_limit_exceptions": "",
            # smtpd_soft_error_limit / smtpd_hard_error_limit: Postfix's defaults (10, 20)
        }
        return "".join(f"{k} = {v}\n" for k, v in settings.items())

    def start(self) -> PostfixRelay:
        binary = postfix_binary()
        if binary is None:
            raise RuntimeError("postfix not installed: apt-get install postfix (make bench)")
        for sub in ("etc", "queue", "data"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for folder in (self.root, *self.root.parents):
            if not folder.stat().st_mode & 0o001:  # Postfix's daemons run as `postfix`
                raise RuntimeError(f"{folder} is not searchable by others: Postfix cannot use it")
        owner = pwd.getpwnam("postfix")
        os.chown(self.root / "data", owner.pw_uid, owner.pw_gid)
        (self.config / "main.cf").write_text(self.main_cf())
        (self.config / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        self.maillog.touch()
        self._tail = threading.Thread(target=self._follow, daemon=True)
        self._tail.start()
        run = subprocess.run(
            [binary, "-c", str(self.config), "start"], capture_output=True, text=True, timeout=60
        )
        if run.returncode != 0:
            raise RuntimeError(f"postfix start failed: {run.stderr}{self.maillog.read_text()}")
        wait_port(self.port, timeout=20)
        return self

    def stop(self) -> None:
        binary = postfix_binary()
        if binary is not None:
            subprocess.run(
                [binary, "-c", str(self.config), "stop"], capture_output=True, timeout=60
            )
        time.sleep(0.5)  # postlogd writes anvil's exit statistics
        self._stop.set()
        if self._tail is not None:
            self._tail.join(5)

    def _follow(self) -> None:
        with self.maillog.open() as f:
            buffer = ""
            while True:
                chunk = f.read()
                if chunk:
                    buffer += chunk
                    *complete, buffer = buffer.split("\n")
                    now = time.time()
                    self.lines += [LogLine(now, line) for line in complete]
                elif self._stop.is_set():
                    return
                else:
                    time.sleep(0.05)

    # ---- readings

    def delivered_ids(self) -> Counter[str]:
        """Message-ID -> times delivered (discard's status=sent, joined to cleanup's line)."""
        ids: dict[str, str] = {}
        out: Counter[str] = Counter()
        for line in list(self.lines):
            if m := CLEANUP_ID.search(line.text):
                ids[m.group(1)] = m.group(2)
            elif m := SENT.search(line.text):
                out[ids.get(m.group(1), f"queue-id:{m.group(1)}")] += 1
        return out

    def times(self, pattern: re.Pattern[str]) -> list[float]:
        return [line.at for line in list(self.lines) if pattern.search(line.text)]

    def count(self, pattern: re.Pattern[str]) -> int:
        return sum(1 for line in list(self.lines) if pattern.search(line.text))


@dataclass
class Sessions:
    """From smtpd's `disconnect from ... mail=ok/total` lines: per-session command counts."""

    total: int = 0
    mail_ok: int = 0
    mail_all: int = 0
    without_quit: int = 0
    commands: Counter[str] = field(default_factory=Counter)


def sessions(relay: PostfixRelay) -> Sessions:
    out = Sessions()
    for line in list(relay.lines):
        m = DISCONNECT.search(line.text)
        if not m:
            continue
        out.total += 1
        quit_seen = False
        for part in m.group(1).split():
            name, _, value = part.partition("=")
            ok, _, of = value.partition("/")
            if not ok.isdigit() or name == "commands":
                continue
            out.commands[name] += int(of or ok)
            if name == "mail":
                out.mail_ok += int(ok)
                out.mail_all += int(of or ok)
            quit_seen |= name == "quit"
        out.without_quit += not quit_seen
    return out


def max_in_window(times: Sequence[float], window: float) -> int:
    ordered = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(ordered):
        while ordered[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def per_minute(times: Sequence[float], start: float) -> list[int]:
    if not times:
        return []
    out = [0] * (int((max(times) - start) // 60) + 1)
    for t in times:
        if t >= start:
            out[int((t - start) // 60)] += 1
    return out


TIMELINE = 20


def per_second(times: Sequence[float], start: float) -> str:
    out = [0] * TIMELINE
    for t in times:
        if 0 <= t - start < TIMELINE:
            out[int(t - start)] += 1
    return " ".join(f"{n:3d}" for n in out)


def ceiling_at(ceilings: Sequence[tuple[float, float | None]], at: float) -> str:
    """The last sampled ceiling at `at` (msg/s), '-' for none."""
    rate = next((r for t, r in reversed(ceilings) if t <= at), None)
    return "  -" if rate is None else f"{rate:3.0f}"


# ---- one run -----------------------------------------------------------------------------------


@dataclass
class Tree:
    """The code the workers and the producer run: this checkout, or another commit's export."""

    label: str
    path: Path

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.path)}


def export_tree(ref: str, into: Path) -> Tree:
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", ref],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return Tree(f"commit {commit}", into)


@dataclass
class Scenario:
    name: str
    message_rate: int  # Postfix's smtpd_client_message_rate_limit, per 60 s
    messages: int


def run_scenario(
    scenario: Scenario,
    tree: Tree,
    args: argparse.Namespace,
    root: Path,
    say: Say,
) -> dict[str, object]:
    ideal = scenario.messages / scenario.message_rate * 60
    timeout = ideal * args.timeout_factor + 120
    limit = f"{scenario.message_rate}/min" if args.rate_limit == "relay" else args.rate_limit
    configured = f", MAILER_RATE_LIMIT={limit}" if limit else ""
    say(
        f"{scenario.name} [{tree.label}]: Postfix at {scenario.message_rate}/min per client,"
        f" 10 connections; {args.workers} workers, MAILER_MAX_CONNECTIONS=10{configured};"
        f" {scenario.messages:,} messages (the limit alone allows them in {ideal / 60:.1f} min)"
    )
    relay = PostfixRelay(root / "postfix", message_rate=scenario.message_rate).start()
    server = RedisServer().start()
    client = redis.Redis.from_url(server.url, socket_timeout=10)
    env = {
        **tree.env(),
        "MAILER_BROKER_URL": server.url,
        "MAILER_SMTP_HOST": "127.0.0.1",
        "MAILER_SMTP_PORT": str(relay.port),
        "MAILER_SMTP_TLS": "none",
        "MAILER_SMTP_ALLOW_INSECURE": "1",
        "MAILER_SMTP_NO_AUTH": "1",
        "MAILER_SMTP_PASSWORD": "bench-not-a-key",
        "MAILER_DEFAULT_FROM": FROM_ADDR,
        "MAILER_MAX_CONNECTIONS": "10",
        **({"MAILER_RATE_LIMIT": limit} if limit else {}),
    }
    workers = [WorkerProcess(env, name=f"pf{i}") for i in range(args.workers)]
    ceilings: list[tuple[float, float | None]] = []
    try:
        # `python -m mailer` puts the cwd first on sys.path: the tree's own package loads.
        with contextlib.chdir(tree.path), ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(lambda w: w.start(timeout=120), workers))
        started = time.time()
        produced = subprocess.run(
            [sys.executable, "-c", PRODUCER, str(scenario.messages), scenario.name],
            env={**os.environ, **env},
            cwd=tree.path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if produced.returncode != 0:
            raise RuntimeError(f"producer failed: {produced.stderr[-2000:]}")
        enqueued = time.time() - started
        deadline = time.monotonic() + timeout
        next_report = time.monotonic() + args.report_every
        while time.monotonic() < deadline:
            delivered = len(relay.delivered_ids())
            with contextlib.suppress(redis.RedisError):
                ceilings.append((time.time(), peek_ceiling(client).rate))
            settled = delivered
            with contextlib.suppress(redis.RedisError):
                settled += int(client.zcard(keys.DEAD_LETTER_INDEX))  # dead letters never come
            if settled >= scenario.messages:
                break
            if time.monotonic() >= next_report:
                next_report += args.report_every
                rate = ceilings[-1][1] if ceilings else None
                say(
                    f"  ... {time.time() - started:5.0f} s: delivered {delivered:,},"
                    f" rate-refused MAILs {relay.count(RATE_REFUSED):,},"
                    f" sessions {relay.count(CONNECT):,}, too many errors"
                    f" {relay.count(TOO_MANY_ERRORS)}, ceiling"
                    f" {'none' if rate is None else f'{rate:.2f}/s'}"
                )
            time.sleep(1.0)
        finished = time.time()
        dead = dead_letters(client)
    finally:
        with ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(lambda w: w.stop(timeout=30), workers))
        for w in workers:  # beside Postfix's maillog (kept with --keep)
            (root / f"{w.name}.log").write_text(w.log)
        relay.stop()
        client.close()
        server.close()
    return report(scenario, relay, workers, dead, ceilings, started, finished, enqueued, say)


def dead_letters(client: redis.Redis) -> Counter[str]:
    """Dead letters by kind (the record's `kind`), read from Redis."""
    kinds: Counter[str] = Counter()
    for raw in client.hvals(keys.DEAD_LETTERS):
        with contextlib.suppress(ValueError, TypeError):
            record = json.loads(raw)
            kind, code, attempts = record.get("kind"), record.get("code"), record.get("attempts")
            kinds[f"{kind} {code} attempts={attempts}"] += 1
    return kinds


def report(
    scenario: Scenario,
    relay: PostfixRelay,
    workers: Sequence[WorkerProcess],
    dead: Counter[str],
    ceilings: Sequence[tuple[float, float | None]],
    started: float,
    finished: float,
    enqueued: float,
    say: Say,
) -> dict[str, object]:
    ids = relay.delivered_ids()
    delivered = len(ids)
    duplicates = sum(n - 1 for n in ids.values() if n > 1)
    refused = relay.count(RATE_REFUSED)
    s = sessions(relay)
    killed = relay.count(TOO_MANY_ERRORS)
    killed_after = Counter(
        m.group(1) for line in relay.lines if (m := TOO_MANY_ERRORS.search(line.text))
    )
    conn_refused = relay.count(CONN_REFUSED)
    noqueue = Counter(m.group(1) for line in relay.lines if (m := NOQUEUE.search(line.text)))
    lost = Counter(
        f"{m.group(1)} after {m.group(2)}" for line in relay.lines if (m := LOST.search(line.text))
    )
    sent_times = relay.times(SENT)
    refused_times = relay.times(RATE_REFUSED)
    mail_times = sorted(sent_times + refused_times)
    anvil = [m.group(1) for line in relay.lines if (m := ANVIL_STATS.search(line.text))]
    events: Counter[str] = Counter()
    retried_kinds: Counter[str] = Counter()
    lease_waits: list[float] = []
    for w in workers:
        for line in w.lines:
            if m := EVENT.search(line):
                events[m.group(1)] += 1
                if m.group(1) in ("retried", "lease_acquired"):
                    with contextlib.suppress(ValueError):
                        record = json.loads(line[line.index("{") :])
                        if m.group(1) == "retried":
                            retried_kinds[f"{record.get('kind')} {record.get('code')}"] += 1
                        else:
                            lease_waits.append(float(record.get("waited_s") or 0.0))
    rates = [r for _, r in ceilings if r is not None]
    took = finished - started
    ratio = 100 * refused / delivered if delivered else None
    say(
        f"  delivered {delivered:,}/{scenario.messages:,} in {took:.0f} s"
        f" (enqueue {enqueued:.1f} s); duplicates {duplicates}; dead letters"
        f" {sum(dead.values())} {dict(dead) if dead else ''}"
    )
    say(
        f"  MAILs refused by the rate limit (450 4.7.1 too much mail): {refused:,}"
        f" = {'n/a' if ratio is None else f'{ratio:.1f}%'} of delivered;"
        f" refused connections (421 too many connections): {conn_refused}"
    )
    say(
        f"  sessions {s.total:,} (connect lines {relay.count(CONNECT):,}); ended for too many"
        f" errors {killed} {dict(killed_after) if killed_after else ''}; without QUIT"
        f" {s.without_quit}; lost/timeout {dict(lost) if lost else 0}"
    )
    say(
        f"  smtpd commands: {dict(s.commands)}; MAIL {s.mail_ok:,} ok of {s.mail_all:,};"
        f" NOQUEUE rejects {dict(noqueue) if noqueue else 0}"
    )
    say(
        f"  most in any 60 s: delivered {max_in_window(sent_times, 60):,}, MAIL requests"
        f" (delivered + rate-refused) {max_in_window(mail_times, 60):,}"
        f" (limit {scenario.message_rate})"
    )
    say(f"  delivered per minute: {per_minute(sent_times, started)}")
    say(f"  refused per minute:   {per_minute(refused_times, started)}")
    if refused_times:
        first = min(refused_times)
        say(f"  from 3 s before the first refusal, per second ({TIMELINE} s):")
        say(f"    delivered: {per_second(sent_times, first - 3)}")
        say(f"    refused:   {per_second(refused_times, first - 3)}")
        marks = [first - 3 + i for i in range(TIMELINE)]
        say(f"    ceiling:   {' '.join(ceiling_at(ceilings, t) for t in marks)}")
    if anvil:
        say(f"  anvil: {'; '.join(anvil)}")
    say(
        f"  worker events: throttled {events['throttled']}, rate_recovered"
        f" {events['rate_recovered']}, retried {events['retried']}"
        f" {dict(retried_kinds) if retried_kinds else ''}, dead_lettered"
        f" {events['dead_lettered']}; lease waits: max"
        f" {max(lease_waits, default=0.0):.1f} s over {len(lease_waits):,} leases"
    )
    if rates:
        say(
            f"  adaptive ceiling: in force {100 * len(rates) / len(ceilings):.0f}% of the"
            f" samples, min {min(rates):.2f}/s, last {ceilings[-1][1] or 'none'}"
        )
    return {
        "delivered": delivered,
        "duplicates": duplicates,
        "dead": sum(dead.values()),
        "refused": refused,
        "ratio": ratio,
        "sessions": s.total,
        "killed": killed,
        "seconds": took,
    }


# ---- main --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="fast,slow", help="fast (600/min), slow (60/min)")
    parser.add_argument("--fast-rate", type=int, default=600, help="Postfix's limit, per min")
    parser.add_argument("--fast-messages", type=int, default=1500)
    parser.add_argument("--slow-rate", type=int, default=60, help="Postfix's limit, per min")
    parser.add_argument(
        "--minutes",
        type=float,
        default=13.0,
        help="length of the slow run at its limit (messages = slow rate x minutes)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--rate-limit",
        default="",
        help="MAILER_RATE_LIMIT for the workers: a value, or `relay` for Postfix's own limit"
        " (default: none, the adaptive ceiling alone)",
    )
    parser.add_argument(
        "--compare", default="", help="also run the workers and producer of this git ref"
    )
    parser.add_argument(
        "--timeout-factor",
        type=float,
        default=2.5,
        help="give up after this many times the time the limit needs, plus 2 minutes",
    )
    parser.add_argument(
        "--compare-only", action="store_true", help="with --compare: skip this checkout's runs"
    )
    parser.add_argument("--report-every", type=float, default=30.0)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (Postfix's log)")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := set(chosen) - {"fast", "slow"}:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))} (fast, slow)")
    if postfix_binary() is None:
        parser.error("postfix is not installed (apt-get install postfix; `make bench` does)")
    if os.geteuid() != 0:
        parser.error("a private Postfix instance is started with `postfix -c`, as root")
    scenarios = {
        "fast": Scenario("fast", args.fast_rate, args.fast_messages),
        "slow": Scenario("slow", args.slow_rate, int(args.slow_rate * args.minutes)),
    }

    def say(line: str) -> None:
        print(line, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="postfix-bench-"))
    tmp.chmod(0o755)  # Postfix's daemons (user `postfix`) reach their data_directory in it
    try:
        trees = [] if args.compare and args.compare_only else [Tree("this checkout", REPO)]
        if args.compare:
            trees.append(export_tree(args.compare, tmp / "compare"))
        say(
            f"postfix throttle bench: {', '.join(chosen)}; {os.cpu_count()} CPUs,"
            f" load {os.getloadavg()[0]:.1f}; {subprocess.getoutput('postconf -d mail_version')}"
        )
        for name in chosen:
            for i, tree in enumerate(trees):
                run_scenario(scenarios[name], tree, args, tmp / f"{name}-{i}", say)
    finally:
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

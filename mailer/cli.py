"""`mailer` command line: send, show, worker, status, failures, suppressions, relays, webhook,
demo, sink, bench.

Operator commands import the worker side lazily, inside the subcommand, so `import mailer`
stays light for app code.

Longer than most modules because it is one short handler per subcommand; the work itself is
in the modules each handler calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from mailer.config import Settings, redact_url
from mailer.errors import MailerError


def _worker(args: argparse.Namespace, extra: list[str]) -> int:
    from mailer import redisconn
    from mailer.wire import queue_for
    from workers.engine.runtime import ATTEMPTS_PER_SESSION

    settings = Settings.from_env().require_relay()
    # A certificate or login no retry fixes stops the worker here, with one line.
    redisconn.check(settings.broker_url, settings, "MAILER_BROKER_URL", role="worker")
    redisconn.check(settings.redis_url, settings, "MAILER_REDIS_URL", role="worker")
    if settings.fallback:
        from mailer.relays import RelayStore, check_fallback

        with _redis_errors("worker", settings):
            check_fallback(settings, RelayStore(_state_client(settings)))
    concurrency = args.concurrency or settings.worker_connections
    # Reserve as many messages as the runtime runs attempts: with one per thread (Celery's
    # default), a session that ends a message idles through its settle, ack and the next fetch
    # before it has another (bench/README.md, "Figures behind the code").
    prefetch = ["--prefetch-multiplier", str(ATTEMPTS_PER_SESSION)]
    if _has_option(extra, "--prefetch-multiplier"):
        prefetch = []
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        str(concurrency),
        "--queues",
        ",".join(queue_for(lane.name) for lane in settings.lanes),  # highest priority first
        "--task-events",
        "--loglevel",
        args.loglevel,
        "--without-gossip",
        "--without-mingle",
        *prefetch,
    ]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    argv += extra
    os.execv(sys.executable, argv)
    return 0  # pragma: no cover - execv does not return


def _send(args: argparse.Namespace) -> int:
    """One message from flags, or many from --csv / --jsonl (validated before any is queued)."""
    import mailer

    if args.csv or args.jsonl:
        return _send_file(args)
    if not args.to or not args.subject:
        print("mailer send: give --to and --subject, or --csv/--jsonl FILE", file=sys.stderr)
        return 2
    message_id = mailer.send(
        to=args.to,
        subject=args.subject,
        text=args.text,
        html=args.html,
        from_addr=args.from_addr,
        cc=args.cc or None,
        bcc=args.bcc or None,
        reply_to=args.reply_to or None,
        idempotency_key=args.idempotency_key,
        lane=args.lane,
        relay=args.relay,
    )
    print(message_id)
    return 0


def _when(value: Any) -> Any:
    """A file's `send_at`: UNIX seconds, or an ISO 8601 time with its offset."""
    from datetime import datetime

    if not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return value  # due_time names it


def _progress(label: str, done: int, total: int | None, quiet: bool) -> None:
    if quiet:
        return
    if total:
        width = 30
        filled = width * done // total
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r{label} [{bar}] {done:,}/{total:,}")
    else:
        sys.stderr.write(f"\r{label} {done:,}")
    sys.stderr.flush()


def _send_file(args: argparse.Namespace) -> int:
    """Validates and renders every row first, so one bad row refuses the whole file before
    anything is published; then publishes in chunks with `send_many`'s batch tasks. Each row
    has an idempotency key (mailer/bulk.py), so a rerun after a partial failure queues only
    what was not queued."""
    import time

    from mailer.bulk import BadFile, read_rows
    from mailer.client import default_mailer, message_from_mapping
    from mailer.errors import InvalidMessage, PublishError
    from mailer.message import Rendered
    from mailer.schedule import due_time

    path = args.csv or args.jsonl
    if args.chunk_size < 1:
        print("mailer send: --chunk-size must be at least 1", file=sys.stderr)
        return 2
    client = default_mailer()
    started = time.monotonic()
    rendered: list[tuple[Rendered, str, float | None]] = []
    options: dict[str, dict[str, Any]] = {}
    try:
        for number, row in read_rows(path, "csv" if args.csv else "jsonl"):
            try:
                lane = client.lane(row.pop("lane", None) or args.lane)
                due = due_time(_when(row.pop("send_at", None)))
                relay = client.relay(row.pop("relay", None) or args.relay)
                rendered.append((client.render(message_from_mapping(row)), lane, due))
                client.check_portable(rendered[-1][0], relay)
                if relay != "default":
                    options[rendered[-1][0].id] = {"relay": relay}
            except InvalidMessage as exc:
                raise BadFile(number, exc.field, exc.problem) from None
            if len(rendered) % 1000 == 0:
                _progress("validating", len(rendered), None, args.quiet)
    except (BadFile, OSError) as exc:
        if not args.quiet and rendered:
            sys.stderr.write("\n")
        print(f"mailer send: {path}: {exc}; nothing was queued", file=sys.stderr)
        return 2
    _progress("validating", len(rendered), None, args.quiet)
    if not args.quiet:
        sys.stderr.write("\n")
    total = len(rendered)
    queued = 0
    for start in range(0, total, args.chunk_size):
        chunk = rendered[start : start + args.chunk_size]
        try:
            ids = client.publish_rendered(chunk, options=options)
        except PublishError as exc:
            if not args.quiet:
                sys.stderr.write("\n")
            print(
                f"mailer send: {path}: the broker refused rows {start + 1:,}-{total:,} ({exc}); "
                f"{queued:,} of {total:,} rows were queued. Rerun the same file: rows already "
                "queued are not sent twice (idempotency keys)",
                file=sys.stderr,
            )
            return 1
        if args.ids:
            print("\n".join(ids))
        queued += len(chunk)
        _progress("queued    ", queued, total, args.quiet)
    elapsed = time.monotonic() - started
    if not args.quiet and total:
        sys.stderr.write("\n")
    rate = f", {queued / elapsed:,.0f} msg/s" if elapsed > 0 else ""
    print(f"queued {queued:,} messages from {path} in {elapsed:.1f} s{rate}", file=sys.stderr)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    """One line per id; exit 1 if any could not be cancelled (sent, or being sent)."""
    from mailer.client import default_mailer

    client = default_mailer()
    late = 0
    for message_id in args.ids:
        if client.cancel(message_id):
            print(f"{message_id}: cancelled")
        else:
            print(f"{message_id}: too late (sent, or being sent)", file=sys.stderr)
            late += 1
    return 1 if late else 0


def _status(args: argparse.Namespace) -> int:
    from workers.observe.status import collect, render

    settings = Settings.from_env()
    with _redis_errors("status", settings):
        data = collect(settings, relays=args.relays)
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else render(data))
    return 0


class _RedisUnavailable(Exception):
    """Redis could not be reached or refused us; the text is the one line to print."""


@contextmanager
def _redis_errors(command: str, settings: Settings) -> Iterator[None]:
    """Turns a Redis failure into one line naming the (redacted) URL, not a traceback."""
    import redis

    from mailer.redisconn import RedisUnusable

    try:
        yield
    except RedisUnusable as exc:  # already one line: a refused certificate or login
        raise _RedisUnavailable(f"mailer {command}: {exc}") from None
    except (redis.RedisError, OSError) as exc:
        url = redact_url(settings.redis_url)
        if isinstance(exc, redis.AuthenticationError) or any(
            word in str(exc) for word in ("NOAUTH", "WRONGPASS", "invalid password")
        ):
            problem = "refused the credentials (check the password in the URL)"
        elif isinstance(exc, redis.ConnectionError | OSError):
            problem = "is unreachable"
        else:
            problem = f"answered with an error ({type(exc).__name__})"
        raise _RedisUnavailable(f"mailer {command}: Redis at {url} {problem}") from None


def _failures(args: argparse.Namespace) -> int:
    """Dead letters: list | show | retry | purge.

    `retry` is an operator's decision to send again whatever the ledger recorded (this is how a
    message held as "uncertain" is deliberately resent): it forgets the message's ledger record,
    re-queues the stored payload with a fresh age budget and attempt count, and removes the
    dead letter once the broker has it. A "recipients" letter holds only the refused envelope.
    """
    settings = Settings.from_env()
    with _redis_errors("failures", settings):
        return _failures_in(args, settings)


def _failures_in(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from mailer import redisconn
    from mailer.publish import Publisher
    from workers.state.deadletters import DeadLetters
    from workers.state.ledger import Ledger

    settings = Settings.from_env()
    redisconn.check(settings.redis_url, settings, "MAILER_REDIS_URL")
    store = DeadLetters(redisconn.client(settings.redis_url, settings, max_connections=2))
    kinds = set(args.kind or [])
    relays = set(args.relay or [])

    def wanted(d: Any) -> bool:
        return (not kinds or d.kind in kinds) and (not relays or d.relay in relays)

    if args.action == "list":
        scan = args.limit if not relays else 1_000_000  # the newest `limit` of that relay
        letters = [d for d in store.list(limit=scan) if wanted(d)][: args.limit]
        if args.json:
            print(json.dumps([d.summary() for d in letters], indent=2))
            return 0
        print(f"{store.count()} dead letters")
        for d in letters:
            print(
                f"{d.id}  {d.kind:<10} {d.code or '-':>4}  attempts={d.attempts}  "
                f"relay={d.relay}  {d.subject[:40]!r}  {d.text[:60]}"
            )
        return 0
    if args.action == "purge" and not args.ids:
        print(f"purged {store.purge()} dead letters")
        return 0
    ids: list[str] = list(args.ids)
    if not ids and args.all:
        ids = [d.id for d in store.list(limit=1_000_000) if wanted(d)]
    if not ids:
        print("name message ids, or --all", file=sys.stderr)
        return 2
    publisher = Publisher(settings) if args.action == "retry" else None
    missing = 0
    try:
        for message_id in ids:
            letter = store.get(message_id)
            if letter is None:
                print(f"{message_id}: no such dead letter", file=sys.stderr)
                missing += 1
            elif args.action == "show":
                print(json.dumps(letter.summary(), indent=2))
            elif args.action == "purge":
                store.remove(message_id)
                print(f"{message_id}: purged")
            else:
                assert publisher is not None
                if letter.kind == "invalid":
                    print(f"{message_id}: an invalid payload is never replayed", file=sys.stderr)
                    missing += 1
                    continue
                payload = dict(letter.payload)
                payload["meta"] = {**payload.get("meta", {}), "created_at": time.time()}
                store.redis.delete(Ledger.key(message_id))
                publisher.send(payload)
                store.remove(message_id)
                print(f"{message_id}: re-queued")
    finally:
        if publisher is not None:
            publisher.close()
    return 1 if missing else 0


def _show(args: argparse.Namespace) -> int:
    """A message's status: state, transitions, the relay's replies, recipients, events."""
    from mailer.lifecycle import render, status

    code = 0
    for ident in args.ids:
        try:
            st = status(idempotency_key=ident) if args.key else status(ident)
        except ValueError as exc:
            print(f"mailer show: {exc}", file=sys.stderr)
            code = 2
            continue
        print(json.dumps(st.to_dict(), indent=2) if args.json else render(st))
    return code


def _suppressions(args: argparse.Namespace) -> int:
    """The suppression lists: list | add | remove | import (docs/lifecycle.md)."""
    import csv

    from mailer import redisconn
    from workers.state.suppressions import Suppression, Suppressions

    settings = Settings.from_env()
    redisconn.check(settings.redis_url, settings, "MAILER_REDIS_URL")
    from mailer.wire import RELAY_NAME

    if not RELAY_NAME.match(args.relay):
        print(f"mailer suppressions: bad relay name {args.relay!r}", file=sys.stderr)
        return 2
    client = redisconn.client(settings.redis_url, settings, max_connections=2)
    store = Suppressions(client, args.relay)
    group = args.group
    if args.action == "list":
        groups = [group] if group is not None else [None, *store.groups()]
        rows = [s for g in groups for s in store.list(g)]
        if args.json:
            print(json.dumps([s.__dict__ for s in rows], indent=2))
            return 0
        for s in sorted(rows, key=lambda s: (s.group or 0, s.address)):
            scope = "global" if s.group is None else f"group {s.group}"
            print(f"{s.address}  {scope:<10} {s.reason:<18} {s.source}")
        print(f"{len(rows)} suppressed", file=sys.stderr)
        return 0
    if args.action == "import":
        if not args.file:
            print("mailer suppressions import: give --file (CSV: email[,reason])", file=sys.stderr)
            return 2
        import time

        with open(args.file, encoding="utf-8", newline="") as f:
            entries = [
                Suppression(
                    row[0],
                    row[1] if len(row) > 1 and row[1] else args.reason,
                    time.time(),
                    "import",
                    group=group,
                )
                for row in csv.reader(f)
                if row and "@" in row[0]
            ]
        print(f"imported {store.add_many(entries)} addresses")
        return 0
    if not args.addresses:
        print(f"mailer suppressions {args.action}: name one or more addresses", file=sys.stderr)
        return 2
    missing = 0
    for address in args.addresses:
        if "@" not in address:
            print(f"{address}: not an email address", file=sys.stderr)
            missing += 1
        elif args.action == "add":
            store.add(address, args.reason, group)
            print(f"{address}: suppressed")
        elif store.remove(address, group):
            print(f"{address}: removed")
        else:
            print(f"{address}: not suppressed", file=sys.stderr)
            missing += 1
    return 1 if missing else 0


def _state_client(settings: Settings) -> Any:
    from mailer import redisconn

    redisconn.check(settings.redis_url, settings, "MAILER_REDIS_URL")
    return redisconn.client(settings.redis_url, settings, max_connections=2)


def _relays(args: argparse.Namespace) -> int:
    """The relay registry: apply FILE [--replace] | list | show NAME | remove NAME
    (docs/relays.md). Never prints a secret: the registry holds none."""
    settings = Settings.from_env()
    with _redis_errors("relays", settings):
        return _relays_in(args, settings)


def _relays_in(args: argparse.Namespace, settings: Settings) -> int:
    from mailer.relays import DEFAULT_RELAY, RelayStore, load_file

    if args.action == "apply":
        if not args.target:
            print("mailer relays apply: name the TOML file", file=sys.stderr)
            return 2
        # Everything is checked before anything is written (load_file raises on the first
        # problem); the fleet's lanes are this environment's MAILER_LANES.
        specs = load_file(args.target, [lane.name for lane in settings.lanes])
        changes = RelayStore(_state_client(settings)).apply(specs, replace=args.replace)
        for name in changes.added:
            print(f"added    {name}")
        for name, fields in changes.changed.items():
            print(f"changed  {name} ({', '.join(fields)})")
        for name in changes.removed:
            print(f"removed  {name}")
        print(
            f"{len(changes.unchanged)} unchanged; registry version {changes.version}",
            file=sys.stderr,
        )
        return 0
    if args.action != "list" and not args.target:
        print(f"mailer relays {args.action}: name the relay", file=sys.stderr)
        return 2
    if args.target == DEFAULT_RELAY:
        print("default: the workers' environment (MAILER_SMTP_*), not the registry")
        return 0 if args.action == "show" else 2
    store = RelayStore(_state_client(settings))
    if args.action == "remove":
        if store.remove(args.target):
            print(f"removed  {args.target}")
            return 0
        print(f"{args.target}: not a configured relay", file=sys.stderr)
        return 1
    if args.action == "show":
        spec = store.get(args.target)
        if spec is None:
            print(f"{args.target}: not a configured relay", file=sys.stderr)
            return 1
        print(json.dumps({"name": spec.name, **spec.to_dict()}, indent=2))
        return 0
    registry = store.specs()
    if args.json:
        print(json.dumps([{"name": s.name, **s.to_dict()} for s in registry.values()], indent=2))
        return 0
    rows = [("NAME", "HOST", "PORT", "PROFILE", "CAP", "RATE", "FALLBACK")]
    for s in registry.values():
        fallback = f"{s.fallback} ({','.join(s.fallback_lanes)})" if s.fallback else "-"
        cap = str(s.max_connections or "-")
        rows.append((s.name, s.host, str(s.port), s.profile, cap, s.rate_limit or "-", fallback))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    print(f"{len(registry)} relays, and default (the workers' environment)", file=sys.stderr)
    return 0


def _webhook(args: argparse.Namespace) -> int:
    from events.app import serve

    serve(args.host, args.port, args.log_level)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from devkit.demo import run_demo

    return run_demo(count=args.count, per_connection=args.per_connection)


def _sink(args: argparse.Namespace, extra: list[str]) -> int:
    from devkit import sink

    sys.argv = ["mailer sink", *extra]
    sink.main()
    return 0


def _bench(args: argparse.Namespace, extra: list[str]) -> int:
    import runpy

    path = os.path.join(os.getcwd(), "bench", "run.py")
    if not os.path.exists(path):
        print("run `mailer bench` from a checkout (bench/run.py)", file=sys.stderr)
        return 2
    sys.argv = [path, *extra]
    runpy.run_path(path, run_name="__main__")
    return 0


def _has_option(argv: Sequence[str], name: str) -> bool:
    return any(arg == name or arg.startswith(name + "=") for arg in argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("worker", help="start a Celery worker (extra args go to celery)")
    p.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=0,
        help="task threads (default MAILER_WORKER_CONNECTIONS)",
    )
    p.add_argument("--loglevel", "-l", default="INFO")
    p.add_argument("--hostname", "-n", default="")

    p = sub.add_parser(
        "send",
        help="enqueue one message from flags, or many from a CSV or JSONL file",
        description="Columns (CSV) or keys (JSONL) are Message fields: to, subject, text, html, "
        "from_addr, cc, bcc, reply_to, idempotency_key, headers and smtpapi (JSON objects in "
        "CSV); in CSV, to/cc/bcc/reply_to may be ';'-separated lists. Every row is validated "
        "before anything is queued.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--csv", metavar="FILE", help="one message per row (header row first)")
    source.add_argument("--jsonl", metavar="FILE", help="one JSON object per line")
    p.add_argument("--chunk-size", type=int, default=1000, help="messages per send_many call")
    p.add_argument("--ids", action="store_true", help="with a file: print the message ids")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--to", action="append")
    p.add_argument("--subject")
    p.add_argument("--reply-to", action="append")
    p.add_argument("--text")
    p.add_argument("--html")
    p.add_argument("--from", dest="from_addr")
    p.add_argument("--cc", action="append")
    p.add_argument("--bcc", action="append")
    p.add_argument("--idempotency-key")
    p.add_argument(
        "--lane", help="priority lane (MAILER_LANES); a file's `lane` column wins for its row"
    )
    p.add_argument(
        "--relay",
        help="named relay (`mailer relays list`); a file's `relay` column wins for its row",
    )

    p = sub.add_parser("cancel", help="cancel scheduled or still-queued messages")
    p.add_argument("ids", nargs="+", metavar="ID")

    p = sub.add_parser("show", help="a message's status: state, transitions, replies, events")
    p.add_argument("ids", nargs="+", help="message ids (or idempotency keys with --key)")
    p.add_argument("--key", action="store_true", help="the arguments are idempotency keys")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("suppressions", help="suppressed recipients: list | add | remove | import")
    p.add_argument("action", choices=["list", "add", "remove", "import"])
    p.add_argument("addresses", nargs="*")
    p.add_argument("--group", type=int, help="an unsubscribe group (asm_group_id); default global")
    p.add_argument(
        "--relay", default="default", help="the relay (tenant) whose lists; default: default"
    )
    p.add_argument("--reason", default="manual", help="with add/import: why")
    p.add_argument("--file", help="with import: a CSV of email[,reason] rows")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "relays",
        help="named relays: apply FILE [--replace] | list | show NAME | remove NAME",
        description="The relay registry in the state Redis (docs/relays.md). `apply` checks "
        "the whole TOML file before writing anything and prints what changed; workers and "
        "producers pick changes up within seconds, without a restart.",
    )
    p.add_argument("action", choices=["apply", "list", "show", "remove"])
    p.add_argument("target", nargs="?", metavar="FILE|NAME")
    p.add_argument(
        "--replace", action="store_true", help="with apply: remove relays the file does not name"
    )
    p.add_argument("--json", action="store_true", help="with list")

    p = sub.add_parser("webhook", help="serve SendGrid's Event Webhook (POST /webhooks/sendgrid)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8025)
    p.add_argument("--log-level", default="info")

    p = sub.add_parser("status", help="leases, circuit breaker, queue and dead letters")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--relays",
        choices=["active", "all"],
        default="active",
        help="relays listed: those with activity or trouble (default, at most 20), or all",
    )

    p = sub.add_parser("failures", help="dead letters: list | show | retry | purge")
    p.add_argument("action", choices=["list", "show", "retry", "purge"])
    p.add_argument("ids", nargs="*")
    p.add_argument("--all", action="store_true", help="with retry: every dead letter")
    p.add_argument(
        "--kind",
        action="append",
        choices=["permanent", "expired", "uncertain", "recipients"],
        help="with list or retry --all: only these kinds (repeatable)",
    )
    p.add_argument(
        "--relay",
        action="append",
        metavar="NAME",
        help="with list or retry --all: only the dead letters of this relay (repeatable)",
    )
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="send through a real worker; starts Redis and a sink if unset")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument(
        "--per-connection",
        type=int,
        default=0,
        help="rotate sessions after this many messages (default from the environment)",
    )

    sub.add_parser("sink", help="run the development SMTP sink (args: see --help)")
    sub.add_parser("bench", help="run the benchmarks in bench/ (from a checkout)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # worker/sink/bench pass unknown arguments through to the program they start.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("worker", "sink", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handlers: dict[str, Any] = {
        "send": _send,
        "cancel": _cancel,
        "status": _status,
        "failures": _failures,
        "show": _show,
        "suppressions": _suppressions,
        "relays": _relays,
        "webhook": _webhook,
        "demo": _demo,
    }
    try:
        if args.command == "worker":
            return _worker(args, extra)
        if args.command == "sink":
            return _sink(args, extra)
        if args.command == "bench":
            return _bench(args, extra)
        return int(handlers[args.command](args))
    except _RedisUnavailable as exc:
        print(exc, file=sys.stderr)
        return 1
    except MailerError as exc:
        print(f"mailer: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

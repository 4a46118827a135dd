"""`mailer send` as a user runs it: one message from flags, many from CSV/JSONL, against the
test Redis; what the broker holds is read back from the `mailer` list."""

from __future__ import annotations

import base64
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parents[2]


def run_send(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MAILER_BROKER_URL": redis_url,
        "MAILER_DEFAULT_FROM": "Sender <sender@example.com>",
    }
    return subprocess.run(
        [sys.executable, "-m", "mailer", "send", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def queued_tasks(redis_url: str) -> list[tuple[str, list[Any]]]:
    """(task name, args) of every task waiting in the `mailer` queue, oldest first."""
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.lrange("mailer", 0, -1)
    finally:
        client.close()
    tasks = []
    for item in reversed(raw):  # kombu LPUSHes and consumers BRPOP
        envelope = json.loads(item)
        body = json.loads(base64.b64decode(envelope["body"]))
        tasks.append((envelope["headers"]["task"], body[0]))
    return tasks


def queued_payloads(redis_url: str) -> list[dict[str, Any]]:
    payloads: list[dict[str, Any]] = []
    for name, args in queued_tasks(redis_url):
        payloads.extend(args[0] if name == "mailer.send_batch" else [args[0]])
    return payloads


def test_one_message_from_flags(redis_url: str) -> None:
    done = run_send(
        redis_url,
        "--to",
        "a@example.com",
        "--cc",
        "c@example.com",
        "--subject",
        "hi",
        "--text",
        "x",
    )
    assert done.returncode == 0, done.stderr
    [(name, args)] = queued_tasks(redis_url)
    assert name == "mailer.send"
    assert args[0]["id"] == done.stdout.strip()
    assert args[0]["rcpt_to"] == ["a@example.com", "c@example.com"]


def test_jsonl_file_is_queued_in_batches_with_progress_and_summary(
    redis_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "mail.jsonl"
    rows = [
        {"to": f"user{i}@example.com", "subject": f"bulk {i}", "text": f"body {i}\n"}
        for i in range(2500)
    ]
    rows[7]["cc"] = ["x@example.com", "y@example.com"]
    rows[8]["smtpapi"] = {"category": ["newsletter"]}
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")

    done = run_send(redis_url, "--jsonl", str(path), "--chunk-size", "1000", "--ids")
    assert done.returncode == 0, done.stderr
    # The progress bar (text mode turns its \r into \n) and a summary line.
    assert "1,000/2,500" in done.stderr and "2,500/2,500" in done.stderr
    assert "queued 2,500 messages" in done.stderr.splitlines()[-1]

    tasks = queued_tasks(redis_url)
    assert {name for name, _ in tasks} == {"mailer.send_batch"}
    assert len(tasks) == 25  # 100 messages per batch task, not one task per message
    payloads = queued_payloads(redis_url)
    assert [p["meta"]["subject"] for p in payloads] == [r["subject"] for r in rows]
    assert [p["id"] for p in payloads] == done.stdout.split()
    assert payloads[7]["rcpt_to"] == ["user7@example.com", "x@example.com", "y@example.com"]
    assert '"category": ["newsletter"]' in payloads[8]["data"]


def test_csv_file_with_lists_and_json_columns(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "mail.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["to", "cc", "bcc", "subject", "text", "html", "headers"])
        writer.writerow(
            ["a@example.com; b@example.com", "", "audit@example.com", "one", "t1", "", ""]
        )
        writer.writerow(
            [
                "c@example.com",
                "d@example.com",
                "",
                "two, with a comma",
                "line1\nline2",
                "<p>2</p>",
                '{"X-Campaign": "spring"}',
            ]
        )
    done = run_send(redis_url, "--csv", str(path), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "/2" not in done.stderr and "queued 2 messages" in done.stderr
    first, second = queued_payloads(redis_url)
    assert first["rcpt_to"] == ["a@example.com", "b@example.com", "audit@example.com"]
    assert "audit@example.com" not in first["data"]
    assert second["meta"]["subject"] == "two, with a comma"
    assert second["rcpt_to"] == ["c@example.com", "d@example.com"]
    assert "X-Campaign: spring\r\n" in second["data"] and "text/html" in second["data"]


def test_a_bad_row_refuses_the_whole_file_naming_line_and_field(
    redis_url: str, tmp_path: Path
) -> None:
    jsonl = tmp_path / "bad.jsonl"
    lines = [json.dumps({"to": f"u{i}@example.com", "subject": "s", "text": "x"}) for i in range(5)]
    lines[3] = json.dumps({"to": "u3@example.com", "subject": "s", "text": "x", "cc": "not valid"})
    jsonl.write_text("\n".join(lines) + "\n")
    done = run_send(redis_url, "--jsonl", str(jsonl), "--chunk-size", "2")
    assert done.returncode == 2
    assert f"{jsonl}: line 4: cc:" in done.stderr and "nothing was queued" in done.stderr

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text('to,subject,text,colour\na@example.com,s,"multi\nline",\nb@x.com,s,x,red\n')
    done = run_send(redis_url, "--csv", str(bad_csv))
    assert done.returncode == 2
    assert "line 4: colour: not a Message field" in done.stderr  # the row starting on line 4

    not_json = tmp_path / "broken.jsonl"
    not_json.write_text('{"to": "a@example.com", "subject": "s", "text": "x"}\n{oops\n')
    done = run_send(redis_url, "--jsonl", str(not_json))
    assert done.returncode == 2 and "line 2: line: not JSON" in done.stderr
    assert queued_tasks(redis_url) == []

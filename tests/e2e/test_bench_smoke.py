"""`python bench/run.py --smoke`: the benchmark command runs end to end, prints its table and
writes its JSON. Tiny counts; no timing is asserted (machines are shared and noisy). Uses
Postfix's smtp-sink when installed, else our aiosmtpd sink (smtp-source rows are then absent).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SYSTEMS = {"ours single", "ours bulk", "naive Celery", "django-celery-email style"}


def test_bench_smoke_run_prints_its_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "bench/run.py", "--smoke", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "ratio (same run)" in proc.stdout
    assert "RSS per open TLS session" in proc.stdout

    data = json.loads(out.read_text())
    runs = {(r["regime"], r["system"]): r for r in data["runs"]}
    for regime in ("zero", "latency"):
        for system in SYSTEMS:
            run = runs[(regime, system)]
            assert run["complete"], run
            assert run["delivered"] == run["messages"]
            assert f"{system}" in proc.stdout
    assert {item["tls"] for item in data["rss"]} == {False, True}
    for item in data["rss"]:
        assert item["many"]["sessions"] > item["few"]["sessions"], item
    assert set(data["enqueue"]) == {"send", "send_many"}
    assert {r["ratio"] for r in data["ratios"]} >= {
        "zero: ours bulk / naive Celery",
        "zero: ours single / naive Celery",
        "RSS per open TLS session, KiB",
    }

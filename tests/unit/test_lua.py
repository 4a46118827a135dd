"""The Redis scripts of workers/state/lua/: every one compiles in a real redis-server as the code
composes it, every file is used, and a wheel built from the tree carries them all (read back
with importlib.resources from the installed package, not from the checkout)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import redis

from workers import broker
from workers.state import ledger, lifecycle, ratelimit, scripts

REPO = Path(__file__).resolve().parents[2]
LUA = REPO / "workers" / "state" / "lua"

# Every script as the code sends it (a library first where it has one).
SEMAPHORE = {"lease_acquire", "lease_renew", "lease_release"}
LEDGER = [ledger._CLAIM_SCRIPT, ledger._DATA_SCRIPT, ledger._SETTLE_SCRIPT, ledger._RELEASE_SCRIPT]
FETCH = [broker._BEAT, broker._SWEEP, broker._TAKE, broker._MOVE_FIRST]
OTHERS = [ratelimit._SCRIPT, scripts.source("schedule_release")]
OTHERS += [lifecycle.NOTE_SOURCE, lifecycle.EVENT_SOURCE]
LIBRARIES_AND_STEPS = {"fetch_lib", "fetch_beat", "fetch_sweep", "fetch_take", "ledger_lib"}
LIBRARIES_AND_STEPS |= {"status_lib", "status_note", "event_apply"}
STANDALONE = {"fetch_move_first", "ratelimit", "schedule_release"}
LEDGER_FILES = {"ledger_claim", "ledger_data", "ledger_settle", "ledger_release", "ledger_each"}


def test_every_file_is_a_script_the_code_uses() -> None:
    on_disk = sorted(p.stem for p in LUA.glob("*.lua"))
    assert scripts.names() == on_disk
    assert set(on_disk) == SEMAPHORE | LIBRARIES_AND_STEPS | LEDGER_FILES | STANDALONE


def test_every_script_compiles_in_redis(redis_url: str) -> None:
    sources = [scripts.source(name) for name in sorted(SEMAPHORE)]
    sources += [s.source for s in LEDGER] + [s.single for s in LEDGER] + FETCH + OTHERS
    client = redis.Redis.from_url(redis_url)
    try:
        for source in sources:
            sha = client.script_load(source)  # a syntax error is a ResponseError here
            assert client.script_exists(sha) == [True]
    finally:
        client.close()


def test_the_wheel_carries_every_script(tmp_path: Path) -> None:
    """Built offline from a copy of the tree (the checkout stays clean), installed into a
    folder of its own, and read from there by a fresh interpreter."""
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("mailer", "workers", "devkit"):
        shutil.copytree(REPO / name, tree / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")]
    subprocess.run([*build, str(tree)], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)

    probe = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from workers.state import scripts;"
        "print(json.dumps({'file': scripts.__file__,"
        " 'scripts': {n: scripts.source(n) for n in scripts.names()}}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(site)],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    installed = json.loads(out.stdout)
    assert Path(installed["file"]).is_relative_to(site)
    expected = {p.stem: p.read_text(encoding="utf-8") for p in LUA.glob("*.lua")}
    assert installed["scripts"] == expected


def test_every_command_a_script_calls_is_in_the_documented_acl_rule() -> None:
    """Redis checks a script's commands against the caller's ACL: a command the README's rule
    (README, Production Redis) does not grant fails the script for every fleet that applied
    it, which only an end-to-end run under that user would otherwise show."""
    import re

    readme = (REPO / "README.md").read_text()
    rule = readme.split("<!-- acl-rule:", 1)[1].split("```", 2)[1]
    granted = {m.lower() for m in re.findall(r"\+([a-z|]+)", rule)}
    called: dict[str, set[str]] = {}
    for path in LUA.glob("*.lua"):
        for command in re.findall(r"redis\.call\('([A-Za-z]+)'", path.read_text()):
            called.setdefault(command.lower(), set()).add(path.name)
    missing = {c: sorted(files) for c, files in called.items() if c not in granted}
    assert called and missing == {}, f"not in the README's ACL rule: {missing}"

"""docker-compose.yml without a Docker engine: the file is parsed, and every command it names is
run for real from this checkout (or, for Flower, checked against Flower's own options), so the
stack cannot name a subcommand or flag that does not exist. The README must show the same
processes by hand."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from devkit.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
# Flags that only make sense inside the compose network (bind every interface, the container's
# DNS name in the certificate); the by-hand commands run on localhost without them.
CONTAINER_ONLY_FLAGS = {"--host", "--hostname"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and "services" in data
    return data


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def seconds(value: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", value)
    assert match and any(match.groups()), f"not a compose duration: {value!r}"
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def flags(command: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in command if arg.startswith("--")}


def option(command: list[str], name: str) -> str:
    for i, arg in enumerate(command):
        if arg == name:
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {command}")


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> str:
    proc = subprocess.run(
        args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_services_have_the_production_shape(compose: dict[str, Any]) -> None:
    from workers.app import RUNTIME_CLOSE_TIMEOUT, SOFT_SHUTDOWN_TIMEOUT

    svc = services(compose)
    assert {"redis", "worker", "flower", "sink", "dev-worker", "producer"} <= set(svc)

    redis_cmd = svc["redis"]["command"]
    assert option(redis_cmd, "--appendonly") == "yes"
    assert option(redis_cmd, "--maxmemory-policy") == "noeviction"
    assert "redis-cli" in svc["redis"]["healthcheck"]["test"]

    for name in ("worker", "dev-worker"):
        worker = svc[name]
        assert worker["command"] == ["mailer", "worker"]
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert ".env" in worker["env_file"]
        # Scales with --scale: no fixed name, no host port that two replicas would fight over.
        assert "container_name" not in worker and "ports" not in worker
        assert worker["environment"]["MAILER_METRICS_PORT"] in [str(p) for p in worker["expose"]]
        assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
        grace = seconds(worker["stop_grace_period"])
        assert grace >= SOFT_SHUTDOWN_TIMEOUT + RUNTIME_CLOSE_TIMEOUT

    flower = svc["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH")
    assert option(flower["command"], "--enable_events") == "True"
    # Flower and the producer never get the worker's .env (the API key).
    assert "env_file" not in flower and "env_file" not in svc["producer"]


def test_profiles_keep_development_mail_away_from_the_relay(compose: dict[str, Any]) -> None:
    svc = services(compose)
    assert svc["worker"]["profiles"] == ["relay"]
    for name in ("sink", "dev-worker", "producer"):
        assert svc[name]["profiles"] == ["dev"]
    assert "profiles" not in svc["redis"] and "profiles" not in svc["flower"]

    sink, dev = svc["sink"]["command"], svc["dev-worker"]["environment"]
    assert dev["MAILER_SMTP_HOST"] == option(sink, "--hostname")  # in the sink's certificate
    assert dev["MAILER_SMTP_PORT"] == option(sink, "--port")
    assert dev["MAILER_SMTP_TLS"] == option(sink, "--tls") == "starttls"
    user, password = option(sink, "--auth").split(":", 1)
    assert (dev["MAILER_SMTP_USERNAME"], dev["MAILER_SMTP_PASSWORD"]) == (user, password)
    # The CA the sink writes into --tls-dir reaches the workers through the same volume.
    tls_dir = option(sink, "--tls-dir")
    (sink_volume,) = [v for v in svc["sink"]["volumes"] if v.split(":")[1] == tls_dir]
    volume = sink_volume.split(":")[0]
    mounts = [v.split(":") for v in svc["dev-worker"]["volumes"]]
    (mount,) = [m[1] for m in mounts if m[0] == volume]
    assert Path(dev["MAILER_SMTP_CA_FILE"]).parent == Path(mount)
    assert svc["dev-worker"]["depends_on"]["sink"]["condition"] == "service_healthy"


def test_every_mailer_subcommand_exists(compose: dict[str, Any]) -> None:
    from mailer.cli import build_parser

    commands = [s["command"] for s in services(compose).values() if "command" in s]
    mailer_commands = [c for c in commands if c[0] == "mailer"]
    assert {c[1] for c in mailer_commands} >= {"worker", "sink", "send"}
    for command in mailer_commands:
        run([sys.executable, "-m", "mailer", command[1], "--help"])
        if command[1] in ("worker", "send"):
            build_parser().parse_args(command[1:])  # every flag is one of ours


def test_mailer_worker_runs_the_threads_pool_with_task_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mailer import cli

    captured: list[list[str]] = []
    monkeypatch.setenv("MAILER_SMTP_PASSWORD", "SG.compose-test-key")
    monkeypatch.setattr(cli.os, "execv", lambda _path, argv: captured.append(list(argv)))
    cli.main(["worker"])
    (argv,) = captured
    assert argv[1:6] == ["-m", "celery", "-A", "workers.app", "worker"]
    assert option(argv, "--pool") == "threads"
    assert "--task-events" in argv  # Flower sees every task and every retry


def test_sink_command_and_its_healthcheck_run(compose: dict[str, Any], tmp_path: Path) -> None:
    svc = services(compose)["sink"]
    port = free_port()
    command = [
        {"0.0.0.0": "127.0.0.1", "2525": str(port), "/tls": str(tmp_path)}.get(arg, arg)
        for arg in svc["command"]
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on"), line + proc.stdout.read()
        assert (tmp_path / "ca.pem").exists()
        check = svc["healthcheck"]["test"]
        assert check[:2] == ["CMD", "python"]
        run([sys.executable, *check[2:-1], check[-1].replace("2525", str(port))])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_producer_command_enqueues_one_message(compose: dict[str, Any], redis_url: str) -> None:
    command = services(compose)["producer"]["command"]
    out = run([sys.executable, "-m", *command], env={"MAILER_BROKER_URL": redis_url})
    assert re.fullmatch(r"[0-9a-f]{32}\n", out), out
    assert redis.Redis.from_url(redis_url).llen("mailer") == 1


def test_flower_command_exists_and_takes_every_option(compose: dict[str, Any]) -> None:
    command = services(compose)["flower"]["command"]
    assert command[:4] == ["celery", "-A", "workers.app", "flower"]
    run([sys.executable, "-m", "celery", "-A", "workers.app", "flower", "--help"])
    import flower.options  # noqa: F401  (defines Flower's options)
    from tornado.options import options

    known = set(options.as_dict())
    for flag in flags(command):
        assert flag[2:].replace("-", "_") in known, f"Flower has no option {flag}"
    # FLOWER_BASIC_AUTH is how compose passes the credentials: Flower reads FLOWER_<OPTION>.
    assert "basic_auth" in known


def test_redis_command_runs_with_aof_and_noeviction(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    command = services(compose)["redis"]["command"]
    port = free_port()
    extra = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", ""]
    proc = subprocess.Popen([*command, *extra], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    finally:
        client.close()
        proc.terminate()
        proc.wait(20)


def _by_hand() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running by hand", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert blocks, "README: no commands under 'Running by hand'"
    return "\n".join(blocks).replace("\\\n", " ")


def test_readme_runs_the_same_processes_by_hand(compose: dict[str, Any]) -> None:
    text = _by_hand()
    lines = text.splitlines()
    for name, service in services(compose).items():
        command = service["command"]
        program = " ".join(command[:4] if command[0] == "celery" else command[:2])
        if command[0] == "redis-server":
            program = "redis-server"
        matching = [line for line in lines if program in line]
        assert matching, f"README does not run {name} ({program}) by hand"
        shown = " ".join(matching)
        for flag in flags(command) - CONTAINER_ONLY_FLAGS:
            assert flag in shown, f"README's {program} lacks {flag} (compose service {name})"
        for var in service.get("environment", {}):
            if var.startswith("MAILER_SMTP_") or var == "FLOWER_BASIC_AUTH":
                assert var in shown, f"README's {program} does not set {var}"
    readme = (ROOT / "README.md").read_text()
    assert "docker compose --profile relay up -d --scale worker=" in readme
    assert "docker compose --profile dev up" in readme


def test_every_interpolated_variable_is_in_env_example(compose: dict[str, Any]) -> None:
    raw = COMPOSE.read_text()
    example = (ROOT / ".env.example").read_text()
    defined = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.M))
    for name, default in re.findall(r"\$\{([A-Z_][A-Z0-9_]*)(:-)?", raw):
        assert default or name in defined, f"${{{name}}} is neither defaulted nor in .env.example"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_image_runs_every_service_as_a_user(compose: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"pip install .*flower", dockerfile), "the image must include Flower"
    assert "ARG EXTRAS" in dockerfile, "the dev profile's image adds devkit's extra"
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    assert 'CMD ["mailer", "worker"]' in dockerfile
    for name, service in services(compose).items():
        build = service.get("build")
        context = build.get("context") if isinstance(build, dict) else build
        assert context == "." or service.get("image", "").startswith("redis"), name
    dev = services(compose)["sink"]["build"]
    assert dev["args"]["EXTRAS"] == "devkit", "the sink needs devkit's extra (aiosmtpd, trustme)"

"""deploy/: the compose file validates with docker-compose (no engine needed), the example
configs load with the node's own loader, Dockerfiles copy paths that exist and run CLI
commands that exist, and the systemd units pass systemd-analyze."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from node.cli import _setup_argparser
from node.config import load_config
from tests.services import require_service, require_tool

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
ALL_PROFILES = ["--profile", "demo", "--profile", "multi-gpu", "--profile", "cpu"]
SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "PTX_HTTP_TOKEN": "http-secret"}


def _compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = require_tool("docker-compose")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PTX_", "POSTGRES_"))}
    return subprocess.run([binary, "-f", str(COMPOSE), *ALL_PROFILES, *args], cwd=DEPLOY,
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)


def test_compose_file_validates() -> None:
    quiet = _compose("config", "-q", env=SECRETS)
    assert quiet.returncode == 0, quiet.stderr
    services = _compose("config", "--services", env=SECRETS)
    assert set(services.stdout.split()) == {
        "postgres", "redis", "node", "gpu-worker", "gpu-worker-1", "cpu-worker", "orthanc", "ohif",
    }
    full = _compose("config", env=SECRETS).stdout
    assert full.count("driver: nvidia") == 2  # both GPU workers reserve a device
    assert "postgresql+psycopg://ptx:pg-secret@postgres:5432/ptx" in full
    assert "PTX_NODE_HTTP__TOKEN: http-secret" in full


def test_compose_refuses_to_run_without_secrets() -> None:
    missing = _compose("config", "-q", env={"PTX_HTTP_TOKEN": "x"})
    assert missing.returncode != 0
    assert "POSTGRES_PASSWORD" in missing.stderr


@pytest.mark.parametrize("relative", ["node.toml", "demo/node.toml"])
def test_example_configs_load(relative: str) -> None:
    config = load_config(DEPLOY / relative, environ={"PTX_NODE_HTTP__TOKEN": "t" * 16})
    assert config.broker_url.startswith("redis://")
    assert config.database_url.startswith("postgresql+psycopg://")
    assert config.worker.embedded_workers == 0  # production: workers are separate processes
    assert config.http.bind_address == "0.0.0.0" and config.http.token == "t" * 16
    assert config.destinations


def _dockerfiles() -> list[Path]:
    return sorted([*DEPLOY.glob("docker/*.Dockerfile"), DEPLOY / "ohif" / "Dockerfile"])


@pytest.mark.parametrize("dockerfile", _dockerfiles(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_dockerfiles_copy_existing_paths(dockerfile: Path) -> None:
    copies = [line.split()[1:-1] for line in dockerfile.read_text().splitlines()
              if line.startswith("COPY ") and "--from=" not in line]
    assert copies, f"{dockerfile} copies nothing"
    for sources in copies:
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"


def test_container_and_unit_commands_exist_in_the_cli() -> None:
    files = [*_dockerfiles(), *DEPLOY.glob("systemd/*.service")]
    lines = [line for p in files for line in p.read_text().splitlines() if line.startswith(("CMD", "ExecStart"))]
    commands = [m.group(1) for line in lines for m in [re.search(r"ptx-node ((?:serve|worker|db)[^'\]]*)", line)] if m]
    assert {c.split()[0] for c in commands} == {"serve", "worker", "db"}, commands
    for command in commands:
        argv = [a.strip('"\\') for a in command.split() if a.strip('"\\')]
        argv = ["cuda" if "PTX_WORKER_DEVICE" in a else "/etc/ptx-node/node.toml" if "PTX_NODE_CONFIG" in a else a
                for a in argv]
        _setup_argparser(argv)  # exits (fails the test) on an unknown command or flag


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    require_service(analyze is not None, "systemd-analyze", "apt-get install systemd")
    units = []
    for unit in DEPLOY.glob("systemd/*.service"):
        # A template unit is verified as one of its instances.
        target = tmp_path / unit.name.replace("@.service", "@0.service")
        target.write_text(unit.read_text())
        units.append(target)
    assert len(units) == 2
    result = subprocess.run([analyze, "verify", *map(str, units)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                # The install prefix does not exist on a test machine.
                if line.strip() and "/opt/ptx-node/venv/bin/ptx-node is not executable" not in line]
    assert not problems, problems  # (exit status is 1 for the missing install prefix alone)

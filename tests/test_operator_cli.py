"""The admin's command line, as an admin runs it (subprocesses of `ptx-node`), in production
mode where the item is about production: PostgreSQL job database, Redis broker.

Issue 14: `-c` where the help shows it, commands that name the database they read,
`config check` running every check `serve` runs, one-line errors, environment overrides,
`resend` to an unknown destination, `jobs` marks, `db upgrade`'s message, `--version`,
`workers` flagging settings that differ from the node's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from node.config import load_config, write_config_file
from node.db import Job, JobStatus, WorkerRecord, get_sessionmaker, migrate, utcnow
from node.demo.pacs import free_port

REPO = Path(__file__).resolve().parents[1]


def ptx_node(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PTX_NODE_")}
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**clean, **(env or {})})


def production_config(tmp_path: Path, postgres_url: str, redis_url: str, **sections: Any) -> Path:
    data: dict[str, Any] = {
        "spool_dir": str(tmp_path / "spool"),
        "database_url": postgres_url,
        "broker_url": redis_url,
        "scp": {"port": free_port()},
        "model": {"allow_untrained": True, "device": "cpu"},
        "worker": {"embedded_workers": 0},
        "http": {"enabled": False},
        "destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": free_port()}],
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values} if isinstance(values, dict) else values
    return write_config_file(tmp_path / "node.toml", data)


def add_job(database_url: str, **values: Any) -> int:
    with get_sessionmaker(database_url)() as session:
        job = Job(sop_instance_uid=values.pop("sop_instance_uid", "1.2.826.0.1.3680043.8.498.1"), **values)
        session.add(job)
        session.commit()
        return job.id


# --- -c and the database each command reads ------------------------------------------------------------


def _head_revision() -> str:
    """The newest migration, read from the scripts (several issues add migrations)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    import node.db

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(node.db.__file__).parent / "migrations"))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def test_config_option_works_before_the_nested_subcommand(tmp_path: Path, postgres_url: str, redis_url: str) -> None:
    cfg = production_config(tmp_path, postgres_url, redis_url)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    # An empty database is not the node's: reading jobs from it creates nothing.
    empty = ptx_node("jobs", "-c", str(cfg), cwd=workdir)
    assert empty.returncode == 1 and "holds no ptx-node jobs" in empty.stderr, empty.stderr
    # The form `ptx-node db --help` shows: -c before `upgrade`.
    upgraded = ptx_node("db", "-c", str(cfg), "upgrade", cwd=workdir)
    assert upgraded.returncode == 0, upgraded.stderr
    head = _head_revision()
    assert f"created the schema at revision {head}" in upgraded.stdout
    assert postgres_url.rsplit("/", 1)[1] in upgraded.stdout  # names the database it migrated
    assert not list(workdir.rglob("*.sqlite")), "a SQLite file appeared in the working directory"
    again = ptx_node("db", "upgrade", "-c", str(cfg), cwd=workdir)
    assert again.returncode == 0 and f"schema is current (revision {head})" in again.stdout

    job_id = add_job(postgres_url, status=JobStatus.DONE, modality="CR")
    shown = ptx_node("jobs", "-c", str(cfg), "show", str(job_id), cwd=workdir)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == job_id
    shown_after = ptx_node("jobs", "show", str(job_id), "-c", str(cfg), cwd=workdir)
    assert json.loads(shown_after.stdout)["database"].endswith(postgres_url.rsplit("/", 1)[1])


def test_without_a_config_commands_say_which_database_and_invent_none(tmp_path: Path) -> None:
    listing = ptx_node("jobs", cwd=tmp_path)
    assert listing.returncode == 1
    expected = tmp_path / "var" / "ptx-node.sqlite"
    assert f"no job database at {expected}" in listing.stderr
    assert "PTX_NODE_CONFIG" in listing.stderr and len(listing.stderr.strip().splitlines()) == 1
    assert not expected.exists()

    cfg = write_config_file(tmp_path / "node.toml", {"database_url": f"sqlite:///{tmp_path / 'jobs.sqlite'}"})
    migrate(load_config(cfg, environ={}).database_url)
    from_env = ptx_node("jobs", cwd=tmp_path, env={"PTX_NODE_CONFIG": str(cfg)})
    assert from_env.returncode == 0, from_env.stderr
    assert from_env.stdout.splitlines()[0] == f"database: sqlite:///{tmp_path / 'jobs.sqlite'}"
    assert "(no jobs)" in from_env.stdout


def test_version() -> None:
    out = ptx_node("--version", cwd=REPO)
    assert out.returncode == 0 and out.stdout.startswith("ptx-node 0.")


# --- config check = serve's checks, one-line errors ------------------------------------------------------


def test_config_check_refuses_what_serve_refuses_with_the_same_line(tmp_path: Path) -> None:
    deploy = REPO / "deploy" / "node.toml"
    checked = ptx_node("config", "check", str(deploy), "--no-connect", cwd=tmp_path)
    assert checked.returncode == 2
    exposure = [line for line in checked.stderr.splitlines() if "http.bind_address is 0.0.0.0" in line]
    assert len(exposure) == 1 and "Traceback" not in checked.stderr

    cfg = tmp_path / "node.toml"
    port = free_port()
    cfg.write_text(deploy.read_text().replace("port = 11112", f"port = {port}"))
    served = ptx_node("serve", "-c", str(cfg), "--allow-untrained", cwd=tmp_path, timeout=60)
    assert served.returncode == 2
    assert exposure[0] in served.stderr.splitlines(), served.stderr
    assert "Traceback" not in served.stderr and "ptx-node ready" not in served.stdout

    # With a token, the check goes on to the database: deploy's PostgreSQL host does not resolve here.
    with_token = ptx_node("config", "check", str(deploy), cwd=tmp_path, env={"PTX_NODE_HTTP__TOKEN": "a-long-token-0123456789"})
    assert with_token.returncode == 2
    assert [line for line in with_token.stderr.splitlines() if line.startswith("ptx-node: cannot use the job database")]


def test_serve_and_jobs_on_a_missing_postgresql_database_print_one_line(tmp_path: Path, postgres_url: str,
                                                                       redis_url: str) -> None:
    missing = postgres_url.rsplit("/", 1)[0] + "/ptx_no_such_database"
    cfg = production_config(tmp_path, missing, redis_url)
    for args in (("serve", "-c", str(cfg)), ("jobs", "-c", str(cfg)), ("db", "upgrade", "-c", str(cfg))):
        out = ptx_node(*args, cwd=tmp_path, timeout=60)
        assert out.returncode != 0, args
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, (args, out.stderr)
        assert "ptx_no_such_database" in lines[0] and "does not exist" in lines[0], lines


def test_config_check_of_a_production_config_contacts_postgresql_and_redis(tmp_path: Path, postgres_url: str,
                                                                           redis_url: str) -> None:
    good = ptx_node("config", "check", str(production_config(tmp_path, postgres_url, redis_url)), cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert "ready to serve" in good.stderr
    dead_redis = production_config(tmp_path, postgres_url, f"redis://127.0.0.1:{free_port()}/7")
    bad = ptx_node("config", "check", str(dead_redis), cwd=tmp_path)
    assert bad.returncode == 2
    assert [line for line in bad.stderr.splitlines() if line.startswith("ptx-node: cannot reach the broker redis://")]


def test_a_config_typo_gets_a_suggestion(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text("[worker]\nembeded_workers = 0\n")
    out = ptx_node("config", "check", str(cfg), cwd=tmp_path)
    assert out.returncode == 2
    assert "unknown key `embeded_workers` (did you mean `embedded_workers`?)" in out.stderr
    assert "Extra inputs" not in out.stderr


# --- environment overrides --------------------------------------------------------------------------------


def test_environment_values_follow_one_syntax_and_errors_name_the_variable(tmp_path: Path) -> None:
    env = {
        "PTX_NODE_HTTP__TOKEN": "1234567890123456",  # a string field takes digits as a string
        "PTX_NODE_SCP__PORT": "11113",
        "PTX_NODE_MODEL__ALLOW_UNTRAINED": "true",
        "PTX_NODE_SCP__ALLOWED_CALLERS": '[{"ae_title": "ORTHANC", "host": "10.0.0.5"}]',
    }
    out = ptx_node("config", "check", "--no-connect", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    effective = json.loads(out.stdout)
    assert effective["http"]["token"] == "***" and effective["scp"]["port"] == 11113
    assert effective["scp"]["allowed_callers"] == [{"ae_title": "ORTHANC", "host": "10.0.0.5"}]
    config = load_config(None, environ=env)
    assert config.http.token == "1234567890123456"

    cases = {
        "PTX_NODE_SCP__PORT": ("eleven", "PTX_NODE_SCP__PORT: scp.port: Input should be a valid integer"),
        "PTX_NODE_SCP__ALLOWED_CALLERS": ('[{ ae_title = "X" }]', "PTX_NODE_SCP__ALLOWED_CALLERS: lists and tables are given as JSON"),
        "PTX_NODE_SCP__PROT": ("1", "PTX_NODE_SCP__PROT: unknown setting `scp.prot` (did you mean `PTX_NODE_SCP__PORT`?)"),
    }
    for variable, (value, message) in cases.items():
        bad = ptx_node("config", "check", "--no-connect", cwd=tmp_path, env={**env, variable: value})
        assert bad.returncode == 2, variable
        assert message in bad.stderr, bad.stderr
        assert "built-in defaults: " not in bad.stderr  # reported against the variable, not a file


def test_deploy_files_keep_their_own_variables_out_of_the_config_prefix() -> None:
    import re

    from node.config import ConfigError

    deploy = REPO / "deploy"
    texts = [p.read_text() for p in [deploy / "docker-compose.yml", deploy / ".env.example", deploy / "README.md",
                                     *deploy.glob("systemd/*")]]
    names = {name for text in texts for name in re.findall(r"\bPTX_NODE_[A-Z0-9_]*[A-Z0-9]", text)}
    assert "PTX_NODE_DATABASE_URL" in names and "PTX_NODE_TOML" not in names
    for name in names - {"PTX_NODE_CONFIG"}:
        try:
            load_config(None, environ={name: "x"})
        except ConfigError as exc:  # a bad value is fine here; an unknown name is not
            assert "unknown setting" not in str(exc), name


# --- resend, jobs, workers -------------------------------------------------------------------------------


def test_resend_to_an_unknown_destination_fails_and_lists_destinations(tmp_path: Path, postgres_url: str,
                                                                       redis_url: str) -> None:
    cfg = production_config(tmp_path, postgres_url, redis_url)
    migrate(postgres_url)
    job_id = add_job(postgres_url, status=JobStatus.DONE, delivered_at=utcnow())
    out = ptx_node("resend", str(job_id), "--destination", "pcas", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode == 2
    assert "no destination 'pcas'; configured destinations: pacs" in out.stderr
    with get_sessionmaker(postgres_url)() as session:
        assert session.get(Job, job_id).status == JobStatus.DONE  # untouched


def test_jobs_shows_the_lease_holder_and_marks_untrained_results(tmp_path: Path, postgres_url: str,
                                                                redis_url: str) -> None:
    cfg = production_config(tmp_path, postgres_url, redis_url)
    migrate(postgres_url)
    import datetime as dt

    add_job(postgres_url, status=JobStatus.RUNNING, worker="gpu-box-2:4711",
            lease_until=utcnow() + dt.timedelta(seconds=60), sop_instance_uid="1.2.3.1")
    add_job(postgres_url, status=JobStatus.DONE, positive=True, max_probability=0.62, untrained=True,
            sop_instance_uid="1.2.3.2")
    add_job(postgres_url, status=JobStatus.DONE, positive=False, max_probability=0.1, untrained=False,
            sop_instance_uid="1.2.3.3", worker="gpu-box-1:1")
    out = ptx_node("jobs", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "WORKER" in lines[1]
    running = next(line for line in lines if " RUNNING " in line)
    assert "gpu-box-2:4711" in running
    untrained = next(line for line in lines if "0.62" in line)
    assert "PTX (UNTRAINED)" in untrained
    trained = next(line for line in lines if "0.10" in line)
    assert "UNTRAINED" not in trained and "gpu-box-1:1" not in trained  # a finished job holds no lease
    assert "(UNTRAINED): made by an untrained network" in out.stdout


def test_workers_flags_settings_that_differ_from_the_node(tmp_path: Path, postgres_url: str, redis_url: str) -> None:
    cfg = production_config(tmp_path, postgres_url, redis_url)
    node = load_config(cfg, environ={})
    other = load_config(cfg, environ={"PTX_NODE_DELIVERY__MAX_ATTEMPTS": "2"})
    assert node.shared_settings_digest() != other.shared_settings_digest()
    assert node.shared_settings_digest() == load_config(cfg, environ={"PTX_NODE_SCP__PORT": "1"}).shared_settings_digest()
    migrate(postgres_url)
    now = utcnow()
    with get_sessionmaker(postgres_url)() as session:
        session.add_all([
            WorkerRecord(name="same:1", device="cuda", last_seen=now, settings_digest=node.shared_settings_digest()),
            WorkerRecord(name="stale:2", device="cuda", last_seen=now, settings_digest=other.shared_settings_digest()),
            WorkerRecord(name="broken:3", device="cuda", last_seen=now, settings_digest=node.shared_settings_digest(),
                         serving_error="model.device is cuda but CUDA is not available", serving_error_code="device_unavailable"),
        ])
        session.commit()
    out = ptx_node("workers", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[2:]}
    assert "same as node" in rows["same:1"] and "alive" in rows["same:1"]
    assert "DIFFERENT from the node" in rows["stale:2"]
    assert "cannot serve: model.device is cuda" in rows["broken:3"]
    listing = json.loads(ptx_node("workers", "--json", "-c", str(cfg), cwd=tmp_path).stdout)
    assert listing["settings_digest"] == node.shared_settings_digest()
    assert {w["name"]: w["alive"] for w in listing["workers"]} == {"same:1": True, "stale:2": True, "broken:3": False}


@pytest.mark.parametrize("device", ["cuda"])
def test_a_worker_that_cannot_serve_exits_at_once_with_one_line(tmp_path: Path, postgres_url: str, redis_url: str,
                                                                device: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: `--device cuda` is not impossible here")
    cfg = production_config(tmp_path, postgres_url, redis_url)
    migrate(postgres_url)
    out = ptx_node("worker", "-c", str(cfg), "--device", device, cwd=tmp_path, timeout=60)
    assert out.returncode == 3
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert lines == ["ptx-node worker: cannot serve: model.device is cuda but CUDA is not available on this machine "
                     "(no GPU, driver or CUDA-enabled torch); use --device cpu or fix the driver"], out.stderr
    with get_sessionmaker(postgres_url)() as session:
        (record,) = session.query(WorkerRecord).all()
    assert record.serving_error_code == "device_unavailable" and record.device == "cuda"

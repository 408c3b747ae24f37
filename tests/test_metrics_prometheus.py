"""Metrics a Prometheus user can alert on (issue 14): counters that never go down (not after
`resend`, not when job rows are pruned), every family documented in deploy/README.md with
its type and labels, the shipped alert rules valid for `promtool`, and a real Prometheus
scraping the node's /metrics with the token and evaluating those rules."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete

from node.config import NodeConfig, load_config
from node.db import Job, WorkerRecord, get_sessionmaker, migrate, utcnow
from node.demo.pacs import free_port, wait_until
from node.http import HttpServerHandle, start_http_server
from node.intake import accept_instance
from node.metrics import COUNTERS, count_event
from tests.services import pydicom_file, require_tool

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus" / "ptx-node-rules.yml"
TOKEN = "metrics-test-token"


@pytest.fixture
def config(tmp_path: Path) -> NodeConfig:
    config = load_config(None, environ={}, overrides={
        "database_url": f"sqlite:///{tmp_path / 'jobs.sqlite'}", "spool_dir": str(tmp_path / "spool"),
        "broker_url": f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
        "http": {"port": 0, "token": TOKEN}, "model": {"allow_untrained": True},
    })
    migrate(config.database_url)
    return config


@pytest.fixture
def server(config: NodeConfig) -> Iterator[HttpServerHandle]:
    handle = start_http_server(config)
    try:
        yield handle
    finally:
        handle.stop()


def scrape(server: HttpServerHandle) -> tuple[dict, dict[tuple[str, tuple], float]]:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    return families, samples


def receive(config: NodeConfig, count: int) -> None:
    source = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm"))
    for i in range(count):
        source.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.14{i}"
        accept_instance(source, file_meta=source.file_meta, config=config, calling_ae="ORTHANC")


def documented_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """deploy/README.md's metrics table: name -> (type, label names)."""
    text = (REPO / "deploy" / "README.md").read_text()
    rows = re.findall(r"^\| `(ptx_[a-z_]+)(?:\{([a-z_,]*)\})?` \| (counter|gauge|histogram) \|", text, re.MULTILINE)
    return {name: (kind, frozenset(filter(None, labels.split(",")))) for name, labels, kind in rows}


def test_counters_never_decrease_when_rows_are_pruned(config: NodeConfig, server: HttpServerHandle) -> None:
    receive(config, 3)
    for _ in range(2):
        count_event(config.database_url, "ptx_delivery_retries_total", {"destination": "pacs"})
    _, before = scrape(server)
    assert before[("ptx_jobs_received_total", (("source", "dimse"),))] == 3
    assert before[("ptx_delivery_retries_total", (("destination", "pacs"),))] == 2
    assert before[("ptx_jobs", (("status", "RECEIVED"),))] == 3
    with get_sessionmaker(config.database_url)() as session:  # what a retention clean-up does
        session.execute(delete(Job))
        session.commit()
    _, after = scrape(server)
    assert after[("ptx_jobs", (("status", "RECEIVED"),))] == 0  # a level: goes down
    assert after[("ptx_jobs_received_total", (("source", "dimse"),))] == 3  # a count: does not
    assert after[("ptx_delivery_retries_total", (("destination", "pacs"),))] == 2
    receive(config, 1)
    _, later = scrape(server)
    assert later[("ptx_jobs_received_total", (("source", "dimse"),))] == 4


def test_every_metric_is_documented_with_its_type_and_labels(config: NodeConfig, server: HttpServerHandle) -> None:
    receive(config, 1)
    for name, (_, labels) in COUNTERS.items():  # one event of each kind, so every label set shows
        count_event(config.database_url, name, {label: "x" for label in labels})
    with get_sessionmaker(config.database_url)() as session:
        session.add(WorkerRecord(name="w:1", device="cpu", last_seen=utcnow()))
        session.add(WorkerRecord(name="w:2", device="cuda", last_seen=utcnow(), serving_error="no CUDA",
                                 serving_error_code="device_unavailable"))
        session.commit()
    families, _ = scrape(server)
    documented = documented_metrics()
    exposed: dict[str, tuple[str, frozenset[str]]] = {}
    for family in families.values():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = frozenset(label for s in family.samples for label in s.labels if label != "le")
        exposed[name] = (family.type, labels)
    for name, (kind, labels) in exposed.items():
        assert name in documented, f"{name} is served but not in deploy/README.md's metrics table"
        assert documented[name][0] == kind, name
        assert labels <= documented[name][1], (name, labels, documented[name][1])
    missing = set(documented) - set(exposed) - {"ptx_stow_instances_total"}  # only after a STOW-RS upload
    assert not missing, f"documented but not served: {missing}"


def test_alert_rules_are_valid_promql() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    rules = RULES.read_text()
    # A counter is alerted on with increase(); a level (gauge) never is.
    gauges = [name for name, (kind, _) in documented_metrics().items() if kind == "gauge"]
    for expr in re.findall(r"expr: (.+)", rules):
        for inner in re.findall(r"increase\((\w+)", expr):
            assert inner not in gauges, f"increase() on the gauge {inner}: {expr}"
    readme = (REPO / "deploy" / "README.md").read_text()
    assert "increase(ptx_jobs{" not in readme


def test_a_real_prometheus_scrapes_the_node_and_evaluates_the_rules(tmp_path: Path, config: NodeConfig,
                                                                    server: HttpServerHandle) -> None:
    prometheus = require_tool("prometheus")
    receive(config, 2)
    token_file = tmp_path / "ptx-node.token"
    token_file.write_text(TOKEN)
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": "ptx-node",
            "authorization": {"credentials_file": str(token_file)},
            "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}],
        }],
    }))
    log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(expr: str) -> list[dict]:
        try:
            answer = httpx.get(f"{api}/query?query={urllib.parse.quote(expr)}", timeout=5).json()
        except httpx.HTTPError:
            return []
        return answer.get("data", {}).get("result", [])

    try:
        wait_until(lambda: any(r["value"][1] == "1" for r in query('up{job="ptx-node"}')), 120,
                   what="Prometheus to scrape the node")
        received = query('ptx_jobs_received_total{job="ptx-node"}')
        assert [r["value"][1] for r in received] == ["2"], received
        wait_until(lambda: query("ALERTS") is not None and _rules_evaluated(api), 60, what="rules to evaluate")

        # No worker reported, two images wait: the "no worker can serve" alert goes pending at
        # the first evaluation that sees the scraped series (a rule can be healthy before that).
        def alerts() -> list[dict]:
            return httpx.get(f"{api}/alerts", timeout=5).json()["data"]["alerts"]

        try:
            wait_until(lambda: any(a["labels"]["alertname"] == "PtxNoWorkerCanServe" for a in alerts()), 60,
                       what="the PtxNoWorkerCanServe alert")
        except AssertionError:
            raise AssertionError(f"alert not pending; alerts: {alerts()}; "
                                 f"serving: {query('ptx_workers_serving')}; queue: {query('ptx_queue_depth')}") from None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _rules_evaluated(api: str) -> bool:
    groups = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    return bool(rules) and all(rule["health"] == "ok" for rule in rules)


def test_status_page_flags_a_worker_whose_settings_differ(config: NodeConfig, server: HttpServerHandle) -> None:
    other = load_config(None, environ={"PTX_NODE_DELIVERY__MAX_ATTEMPTS": "1"})
    with get_sessionmaker(config.database_url)() as session:
        session.add(WorkerRecord(name="same:1", device="cpu", last_seen=utcnow(),
                                 settings_digest=config.shared_settings_digest()))
        session.add(WorkerRecord(name="stale:2", device="cpu", last_seen=utcnow(),
                                 settings_digest=other.shared_settings_digest()))
        session.commit()
    page = httpx.get(server.url + "/", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).text
    rows = dict(re.findall(r'<tr data-worker="([^"]+)">(.*?)</tr>', page))
    assert "same as node" in rows["same:1"] and "DIFFERENT" not in rows["same:1"]
    assert "DIFFERENT from the node" in rows["stale:2"]
    assert "No worker can serve" not in page

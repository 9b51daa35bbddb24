"""A real Prometheus (Debian package; `make system-deps`) scraping a real service on the shipped models: the
target is up, promtool accepts the exposition and the compose config, PromQL over the batch-size histogram
returns data, and every query of the Grafana dashboard parses and runs (with data where the traffic made some).
The same live service also runs the Docker image's HEALTHCHECK command.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import (
    REPO,
    SHIPPED_STORE,
    dashboard_exprs,
    free_port,
    require_tool,
    server_process,
    stop_process,
    wait_http,
)

# Grafana's built-in variables, as Grafana would fill them in for a 1 s scrape interval.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
ZERO_IMAGE = [[0] * 28 for _ in range(28)]


def test_promtool_accepts_the_compose_prometheus_config():
    promtool = require_tool("promtool")
    proc = subprocess.run([promtool, "check", "config", str(REPO / "deploy" / "prometheus" / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    log = tmp_path_factory.mktemp("service") / "service.log"
    with server_process(SHIPPED_STORE, log, timeout_s=180, intra_op_threads="1") as (base, _proc):
        yield base


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory):
    """Prometheus on a free loopback port, scraping the service every second; stopped in teardown."""
    binary = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "genserve", "static_configs": [{"targets": [service.split("//")[1]]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    base, log = f"http://127.0.0.1:{free_port()}", tmp / "prometheus.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address={base[7:]}",
                                 "--log.level=warn"], stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
                                start_new_session=True)
    try:
        wait_http(base + "/-/ready", proc, log, timeout_s=60)
        deadline = time.monotonic() + 60
        while not target_up(base):                               # bounded: 60 s
            assert time.monotonic() < deadline, f"target never up: {targets(base)}\n{log.read_text()}"
            assert proc.poll() is None, log.read_text()
            time.sleep(0.25)
        yield base
    finally:
        stop_process(proc)


def targets(base: str) -> list[dict]:
    return httpx.get(base + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]


def target_up(base: str) -> bool:
    return any(t["labels"]["job"] == "genserve" and t["health"] == "up" for t in targets(base))


def query(base: str, promql: str) -> dict:
    """One instant query through the HTTP API; its JSON answer (status "success" or "error")."""
    return httpx.post(base + "/api/v1/query", data={"query": promql}, timeout=10).json()


@pytest.fixture(scope="module")
def traffic(service, prometheus):
    """A few requests of each kind, errors included, once Prometheus scrapes; then waits (bounded) until
    Prometheus holds the final counts and two more scrapes, so that rate() over them has data."""
    with httpx.Client(base_url=service, timeout=60) as c:
        for i in range(6):
            assert c.post("/v1/gan/sample", json={"n": 2, "seed": i}).status_code == 200
        for _ in range(3):
            assert c.post("/v1/pixelcnn/logprob", json={"images": [ZERO_IMAGE]}).status_code == 200
        assert c.post("/v1/pixelcnn/sample", json={"n": 1, "seed": 1}).status_code == 200
        assert c.post("/v1/vae/sample", json={"n": 1, "seed": 1}).status_code == 200
        assert c.post("/v1/gan/sample", json={"n": "three"}).status_code == 422
        assert c.get("/v1/models/nonexistent").status_code == 404
    sent = 7                                                     # POST /v1/gan/sample, 200s and the 422
    deadline = time.monotonic() + 30
    while True:                                                  # bounded: 30 s
        result = query(prometheus, 'sum(genserve_http_requests_total{route="/v1/gan/sample"})')["data"]["result"]
        if result and float(result[0]["value"][1]) == sent:
            break
        assert time.monotonic() < deadline, f"Prometheus never saw the {sent} requests: {result}"
        time.sleep(0.25)
    time.sleep(2.5)
    return httpx.get(service + "/metrics", timeout=10).text


@pytest.mark.slow
def test_target_is_up(prometheus):
    [target] = [t for t in targets(prometheus) if t["labels"]["job"] == "genserve"]
    assert target["health"] == "up" and target["scrapeUrl"].endswith("/metrics"), target


@pytest.mark.slow
def test_promtool_accepts_the_exposition(traffic):
    promtool = require_tool("promtool")
    proc = subprocess.run([promtool, "check", "metrics"], input=traffic, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr


@pytest.mark.slow
def test_batch_size_histogram_answers_promql(prometheus, traffic):
    answer = query(prometheus, "sum by (model, graph) (genserve_batch_size_count)")
    assert answer["status"] == "success", answer
    batches = {(r["metric"]["model"], r["metric"]["graph"]): float(r["value"][1]) for r in answer["data"]["result"]}
    assert batches[("gan", "generator")] >= 1 and batches[("pixelcnn", "logprob")] >= 1, batches
    items = query(prometheus, 'sum(genserve_batch_size_sum{model="gan", graph="generator"})')["data"]["result"]
    assert float(items[0]["value"][1]) == 6 * 2                  # every generated image went through a batch
    median = query(prometheus, "histogram_quantile(0.5, sum by (le, model, graph) "
                               "(rate(genserve_batch_size_bucket[1m])))")
    assert median["status"] == "success" and median["data"]["result"], median


def substitute(expr: str) -> str:
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr!r}: add it to the test"
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


@pytest.mark.slow
def test_every_dashboard_query_runs(prometheus, traffic):
    exposed = {s.name for f in text_string_to_metric_families(traffic) for s in f.samples}
    exprs = dashboard_exprs()
    with_data = 0
    for expr in exprs:
        promql = substitute(expr)
        answer = query(prometheus, promql)
        assert answer["status"] == "success", f"{promql}: {answer.get('error')}"
        names = set(re.findall(r"\b(genserve_\w+)", promql))
        if names <= exposed:                                     # every series it reads exists after the traffic
            assert answer["data"]["result"], f"no data for {promql}"
            with_data += 1
    assert with_data >= len(exprs) - 1, "only the rejections panel may lack data (nothing was rejected)"


@pytest.mark.slow
def test_image_healthcheck_command_against_a_live_service(service):
    dockerfile = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    [line] = [ln for ln in dockerfile.splitlines() if ln.startswith("HEALTHCHECK ")]
    command = json.loads(line.split(" CMD ", 1)[1])
    assert command[0] == "python"

    def run(port: str) -> int:
        env = {**os.environ, "GENSERVE_PORT": port}
        return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode

    assert run(service.rsplit(":", 1)[1]) == 0
    assert run(str(free_port())) != 0                            # nothing listens there

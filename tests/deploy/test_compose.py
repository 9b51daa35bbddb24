"""docker-compose.yml validated by the real docker-compose (v1, `make system-deps`), with and without the GPU
profile, and the Prometheus / Grafana files it mounts checked against it and against each other (promtool and
a live Prometheus: test_prometheus.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import yaml

from tests.deploy.conftest import DASHBOARD, REPO, dashboard_exprs, require_tool

DEPLOY = REPO / "deploy"


def compose_config(*options: str) -> dict:
    """`docker-compose [options] config`: validates the file (no engine needed) and prints it resolved."""
    binary = require_tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "GENSERVE_", "GRAFANA_"))}
    proc = subprocess.run([binary, "--project-directory", str(REPO), "-f", str(REPO / "docker-compose.yml"),
                           *options, "config"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def default():
    return compose_config()


@pytest.fixture(scope="module")
def gpu():
    return compose_config("--profile", "gpu")


def active(config: dict, profiles: set[str]) -> set[str]:
    return {n for n, s in config["services"].items() if not s.get("profiles") or set(s["profiles"]) & profiles}


def test_profiles_select_cpu_by_default_and_a_gpu_service_on_demand(default, gpu):
    assert active(default, set()) == {"genserve", "prometheus", "grafana"}
    assert active(gpu, {"gpu"}) == {"genserve", "genserve-gpu", "prometheus", "grafana"}
    cpu_svc, gpu_svc = gpu["services"]["genserve"], gpu["services"]["genserve-gpu"]
    assert cpu_svc["environment"]["GENSERVE_PROVIDERS"] == "cpu"
    assert gpu_svc["environment"]["GENSERVE_PROVIDERS"] == "cuda"
    devices = gpu_svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in cpu_svc
    assert cpu_svc["image"] == gpu_svc["image"], "one image serves both (the CUDA libraries are in it)"


def test_images_are_pinned(gpu):
    for name, svc in gpu["services"].items():
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), f"{name}: pin the tag of {image}"


def test_every_mounted_file_exists(default, gpu):
    mounted = []
    for config in (default, gpu):
        for svc in config["services"].values():
            for volume in svc.get("volumes", []):
                source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
                if source.startswith("/"):                       # a bind mount (the rest are named volumes)
                    mounted.append(source)
        for svc in config["services"].values():
            if "build" in svc:
                assert (REPO / "Dockerfile").exists() and os.path.samefile(svc["build"]["context"], REPO)
    assert mounted
    for source in mounted:
        assert os.path.exists(source), f"docker-compose.yml mounts {source}, which does not exist"
    assert any(s.endswith("prometheus.yml") for s in mounted)


def test_healthchecks_and_dependencies(default):
    services = default["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    # genserve's healthcheck is the image's own (HEALTHCHECK on /readyz), which compose uses as it is.
    assert "healthcheck" not in services["genserve"]
    assert re.search(r"^HEALTHCHECK .*/readyz", (REPO / "Dockerfile").read_text().replace("\\\n", ""), re.M)


def mounts(service: dict) -> dict[str, str]:
    """Container path -> host path of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        if parts[0].startswith("/"):
            out[parts[1]] = parts[0]
    return out


def test_prometheus_scrapes_the_compose_services(gpu):
    prom = gpu["services"]["prometheus"]
    config_flag = next(c for c in prom["command"] if c.startswith("--config.file="))
    host_file = mounts(prom)[config_flag.split("=", 1)[1]]
    config = yaml.safe_load(open(host_file))
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "genserve")
    sd = job["dns_sd_configs"][0]
    genserve_services = {n for n, s in gpu["services"].items() if s["image"].startswith("genserve:")}
    assert set(sd["names"]) == genserve_services
    assert sd["port"] == 8000 and job.get("metrics_path", "/metrics") == "/metrics"
    assert all(p["target"] == 8000 for n in genserve_services for p in gpu["services"][n]["ports"])


def test_grafana_provisioning_fits_together(default):
    grafana = default["services"]["grafana"]
    m = mounts(grafana)
    datasources = yaml.safe_load(open(os.path.join(m["/etc/grafana/provisioning/datasources"], "prometheus.yml")))
    providers = yaml.safe_load(open(os.path.join(m["/etc/grafana/provisioning/dashboards"], "genserve.yml")))
    ds = datasources["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    prom_config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert ds["jsonData"]["timeInterval"] == prom_config["global"]["scrape_interval"]
    path = providers["providers"][0]["options"]["path"]
    assert path in m and os.path.samefile(m[path], DASHBOARD.parent)
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/{DASHBOARD.name}"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    uids |= {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {ds["uid"]}, "every panel queries the provisioned datasource"


def test_dashboard_shows_what_operations_need():
    exprs = dashboard_exprs()

    def has(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert has(r"rate\(genserve_http_requests_total\[")                                   # request rate
    for q in ("0.5", "0.9", "0.99"):                                                       # latency percentiles
        assert has(rf"histogram_quantile\({q}, sum by \(le\) \(rate\(genserve_http_request_duration_seconds_bucket")
    assert has(r"genserve_batch_size_(bucket|sum)")                                         # batch size
    assert has(r"genserve_queue_depth")                                                     # queue depth
    assert has(r'genserve_http_requests_total\{status!~"2\.\."\}')                          # errors (non-2xx)

"""deploy/k8s: every manifest validates against the Kubernetes schemas (strict, offline), and the manifests agree
with each other and with the service (labels, targets, ports, probe paths, settings, drain time)."""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from starlette.routing import Match

import service
from service.app import create_app
from service.settings import Settings
from tests.conftest import documented_memory_mib
from tests.deploy.conftest import REPO

K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"      # pinned: kubernetes-validate ships this schema, so validation is offline
SHUTDOWN_MARGIN_S = 10              # lifespan shutdown after the last request: batchers and thread pool stop


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomize(directory: Path) -> list[dict]:
    """The resources a kustomization renders, for the features used here: `resources` (files or directories)
    and JSON 6902 `patches` with a target kind and name."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for entry in k.get("resources", []):
        p = (directory / entry).resolve()
        docs += kustomize(p) if p.is_dir() else load_all(p)
    for patch in k.get("patches", []):
        ops, target = yaml.safe_load((directory / patch["path"]).read_text()), patch["target"]
        hits = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert len(hits) == 1, f"patch {patch['path']} targets {target}, found {len(hits)}"
        idx = docs.index(hits[0])
        docs[idx] = json_patch(docs[idx], ops)
    return docs


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 test/add/replace/remove, enough to render the overlays as kustomize does."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        key = (len(node) if last == "-" else int(last)) if isinstance(node, list) else last
        if op["op"] == "test":
            assert node[key] == op["value"], f"patch test failed at {op['path']}: {node[key]!r} != {op['value']!r}"
        elif op["op"] == "add" and isinstance(node, list):
            node.insert(key, op["value"])
        elif op["op"] in ("add", "replace"):
            assert op["op"] == "add" or key in node, f"replace of a missing path {op['path']}"
            node[key] = op["value"]
        elif op["op"] == "remove":
            del node[key]
        else:
            raise AssertionError(f"unsupported patch op {op}")
    return doc


BASE = kustomize(K8S / "base")
GPU = kustomize(K8S / "gpu")


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(docs: list[dict]) -> dict:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(docs: list[dict]) -> dict[str, str]:
    """The container's plain variables; those from a Secret are secret_refs_of's."""
    return {e["name"]: e["value"] for e in container(docs)["env"] if "valueFrom" not in e}


def secret_refs_of(docs: list[dict]) -> dict[str, dict]:
    """name -> secretKeyRef of each variable the container takes from a Secret."""
    env = container(docs)["env"]
    assert all("value" in e or set(e["valueFrom"]) == {"secretKeyRef"} for e in env), "a value or a secret key"
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}


def settings_from(env: dict[str, str], monkeypatch) -> Settings:
    for name in [n for n in os.environ if n.startswith("GENSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def container_port(docs: list[dict], port: int | str) -> int:
    """A port by number or by name, resolved against the container's declared ports."""
    ports = {p.get("name"): p["containerPort"] for p in container(docs)["ports"]}
    if isinstance(port, str) and not port.isdigit():
        assert port in ports, f"port name {port!r} is not declared by the container ({ports})"
        return ports[port]
    assert int(port) in ports.values(), f"port {port} is not declared by the container ({ports})"
    return int(port)


def answers_get(path: str) -> bool:
    """Whether the app routes GET path to a handler, asked through Starlette's own matching (FastAPI nests
    included routers, so a flat list of routes would miss them)."""
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": [], "app": APP}
    return any(r.matches(scope)[0] == Match.FULL for r in APP.router.routes)


APP = create_app(Settings())


@pytest.mark.parametrize("path", sorted(K8S.rglob("*.yaml")), ids=lambda p: str(p.relative_to(K8S)))
def test_every_file_is_part_of_a_kustomization(path: Path):
    """A manifest nobody references would never be applied, and one not validated here could be invalid."""
    k = yaml.safe_load((path.parent / "kustomization.yaml").read_text())
    referenced = {"kustomization.yaml", *k.get("resources", []), *(p["path"] for p in k.get("patches", []))}
    assert path.name in referenced, f"{path} is not listed in {path.parent / 'kustomization.yaml'}"


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_manifests_validate_strictly(variant: str):
    docs = {"base": BASE, "gpu": GPU}[variant]
    assert sorted(d["kind"] for d in docs) == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                               "Service"]
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{variant} {doc['kind']}: {'.'.join(map(str, e.path))}: {e.message}")


def test_validation_is_strict():
    """The check above means something: an unknown field and a wrong type are both refused."""
    bad = copy.deepcopy(one(BASE, "Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
    bad = copy.deepcopy(one(BASE, "Service"))
    bad["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("docs", [BASE, GPU], ids=["base", "gpu"])
def test_selectors_and_targets_agree(docs):
    deploy, svc = one(docs, "Deployment"), one(docs, "Service")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    selectors = {"Deployment": deploy["spec"]["selector"]["matchLabels"], "Service": svc["spec"]["selector"],
                 "PodDisruptionBudget": one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]}
    for kind, sel in selectors.items():
        assert sel and sel.items() <= pod_labels.items(), f"{kind} selector {sel} does not match pods {pod_labels}"
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deploy["metadata"]["name"]}
    for port in svc["spec"]["ports"]:
        container_port(docs, port["targetPort"])


def test_autoscaling_and_disruption_budget_fit_together():
    hpa, pdb = one(BASE, "HorizontalPodAutoscaler")["spec"], one(BASE, "PodDisruptionBudget")["spec"]
    cpu = [m for m in hpa["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in container(BASE)["resources"]["requests"], "CPU utilisation is relative to the CPU request"
    assert "replicas" not in one(BASE, "Deployment")["spec"], "the HPA owns the replica count"
    # A budget that allows no eviction at the minimum scale would block every node drain.
    assert isinstance(pdb["minAvailable"], int) and pdb["minAvailable"] < hpa["minReplicas"] <= hpa["maxReplicas"]


def test_probes_and_scrape_annotations_point_at_real_routes():
    c = container(BASE)
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz" and probes["readinessProbe"]["path"] == "/readyz"
    for name, probe in probes.items():
        assert answers_get(probe["path"]), f"{name} path {probe['path']} is not a GET route of the app"
        container_port(BASE, probe["port"])
    ann = one(BASE, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and answers_get(ann["prometheus.io/path"])
    container_port(BASE, int(ann["prometheus.io/port"]))


def mib(quantity: str) -> float:
    """A Kubernetes memory quantity (binary or decimal suffix, or none) in MiB."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "": 1}
    number, unit = re.fullmatch(r"([\d.]+)([KMGT]i?|k)?", quantity).groups()
    return float(number) * units[unit or ""] / 2**20


def test_memory_requests_and_limits_come_from_the_measured_figures():
    """The CPU pod's memory request covers the README's measured RSS under load (at the load run's last answer,
    and more than after warm-up); its limit is at least 1.25x the load run's peak, so a pod is not OOM-killed at
    the peak the benchmark measured. The GPU overlay asks for more of both (CUDA's libraries)."""
    documented = documented_memory_mib()
    base, gpu = container(BASE)["resources"], container(GPU)["resources"]
    request, limit = mib(base["requests"]["memory"]), mib(base["limits"]["memory"])
    assert request >= max(documented["load_end"], documented["after_load"], documented["after_warmup"],
                          documented["after_idle"])
    assert limit >= 1.25 * documented["load_peak"] and limit >= request
    assert request < 2 * documented["load_peak"], "a request far above what the pod uses wastes the node"
    assert mib(gpu["requests"]["memory"]) >= request and mib(gpu["limits"]["memory"]) >= mib(gpu["requests"]["memory"])
    assert mib("1Gi") == 1024 and mib("512Mi") == 512 and mib("1G") == pytest.approx(953.67, abs=0.01)


@pytest.mark.parametrize("docs", [BASE, GPU], ids=["base", "gpu"])
def test_environment_is_valid_settings_matching_the_pod(docs, monkeypatch):
    env = env_of(docs)
    fields = {f"GENSERVE_{name.upper()}" for name in Settings.model_fields}
    unknown = {n for n in [*env, *secret_refs_of(docs)] if n.split("__")[0] not in fields}
    assert not unknown, f"not settings (pydantic-settings would ignore them silently): {sorted(unknown)}"
    s = settings_from(env, monkeypatch)
    assert s.host == "0.0.0.0", "listening on loopback only, the pod would be unreachable"
    assert container_port(docs, s.port) == s.port
    assert s.workers == 1
    cpu_limit = float(container(docs)["resources"]["limits"]["cpu"])
    assert 1 <= s.intra_op_threads <= cpu_limit, "0 (one thread per node core) oversubscribes the CPU limit"


@pytest.mark.parametrize("docs", [BASE, GPU], ids=["base", "gpu"])
def test_credentials_come_from_an_optional_secret_kept_out_of_git(docs, monkeypatch):
    refs = secret_refs_of(docs)
    assert set(refs) == {"GENSERVE_ADMIN_TOKEN", "GENSERVE_API_KEYS"}
    assert {r["name"] for r in refs.values()} == {"genserve-auth"}
    assert all(r["optional"] is True for r in refs.values()), "without the Secret the pod must still start"
    assert not [d for d in docs if d["kind"] == "Secret"], "a Secret's values do not belong in git"
    without = settings_from(env_of(docs), monkeypatch)              # no Secret: both off
    assert without.admin_token is None and without.api_keys is None
    # what the manifest's `kubectl create secret` command puts in the Secret makes valid settings
    token, key = secrets.token_hex(32), secrets.token_hex(16)
    with_secret = settings_from({**env_of(docs), "GENSERVE_ADMIN_TOKEN": token, "GENSERVE_API_KEYS": json.dumps([key])},
                                monkeypatch)
    assert with_secret.admin_token.get_secret_value() == token
    assert [k.get_secret_value() for k in with_secret.api_keys] == [key]
    comment = (K8S / "base" / "deployment.yaml").read_text()
    assert "kubectl create secret generic genserve-auth" in comment
    assert all(f"--from-literal={r['key']}=" in comment for r in refs.values())


def test_grace_period_covers_the_drain(monkeypatch):
    """SIGTERM comes after the preStop hook; uvicorn then finishes every accepted request, which can run until
    its deadline (request_timeout_s, or sample_timeout_s for PixelCNN sampling), then the batchers stop."""
    s = settings_from(env_of(BASE), monkeypatch)
    pod = one(BASE, "Deployment")["spec"]["template"]["spec"]
    command = container(BASE)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = pre_stop + max(s.request_timeout_s, s.sample_timeout_s) + SHUTDOWN_MARGIN_S
    assert pod["terminationGracePeriodSeconds"] >= drain, f"grace period below the drain time {drain:.0f} s"
    assert pre_stop >= 5, "too short for the endpoint removal to reach kube-proxy and ingresses"


def test_security_context_is_non_root_and_matches_the_image():
    pod = one(BASE, "Deployment")["spec"]["template"]["spec"]
    c = container(BASE)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # the same pinned tag as compose builds: genserve:<the package version>
    assert c["image"] == f"genserve:{service.__version__}"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert compose["services"]["genserve"]["image"] == c["image"]
    dockerfile = (REPO / "Dockerfile").read_text()
    uid = re.search(r"useradd[^\n]*--uid\s+(\d+)|^USER\s+(\d+)", dockerfile, re.M)
    assert uid, "the Dockerfile declares no numeric uid for runAsUser to match"
    assert pod["securityContext"]["runAsUser"] == int(uid.group(1) or uid.group(2))


def test_gpu_overlay_asks_for_one_gpu_and_cuda():
    c, env = container(GPU), env_of(GPU)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env["GENSERVE_PROVIDERS"] == "cuda" and env_of(BASE)["GENSERVE_PROVIDERS"] == "cpu"
    tolerations = one(GPU, "Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    # Everything else is the base: the overlay changes only what a GPU needs.
    strip = {"GENSERVE_PROVIDERS", "nvidia.com/gpu", "memory", "tolerations"}

    def without(doc):
        if isinstance(doc, dict):
            return {k: without(v) for k, v in doc.items() if k not in strip}
        if isinstance(doc, list):
            return [without(v) for v in doc if not (isinstance(v, dict) and v.get("name") in strip)]
        return doc

    assert without(GPU) == without(BASE)

"""deploy/nginx: the shipped config, rendered, in a real nginx in front of two real replicas of the service
(shipped models_store/). Requests through nginx reach both replicas and come back correct, with a request id."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from genserve_client.client import _EventParser
from service.imaging import decode_images
from tests.deploy.conftest import (
    REPO,
    SHIPPED_STORE,
    free_port,
    require_tool,
    scrape,
    server_process,
    stop_process,
    wait_http,
)

pytestmark = pytest.mark.slow

TEMPLATE = REPO / "deploy" / "nginx" / "genserve.conf.template"
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")        # envsubst's syntax; nginx's own $vars have no braces
# Two replicas share two cores with nginx and pytest: one ONNX Runtime thread each, no warm-up.
REPLICA_SETTINGS = {"warmup": "false", "intra_op_threads": "1", "worker_threads": "1"}


def render(values: dict[str, str]) -> str:
    """What `envsubst '<the placeholders>'` does with the template; every placeholder must get a value."""
    text = TEMPLATE.read_text()
    assert set(PLACEHOLDER.findall(text)) == set(values), "the template's placeholders changed"
    return PLACEHOLDER.sub(lambda m: values[m[1]], text)


@dataclass
class Stack:
    proxy: str                                  # nginx's base URL
    replicas: list[tuple[str, subprocess.Popen]]
    state: Path                                 # nginx's pid, logs and temp files

    def access_log(self) -> str:
        return (self.state / "access.log").read_text()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    nginx = require_tool("nginx")                           # fails (never skips) naming `make system-deps`
    logs = tmp_path_factory.mktemp("nginx-stack")
    # nginx started as root hands its workers to `nobody`, who must reach the temp paths: so a world-searchable
    # directory outside pytest's private (0700) tree.
    state = Path(tempfile.mkdtemp(prefix="genserve-nginx-"))
    state.chmod(0o755)
    with contextlib.ExitStack() as stop:                      # unwinds in reverse: nginx, replicas, directory
        stop.callback(shutil.rmtree, state, ignore_errors=True)
        replicas = [stop.enter_context(server_process(SHIPPED_STORE, logs / f"replica{i}.log",
                                                      **REPLICA_SETTINGS)) for i in (1, 2)]
        port = free_port()
        conf = state / "nginx.conf"
        conf.write_text(render({"NGINX_LISTEN": f"127.0.0.1:{port}", "NGINX_STATE_DIR": str(state),
                                "GENSERVE_REPLICA_1": replicas[0][0].removeprefix("http://"),
                                "GENSERVE_REPLICA_2": replicas[1][0].removeprefix("http://")}))
        error_log = state / "error.log"
        error_log.touch()
        with open(logs / "nginx.out", "w") as out:
            proc = subprocess.Popen([nginx, "-p", str(state), "-c", str(conf), "-e", str(error_log),
                                     "-g", "daemon off;"], stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)   # the group: stop_process reaches nginx's workers
        stop.callback(stop_process, proc)
        proxy = f"http://127.0.0.1:{port}"
        wait_http(proxy + "/healthz", proc, error_log)
        yield Stack(proxy, replicas, state)


def gan_request(i: int) -> dict:
    return {"n": 2, "seed": 100 + i, "labels": [i % 10, (i + 3) % 10]}


def served(replica: str) -> float:
    """Successful /v1/gan/sample requests this replica has answered, from its own /metrics."""
    text = httpx.get(replica + "/metrics", timeout=10).text
    return scrape(text, "genserve_http_requests_total", route="/v1/gan/sample", status="200")


def test_documented_envsubst_command_names_every_placeholder():
    text = TEMPLATE.read_text()
    documented = re.search(r"envsubst '([^']*)'", text)
    assert documented, "the template's header shows how to render it"
    config = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert set(PLACEHOLDER.findall(documented[1])) == set(PLACEHOLDER.findall(config))


def test_both_replicas_serve_and_answers_are_correct(stack):
    replicas = [base for base, _ in stack.replicas]
    before = [served(r) for r in replicas]
    n = 10
    answers = []
    with httpx.Client(base_url=stack.proxy, timeout=30) as c:
        for i in range(n):
            rid = f"nginx-test-{i}"
            r = c.post("/v1/gan/sample", json=gan_request(i), headers={"X-Request-ID": rid})
            assert r.status_code == 200, r.text
            assert r.headers["x-request-id"] == rid, "nginx passes the client's request id through"
            answers.append(r.json())
    counts = [served(r) - b for r, b in zip(replicas, before, strict=True)]
    assert sum(counts) == n and min(counts) >= 1, f"requests per replica: {counts}"

    # The access log names the replica that answered each request id: both appear.
    upstreams = dict(re.findall(r"rid=(nginx-test-\d+) upstream=(\S+)", stack.access_log()))
    assert set(upstreams) == {f"nginx-test-{i}" for i in range(n)}
    assert set(upstreams.values()) == {r.removeprefix("http://") for r in replicas}

    # Correct: the same request sent straight to one replica gives the same answer (same seed, same model).
    for i, body in enumerate(answers):
        assert body == httpx.post(replicas[0] + "/v1/gan/sample", json=gan_request(i), timeout=30).json()
        assert (body["model"], body["seed"], body["labels"]) == ("gan", 100 + i, gan_request(i)["labels"])
        images = decode_images(body["images"])
        assert images.shape == (2, 28, 28) and images.dtype == np.uint8 and images.max() > 0


def test_large_response_passes_intact(stack):
    """256 images as arrays: about 480 kB, far beyond nginx's in-memory proxy buffers (8 x 4 kB)."""
    r = httpx.post(stack.proxy + "/v1/gan/sample", json={"n": 256, "seed": 5, "format": "array"}, timeout=60)
    assert r.status_code == 200, r.text
    images = np.asarray(r.json()["images"])
    assert images.shape == (256, 28, 28) and 0 <= images.min() and images.max() <= 255


def test_request_id_is_generated_when_absent(stack):
    r = httpx.get(stack.proxy + "/v1/vae/attributes", timeout=10)
    assert r.status_code == 200 and [a["name"] for a in r.json()["attributes"]] == ["thickness", "slant"]
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_service_errors_pass_through_and_metrics_stay_private(stack):
    r = httpx.post(stack.proxy + "/v1/gan/sample", json={"n": "3"}, timeout=10)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_request" and r.json()["error"]["fields"][0]["field"] == "n"
    r = httpx.get(stack.proxy + "/metrics", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_sample_events_pass_unbuffered(stack):
    """A streamed PixelCNN sample through nginx: its first progress event reaches the client while a replica still
    has the request in flight (so nginx did not hold the stream until the end), more progress follows, and the
    result is the plain answer of a replica for the same seed."""
    replicas = [base for base, _ in stack.replicas]
    body = {"n": 4, "seed": 2, "labels": 6}
    parser, events, inflight = _EventParser(), [], []
    with httpx.stream("POST", stack.proxy + "/v1/pixelcnn/sample", json=body,
                      headers={"accept": "text/event-stream"}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if (event := parser.feed(line)) is None:
                continue
            if not events:
                inflight.append(sum(inflight_requests(replica) for replica in replicas))
            events.append((event[0], json.loads(event[1])))
    names = [name for name, _ in events]
    assert inflight == [1], "the first event arrived only once the replica had answered in full"
    assert names[-1] == "result" and names.count("progress") >= 2 and set(names[:-1]) == {"progress"}
    assert events[-1][1] == httpx.post(replicas[0] + "/v1/pixelcnn/sample", json=body, timeout=120).json()


def inflight_requests(replica: str) -> float:
    text = httpx.get(replica + "/metrics", timeout=10).text
    return sum(float(line.split()[1]) for line in text.splitlines() if line.startswith("genserve_inflight_requests "))


def test_zz_failover_then_unavailable(stack):
    """Runs last (it stops the replicas): with one replica gone every request still succeeds; with both gone
    nginx answers 502 in the service's JSON error format."""
    (first, first_proc), (_, second_proc) = stack.replicas
    stop_process(second_proc)
    with httpx.Client(base_url=stack.proxy, timeout=30) as c:
        for i in range(4):
            r = c.post("/v1/gan/sample", json=gan_request(i))
            assert r.status_code == 200, r.text
            assert r.json() == httpx.post(first + "/v1/gan/sample", json=gan_request(i), timeout=30).json()
        stop_process(first_proc)
        r = c.post("/v1/gan/sample", json=gan_request(0), headers={"X-Request-ID": "down"})
    assert r.status_code == 502 and r.headers["x-request-id"] == "down"
    assert r.json()["error"]["code"] == "upstream_unavailable"

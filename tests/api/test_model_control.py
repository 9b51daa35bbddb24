"""Model control on real server processes, under load: 8 clients send GAN requests without pause while versions
are loaded through tritonclient, traffic is split and promoted, a broken version is refused, the VAE is unloaded
and loaded again, and (poll mode) versions appear and vanish on disk. No GAN request may fail. With two workers, a
change reaches both, through the store (poll mode) or through the one worker that received it."""

from __future__ import annotations

import collections
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.control import ControlFolder
from service.repository import WATCH_INTERVAL_S
from tests.api.conftest import server_process, wait_for
from tests.api.test_server_process import scrape
from tests.conftest import REPO, copy_version

pytestmark = pytest.mark.slow
CLIENTS = 8
TOKEN = "admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


class Load:
    """CLIENTS threads posting /v1/gan/sample until stopped; each answer's (time, status, version) is kept."""

    def __init__(self, base: str):
        self.base, self.stop, self.answers = base, threading.Event(), []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def _client(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as http:
            while not self.stop.is_set():
                try:
                    r = http.post("/v1/gan/sample", json={"n": 1, "format": "array"})
                    answer = (time.monotonic(), r.status_code, r.json().get("model_version"))
                except (httpx.HTTPError, ValueError) as e:
                    answer = (time.monotonic(), repr(e), None)
                with self.lock:
                    self.answers.append(answer)

    def since(self, t0: float) -> list[tuple]:
        with self.lock:
            return [a for a in self.answers if a[0] >= t0]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


@pytest.fixture
def store(tmp_path) -> Path:
    for model in ("gan", "vae"):
        shutil.copytree(REPO / "models_store" / model, tmp_path / "store" / model)
    return tmp_path / "store"


def test_versions_change_under_load_and_no_request_fails(store, tmp_path, record_property):
    with server_process(store, tmp_path / "server.log", providers="cpu", drain_grace_s="1",
                        admin_token=TOKEN) as (base, _):
        triton_client = triton.InferenceServerClient(url=base.removeprefix("http://"))
        http = httpx.Client(base_url=base, timeout=60)
        for headers, status in (({}, 401), ({"Authorization": "Bearer not-the-admin-token-at-all"}, 401)):
            r = http.post("/v2/repository/models/gan/load", headers=headers)
            assert r.status_code == status and "Bearer" in r.headers["www-authenticate"], r.text
        r = http.put("/v1/models/gan/traffic", json={"1": 100}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        with Load(base) as load:
            wait_for("the clients to start", lambda: len(load.since(0)) > 50)

            copy_version(store, "gan", 1, 2)
            t0 = time.monotonic()
            triton_client.load_model("gan.generator", headers=ADMIN)        # as Triton's own client does it
            loaded_s = time.monotonic() - t0
            first_v2 = wait_for("version 2 answering", lambda: next((a[0] for a in load.since(t0) if a[2] == 2), None))
            assert http.get("/v1/models/gan").json()["versions"] == [1, 2]
            record_property("load_to_serving_s", round(first_v2 - t0, 3))
            record_property("load_call_s", round(loaded_s, 3))

            r = http.put("/v1/models/gan/traffic", json={"1": 50, "2": 50}, headers=ADMIN)
            assert r.status_code == 200, r.text
            t_split = time.monotonic()
            wait_for("400 answers under the split", lambda: len(load.since(t_split)) >= 400, 60)
            versions = collections.Counter(a[2] for a in load.since(t_split))
            share = versions[2] / (versions[1] + versions[2])
            assert abs(share - 0.5) < 0.08, versions                     # 400+ draws: 3 sd is about 0.075

            assert http.put("/v1/models/gan/traffic", json={"2": 100}, headers=ADMIN).status_code == 200
            t_promoted = time.monotonic()
            wait_for("answers after the promotion", lambda: len(load.since(t_promoted + 0.2)) >= 100)
            assert {a[2] for a in load.since(t_promoted + 0.2)} == {2}   # the next requests' choice is 2

            copy_version(store, "gan", 1, 3, truncate="generator.onnx")
            with pytest.raises(InferenceServerException, match="generator.onnx"):
                triton_client.load_model("gan", headers=ADMIN)
            assert http.get("/v1/models/gan").json()["versions"] == [1, 2]

            triton_client.unload_model("vae", headers=ADMIN)
            r = http.post("/v1/vae/sample", json={"n": 1})
            assert r.status_code == 404 and "unloaded" in r.json()["error"]["message"]
            assert http.get("/readyz").status_code == 200                # an unloaded model is not a missing one
            triton_client.load_model("vae", headers=ADMIN)
            assert http.post("/v1/vae/sample", json={"n": 1}).status_code == 200
            time.sleep(1.5)                                               # past the drain grace of what left
        answers = load.since(0)
        failed = [a for a in answers if a[1] != 200]
        record_property("gan_requests", len(answers))
        record_property("gan_failed", len(failed))
        assert not failed, failed[:5]
        assert len(answers) > 800


def test_without_an_admin_token_the_admin_routes_are_off(store, tmp_path):
    with server_process(store, tmp_path / "server.log", providers="cpu") as (base, _):
        for method, path, body in (("POST", "/v2/repository/models/gan/load", None),
                                   ("POST", "/v2/repository/models/gan/unload", None),
                                   ("PUT", "/v1/models/gan/traffic", {"1": 100})):
            r = httpx.request(method, base + path, json=body, headers=ADMIN)
            assert r.status_code == 403 and "GENSERVE_ADMIN_TOKEN" in r.text, r.text
        assert httpx.post(base + "/v1/gan/sample", json={}).status_code == 200


def test_poll_mode_picks_up_and_drains_versions_by_itself(store, tmp_path):
    with server_process(store, tmp_path / "server.log", providers="cpu", model_control="poll",
                        poll_interval_s="0.3", drain_grace_s="0.5") as (base, _):
        http = httpx.Client(base_url=base, timeout=60)
        with Load(base) as load:
            wait_for("the clients to start", lambda: len(load.since(0)) > 50)
            copy_version(store, "gan", 1, 2)
            wait_for("version 2 picked up", lambda: http.get("/v1/models/gan").json()["versions"] == [1, 2])
            t0 = time.monotonic()
            wait_for("version 2 answering", lambda: any(a[2] == 2 for a in load.since(t0)))
            shutil.rmtree(store / "gan" / "2")                            # removed from disk while it serves
            wait_for("version 2 dropped", lambda: http.get("/v1/models/gan").json()["versions"] == [1])
            t1 = time.monotonic()
            wait_for("answers after", lambda: len(load.since(t1 + 0.2)) >= 50)
            assert {a[2] for a in load.since(t1 + 0.2)} == {1}
            time.sleep(1.0)                                               # past its drain grace: released
        failed = [a for a in load.since(0) if a[1] != 200]
        assert not failed, failed[:5]
        r = http.post("/v2/repository/index")
        assert {(m["name"], m["version"]) for m in r.json()} >= {("gan.generator", "1")}


def workers_serving(base: str, model: str, version: int) -> float:
    """genserve_model_info sums over the live workers that serve a version, whichever worker answers the scrape: it
    does not depend on which worker accepts a connection, which the kernel decides."""
    return scrape(httpx.get(base + "/metrics", timeout=10).text, "genserve_model_info", model=model,
                  version=str(version))


def test_poll_mode_reaches_every_worker(store, tmp_path):
    """Each worker process has its own registry and rescans the store itself."""
    with server_process(store, tmp_path / "server.log", timeout_s=240, providers="cpu", workers="2",
                        intra_op_threads="1", model_control="poll", poll_interval_s="0.3") as (base, _):
        wait_for("both workers serving version 1", lambda: workers_serving(base, "gan", 1) == 2)
        copy_version(store, "gan", 1, 2)
        t0 = time.monotonic()
        wait_for(lambda: f"both workers serving version 2 (now {workers_serving(base, 'gan', 2):g})",
                 lambda: workers_serving(base, "gan", 2) == 2, timeout_s=30, every_s=0.02)
        took = time.monotonic() - t0
        assert httpx.get(base + "/readyz", timeout=10).json()["models"]["gan"] == [1, 2]
        assert took < 10, took


def test_a_change_through_one_worker_reaches_every_worker(store, tmp_path, record_property):
    """Two workers in explicit mode: a load through tritonclient, reaching one worker, has both serving the new
    version within seconds; so do a traffic split and an unload; a refused load goes no further than the worker
    it reached; a worker that dies is replaced by one that serves what the others serve. Each worker's state is
    read where it does not depend on which worker the kernel hands a connection: genserve_model_info (a sum over
    the workers) and each worker's record in the control folder."""
    control = ControlFolder(tmp_path / "control")   # this test's reader of the folder the server shares

    def records() -> list:
        return control.records()

    def gan_states() -> list[dict]:
        return [r.serving.get("gan") for r in records()]

    with server_process(store, tmp_path / "server.log", timeout_s=240, providers="cpu", workers="2",
                        intra_op_threads="1", admin_token=TOKEN, drain_grace_s="0.5",
                        control_dir=str(control.path)) as (base, proc):
        http = httpx.Client(base_url=base, timeout=60)
        wait_for("both workers started and caught up", lambda: len(records()) == 2 and all(
            r.generation == 0 for r in records()))
        assert workers_serving(base, "gan", 1) == 2

        copy_version(store, "gan", 1, 2)
        t0 = time.monotonic()
        triton.InferenceServerClient(url=base.removeprefix("http://")).load_model("gan", headers=ADMIN)
        load_call_s = time.monotonic() - t0
        wait_for(lambda: f"both workers serving version 2 (now {workers_serving(base, 'gan', 2):g})",
                 lambda: workers_serving(base, "gan", 2) == 2, timeout_s=10, every_s=0.02)
        both_s = time.monotonic() - t0
        record_property("load_call_s", round(load_call_s, 3))
        record_property("load_to_both_workers_s", round(both_s, 3))
        assert both_s < 5, both_s
        assert [s["versions"] for s in gan_states()] == [[1, 2], [1, 2]]

        r = http.post("/v2/repository/models/gan/load", headers=ADMIN)          # nothing new: both say so
        assert r.status_code == 200, r.text
        assert r.json() == {"model": "gan", "serving": [1, 2], "added": [], "removed": [],
                            "workers": {"applied": 2, "total": 2, "failed": []}}

        r = http.put("/v1/models/gan/traffic", json={"1": 30, "2": 70}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["workers"] == {"applied": 2, "total": 2, "failed": []}
        assert gan_states() == [{"versions": [1, 2], "traffic": {"1": 30.0, "2": 70.0}}] * 2

        r = http.post("/v2/repository/models/vae/unload", headers=ADMIN)
        assert r.status_code == 200 and r.json()["workers"] == {"applied": 2, "total": 2, "failed": []}, r.text
        assert workers_serving(base, "vae", 1) == 0
        assert all("vae" not in rec.serving for rec in records())

        generation = control.read().generation
        copy_version(store, "gan", 1, 3, truncate="generator.onnx")
        with pytest.raises(InferenceServerException, match="generator.onnx") as refused:
            triton.InferenceServerClient(url=base.removeprefix("http://")).load_model("gan", headers=ADMIN)
        assert refused.value.status() == "400"
        assert control.read().generation == generation                           # not published
        time.sleep(2 * WATCH_INTERVAL_S)
        assert workers_serving(base, "gan", 3) == 0 and workers_serving(base, "gan", 2) == 2
        assert [(r.generation, r.errors) for r in records()] == [(generation, {})] * 2

        # a worker killed outright: uvicorn starts another, which loads the store (gan 1, 2 and the broken 3,
        # the vae) and then applies the desired state: gan 1 and 2 at 30/70, no vae
        victim = records()[0].pid
        os.kill(victim, signal.SIGKILL)
        wait_for("a new worker caught up", lambda: len(recs := records()) == 2 and victim not in
                 {r.pid for r in recs} and all(r.generation == generation for r in recs), timeout_s=120)
        assert gan_states() == [{"versions": [1, 2], "traffic": {"1": 30.0, "2": 70.0}}] * 2
        wait_for("the dead worker's gauges withdrawn", lambda: workers_serving(base, "gan", 2) == 2)
        assert workers_serving(base, "vae", 1) == 0
        assert proc.poll() is None
